"""The paper's three findings, stated as claims and checked on a metrics dict.

`metrics` is shaped {model: {steps (str): {"alignment", "fd", "precision", "recall",
"fd_to_teacher_nocfg", "nfe"}}}. Students are compared at one `steps` key;
teachers at `teacher_steps` (default: each teacher's largest step count, its reference).
"""

from __future__ import annotations

import math
from typing import Any

ALIGN_TOL = 0.01  # "not worse" margin on alignment (fraction of prompts judged right)
BEATS_RULE = f"rule: beats = lower FD and alignment not lower by more than {ALIGN_TOL}"
RUNS = {
    "teacher_cfg": "the `teacher_cfg` evaluation (teacher sampled with CFG)",
    "teacher_nocfg": "the `teacher_nocfg` evaluation (teacher sampled without CFG)",
    "dmd2": "the `dmd2` baseline (a preset of `methods` in params.yaml)",
    "dynamic": "the `dynamic` preset (`make ablation`, or configs/ablation.yaml)",
    "dm_only": "the `dm_only` preset (`make ablation`, or configs/ablation.yaml)",
    "cdm": "the `cdm` preset",
}
CLAIMS = {
    1: "A dynamic continuous schedule beats the fixed discrete one (both with CA+DM).",
    2: "A student trained with DM alone lands near the teacher's CFG-free distribution.",
    3: "Adding the CDM loss improves further over the dynamic schedule.",
}

Row = dict[str, Any]


def verdict(better: list[str], worse: list[str]) -> str:
    """A claim judged on several metrics, each better, worse or neither beyond its margin:
    held (better somewhere, worse nowhere), did not hold, mixed, or within noise."""
    if better and not worse:
        return "held"
    if worse and not better:
        return "did not hold"
    return "mixed" if better else "within noise"


def _needs(*models: str) -> str:
    return "needs " + " and ".join(RUNS.get(m, f"the `{m}` run") for m in models)


def _row(metrics: dict, model: str, steps: str | None) -> Row | None:
    """The model's metrics at `steps`; at its largest step count when `steps` is None."""
    by_steps = metrics.get(model) or {}
    if steps is None and by_steps:
        steps = max(by_steps, key=lambda s: float(s))
    return by_steps.get(steps)


