"""`python -m cdm.launch <accelerate launch arguments>`: `accelerate launch`, whose failure is
the worker's own one-line error and exit code.

Plain `accelerate launch` follows a failed worker with its own ~30-line traceback (a
CalledProcessError, or torch elastic's ChildFailedError), burying the worker's `error:` line.
Here the launcher exits with the worker's code and prints nothing more; CDM_VERBOSE=1 keeps
accelerate's traceback. The workers tie their lives to this process (cdm.lifeline), so
killing it never leaves a worker writing checkpoints afterwards.

A leading `--nodes N` (distill.nodes; `--num_processes` then counts the GPUs of one node)
with N > 1 runs one such launcher per node of the SLURM allocation under srun (cdm.nodes).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys

from cdm.nodes import NodesError, require_allocation, split_nodes, srun_command


def main(argv: list[str] | None = None) -> int:
    try:
        nodes, argv = split_nodes(sys.argv[1:] if argv is None else argv)
        if nodes > 1:
            require_allocation(nodes)
            step = srun_command(nodes, argv)
    except NodesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if nodes > 1:
        print("+", shlex.join(step), file=sys.stderr, flush=True)  # the job log shows it
        code = subprocess.run(step).returncode
        return exit_code(code) if code else 0
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from cdm.lock import watch

    args = launch_command_parser().parse_args(argv)
    watch()  # the launcher, too, ends with its orchestrator (its workers then with it)
    verbose = os.environ.get("CDM_VERBOSE") == "1"
    if not verbose:  # torch elastic logs each failed rank (and a Ctrl-C) as records too
        quiet("torch.distributed.elastic")
    try:
        launch_command(args)
    except subprocess.CalledProcessError as exc:
        if verbose:
            raise
        return failed({0: exc.returncode})
    except ChildFailedError as exc:
        if verbose:
            raise
        return failed({rank: failure.exitcode for rank, failure in exc.failures.items()})
    except (KeyboardInterrupt, SignalException) as exc:
        # Ctrl-C reaches the launcher with its workers, whose rank 0 says it in one line.
        if verbose:
            raise
        return 128 + getattr(exc, "sigval", signal.SIGINT)
    return 0


def quiet(prefix: str) -> None:
    """Silence `prefix` and its modules' loggers, which set their own levels (LOGLEVEL)."""
    import torch.distributed.run  # noqa: F401  (creates the elastic agent's loggers)

    for name in [prefix, *logging.root.manager.loggerDict]:
        if name == prefix or name.startswith(prefix + "."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def failed(codes: dict[int, int]) -> int:
    """The exit code of a run whose failed workers ended with `codes` (rank: code; negative:
    killed by that signal). A worker that failed said why itself, and the others were then
    stopped (SIGTERM): nothing to add. When every one was killed, none could say it, so say
    here which rank died of which signal (SIGTERM last: it is how the rest were stopped)."""
    if any(code > 0 for code in codes.values()):
        return exit_code(*(code for code in codes.values() if code > 0))
    rank, code = min(codes.items(), key=lambda rc: (rc[1] == -signal.SIGTERM, rc[0]))
    print(
        f"error: worker rank {rank} was killed by {signal_name(-code)}, so the run stopped "
        "(out of memory? see `dmesg`); rerun to resume from the newest checkpoint",
        file=sys.stderr,
    )
    return exit_code(code)


def signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def exit_code(*codes: int) -> int:
    """The first failing worker's code; a worker killed by signal N exits 128 + N, as a shell
    reports it."""
    code = next((c for c in codes if c), 1)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
