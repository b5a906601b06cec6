"""`python -m cdm.launch <accelerate launch arguments>`: `accelerate launch`, whose failure is
the worker's own one-line error and exit code.

Plain `accelerate launch` follows a failed worker with its own ~30-line traceback (a
CalledProcessError, or torch elastic's ChildFailedError), burying the worker's `error:` line.
Here the launcher exits with the worker's code and prints nothing more; CDM_VERBOSE=1 keeps
accelerate's traceback. The workers tie their lives to this process (cdm.lifeline), so
killing it never leaves a worker writing checkpoints afterwards.

A leading `--nodes N` (distill.nodes; `--num_processes` then counts the GPUs of one node)
with N > 1 runs one such launcher per node of the SLURM allocation under srun (cdm.nodes).
A one-machine launch that names no `--main_process_port` (here or in its config file) gets
a free one.

A run that stopped to resume (distill near its time limit: exit RESUME) inside a SLURM batch
job asks Slurm to requeue that job (`cdm.requeue`): the same job comes back and resumes from
its checkpoint, while every other failure fails once, with its own line (no `retries`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

from cdm.nodes import (
    NodesError,
    cpus_per_node,
    free_port,
    require_allocation,
    split_nodes,
    srun_command,
)
from cdm.requeue import RESUME, requeue


def main(argv: list[str] | None = None) -> int:
    try:
        nodes, argv = split_nodes(sys.argv[1:] if argv is None else argv)
        if nodes > 1:
            require_allocation(nodes)
            step = srun_command(nodes, argv, cpus_per_node())
    except NodesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if nodes > 1:
        return requeue_on_resume(run_step(step))
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from cdm.lock import watch

    args = launch_command_parser().parse_args(argv)
    if args.main_process_port is None and needs_free_port(args):
        args.main_process_port = free_port()
    watch()  # the launcher, too, ends with its orchestrator (its workers then with it)
    verbose = os.environ.get("CDM_VERBOSE") == "1"
    if not verbose:  # torch elastic logs each failed rank (and a Ctrl-C) as records too
        quiet("torch.distributed.elastic")
    try:
        launch_command(args)
    except subprocess.CalledProcessError as exc:
        if verbose:
            raise
        return requeue_on_resume(failed({0: exc.returncode}))
    except ChildFailedError as exc:
        if verbose:
            raise
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        return requeue_on_resume(failed(codes))
    except (KeyboardInterrupt, SignalException) as exc:
        # Ctrl-C reaches the launcher with its workers, whose rank 0 says it in one line.
        if verbose:
            raise
        return 128 + getattr(exc, "sigval", signal.SIGINT)
    return 0


def needs_free_port(args: argparse.Namespace) -> bool:
    """Whether this launch is one machine's whole run with no port named (command line or
    accelerate config): its rendezvous is local, so any free port serves, where accelerate's
    fixed default (29500) fails the second of two runs on a node (two single-GPU jobs, or
    `dvc repro` beside a Snakemake run) with EADDRINUSE. One of several machines (a node of
    cdm.nodes' srun step) keeps the default: every node must meet at the same port."""
    config: dict = {}
    if args.config_file and os.path.exists(args.config_file):
        import yaml

        with open(args.config_file) as f:
            config = yaml.safe_load(f) or {}
    machines = args.num_machines if args.num_machines is not None else config.get("num_machines")
    return config.get("main_process_port") is None and int(machines or 1) == 1


def run_step(step: list[str]) -> int:
    """Run the multi-node srun step; its tasks carry this run's token (cdm.lock), and the
    step is aborted if the orchestrator ends (its tasks are no descendants to die with it)."""
    from cdm.lock import RUN, claim, run_token, watch

    print("+", shlex.join(step), file=sys.stderr, flush=True)  # the job log shows it
    # Claimed here, before the step: when distill is the first stage a `dvc repro` runs (a
    # rerun after a stop), no stage has drawn the run's token yet, and tasks without one
    # are taken for orphans of an ended run and killed.
    claim()
    token = run_token()
    env = os.environ | ({RUN: token} if token else {})
    srun = subprocess.Popen(step, env=env)
    watch(on_end=lambda: abort_step(srun))
    try:
        code = srun.wait()
    except KeyboardInterrupt:  # srun got it too: it passes it to the tasks and ends
        code = srun.wait()
    return exit_code(code) if code else 0


def abort_step(srun: subprocess.Popen) -> None:
    """srun's own abort: two SIGINTs within a second end every task of the step (SIGTERM,
    then SIGKILL), on every node; SIGKILL of srun alone would leave them running."""
    for _ in range(2):
        srun.send_signal(signal.SIGINT)
        time.sleep(0.2)


def requeue_on_resume(code: int) -> int:
    """`code`, after asking Slurm to requeue this batch job where the run stopped to resume."""
    if code == RESUME:
        requeue()
    return code


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
