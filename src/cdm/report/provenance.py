"""Where a report's numbers come from, and how they moved since the last committed run.

`provenance()` gathers the commit (and whether the code or params differ from it), the date,
the backend and teacher, the params that differ from the committed params.yaml, package
versions, the device, the stages' wall time and peak memory (Snakemake `benchmark:` files) and
the stages' own timings (logs/timings/: images per second, the teacher check's seconds).
`since_committed()`
sets every metric beside its value in the committed results/metrics.json.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from cdm import params as P

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "deepspeed", "open_clip_torch",
            "snakemake", "dvc")  # fmt: skip


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested mapping."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: data}


def changed_params(params_file: str | Path, committed_text: str | None) -> dict[str, list]:
    """{key: [committed value, this run's value]} of every leaf that differs."""
    now = flatten(P.read_yaml(params_file))
    then = flatten(P.parse_yaml(committed_text)) if committed_text else {}
    keys = sorted(set(now) | set(then))
    return {k: [then.get(k), now.get(k)] for k in keys if now.get(k) != then.get(k)}


def device_name() -> str:
    """The GPUs nvidia-smi lists, else the CPU and the threads a stage gets here (torch's
    default: OMP_NUM_THREADS, else the cores this process may use). Read without torch: the
    report stage does not import it."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            out = None
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()] if out else []
        if out is not None and out.returncode == 0 and names:
            return f"{len(names)} x {names[0]}"
    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    return f"CPU: {platform.processor() or platform.machine()}, {threads} threads"


def torch_cuda() -> str | None:
    """The CUDA version the installed torch was built with (torch.version.cuda), read from
    its version file rather than by importing torch."""
    try:
        text = importlib.metadata.distribution("torch").locate_file("torch/version.py")
        found = re.search(r"^cuda(?:: \S+)? = '([^']*)'", Path(text).read_text(), re.M)
    except (importlib.metadata.PackageNotFoundError, OSError):
        return None
    return found.group(1) if found else None


def stage_costs(benchmarks: Path) -> list[dict[str, Any]]:
    """Wall seconds and peak RSS (MB) of every stage job, from Snakemake's benchmark files."""
    rows = []
    for path in sorted(benchmarks.glob("**/*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if table.empty:
            continue
        rows.append(
            {
                "stage": str(path.relative_to(benchmarks).with_suffix("")),
                "seconds": round(float(table["s"].iloc[-1]), 1),
                "max_rss_mb": round(float(table["max_rss"].iloc[-1]), 1),
            }
        )
    return rows


# What a run writes itself (tracked so that a run can be committed): a change there is the
# run's result, not a difference in what produced it.
RUN_OUTPUTS = ("results", "dvc.lock")


def provenance(
    params_file: str | Path, params: P.Params, benchmarks: Path, timings: dict[str, Any]
) -> dict[str, Any]:
    """The record of this run; `timings` are the stages' own (cdm.metrics.timings.read)."""
    # "dirty": the code or params that produce the results differ from the commit
    status = _git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in RUN_OUTPUTS))
    return {
        "commit": (_git("rev-parse", "HEAD") or "unknown").strip(),
        "dirty": bool(status.strip()) if status is not None else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "backend": params.teacher.backend,
        "teacher": params.teacher.path,
        "training": P.training_mode(params.distill.lora),
        "params_changed_since_commit": changed_params(
            params_file, _git("show", f"HEAD:{Path(params_file).as_posix()}")
        ),
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "cuda": torch_cuda(),
        "device": device_name(),
        "stages": stage_costs(benchmarks),
        "timings": timings,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def committed_metrics(path: str | Path) -> dict | None:
    text = _git("show", f"HEAD:{Path(path).as_posix()}")
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def _margin(key: str, entry: dict, pairs: int) -> float | None:
    """How far a value may move by chance: its interval's half-width (real runs), or one
    binomial standard error of a world fraction over the evaluation pairs."""
    ci = entry.get(f"{key}_ci")
    if isinstance(ci, list) and len(ci) == 2:
        return (ci[1] - ci[0]) / 2
    value = entry.get(key)
    if key != "images_per_s" and isinstance(value, float) and 0.0 <= value <= 1.0 and pairs:
        return math.sqrt(max(value * (1 - value), 1e-12) / pairs)
    return None


def since_committed(now: dict, then: dict | None, keys: list[str], pairs: int) -> pd.DataFrame:
    """One row per set and metric: committed value, this run's, the difference, and whether it
    moved by more than its margin (`_margin`; FD and speed have none and are not flagged)."""
    rows = []
    for model in sorted(now):
        for steps, entry in sorted(now[model].items(), key=lambda x: float(x[0])):
            old = ((then or {}).get(model) or {}).get(steps) or {}
            for key in keys:
                value, before = entry.get(key), old.get(key)
                if not isinstance(value, (int, float)):
                    continue
                diff = value - before if isinstance(before, (int, float)) else math.nan
                margin = _margin(key, entry, pairs)
                moved = margin is not None and not math.isnan(diff) and abs(diff) > margin
                rows.append(
                    {
                        "model": model, "steps": int(steps), "metric": key,
                        "committed": before if before is not None else math.nan,
                        "now": value, "change": diff, "moved": "yes" if moved else "",
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)
