"""Report figures as PNG files: quality vs NFE, training losses, labelled sample grids.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state) and
written atomically, like every other output of the pipeline.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from cdm.report.tables import model_key

LOSS_COLUMNS = ("loss_ca", "loss_dm", "loss_cdm", "loss_fake")
DPI = 120
# One colour per model in every figure (teachers in greys); other names hash into the rest.
COLOURS = {
    "teacher_cfg": "#222222", "teacher_nocfg": "#8c8c8c", "dmd2": "#1f77b4",
    "dynamic": "#ff7f0e", "cdm": "#d62728", "dm_only": "#2ca02c",
}  # fmt: skip
SPARE = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


def model_colour(model: str) -> str:
    """The model's colour, the same in the loss panels, the quality plots and every report."""
    if model in COLOURS:
        return COLOURS[model]
    return SPARE[sum(map(ord, model)) % len(SPARE)]  # stable across runs (not hash())


@contextlib.contextmanager
def _atomic_png(path: str | Path) -> Iterator[str]:
    """Yield a temporary .png path beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with _atomic_png(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def _curve(by_steps: dict, key: str) -> tuple[list[float], list[float]]:
    """(nfe, value) pairs of one model sorted by NFE, NaN or missing entries dropped."""
    pts = sorted(
        (float(m["nfe"]), float(m[key]))
        for m in by_steps.values()
        if m.get("nfe") is not None and m.get(key) is not None
    )
    pts = [(x, y) for x, y in pts if not (math.isnan(x) or math.isnan(y))]
    return [x for x, _ in pts], [y for _, y in pts]


WORLD_PANELS = (
    ("alignment", "alignment (judge, higher is better)"),
    ("fd", "FD (lower is better)"),
)


def quality_vs_nfe(
    metrics: dict, path: str | Path, panels: tuple[tuple[str, str], ...] = WORLD_PANELS
) -> Path:
    """One panel per (metric key, label) against NFE (log x), one line per model."""
    fig = Figure(figsize=(5 * len(panels), 4))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for model in sorted(metrics, key=model_key):
            x, y = _curve(metrics[model], key)
            if x:
                ax.plot(
                    x, y, marker="o", label=model, color=model_colour(model),
                    ls="--" if model.startswith("teacher") else "-",
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _read_losses(csv_path: Path) -> pd.DataFrame | None:
    """The step and loss columns of a train.csv, numeric; None if missing or empty."""
    try:
        df = pd.read_csv(csv_path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    if "step" not in df.columns and "iteration" in df.columns:  # the engine's train.csv
        df = df.rename(columns={"iteration": "step"})
    if "step" not in df.columns or df.empty:
        return None
    cols = ["step", *(c for c in LOSS_COLUMNS if c in df.columns)]
    return df[cols].apply(pd.to_numeric, errors="coerce").dropna(subset=["step"])


def training_curves(csv_paths: dict[str, Path], path: str | Path) -> Path:
    """One panel per loss column present, one line per method (rolling mean over ~2% of steps)."""
    logs = {m: df for m, p in csv_paths.items() if (df := _read_losses(Path(p))) is not None}
    columns = [
        c for c in LOSS_COLUMNS if any(c in df and df[c].notna().any() for df in logs.values())
    ]
    fig = Figure(figsize=(4 * max(1, len(columns)), 3.5))
    if not columns:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training logs", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        return _save(fig, path)
    for i, col in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), i + 1)
        for method in sorted(logs, key=model_key):
            df = logs[method]
            if col not in df or not df[col].notna().any():
                continue
            series = df[["step", col]].dropna()
            window = max(1, len(series) // 50)
            smooth = series[col].rolling(window, center=True, min_periods=1).mean()
            ax.plot(series["step"], smooth, label=method, color=model_colour(method))
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _wrap(text: str, width: int, font, measure, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to `width` pixels, at most max_lines (the last one cut with ...)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return lines


def image_grid(
    rows: dict[str, np.ndarray],
    path: str | Path,
    scale: int = 4,
    captions: list[str] | None = None,
) -> Path:
    """One labelled row per model of uint8 images (N, H, W, 3), nearest-neighbour upscaled;
    `captions` (one per column, e.g. the prompt) are written under the last row."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    shape = next(iter(rows.values())).shape
    for name, a in rows.items():
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or a.shape != shape:
            raise ValueError(
                f"row {name!r}: need uint8 (N, H, W, 3) like {shape}, got {a.dtype} {a.shape}"
            )
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n, h, w, _ = shape
    cell_h, cell_w, gap, pad = h * scale, w * scale, 2, 8
    font = ImageFont.load_default(size=max(10, min(16, cell_h // 4)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(name, font=font) for name in rows)) + 2 * pad
    small = ImageFont.load_default(size=11)
    wrapped = [_wrap(c, cell_w, small, measure) for c in captions] if captions else []
    caption_h = (14 * max(len(w) for w in wrapped) + pad) if wrapped else 0
    canvas = Image.new(
        "RGB",
        (label_w + n * (cell_w + gap), len(rows) * (cell_h + gap) + gap + caption_h),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    below = gap + len(rows) * (cell_h + gap)
    for c, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            draw.text(
                (label_w + c * (cell_w + gap), below + 14 * j), line, fill="black", font=small
            )
    for r, (name, images) in enumerate(rows.items()):
        top = gap + r * (cell_h + gap)
        draw.text((pad, top + cell_h // 2), name, fill="black", font=font, anchor="lm")
        for c, img in enumerate(images):
            tile = Image.fromarray(img).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (cell_w + gap), top))
    with _atomic_png(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
