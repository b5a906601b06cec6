"""A cancelled SLURM job seen as cancelled by the SLURM executor plugin.

snakemake-executor-plugin-slurm (2.8) compares the State that `sacct` prints with
'CANCELLED', but `sacct` prints a job cancelled with scancel as 'CANCELLED by <uid>': the
plugin then counts the job as running for ever, and Snakemake waits without a word (SIGTERM
only says "Will exit after finishing currently running jobs"). Seen on a real Slurm 22.05
(issue 34). The Snakefile wraps the plugin's status query so that such a state reads
'CANCELLED'; the plugin then reports the job failed and onerror names it (cdm.jobends).

The plugin also waits 10 s longer after each status check that finds no job finished (up to
3 minutes), which suits day-long jobs, while a DAG of one-minute jobs (a local Slurm, the
scaled-down profile) learns of each job's end tens of seconds late.
`CDM_SLURM_STATUS_EVERY=<seconds>` checks at that fixed interval instead.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

STATUS_EVERY = "CDM_SLURM_STATUS_EVERY"
Query = Callable[..., Awaitable[tuple[dict[str, str] | None, float | None]]]


def plain_states(query: Query) -> Query:
    """`query` with each state's ' by <uid>' suffix dropped."""

    async def wrapped(*args: Any, **kwargs: Any) -> tuple[dict[str, str] | None, float | None]:
        states, seconds = await query(*args, **kwargs)
        if states:
            states = {job: state.split(" by ")[0] for job, state in states.items()}
        return states, seconds

    wrapped.cdm_plain_states = True  # type: ignore[attr-defined]
    return wrapped


def patch_plugin() -> bool:
    """Wrap the installed SLURM plugin's status query once; False where it is not installed."""
    try:
        import snakemake_executor_plugin_slurm as plugin
    except ImportError:
        return False
    query = getattr(plugin, "query_job_status", None)
    if query is None:
        return False
    if not getattr(query, "cdm_plain_states", False):
        plugin.query_job_status = plain_states(query)
    every = status_every()
    if every is not None:  # the interval the plugin sets after each check is ignored
        plugin.Executor.next_seconds_between_status_checks = property(
            lambda self: every, lambda self, value: None
        )
    return True


def status_every(env: dict[str, str] | None = None) -> float | None:
    """CDM_SLURM_STATUS_EVERY in seconds, or None (the plugin's own back-off)."""
    value = (os.environ if env is None else env).get(STATUS_EVERY, "")
    if not value:
        return None
    try:
        every = float(value)
    except ValueError:
        every = -1.0
    if every <= 0:
        raise ValueError(f"{STATUS_EVERY}={value!r}: expected a number of seconds > 0")
    return every
