"""Fréchet distance against closed forms and an independent matrix square root."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from cdm.metrics.frechet import frechet_distance, gaussian_stats, trace_sqrt_product


def test_one_dimensional_closed_form() -> None:
    """For 1-D Gaussians FD = (mu_a - mu_b)^2 + (sd_a - sd_b)^2."""
    g = torch.Generator().manual_seed(0)
    a = 2.0 + 3.0 * torch.randn(5000, 1, generator=g)
    b = -1.0 + 0.5 * torch.randn(5000, 1, generator=g)
    (mu_a, var_a), (mu_b, var_b) = gaussian_stats(a), gaussian_stats(b)
    expected = (mu_a[0] - mu_b[0]) ** 2 + (np.sqrt(var_a[0, 0]) - np.sqrt(var_b[0, 0])) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-10)


def test_trace_of_the_square_root_matches_scipy_on_full_rank_covariances() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    cov_a, cov_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = np.trace(linalg.sqrtm(cov_a @ cov_b)).real
    assert trace_sqrt_product(cov_a, cov_b) == pytest.approx(reference, rel=1e-9)


def test_identical_and_singular_sets() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 4, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-9
    # Fewer samples than dimensions: singular covariances still give a finite distance.
    few = torch.randn(5, 16, generator=g)
    assert np.isfinite(frechet_distance(few, few + 1.0))
    assert frechet_distance(few, few + 1.0) == pytest.approx(16.0, rel=1e-6)  # the shift alone
