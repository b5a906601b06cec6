"""Fréchet distance between Gaussians fitted to two feature sets (as FID does)."""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().cpu().numpy()
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative rounding noise clipped to 0)."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) as Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the two matrices are
    similar, and the second is symmetric PSD, so eigh gives it exactly. No scipy.linalg.sqrtm
    (its `disp` argument is gone in SciPy 1.18) and no complex round-off on singular sets."""
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    return float(np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N, D)."""
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    return (
        mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2 * trace_sqrt_product(cov_a, cov_b)
    )
