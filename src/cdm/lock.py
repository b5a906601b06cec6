"""One run at a time per project, across orchestrators.

Snakemake locks its own outputs and DVC its own, but neither sees the other: a `snakemake`
and a `dvc repro` started together in one project would write the same outputs. The
project lock (.cdm-run.lock) names the orchestrator that runs the project now (its pid,
start time and host). Snakemake claims it when it starts (onstart); every stage script
claims it for the orchestrator that started it (its outermost `snakemake` or `dvc`
ancestor), so a `dvc repro` holds it from its first stage; a script run by hand only
checks. A claim fails, in one line, while another live orchestrator on this host holds it;
a holder that is gone (or a pid reused by another process, told apart by its start time) is
replaced, but only once every stage it started has ended too: each stage script records
itself in the lock (`stages`), and dies with its orchestrator (`watch`), so the project is
never reported free while a stage of a dead run still writes.

A run is also named by a token (`run` in the lock, CDM_RUN in the environment): Snakemake's
Snakefile sets CDM_RUN in its own environment, its claim records it, and every job inherits
it, through sbatch and srun too (they export the submitting environment). A process that
carries the holder's token is part of that run whatever its host or ancestry: a SLURM job
that slurmstepd started on the orchestrator's own host (a one-node cluster, or the
Snakemake head inside an allocation), or a task of cdm.launch's multi-node srun step (which
passes the token of the run it belongs to on). Jobs on other hosts without the token (a
cluster that exports no environment) leave that host's lock to their orchestrator, as
before: a pid of another host cannot be checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

LOCK = Path(".cdm-run.lock")
ORCHESTRATORS = ("snakemake", "dvc")
RUN = "CDM_RUN"  # the environment variable that carries the run's token


class ProjectBusy(RuntimeError):
    """Another run holds the project."""


def _lineage(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.parents()]


INTERPRETERS = ("python", "sh", "bash", "dash")


def program(argv: list[str]) -> str:
    """The program a command line runs: its first word, or for an interpreter (a Python or
    shell script: snakemake and dvc are Python scripts) the script or `-m` module after its
    options. A wrapper's arguments (`timeout 180 snakemake`) are not its program, so the
    wrapper is never taken for the orchestrator, nor is `sh -c "snakemake ..."`."""
    if not argv:
        return ""
    first = os.path.basename(argv[0])
    if not first.startswith(INTERPRETERS):
        return first
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, first)
        if arg == "-c":
            return first
        if not arg.startswith("-"):
            return os.path.basename(arg)
    return first


def _orchestrator(process: psutil.Process) -> psutil.Process | None:
    """The outermost snakemake or dvc ancestor (Snakemake may start itself again for a
    job), or None for a script run by hand."""
    found = None
    for p in _lineage(process):
        try:
            name = program(p.cmdline())
        except psutil.Error:
            continue
        if name in ORCHESTRATORS:
            found = p
    return found


def _holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _running(entry: dict) -> bool:
    try:
        return psutil.Process(entry["pid"]).create_time() == entry["started"]
    except (psutil.Error, KeyError, TypeError):
        return False


def _alive(holder: dict) -> bool:
    """The holder (on this host: claim leaves other hosts' holders alone), or a stage it
    started, still runs."""
    return _running(holder) or any(_running(s) for s in _stages(holder))


def _stages(holder: dict) -> list[dict]:
    stages = holder.get("stages")
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def _ours(holder: dict, process: psutil.Process) -> bool:
    """The holder is this process or one of its ancestors."""
    try:
        return any(
            (p.pid, p.create_time()) == (holder.get("pid"), holder.get("started"))
            for p in _lineage(process)
        )
    except psutil.Error:
        return False


def _token_member(holder: dict, env: dict[str, str]) -> bool:
    """The process carries the holder's run token: a job of that run (cdm.lock docstring)."""
    token = env.get(RUN)
    return bool(token) and holder.get("run") == token


def claim(
    root: Path = Path("."),
    process: psutil.Process | None = None,
    env: dict[str, str] | None = None,
) -> dict | None:
    """Take the project lock for this process's orchestrator (ProjectBusy while another holds
    it); a script run by hand only checks, since it has no run to hold the lock for."""
    process = process or psutil.Process()
    env = os.environ if env is None else env
    owner = _orchestrator(process)
    host = socket.gethostname()
    path = root / LOCK
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two claims at once: one reads what the other wrote
        f.seek(0)
        holder = _holder(f.read())
        ours = holder is not None and _ours(holder, process)
        if holder is not None and not ours and _token_member(holder, env):
            if holder.get("host") == host:  # its pid is checkable here: the run waits for it
                holder["stages"] = [s for s in _stages(holder) if _running(s)] + [
                    {"pid": process.pid, "started": process.create_time()}
                ]
                _write(f, holder)
            return holder
        if holder is not None and holder.get("host") != host:
            return holder  # a job on a compute node: the login node's orchestrator holds it
        if holder is not None and not ours and _alive(holder):
            left = "" if _running(holder) else ", ended; a stage it started still runs"
            raise ProjectBusy(
                f"another run holds this project ({holder.get('what')}, pid {holder.get('pid')}"
                f"{left}); wait for it to finish, or delete {path} if that process is not running"
            )
        if owner is None:
            return None
        me = {
            "pid": owner.pid,
            "started": owner.create_time(),
            "host": host,
            "what": " ".join(owner.cmdline()[:4]),
            # The run's token: the holder's for its stages, else the orchestrator's own
            # (Snakemake's CDM_RUN), else a new one (DVC, whose stages find it here).
            "run": (ours and holder.get("run")) or env.get(RUN) or secrets.token_hex(8),
        }
        # A stage joins its orchestrator's record (the stages that ended are dropped).
        stages = [s for s in _stages(holder) if _running(s)] if ours else []
        if owner.pid != process.pid:
            stages.append({"pid": process.pid, "started": process.create_time()})
        if stages:
            me["stages"] = stages
        _write(f, me)
    return me


def _write(f, record: dict) -> None:  # noqa: ANN001 (an open text file)
    f.seek(0)
    f.truncate()
    f.write(json.dumps(record) + "\n")


def run_token(root: Path = Path("."), process: psutil.Process | None = None) -> str | None:
    """The token of the run this process belongs to (by ancestry or by its CDM_RUN), for a
    step that leaves its ancestry (srun) to carry; None if it belongs to none."""
    path = root / LOCK
    holder = _holder(path.read_text()) if path.exists() else None
    if holder is None:
        return None
    if _ours(holder, process or psutil.Process()) or _token_member(holder, dict(os.environ)):
        return holder.get("run")
    return None


def watch(
    process: psutil.Process | None = None,
    every: float = 0.5,
    on_end: Callable[[], None] | None = None,
) -> bool:
    """Kill this process (SIGKILL: nothing more is written) when the orchestrator that
    started it ends: a stage must not outlive its run, even where the orchestrator dies
    without passing the signal on (`dvc repro` on SIGTERM). `on_end` runs first (ending what
    the process started outside its own process tree: an srun step). True if a watch was
    started."""
    process = process or psutil.Process()
    owner = _orchestrator(process)
    # DVC started it and has ended since; a task of a run's srun step has DVC_STAGE with no
    # dvc ancestor too, but carries the run's token (its launcher ends the step instead).
    if owner is None and os.environ.get("DVC_STAGE") and not os.environ.get(RUN):
        os.kill(process.pid, signal.SIGKILL)
    if owner is None or owner.pid == process.pid:
        return False
    entry = {"pid": owner.pid, "started": owner.create_time()}

    def _watch() -> None:
        while _running(entry):
            time.sleep(every)
        if on_end is not None:
            on_end()
        os.kill(process.pid, signal.SIGKILL)

    threading.Thread(target=_watch, name="orchestrator-watch", daemon=True).start()
    return True


def release(root: Path = Path("."), process: psutil.Process | None = None) -> None:
    """Drop the lock if this process's orchestrator holds it (Snakemake's onsuccess/onerror)."""
    path = root / LOCK
    if not path.exists():
        return
    holder = _holder(path.read_text())
    if holder and _ours(holder, process or psutil.Process()):
        path.unlink(missing_ok=True)
