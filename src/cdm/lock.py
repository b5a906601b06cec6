"""One run at a time per project, across orchestrators.

Snakemake locks its own outputs and DVC its own, but neither sees the other: a `snakemake`
and a `dvc repro` started together in one project would write the same outputs. The
project lock (.cdm-run.lock) names the orchestrator that runs the project now (its pid,
start time and host). Snakemake claims it when it starts (onstart); every stage script
claims it for the orchestrator that started it (its outermost `snakemake` or `dvc`
ancestor), so a `dvc repro` holds it from its first stage; a script run by hand only
checks. A claim fails, in one line, while another live orchestrator on this host holds it;
a holder that is gone (or a pid reused by another process, told apart by its start time) is
replaced. Jobs on other hosts (SLURM compute nodes) leave the login node's lock to their
orchestrator.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
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


def _alive(holder: dict) -> bool:
    """The holder (on this host: claim leaves other hosts' holders alone) still runs."""
    try:
        return psutil.Process(holder["pid"]).create_time() == holder["started"]
    except (psutil.Error, KeyError, TypeError):
        return False


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
            raise ProjectBusy(
                f"another run holds this project ({holder['what']}, pid {holder['pid']}); "
                f"wait for it to finish, or delete {path} if that process is not running"
            )
        if me is not None:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(me) + "\n")
    return me


def release(root: Path = Path("."), process: psutil.Process | None = None) -> None:
    """Drop the lock if this process's orchestrator holds it (Snakemake's onsuccess/onerror)."""
    path = root / LOCK
    if not path.exists():
        return
    holder = _holder(path.read_text())
    if holder and _ours(holder, process or psutil.Process()):
        path.unlink(missing_ok=True)
