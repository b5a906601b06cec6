"""A cancelled SLURM job seen as cancelled by the SLURM executor plugin.

snakemake-executor-plugin-slurm (2.8) compares the State that `sacct` prints with
'CANCELLED', but `sacct` prints a job cancelled with scancel as 'CANCELLED by <uid>': the
plugin then counts the job as running for ever, and Snakemake waits without a word (SIGTERM
only says "Will exit after finishing currently running jobs"). Seen on a real Slurm 22.05
(issue 34). The Snakefile wraps the plugin's status query so that such a state reads
'CANCELLED'; the plugin then reports the job failed and onerror names it (cdm.jobends).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

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
    return True
