"""Refuse, before any job is submitted, a SLURM request its partition cannot hold.

Slurm accepts a job that asks for more CPUs, memory or GPUs per node than any node of its
partition has, or for more nodes, and leaves it PENDING (PartitionConfig) for ever while
Snakemake waits without a word. The Snakefile's onstart calls `check` on the SLURM executor
with the jobs to run and their resources (cdm.resources, after the profile's overrides),
and compares each with `sinfo`: one line per rule that cannot run, naming what it asks and
what its partition has.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SINFO = ["sinfo", "--noheader", "--format=%P|%c|%m|%G|%D|%l"]


@dataclass(frozen=True)
class Nodes:
    """One group of alike nodes of a partition, as `sinfo` lists them."""

    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    count: int
    limit_min: float | None  # None: no time limit
    default: bool


def gpus_of(gres: str) -> int:
    """GPUs per node of a gres string: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:2,shard:8", "(null)"."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def minutes(limit: str) -> float | None:
    """A Slurm time ("infinite", "30:00", "2:00:00", "1-12:00:00", "60") in minutes."""
    if limit.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    fields = [float(f) for f in clock.split(":")]
    h, m, s = ([0.0] * (3 - len(fields)) + fields) if len(fields) > 1 else (0.0, fields[0], 0.0)
    return (float(days or 0) * 24 + h) * 60 + m + s / 60


def parse_sinfo(text: str) -> list[Nodes]:
    groups = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        name, cpus, mem, gres, count, limit = fields
        groups.append(
            Nodes(
                name.rstrip("*"), int(re.sub(r"\D", "", cpus) or 0), int(re.sub(r"\D", "", mem) or 0),
                gpus_of(gres), int(count), minutes(limit), name.endswith("*"),
            )
        )  # fmt: skip
    return groups


def _request(resources: Mapping[str, Any]) -> tuple[int, int, int, int, float]:
    """(nodes, CPUs per node, MB per node, GPUs per node, minutes) of one job."""
    nodes = int(resources.get("nodes") or 1)
    tasks = int(resources.get("tasks") or 1)
    per_node = max(1, -(-tasks // nodes))  # one task per node for a multi-node distill
    cpus = int(resources.get("cpus_per_task") or 1) * per_node
    gres = str(resources.get("gres") or "")
    return (
        nodes,
        cpus,
        int(resources.get("mem_mb") or 0),
        gpus_of(gres),
        float(resources.get("runtime") or 0),
    )


def misfit(rule: str, resources: Mapping[str, Any], groups: list[Nodes]) -> str | None:
    """Why `rule`'s job cannot run on its partition (one line), or None if it can."""
    default = next((g.partition for g in groups if g.default), "")
    name = str(resources.get("slurm_partition") or default)
    mine = [g for g in groups if g.partition == name]
    if not mine:
        known = ", ".join(sorted({g.partition for g in groups})) or "none"
        return f"rule {rule}: partition '{name}' does not exist (sinfo lists: {known})"
    nodes, cpus, mem, gpus, runtime = _request(resources)
    fit = sum(g.count for g in mine if g.cpus >= cpus and g.mem_mb >= mem and g.gpus >= gpus)
    limit = mine[0].limit_min
    if fit >= nodes and (limit is None or runtime <= limit):
        return None
    asks = f"{nodes} node(s) of {cpus} CPUs, {mem} MB" + (f", {gpus} GPUs" if gpus else "")
    has = (
        f"{sum(g.count for g in mine)} node(s), the largest {max(g.cpus for g in mine)} CPUs, "
        f"{max(g.mem_mb for g in mine)} MB, {max(g.gpus for g in mine)} GPUs"
    )
    time_limit = "no time limit" if limit is None else f"time limit {limit:g} min"
    return (
        f"rule {rule} asks for {asks}, {runtime:g} min; partition '{name}' has {has}, "
        f"{time_limit}: lower the params that size it (distill.num_processes, distill.nodes), "
        "set CDM_SLURM_SCALE=small on a small node, or override it under set-resources in "
        "workflow/profiles/slurm/config.yaml"
    )


def check(jobs: Iterable[tuple[str, Mapping[str, Any]]], sinfo: str | None = None) -> list[str]:
    """One line per rule whose job its partition cannot hold (each rule once)."""
    if sinfo is None:
        try:
            sinfo = subprocess.run(
                SINFO, capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:  # sbatch will say what is wrong
            print(
                f"note: requests not checked against the partitions: sinfo: {exc}", file=sys.stderr
            )
            return []
    groups, said, lines = parse_sinfo(sinfo), set(), []
    for rule, resources in jobs:
        line = misfit(rule, resources, groups)
        if line is not None and rule not in said:
            said.add(rule)
            lines.append(line)
    return lines
