"""Rectified-flow maths in SD3 conventions (sigma = 1 is noise, sigma = 0 is data).

Pure functions: tensors and floats in, tensors out; randomness is passed in.
"""

from __future__ import annotations

import torch


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Per-sample sigma (B,) broadcast over the remaining dimensions of `like`."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return sigma.view(-1, *([1] * (like.ndim - 1)))
    return sigma


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = eps - x0."""
    return eps - x0


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Clean estimate x0_hat = x_s - s v."""
    return x - _bcast(sigma, x) * v


def v_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Velocity that points from x0 through x_s: v = (x_s - x0) / s."""
    return (x - x0) / _bcast(sigma, x)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Euler step (or extrapolation) along v from sigma to sigma_next: x + (s' - s) v."""
    return x + (_bcast(sigma_next, x) - _bcast(sigma, x)) * v


def time_shift(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 time shift: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + scale (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)
