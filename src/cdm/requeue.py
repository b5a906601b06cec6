"""A run that stopped to resume comes back as the same SLURM job: `scontrol requeue`.

distill stops shortly before its job's time limit (or on SIGUSR1/SIGTERM) once its
checkpoint is written, and exits RESUME (cdm.preemption.Preempted). In a SLURM batch job,
cdm.launch then asks Slurm to requeue that job: Slurm starts its batch script again, the
SLURM executor plugin sees the job pending then running (not failed), and distill resumes
from the checkpoint. This replaces Snakemake's `retries`, which are a fixed count per rule
and would resubmit every failure, the deterministic ones (an input, a lock, a params error)
too: now every other failure fails once, with its own line. Outside a batch job (an
`salloc` shell, a local run), or when the job was cancelled (`scancel`'s SIGTERM also makes
distill checkpoint and stop: the job is then no longer RUNNING), the exit code stays and a
rerun resumes. Slurm caps requeues
(MaxBatchRequeue, 5 by default).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

RESUME = 75  # EX_TEMPFAIL: stopped early on purpose, the checkpoint is written
# Set in each task of cdm.launch's multi-node srun step: only the launcher that ran the
# step (the batch shell's) requeues the job, once.
IN_STEP = "CDM_NODE_STEP"


def _scontrol(*args: str, timeout: float = 60) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def show_job(job: str, timeout: float = 60) -> str | None:
    """`scontrol show job <job>`'s text, or None where scontrol cannot be run."""
    shown = _scontrol("show", "job", job, timeout=timeout)
    return None if shown is None else shown.stdout


def requeue(env: dict[str, str] | None = None) -> bool:
    """Requeue this SLURM batch job (True), or say in one line why it is not (False)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job or env.get(IN_STEP):
        return False
    info = show_job(job) or ""
    if not re.search(r"\bBatchFlag=1\b", info):
        return False  # an salloc shell (or no scontrol): the user reruns, which resumes
    state = re.search(r"\bJobState=(\S+)", info)
    if state is None or state[1] != "RUNNING":
        return False  # scancel'ed (its SIGTERM stopped distill): the job stays ended
    if re.search(r"\bRequeue=0\b", info):
        print(
            f"note: SLURM job {job} is not requeueable (sbatch --requeue, or JobRequeue=1 in "
            "slurm.conf); rerun to resume from the checkpoint",
            file=sys.stderr,
        )
        return False
    done = _scontrol("requeue", job)
    if done is None or done.returncode != 0:
        said = done.stderr.strip().splitlines() if done is not None else ["no scontrol"]
        why = said[0] if said else "scontrol failed"
        print(f"note: requeue of SLURM job {job} failed ({why}); rerun to resume", file=sys.stderr)
        return False
    print(f"SLURM job {job} requeued: it resumes from its checkpoint", file=sys.stderr, flush=True)
    return True