def _value(row: Row, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or math.isnan(float(v)) else float(v)


def _values(rows: dict[str, Row], keys: tuple[str, ...]) -> tuple[dict[str, float], str | None]:
    """{f"{model}.{key}": value} for every pair, or a text naming the first missing value."""
    out = {}
    for model, row in rows.items():
        for key in keys:
            v = _value(row, key)
            if v is None:
                return {}, f"needs `{key}` of `{model}`: the metrics have no value for it"
            out[f"{model}.{key}"] = v
    return out, None


def _finding(fid: int, held: bool | None, text: str, numbers: str | None = None) -> dict:
    """`text`: what was measured and the rule that judged it; `numbers`: the measurement
    alone (shown when the seeded measurement gives the verdict instead)."""
    return {
        "id": fid, "claim": CLAIMS[fid], "held": held, "text": text,
        "numbers": text if numbers is None else numbers,
    }  # fmt: skip


def _beats(fid: int, a: str, b: str, rows: dict[str, Row], steps: str, note: str) -> dict:
    v, missing = _values({a: rows[a], b: rows[b]}, ("fd", "alignment"))
    if missing:
        return _finding(fid, None, note + missing)
    fd_a, fd_b = v[f"{a}.fd"], v[f"{b}.fd"]
    al_a, al_b = v[f"{a}.alignment"], v[f"{b}.alignment"]
    held = fd_a < fd_b and al_a >= al_b - ALIGN_TOL
    measured = (
        f"{note}measured at {steps} steps: FD `{a}` {fd_a:.4g} vs `{b}` {fd_b:.4g}; "
        f"alignment `{a}` {al_a:.3f} vs `{b}` {al_b:.3f}"
    )
    return _finding(fid, bool(held), f"{measured} ({BEATS_RULE}).", f"{measured}.")


def _schedule(metrics: dict, steps: str) -> dict:
    dmd2, dynamic, cdm = (_row(metrics, m, steps) for m in ("dmd2", "dynamic", "cdm"))
    if dmd2 is None:
        return _finding(1, None, _needs("dmd2"))
    if dynamic is not None:
        return _beats(1, "dynamic", "dmd2", {"dynamic": dynamic, "dmd2": dmd2}, steps, "")
    if cdm is None:
        return _finding(1, None, _needs("dynamic") + " (or at least the `cdm` run)")
    note = (
        f"fallback: `dynamic` is absent ({_needs('dynamic')}), so `cdm` is compared with "
        "`dmd2`; this mixes the schedule change with the CDM loss. "
    )
    return _beats(1, "cdm", "dmd2", {"cdm": cdm, "dmd2": dmd2}, steps, note)


def _dm_only(metrics: dict, steps: str, teacher_steps: str | None) -> dict:
    ref = "dmd2" if _row(metrics, "dmd2", steps) is not None else "cdm"
    rows = {
        "dm_only": _row(metrics, "dm_only", steps),
        ref: _row(metrics, ref, steps),
        "teacher_cfg": _row(metrics, "teacher_cfg", teacher_steps),
        "teacher_nocfg": _row(metrics, "teacher_nocfg", teacher_steps),
    }
    absent = [m for m, r in rows.items() if r is None]
    if absent:
        return _finding(2, None, _needs(*("dmd2" if m == "cdm" else m for m in absent)))
    full = {m: r for m, r in rows.items() if r is not None}
    fd, missing = _values({m: full[m] for m in ("dm_only", ref)}, ("fd_to_teacher_nocfg",))
    al, missing_al = _values(
        {m: full[m] for m in ("dm_only", "teacher_cfg", "teacher_nocfg")}, ("alignment",)
    )
    if missing or missing_al:
        return _finding(2, None, missing or missing_al or "")
    fd_dm, fd_ref = fd["dm_only.fd_to_teacher_nocfg"], fd[f"{ref}.fd_to_teacher_nocfg"]
    al_dm, al_cfg, al_nocfg = (
        al[f"{m}.alignment"] for m in ("dm_only", "teacher_cfg", "teacher_nocfg")
    )
    held = fd_dm < fd_ref and abs(al_dm - al_nocfg) < abs(al_dm - al_cfg)
    note = (
        ""
        if ref == "dmd2"
        else f"fallback: `dmd2` is absent ({_needs('dmd2')}), reference is `cdm`. "
    )
    measured = (
        f"{note}measured at {steps} steps: FD to the CFG-free teacher `dm_only` {fd_dm:.4g} vs "
        f"`{ref}` {fd_ref:.4g}; alignment `dm_only` {al_dm:.3f}, teacher without CFG "
        f"{al_nocfg:.3f}, with CFG {al_cfg:.3f}"
    )
    rule = (
        "rule: `dm_only` has the smaller FD to the CFG-free teacher and its alignment is "
        "closer to the CFG-free teacher's than to the CFG one's"
    )
    return _finding(2, bool(held), f"{measured} ({rule}).", f"{measured}.")


def _cdm_loss(metrics: dict, steps: str) -> dict:
    cdm, dynamic, dmd2 = (_row(metrics, m, steps) for m in ("cdm", "dynamic", "dmd2"))
    if cdm is None:
        return _finding(3, None, _needs("cdm"))
    if dynamic is not None:
        return _beats(3, "cdm", "dynamic", {"cdm": cdm, "dynamic": dynamic}, steps, "")
    if dmd2 is None:
        return _finding(3, None, _needs("dynamic") + " (or at least the `dmd2` baseline)")
    note = (
        f"fallback: `dynamic` is absent ({_needs('dynamic')}), so `cdm` is compared with "
        "`dmd2`; this mixes the CDM loss with the schedule change. "
    )
    return _beats(3, "cdm", "dmd2", {"cdm": cdm, "dmd2": dmd2}, steps, note)


def findings(metrics: dict, steps: str = "4", teacher_steps: str | None = None) -> list[dict]:
    """[{"id", "claim", "held" (True/False/None when a run is missing), "text", "numbers"}]
    for findings 1-3."""
    return [
        _schedule(metrics, steps),
        _dm_only(metrics, steps, teacher_steps),
        _cdm_loss(metrics, steps),
    ]
