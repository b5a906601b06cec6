"""When a distillation run must stop early: a signal (SIGUSR1 / SIGTERM) or the SLURM time limit.

Either way the loop checkpoints at the end of the iteration and exits non-zero (`Preempted`),
so that a rerun or the requeued job (cdm.requeue) resumes from that checkpoint.
SLURM sends USR1 ahead of the time limit (the profile's --signal), TERM at it. The end time
is also read from the scheduler, once: the job stops when less than
`distill.stop_before_limit` seconds of it remain. That does not rely on a signal: the SLURM
executor plugin wraps the job in a shell and two snakemake processes that SIGUSR1 would kill
before it reached the workers.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import datetime

from cdm.cli import StageFailure
from cdm.requeue import RESUME, show_job

_END = re.compile(r"\bEndTime=(\S+)")


class Preempted(StageFailure):
    """Near the SLURM time limit, or SIGUSR1 / SIGTERM: checkpointed, exit RESUME, which
    cdm.launch turns into a requeue of the SLURM batch job (cdm.requeue)."""

    code = RESUME


def slurm_end_time(job_id: str | None = None) -> float | None:
    """The job's EndTime (epoch seconds) from `scontrol show job`, or None outside SLURM or
    when the scheduler cannot tell (no limit, no scontrol)."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    out = show_job(job_id, timeout=30)
    if out is None:
        return None
    match = _END.search(out)
    if match is None or match.group(1) in ("Unknown", "None"):
        return None
    try:
        return datetime.fromisoformat(match.group(1)).timestamp()
    except ValueError:
        return None


class Preemption:
    """While entered, remember SIGUSR1 / SIGTERM instead of dying, and know the job's end
    time; `reason()` says, at the end of an iteration, why the run must stop now (or None)."""

    NAMES = ("SIGUSR1", "SIGTERM")

    def __init__(self, stop_before_limit: float) -> None:
        self.stop_before_limit = stop_before_limit
        self.received: str | None = None
        self.deadline: float | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        self.deadline = slurm_end_time()  # None outside SLURM
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def reason(self) -> str | None:
        """The signal received, or "the SLURM time limit" once it is near; None to go on."""
        late = self.deadline is not None and time.time() > self.deadline - self.stop_before_limit
        if late and self.received is None:
            self.received = "the SLURM time limit"
        return self.received

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
