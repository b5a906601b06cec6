"""When a SLURM job must stop: its end time, read once from the scheduler.

The distill job checkpoints and exits (non-zero, so `--retries` resubmits it) when less than
`distill.stop_before_limit` seconds of the job remain. This does not rely on a signal: the
SLURM executor plugin wraps the job in a shell and two snakemake processes that SIGUSR1
would kill before it reached the workers.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime

_END = re.compile(r"\bEndTime=(\S+)")


def slurm_end_time(job_id: str | None = None) -> float | None:
    """The job's EndTime (epoch seconds) from `scontrol show job`, or None outside SLURM or
    when the scheduler cannot tell (no limit, no scontrol)."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _END.search(out)
    if match is None or match.group(1) in ("Unknown", "None"):
        return None
    try:
        return datetime.fromisoformat(match.group(1)).timestamp()
    except ValueError:
        return None
