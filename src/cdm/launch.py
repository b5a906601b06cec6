"""`python -m cdm.launch <accelerate launch arguments>`: `accelerate launch`, whose failure is
the worker's own one-line error and exit code.

Plain `accelerate launch` follows a failed worker with its own ~30-line traceback (a
CalledProcessError, or torch elastic's ChildFailedError), burying the worker's `error:` line.
Here the launcher exits with the worker's code and prints nothing more; CDM_VERBOSE=1 keeps
accelerate's traceback. The workers tie their lives to this process (cdm.lifeline), so
killing it never leaves a worker writing checkpoints afterwards.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from cdm.lock import watch

    args = launch_command_parser().parse_args(argv)
    watch()  # the launcher, too, ends with its orchestrator (its workers then with it)
    verbose = os.environ.get("CDM_VERBOSE") == "1"
    if not verbose:  # torch elastic logs each failed rank as an ERROR record too
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as exc:
        if verbose:
            raise
        return exit_code(exc.returncode)
    except ChildFailedError as exc:
        if verbose:
            raise
        return exit_code(*(failure.exitcode for failure in exc.failures.values()))
    return 0


def exit_code(*codes: int) -> int:
    """The first failing worker's code; a worker killed by signal N exits 128 + N, as a shell
    reports it."""
    code = next((c for c in codes if c), 1)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
