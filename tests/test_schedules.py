"""Schedules of the backward simulation (docs/method.md, paper §3.2)."""

from __future__ import annotations

import pytest
import torch

from cdm.schedules import draw_anchor, dynamic_schedule, fixed_schedule, validate_dynamic


def _shift(u: float, a: float) -> float:
    return a * u / (1 + (a - 1) * u)


def test_fixed_schedule_matches_inference_schedule() -> None:
    raw = [1.0, 0.75, 0.5, 0.25]
    sig = fixed_schedule(raw, 3.0)
    assert sig.dtype == torch.float32 and sig.shape == (5,)
    expected = torch.tensor([_shift(r, 3.0) for r in raw] + [0.0], dtype=torch.float32)
    torch.testing.assert_close(sig, expected, atol=1e-7, rtol=0)
    assert sig[0] == 1.0 and sig[-1] == 0.0
    assert sig[2] == pytest.approx(0.75)


def test_fixed_schedule_single_step() -> None:
    assert torch.equal(fixed_schedule([1.0], 3.0), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([], "empty"),
        ([0.9, 0.5], "start at 1.0"),
        ([1.0, 0.5, 0.5], "strictly decreasing"),
        ([1.0, 0.25, 0.5], "strictly decreasing"),
        ([1.0, 0.5, 0.0], r"\(0, 1\]"),
        ([1.0, -0.1], r"\(0, 1\]"),
    ],
)
def test_fixed_schedule_validation(raw: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fixed_schedule(raw, 3.0)


def test_dynamic_schedule_properties_over_many_draws() -> None:
    k_min, k_max, u_min, u_max, shift = 1, 6, 0.25, 0.95, 3.0
    g = torch.Generator().manual_seed(0)
    lo, hi = _shift(u_min, shift), _shift(u_max, shift)
    seen = set()
    for _ in range(400):
        sig = dynamic_schedule(k_min, k_max, u_min, u_max, shift, g)
        k = sig.numel() - 1
        seen.add(k)
        assert k_min <= k <= k_max
        assert sig.dtype == torch.float32
        assert sig[0] == 1.0 and sig[-1] == 0.0
        assert bool((sig[1:] < sig[:-1]).all())
        inner = sig[1:-1]
        assert bool((inner >= lo - 1e-6).all()) and bool((inner <= hi + 1e-6).all())
    assert seen == set(range(k_min, k_max + 1))


def test_dynamic_schedule_applies_shift() -> None:
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    sig = dynamic_schedule(5, 5, 0.25, 0.95, 3.0, g1)
    # replay the same draws by hand
    k = int(torch.randint(5, 6, (1,), generator=g2).item())
    u = 0.25 + 0.70 * torch.rand(k - 1, generator=g2, dtype=torch.float64)
    raw = [1.0] + sorted(u.tolist(), reverse=True)
    expected = torch.tensor([_shift(r, 3.0) for r in raw] + [0.0], dtype=torch.float32)
    torch.testing.assert_close(sig, expected, atol=1e-7, rtol=0)
    unshifted = dynamic_schedule(5, 5, 0.25, 0.95, 1.0, torch.Generator().manual_seed(7))
    expected1 = torch.tensor(raw + [0.0], dtype=torch.float32)
    torch.testing.assert_close(unshifted, expected1, atol=1e-7, rtol=0)


def test_dynamic_schedule_deterministic_given_seed() -> None:
    a = [dynamic_schedule(1, 28, 0.25, 0.95, 3.0, torch.Generator().manual_seed(s)) for s in (3, 3)]
    assert torch.equal(a[0], a[1])
    b = dynamic_schedule(1, 28, 0.25, 0.95, 3.0, torch.Generator().manual_seed(4))
    assert a[0].shape != b.shape or not torch.equal(a[0], b)


def test_dynamic_schedule_degenerate_range_still_strictly_decreasing() -> None:
    sig = dynamic_schedule(6, 6, 0.5, 0.5, 3.0, torch.Generator().manual_seed(0))
    assert sig.shape == (7,)
    assert bool((sig[1:] < sig[:-1]).all())
    torch.testing.assert_close(sig[1:-1], torch.full((5,), 0.75), atol=1e-5, rtol=0)


def test_dynamic_schedule_k_one_is_single_step() -> None:
    sig = dynamic_schedule(1, 1, 0.25, 0.95, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(sig, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4, 0.25, 0.95), "k_min must be >= 1"),
        ((5, 4, 0.25, 0.95), "k_min must be <= k_max"),
        ((1, 4, 0.0, 0.95), "u_min must be > 0"),
        ((1, 4, 0.6, 0.5), "u_min must be <= u_max"),
        ((1, 4, 0.25, 1.0), "u_max must be < 1"),
    ],
)
def test_validate_dynamic(args: tuple[int, int, float, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_dynamic(*args)
    with pytest.raises(ValueError, match=match):
        dynamic_schedule(*args, 3.0, torch.Generator().manual_seed(0))


def test_validate_dynamic_accepts_recipe() -> None:
    validate_dynamic(1, 28, 0.25, 0.95)
    validate_dynamic(4, 4, 0.5, 0.5)


def test_draw_anchor_range_and_determinism() -> None:
    idx = draw_anchor(5, 2000, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (2000,)
    assert set(idx.tolist()) == {0, 1, 2, 3, 4}
    again = draw_anchor(5, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    assert torch.equal(draw_anchor(1, 3, torch.Generator()), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be >= 1"):
        draw_anchor(0, 3, torch.Generator())
