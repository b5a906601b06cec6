"""The paper's three findings over distillation seeds: mean +- std per preset and step count,
and each finding judged by a rule that accounts for the spread over seeds.

The rule (`RULE`): a difference between two presets counts only when the difference of their
means exceeds twice its standard error over seeds, se = sqrt(sd_a^2 / n_a + sd_b^2 / n_b)
(sd: the sample standard deviation over seeds). A finding "held" when the claimed side is
better beyond that margin on at least one metric and worse beyond it on none; "did not hold"
when it is worse beyond the margin and better on none; otherwise "within noise" (nothing
beyond the margin) or "mixed" (better on one metric, worse on another).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from cdm import params as P
from cdm.report.findings import CLAIMS, verdict
from cdm.report.provenance import flatten
from cdm.report.tables import model_key

RULE = (
    "a difference counts when |mean_a - mean_b| > 2 se, se = sqrt(sd_a^2/n_a + sd_b^2/n_b) "
    "over distillation seeds (sd with ddof 1)"
)
# Metrics summarised over seeds, and which direction is better (timings are no metrics:
# score keeps them out of metrics.json).
HIGHER = ("alignment", "precision", "recall", "shape", "colour", "position", "background")
LOWER = ("fd", "fd_to_teacher_nocfg")
METRICS = HIGHER + LOWER


def summarise(values: list[float]) -> dict[str, Any]:
    """mean, std (ddof 1; 0 for one value) and n of finite values; the values themselves."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    mean = float(np.mean(finite)) if n else math.nan
    std = float(np.std(finite, ddof=1)) if n > 1 else (0.0 if n else math.nan)
    return {"mean": round(mean, 6), "std": round(std, 6), "n": n, "values": finite}


