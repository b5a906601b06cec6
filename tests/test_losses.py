"""Student and fake-score losses (docs/method.md, paper §3.1, §3.3)."""

from __future__ import annotations

import pytest
import torch

from cdm.losses import (
    ca_loss,
    cdm_loss,
    dm_loss,
    fake_score_loss,
    matching_loss,
    normaliser,
    renoise_tau,
)

SHAPE = (3, 2, 4, 4)


def _randn(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _w(a: torch.Tensor, x0_s: torch.Tensor) -> torch.Tensor:
    """Reference normaliser, written out per sample."""
    rows = [1.0 / max(float((a[b] - x0_s[b]).abs().mean()), 0.1) for b in range(a.shape[0])]
    return torch.tensor(rows).view(-1, 1, 1, 1)


def _grad(loss_fn, x0_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x0_s.clone().requires_grad_(True)
    out = loss_fn(x)
    loss = out if isinstance(out, torch.Tensor) else out.loss
    loss.backward()
    assert x.grad is not None
    return loss.detach(), x.grad


def test_normaliser_values_shape_and_floor() -> None:
    x0_s, a = _randn(0), _randn(1)
    w = normaliser(a, x0_s)
    assert w.shape == (3, 1, 1, 1) and w.dtype == torch.float32
    torch.testing.assert_close(w, _w(a, x0_s))
    tiny = x0_s + 1e-4
    torch.testing.assert_close(normaliser(tiny, x0_s), torch.full((3, 1, 1, 1), 10.0))
    torch.testing.assert_close(normaliser(x0_s, x0_s), torch.full((3, 1, 1, 1), 10.0))
    # large difference: not clamped, w = 1 / mean|A - x0|
    torch.testing.assert_close(normaliser(x0_s + 4.0, x0_s), torch.full((3, 1, 1, 1), 0.25))


def test_normaliser_is_detached_and_casts() -> None:
    x0_s = _randn(0).to(torch.bfloat16).requires_grad_(True)
    w = normaliser(_randn(1).to(torch.bfloat16), x0_s)
    assert w.dtype == torch.float32 and not w.requires_grad


def test_matching_loss_value_and_gradient() -> None:
    x0_s, d = _randn(2), _randn(3, 0.5)
    loss, grad = _grad(lambda x: matching_loss(x, d), x0_s)
    torch.testing.assert_close(loss, d.square().mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, -2 * d / d.numel(), atol=1e-8, rtol=1e-5)


def test_ca_loss_gradient_is_direction() -> None:
    x0_s, x0_c, x0_u, g = _randn(4), _randn(5), _randn(6), 7.0
    d = _w(x0_c, x0_s) * g * (x0_c - x0_u)
    loss, grad = _grad(lambda x: ca_loss(x, x0_c, x0_u, g), x0_s)
    torch.testing.assert_close(grad, -2 * d / d.numel(), atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(loss, d.square().mean(), atol=1e-6, rtol=1e-5)
    out = ca_loss(x0_s, x0_c, x0_u, g)
    torch.testing.assert_close(out.weight, _w(x0_c, x0_s).mean())


def test_dm_loss_gradient_is_direction() -> None:
    x0_s, x0_r, x0_f = _randn(7), _randn(8), _randn(9)
    d = _w(x0_r, x0_s) * (x0_r - x0_f)
    loss, grad = _grad(lambda x: dm_loss(x, x0_r, x0_f), x0_s)
    torch.testing.assert_close(grad, -2 * d / d.numel(), atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(loss, d.square().mean(), atol=1e-6, rtol=1e-5)


def test_cdm_loss_gradient_is_direction() -> None:
    x0_s, x0_r, x0_f = _randn(10), _randn(11), _randn(12)
    d = _w(x0_r, x0_s) * (x0_r - x0_f)
    loss, grad = _grad(lambda x: cdm_loss(x, x0_r, x0_f), x0_s)
    torch.testing.assert_close(grad, -2 * d / d.numel(), atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(loss, d.square().mean(), atol=1e-6, rtol=1e-5)


def test_normaliser_uses_named_estimate() -> None:
    """CA normalises with x0_c (not x0_u); DM with x0_r (not x0_f)."""
    x0_s = _randn(13)
    near, far = x0_s + 0.01, x0_s + 2.0
    # CA with x0_c close to x0_s: w = 10
    assert float(ca_loss(x0_s, near, far, 1.0).weight) == pytest.approx(10.0)
    assert float(ca_loss(x0_s, far, near, 1.0).weight) == pytest.approx(0.5)
    assert float(dm_loss(x0_s, near, far).weight) == pytest.approx(10.0)
    assert float(dm_loss(x0_s, far, near).weight) == pytest.approx(0.5)


def test_floor_reaches_every_student_loss() -> None:
    """distill.normaliser_floor caps w at 1 / floor in CA, DM and CDM alike."""
    x0_s = _randn(14)
    near, far = x0_s + 0.01, x0_s + 2.0
    assert float(ca_loss(x0_s, near, far, 1.0, floor=0.25).weight) == pytest.approx(4.0)
    assert float(dm_loss(x0_s, near, far, floor=0.25).weight) == pytest.approx(4.0)
    assert float(cdm_loss(x0_s, near, far, floor=0.5).weight) == pytest.approx(2.0)
    # above the floor the normaliser is unchanged
    assert float(dm_loss(x0_s, far, near, floor=0.25).weight) == pytest.approx(0.5)


def test_student_losses_in_float32_from_bf16() -> None:
    x0_s = _randn(14).to(torch.bfloat16).requires_grad_(True)
    out = dm_loss(x0_s, _randn(15).to(torch.bfloat16), _randn(16).to(torch.bfloat16))
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert x0_s.grad is not None and x0_s.grad.dtype == torch.bfloat16


def test_no_gradient_into_teacher_estimates() -> None:
    x0_s = _randn(17).requires_grad_(True)
    x0_r, x0_f = _randn(18).requires_grad_(True), _randn(19).requires_grad_(True)
    dm_loss(x0_s, x0_r, x0_f).loss.backward()
    assert x0_r.grad is None and x0_f.grad is None


def test_fake_score_loss_closed_form() -> None:
    v, x0, eps = _randn(20).requires_grad_(True), _randn(21), _randn(22)
    loss = fake_score_loss(v, x0, eps)
    torch.testing.assert_close(loss, (v.detach() - (eps - x0)).square().mean())
    loss.backward()
    assert v.grad is not None
    torch.testing.assert_close(v.grad, 2 * (v.detach() - (eps - x0)) / v.numel())
    assert float(fake_score_loss(eps - x0, x0, eps)) == 0.0


def test_renoise_tau_default_range() -> None:
    tau = renoise_tau(5000, torch.Generator().manual_seed(0))
    assert tau.shape == (5000,) and tau.dtype == torch.float32
    assert bool((tau >= 0.02).all()) and bool((tau <= 0.98).all())  # float32 bounds
    assert float(tau.min()) < 0.03 and float(tau.max()) > 0.97
    again = renoise_tau(5000, torch.Generator().manual_seed(0))
    assert torch.equal(tau, again)


def test_renoise_tau_is_a_clamped_unit_uniform() -> None:
    """The authors draw "U(0.02, 0.98)" as clamp(U(0, 1), 0.02, 0.98): the same draws,
    with 2% of the mass sitting exactly on each end point (not spread over the range)."""
    n = 200_000
    tau = renoise_tau(n, torch.Generator().manual_seed(3))
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tau, u.clamp(0.02, 0.98))
    at_low = float((tau == 0.02).float().mean())
    at_high = float((tau == torch.tensor(0.98)).float().mean())
    se = (0.02 * 0.98 / n) ** 0.5
    assert abs(at_low - 0.02) < 5 * se and abs(at_high - 0.02) < 5 * se
    inner = tau[(tau > 0.02) & (tau < 0.98)]
    assert abs(float(inner.mean()) - 0.5) < 0.005  # uniform in between


def test_renoise_tau_below_anchor_for_ca() -> None:
    upper = torch.tensor([1.0, 0.5, 0.3, 0.01]).repeat(1000)
    tau = renoise_tau(4000, torch.Generator().manual_seed(1), upper=upper)
    assert bool((tau >= 0.02).all()) and bool((tau <= 0.98).all())  # float32 bounds
    above_floor = upper > 0.02
    assert bool((tau[above_floor] <= upper[above_floor]).all())
    assert bool((tau[~above_floor] == 0.02).all())
    assert float(tau[upper == 0.5].max()) > 0.45
    assert float(tau[upper == 1.0].max()) == pytest.approx(0.98)


def test_renoise_tau_validation() -> None:
    with pytest.raises(ValueError, match="low < high"):
        renoise_tau(2, torch.Generator(), low=0.5, high=0.5)
    with pytest.raises(ValueError, match="shape"):
        renoise_tau(3, torch.Generator(), upper=torch.ones(2))
