"""The metrics table: one row per (model, steps), as a DataFrame, Markdown or HTML."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

MODEL_ORDER = ("teacher_cfg", "teacher_nocfg", "dmd2", "dynamic", "dm_only", "cdm")
COLUMNS = (
    "steps",
    "nfe",
    "alignment",
    "fd",
    "precision",
    "recall",
    "fd_to_teacher_nocfg",
    "images_per_s",
)


def model_key(model: str) -> tuple[int, int, str]:
    """Teachers first, then known methods in MODEL_ORDER, then any other model by name."""
    known = model in MODEL_ORDER
    rank = MODEL_ORDER.index(model) if known else len(MODEL_ORDER)
    return (0 if model.startswith("teacher") else 1, rank, model)


def metrics_table(metrics: dict) -> pd.DataFrame:
    """Columns model + COLUMNS; rows sorted by model (teachers first), then steps."""
    rows = []
    for model in sorted(metrics, key=model_key):
        for steps in sorted(metrics[model], key=float):
            values = metrics[model][steps]
            row = {"model": model, "steps": int(float(steps))}
            row.update({c: values.get(c, math.nan) for c in COLUMNS[1:]})
            rows.append(row)
    return pd.DataFrame(rows, columns=["model", *COLUMNS])


def format_cell(value: object) -> str:
    """Integers as is, floats with 4 significant digits, missing values as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "n/a"
    if x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.4g}"


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    header = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    body = [[format_cell(v).replace("|", r"\|") for v in row] for row in df.itertuples(index=False)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
    ]
    return "\n".join(lines) + "\n"


def to_html(df: pd.DataFrame) -> str:
    """An HTML <table> with the same cell formatting as the Markdown one."""
    formatters = {c: format_cell for c in df.columns}
    return df.to_html(index=False, formatters=formatters, na_rep="n/a", classes="metrics", border=0)


def against_teacher(metrics: dict) -> pd.DataFrame:
    """Every student set beside the teacher with CFG at the same step count (when sampled)
    and at its own reference (largest) step count: alignment and FD, whatever they are."""
    teacher = metrics.get("teacher_cfg", {})
    ref = max(teacher, key=float) if teacher else None
    rows = []
    for model in sorted(metrics, key=model_key):
        if model.startswith("teacher"):
            continue
        for steps in sorted(metrics[model], key=float):
            own, same = metrics[model][steps], teacher.get(steps, {})
            full = teacher.get(ref, {}) if ref else {}
            rows.append(
                {
                    "student": model, "steps": int(float(steps)),
                    "alignment": own.get("alignment", math.nan),
                    "teacher_cfg same steps": same.get("alignment", math.nan),
                    f"teacher_cfg @ {ref}": full.get("alignment", math.nan),
                    "fd": own.get("fd", math.nan),
                    "teacher_cfg fd same steps": same.get("fd", math.nan),
                    f"teacher_cfg fd @ {ref}": full.get("fd", math.nan),
                }
            )  # fmt: skip
    return pd.DataFrame(rows)
