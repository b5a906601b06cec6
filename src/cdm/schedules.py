"""Sigma schedules for the student's backward simulation (docs/method.md, paper §3.2).

A schedule is a 1-D float32 tensor ``[1.0 = s_0 > s_1 > ... > s_{K-1} > s_K = 0]``: K Euler
steps from pure noise to data. Randomness comes only from the `torch.Generator` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch

from cdm.flow import time_shift


def _shifted_with_zero(raw: torch.Tensor, shift: float) -> torch.Tensor:
    """shift(raw) in float64, a final 0 appended, cast to float32."""
    shifted = time_shift(raw.to(torch.float64), shift)
    assert isinstance(shifted, torch.Tensor)
    return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)


def _check_shift(shift: float) -> None:
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite positive number, got {shift}")


def fixed_schedule(raw: Sequence[float], shift: float) -> torch.Tensor:
    """DMD2-style fixed discrete schedule = the inference schedule (docs/method.md §3.2 baseline).

    ``[shift(r_0), ..., shift(r_{K-1}), 0]`` with ``shift(s) = a s / (1 + (a - 1) s)``;
    `raw` must start at 1.0, be strictly decreasing and lie in (0, 1]. Length ``len(raw) + 1``.
    """
    _check_shift(shift)
    values = [float(r) for r in raw]
    if not values:
        raise ValueError("raw schedule is empty")
    if values[0] != 1.0:
        raise ValueError(f"raw schedule must start at 1.0, got {values[0]}")
    if any(not (0.0 < r <= 1.0) for r in values):
        raise ValueError(f"raw schedule values must lie in (0, 1], got {values}")
    if any(b >= a for a, b in pairwise(values)):
        raise ValueError(f"raw schedule must be strictly decreasing, got {values}")
    return _shifted_with_zero(torch.tensor(values, dtype=torch.float64), shift)


def validate_dynamic(k_min: int, k_max: int, u_min: float, u_max: float) -> None:
    """Check the dynamic-schedule ranges: 1 <= k_min <= k_max and 0 < u_min <= u_max < 1."""
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    if k_min > k_max:
        raise ValueError(f"k_min must be <= k_max, got k_min={k_min} > k_max={k_max}")
    if not 0.0 < u_min:
        raise ValueError(f"u_min must be > 0, got {u_min}")
    if not u_min <= u_max:
        raise ValueError(f"u_min must be <= u_max, got u_min={u_min} > u_max={u_max}")
    if not u_max < 1.0:
        raise ValueError(f"u_max must be < 1, got {u_max}")


def _make_strictly_decreasing(sigmas: torch.Tensor) -> torch.Tensor:
    """Nudge ties (float32 collisions, or u_min == u_max) down by one ulp each.

    Ties have probability zero for u_min < u_max except for float32 rounding; a nudged value
    may sit a few ulps below shift(u_min).
    """
    out = sigmas.clone()
    zero = out.new_zeros(())
    for j in range(1, out.numel() - 1):  # the final 0 is left alone
        if out[j] >= out[j - 1]:
            out[j] = torch.nextafter(out[j - 1], zero)
    return out


def draw_length(k_min: int, k_max: int, generator: torch.Generator) -> int:
    """K ~ U{k_min..k_max}. Draw it from a generator seeded alike on every data-parallel rank:
    K sets how many forwards the rollout makes, which must agree under ZeRO-3."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    return int(torch.randint(k_min, k_max + 1, (1,), generator=generator, device=generator.device))


def dynamic_sigmas(
    k: int, u_min: float, u_max: float, shift: float, generator: torch.Generator
) -> torch.Tensor:
    """A dynamic continuous schedule of K = `k` steps (docs/method.md, paper §3.2).

    u_1..u_{K-1} ~ U[u_min, u_max] sorted descending;
    ``sigmas = [shift(1), shift(u_1), ..., shift(u_{K-1}), 0]`` (length K + 1, float32,
    strictly decreasing, on the generator's device). Each rank draws these from its own
    generator, as the authors do: a global batch mixes schedules of one length.
    """
    validate_dynamic(k, k, u_min, u_max)
    _check_shift(shift)
    device = generator.device
    u = torch.rand(k - 1, generator=generator, device=device, dtype=torch.float64)
    u = u_min + (u_max - u_min) * u
    u = torch.sort(u, descending=True).values
    raw = torch.cat([u.new_ones(1), u])
    return _make_strictly_decreasing(_shifted_with_zero(raw, shift))


def dynamic_schedule(
    k_min: int,
    k_max: int,
    u_min: float,
    u_max: float,
    shift: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """K ~ U{k_min..k_max}, then `dynamic_sigmas` of that length, from one generator."""
    validate_dynamic(k_min, k_max, u_min, u_max)
    return dynamic_sigmas(draw_length(k_min, k_max, generator), u_min, u_max, shift, generator)


def draw_anchor(k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample anchor index i ~ U{0..K-1} (int64, shape (batch,), generator's device)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return torch.randint(0, k, (batch,), generator=generator, device=generator.device)
