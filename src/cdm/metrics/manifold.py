"""Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN balls on features."""

from __future__ import annotations

import torch

CHUNK = 1024  # rows of a distance matrix computed at once


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Direct differences, not the matmul expansion: exact zeros for identical points.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the set, itself excluded."""
    radii = []
    for lo in range(0, len(points), CHUNK):
        d = _cdist(points[lo : lo + CHUNK], points)
        # The k+1 smallest include the point itself at distance 0.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def coverage(support: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of queries inside at least one ball (support[i], radii[i])."""
    inside = 0
    for lo in range(0, len(queries), CHUNK):
        d = _cdist(queries[lo : lo + CHUNK], support)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake features (N, D) against real features (M, D)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"need (N, D) features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    n = min(len(real), len(fake))
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < min(n_real, n_fake) = {n}, got k={k}")
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    precision = coverage(real, knn_radii(real, k), fake)
    recall = coverage(fake, knn_radii(fake, k), real)
    return precision, recall
