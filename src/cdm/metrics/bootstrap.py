"""Mean of per-image scores with a percentile bootstrap confidence interval over prompts.

Images of one prompt are resampled together (prompts are the sampled unit; images of a prompt
are correlated), and each resample's statistic is the mean over its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 22  # resampled indices held at once


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    level: float
    n_prompts: int


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray,
    prompts: Sequence[str] | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> MeanCI:
    """Mean of `scores` and its `level` interval; `prompts` (one per score) groups the images,
    None makes every image its own group."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a non-empty 1-d array of scores, got shape {values.shape}")
    if prompts is not None and len(prompts) != len(values):
        raise ValueError(f"{len(values)} scores but {len(prompts)} prompts")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    groups = (
        np.arange(len(values)) if prompts is None else np.unique(prompts, return_inverse=True)[1]
    )
    sums, counts = np.bincount(groups, weights=values), np.bincount(groups).astype(np.float64)
    n = len(sums)
    rng = np.random.default_rng(seed)
    stats, rows = [], max(1, CHUNK // n)
    for lo in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - lo), n))
        stats.append(sums[idx].sum(1) / counts[idx].sum(1))
    low, high = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return MeanCI(float(values.mean()), float(low), float(high), level, n)
