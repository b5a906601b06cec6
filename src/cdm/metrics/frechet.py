"""Fréchet distance between Gaussians fitted to two feature sets (as FID does)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N, D)."""
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise, as pytorch-fid does
        eps = 1e-6 * np.eye(cov_a.shape[0])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
