"""One line per SLURM job that the scheduler ended (cancelled, timed out, lost its node).

The SLURM executor plugin reports such a job as `SLURM-job '12' failed, SLURM status is:
'CANCELLED'` and Snakemake names the rule on other lines, so no line says which rule's job
ended and what to do. The Snakefile's onerror reads Snakemake's log of the run and prints,
for each, e.g.

    error: rule distill (SLURM job 12, cdm) was cancelled (scancel, or the scheduler); ...

The rule and its wildcards come from the job's own log path, which the plugin names
.snakemake/slurm_logs/rule_<rule>/<wildcards>/<job>.log.
"""

from __future__ import annotations

import re

FAILED = re.compile(r"SLURM-job '(\d+)' failed, SLURM status is: '([A-Z_]+)'")
WHY = {
    "CANCELLED": "was cancelled (scancel, or the scheduler)",
    "TIMEOUT": "reached its SLURM time limit",
    "DEADLINE": "reached its SLURM deadline",
    "NODE_FAIL": "lost its node",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "could not start (its node failed to boot)",
    "OUT_OF_MEMORY": "ran out of memory (raise its mem_mb)",
}


def ended_jobs(log: str) -> list[str]:
    """The lines for the jobs of `log` (Snakemake's log of a run) that SLURM ended."""
    lines, seen = [], set()
    for job, state in FAILED.findall(log):
        if state not in WHY or job in seen:
            continue
        seen.add(job)
        where = re.search(rf"slurm_logs/rule_(\w+)/(?:([^\s,]+)/)?{job}\.log", log)
        rule = where[1] if where else "?"
        what = f"SLURM job {job}" + (
            f", {where[2].replace('/', ' ')}" if where and where[2] else ""
        )
        again = (
            "rerun to resume from its last checkpoint"
            if rule in ("distill", "ablation_distill")
            else "rerun to run it again"
        )
        lines.append(
            f"error: rule {rule} ({what}) {WHY[state]}; finished outputs are kept; {again}"
        )
    return lines