def per_seed_table(runs: dict[int, dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """{method: {steps: {metric: summary}}} over the seeds' metrics dicts (score's shape)."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    methods = sorted({m for metrics in runs.values() for m in metrics})
    for method in methods:
        steps = sorted({s for m in runs.values() for s in m.get(method, {})}, key=float)
        for s in steps:
            rows = [runs[seed].get(method, {}).get(s) for seed in sorted(runs)]
            rows = [r for r in rows if r is not None]
            out.setdefault(method, {})[s] = {
                k: summarise([r.get(k, math.nan) for r in rows]) for k in METRICS
            }
    return out


def compare(a: dict, b: dict) -> dict[str, float | bool]:
    """a - b with its standard error over seeds, and whether it clears 2 se."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1))
    return {"diff": round(diff, 6), "se": round(se, 6), "beyond": abs(diff) > 2 * se}


def beats(table: dict, a: str, b: str, steps: str, metrics=("alignment", "fd")) -> dict:
    """Does preset `a` beat `b` at `steps` on `metrics`, by the rule?"""
    sa, sb = table[a][steps], table[b][steps]
    better, worse, parts = [], [], []
    for m in metrics:
        c = compare(sa[m], sb[m])
        sign = 1 if m in HIGHER else -1
        if c["beyond"]:
            (better if sign * c["diff"] > 0 else worse).append(m)
        parts.append(
            f"{m} `{a}` {_pm(sa[m])} vs `{b}` {_pm(sb[m])} (diff {c['diff']:+.4g}, 2 se "
            f"{2 * c['se']:.3g})"
        )
    return {
        "verdict": verdict(better, worse),
        "better": better,
        "worse": worse,
        "text": "; ".join(parts),
    }


def _pm(s: dict) -> str:
    return f"{s['mean']:.4g} +- {s['std']:.2g}"


def _near_cfg_free(table: dict, steps: str) -> dict:
    """Finding 2: held when dm_only's FD to the CFG-free teacher set is smaller than every
    other student's, each beyond the margin; did not hold when some student is closer beyond
    it; within noise otherwise."""
    ref = "fd_to_teacher_nocfg"
    dm = table["dm_only"][steps][ref]
    others = sorted(m for m in table if m != "dm_only" and steps in table[m])
    better, worse, parts = [], [], [f"FD to the CFG-free teacher set: `dm_only` {_pm(dm)}"]
    for other in others:
        c = compare(dm, table[other][steps][ref])
        if c["beyond"]:
            (better if c["diff"] < 0 else worse).append(other)
        parts.append(
            f"`{other}` {_pm(table[other][steps][ref])} (diff {c['diff']:+.4g}, "
            f"2 se {2 * c['se']:.3g})"
        )
    if worse:
        judged = "did not hold"
    elif others and len(better) == len(others):
        judged = "held"
    else:
        judged = "within noise"
    return {"verdict": judged, "better": better, "worse": worse, "text": "; ".join(parts)}


def judge_findings(table: dict, steps_list: list[str]) -> list[dict]:
    """[{"id", "claim", "rule", "by_steps": {steps: {"verdict", "text", ...}}}] for 1-3."""
    plan = {
        1: ("dynamic", "dmd2"),
        2: ("dm_only", None),
        3: ("cdm", "dynamic"),
    }
    out = []
    for fid, (a, b) in plan.items():
        by_steps = {}
        for steps in steps_list:
            missing = [m for m in (a, b) if m and steps not in table.get(m, {})]
            if missing:
                names = " and ".join(f"`{m}`" for m in missing)
                by_steps[steps] = {"verdict": "not measured", "text": f"needs {names}"}
            elif fid == 2:
                by_steps[steps] = _near_cfg_free(table, steps)
            else:
                by_steps[steps] = beats(table, a, b, steps)
        out.append({"id": fid, "claim": CLAIMS[fid], "rule": RULE, "by_steps": by_steps})
    return out


CHECK_DIGITS = 4  # significant digits of the teacher check's numbers that identify a teacher


def _identifying(value: Any) -> Any:
    """The teacher check at CHECK_DIGITS significant digits: another CPU's float rounding moves
    its FDs by ~1e-6 relative (the same teacher and code, results/teacher.json on two
    machines), another teacher by far more."""
    if isinstance(value, dict):
        return {k: _identifying(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.{CHECK_DIGITS}g}")
    return value


def measured_on(params: P.Params, teacher_check: dict) -> dict[str, Any]:
    """What a seeded measurement ran on: the params it depends on (cdm.params.ablation_inputs)
    and the sha256 of the teacher check (results/teacher.json, the teacher's own numbers on
    fixed pairs and seeds, so a different teacher gives a different one), its numbers at
    CHECK_DIGITS significant digits so that the same teacher on another CPU matches."""
    canonical = json.dumps(_identifying(teacher_check), sort_keys=True).encode()
    return {
        "params": P.ablation_inputs(params),
        "teacher_check_sha256": hashlib.sha256(canonical).hexdigest(),
    }


def mismatch(ablation: dict, now: dict[str, Any]) -> str | None:
    """None when the ablation ran on `now` (measured_on of this run), else why not, in words."""
    then = ablation.get("measured_on")
    if not then:
        return "it records no teacher or params (rerun `make ablation`)"
    a, b = flatten(then), flatten(now)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not differ:
        return None
    shown = ", ".join(f"`{k}`" for k in differ[:4]) + (" ..." if len(differ) > 4 else "")
    return f"it ran on another teacher or params ({shown} differ; rerun `make ablation`)"


def ablation_summary(
    runs: dict[int, dict], teacher: dict, steps_list: list[str], ran_on: dict[str, Any]
) -> dict:
    """results/ablation.json: seeds, per-preset summaries, the teacher's reference sets (one
    sampling run each, from the main pipeline), the findings and what it ran on."""
    table = per_seed_table(runs)
    return {
        "seeds": sorted(runs),
        "steps": steps_list,
        "rule": RULE,
        "students": table,
        "teacher": teacher,
        "findings": judge_findings(table, steps_list),
        "measured_on": ran_on,
    }


# --- tables for the report -------------------------------------------------------------

SHOWN = ("alignment", "fd", "fd_to_teacher_nocfg", "precision", "recall")


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per preset and step count: each metric as `mean +- std` over the seeds."""
    rows = []
    for method in sorted(summary["students"], key=model_key):
        for steps, values in sorted(summary["students"][method].items(), key=lambda x: float(x[0])):
            row = {"preset": method, "steps": int(steps), "seeds": values["alignment"]["n"]}
            row |= {m: _pm(values[m]) for m in SHOWN}
            rows.append(row)
    for model in sorted(summary.get("teacher", {}), key=model_key):
        for steps, values in sorted(summary["teacher"][model].items(), key=lambda x: float(x[0])):
            row = {"preset": f"{model} (one sampling run)", "steps": int(steps), "seeds": 1}
            row |= {m: f"{values.get(m, math.nan):.4g}" for m in SHOWN}
            rows.append(row)
    return pd.DataFrame(rows, columns=["preset", "steps", "seeds", *SHOWN])


def findings_frame(summary: dict) -> pd.DataFrame:
    """One row per finding, one verdict column per step count."""
    rows = []
    for f in summary["findings"]:
        row = {"finding": f"({f['id']}) {f['claim']}"}
        row |= {f"{s} steps": v["verdict"] for s, v in f["by_steps"].items()}
        rows.append(row)
    return pd.DataFrame(rows)
