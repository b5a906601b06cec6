"""The report of a real (sd3 / longcat) run: the paper's metrics with their intervals, and
its three findings judged by paired bootstrap intervals over prompts.

A difference "holds" only when the 95% interval of the paired difference (the same prompts
and noise in both sets, prompts resampled) excludes zero.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cdm.report.findings import CLAIMS, verdict
from cdm.report.tables import model_key

METRICS = ("clip", "pickscore", "aesthetic", "hpsv3")
LABELS = {
    "clip": "CLIP score",
    "pickscore": "PickScore",
    "aesthetic": "aesthetic",
    "hpsv3": "HPSv3",
}
RULE = (
    "a difference holds when the 95% bootstrap interval of the paired difference over prompts "
    "(same prompts and noise in both sets) excludes zero"
)


def scored(metrics: dict) -> list[str]:
    """The preference metrics present in the run, in the paper's order."""
    return [m for m in METRICS if any(m in e for by in metrics.values() for e in by.values())]


def _cell(entry: dict, metric: str) -> str:
    value = entry.get(metric)
    if value is None:
        return "not installed" if metric in (entry.get("skipped") or {}) else "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    low, high = entry.get(f"{metric}_ci", [math.nan, math.nan])
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def metrics_frame(metrics: dict) -> pd.DataFrame:
    """One row per set: each metric as `mean [95% interval]`, FD to both teacher sets, speed."""
    shown = scored(metrics)
    skipped = {n for by in metrics.values() for e in by.values() for n in e.get("skipped", {})}
    columns = [*shown, *(m for m in METRICS if m in skipped and m not in shown)]
    rows = []
    for model in sorted(metrics, key=model_key):
        for steps in sorted(metrics[model], key=float):
            e = metrics[model][steps]
            row: dict[str, Any] = {"model": model, "steps": int(steps), "nfe": e.get("nfe")}
            row |= {LABELS[m]: _cell(e, m) for m in columns}
            row |= {
                "FD to teacher_cfg": e.get("fd_to_teacher_cfg", math.nan),
                "FD to teacher_nocfg": e.get("fd_to_teacher_nocfg", math.nan),
                "images/s": e.get("images_per_s", math.nan),
            }
            rows.append(row)
    return pd.DataFrame(rows)


def _beats(per_image: pd.DataFrame, metrics: dict, a: str, b: str, steps: str, n_boot: int):
    from cdm.metrics.preference import compare  # the scorers' stack, only for real runs

    better, worse, parts = [], [], []
    for m in scored(metrics):
        if m not in per_image:
            continue
        d = compare(per_image, m, (a, int(steps)), (b, int(steps)), n_boot)
        if d.holds:
            (better if d.mean > 0 else worse).append(m)
        parts.append(f"{LABELS[m]} `{a}` - `{b}` {d.mean:+.4g} [{d.low:+.4g}, {d.high:+.4g}]")
    return verdict(better, worse), f"at {steps} steps: " + "; ".join(parts) + "."


def findings(per_image: pd.DataFrame, metrics: dict, steps: str, n_boot: int = 1000) -> list:
    """[{"id", "claim", "verdict", "text"}] of the three findings at `steps`."""
    have = {m for m, by in metrics.items() if steps in by}
    out = []
    for fid, (a, b) in {1: ("dynamic", "dmd2"), 3: ("cdm", "dynamic")}.items():
        if {a, b} <= have:
            judged, text = _beats(per_image, metrics, a, b, steps, n_boot)
        else:
            judged, text = "not measured", f"needs the `{a}` and `{b}` runs at {steps} steps"
        out.append({"id": fid, "claim": CLAIMS[fid], "verdict": judged, "text": text})
    students = sorted(m for m in have if not m.startswith("teacher"))
    if "dm_only" in have and len(students) > 1:
        fd = {m: metrics[m][steps].get("fd_to_teacher_nocfg", math.nan) for m in students}
        closest = min(fd, key=lambda m: fd[m])
        judged = "held" if closest == "dm_only" else "did not hold"
        listed = ", ".join(f"`{m}` {v:.4g}" for m, v in sorted(fd.items(), key=lambda x: x[1]))
        text = (
            f"at {steps} steps, FD of CLIP features to the CFG-free teacher set: {listed} "
            "(a point estimate: FD has no interval here; held when `dm_only` is the closest)."
        )
    else:
        judged, text = "not measured", "needs the `dm_only` run and another student"
    out.insert(1, {"id": 2, "claim": CLAIMS[2], "verdict": judged, "text": text})
    return out


def conventions_lines(metrics: dict) -> list[str]:
    """How each number was made (metrics.json keeps the same beside every entry)."""
    notes = next((e.get("conventions") for by in metrics.values() for e in by.values()), None)
    lines = []
    for name, note in (notes or {}).items():
        if isinstance(note, dict):
            text = "; ".join(f"{k}: {v}" for k, v in note.items() if v not in (None, ""))
            lines.append(f"- **{LABELS.get(name, name)}**: {text}")
    return lines
