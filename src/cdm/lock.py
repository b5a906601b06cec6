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
never reported free while a stage of a dead run still writes. Jobs on other hosts (SLURM compute nodes) leave the login node's lock to their
orchestrator.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil

LOCK = Path(".cdm-run.lock")
ORCHESTRATORS = ("snakemake", "dvc")


class ProjectBusy(RuntimeError):
    """Another run holds the project."""


def _lineage(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.parents()]


def _orchestrator(process: psutil.Process) -> psutil.Process | None:
    """The outermost snakemake or dvc ancestor (Snakemake may start itself again for a
    job), or None for a script run by hand."""
    found = None
    for p in _lineage(process):
        try:
            words = [os.path.basename(w) for w in p.cmdline()[:3]]
        except psutil.Error:
            continue
        if any(w in ORCHESTRATORS for w in words):
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


def claim(root: Path = Path("."), process: psutil.Process | None = None) -> dict | None:
    """Take the project lock for this process's orchestrator (ProjectBusy while another holds
    it); a script run by hand only checks, since it has no run to hold the lock for."""
    process = process or psutil.Process()
    owner = _orchestrator(process)
    me = None
    if owner is not None:
        me = {
            "pid": owner.pid,
            "started": owner.create_time(),
            "host": socket.gethostname(),
            "what": " ".join(owner.cmdline()[:4]),
        }
    path = root / LOCK
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two claims at once: one reads what the other wrote
        f.seek(0)
        holder = _holder(f.read())
        if holder is not None and holder.get("host") != socket.gethostname():
            return holder  # a job on a compute node: the login node's orchestrator holds it
        if holder is not None and not _ours(holder, process) and _alive(holder):
            left = "" if _running(holder) else ", ended; a stage it started still runs"
            raise ProjectBusy(
                f"another run holds this project ({holder.get('what')}, pid {holder.get('pid')}"
                f"{left}); wait for it to finish, or delete {path} if that process is not running"
            )
        if me is not None:
            # A stage joins its orchestrator's record (the stages that ended are dropped).
            ours = holder is not None and _ours(holder, process)
            stages = [s for s in _stages(holder) if _running(s)] if ours else []
            if owner.pid != process.pid:
                stages.append({"pid": process.pid, "started": process.create_time()})
            if stages:
                me["stages"] = stages
            f.seek(0)
            f.truncate()
            f.write(json.dumps(me) + "\n")
    return me


def watch(process: psutil.Process | None = None, every: float = 0.5) -> bool:
    """Kill this process (SIGKILL: nothing more is written) when the orchestrator that
    started it ends: a stage must not outlive its run, even where the orchestrator dies
    without passing the signal on (`dvc repro` on SIGTERM). True if a watch was started."""
    process = process or psutil.Process()
    owner = _orchestrator(process)
    if owner is None and os.environ.get("DVC_STAGE"):  # DVC started it and has ended since
        os.kill(process.pid, signal.SIGKILL)
    if owner is None or owner.pid == process.pid:
        return False
    entry = {"pid": owner.pid, "started": owner.create_time()}

    def _watch() -> None:
        while _running(entry):
            time.sleep(every)
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
