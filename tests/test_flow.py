"""Rectified-flow maths in cdm.flow (docs/method.md, Conventions)."""

from __future__ import annotations

import pytest
import torch

from cdm.flow import add_noise, euler_step, time_shift, v_from_x0, velocity_target, x0_from_v


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)


def test_add_noise_endpoints() -> None:
    x0, eps = _pair()
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)


def test_x0_from_v_inverts_add_noise() -> None:
    x0, eps = _pair(1)
    v = velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    for s in (0.0, 0.1, 0.5, 0.9, 1.0):
        x = add_noise(x0, eps, s)
        torch.testing.assert_close(x0_from_v(x, v, s), x0, atol=1e-6, rtol=0)


def test_v_from_x0_inverts_x0_from_v() -> None:
    x0, eps = _pair(2)
    x = add_noise(x0, eps, 0.4)
    torch.testing.assert_close(v_from_x0(x, x0, 0.4), eps - x0, atol=1e-5, rtol=1e-5)


def test_euler_step_formula() -> None:
    x, v = _pair(3)
    torch.testing.assert_close(euler_step(x, v, 0.7, 0.2), x + (0.2 - 0.7) * v)
    # extrapolation upward (CDM's s' may exceed s_i)
    torch.testing.assert_close(euler_step(x, v, 0.2, 0.9), x + (0.9 - 0.2) * v)


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 28])
def test_euler_integration_of_straight_path_lands_on_x0(steps: int) -> None:
    x0, eps = _pair(4)
    v = velocity_target(x0, eps)
    sigmas = torch.cat([torch.sort(torch.rand(steps - 1), descending=True).values, torch.zeros(1)])
    sigmas = torch.cat([torch.ones(1), sigmas])
    x = eps.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = euler_step(x, v, s, s_next)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_time_shift_values() -> None:
    assert time_shift(0.5, 3.0) == pytest.approx(0.75)
    assert time_shift(0.0, 3.0) == 0.0
    assert time_shift(1.0, 3.0) == 1.0
    assert time_shift(0.25, 1.0) == pytest.approx(0.25)
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = time_shift(s, 3.0)
    assert isinstance(shifted, torch.Tensor)
    assert bool((shifted[1:] > shifted[:-1]).all())
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))


def test_per_sample_sigma_broadcasting() -> None:
    x0, eps = _pair(5)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x = add_noise(x0, eps, sigma)
    for b in range(3):
        torch.testing.assert_close(x[b], add_noise(x0[b], eps[b], float(sigma[b])))
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_v(x, v, sigma), x0, atol=1e-6, rtol=0)
    s_next = torch.tensor([0.0, 0.25, 0.1])
    stepped = euler_step(x, v, sigma, s_next)
    for b in range(3):
        torch.testing.assert_close(stepped[b], x[b] + (s_next[b] - sigma[b]) * v[b])
