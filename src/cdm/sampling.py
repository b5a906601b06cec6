"""Samplers over `velocity(x, sigma, cond)`, k-diffusion style: short pure loops."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdm.conditioning import Condition
from cdm.flow import euler_step, time_shift
from cdm.guidance import combine

Velocity = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def inference_sigmas(steps: int, shift: float, raw: list[float] | None = None) -> torch.Tensor:
    """Shifted sigmas with a final 0, as diffusers' FlowMatchEulerDiscreteScheduler builds them.

    `raw` defaults to `steps` values evenly spaced from 1 down to 1/steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = (
        torch.tensor(raw, dtype=torch.float64)
        if raw is not None
        else torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    )
    shifted = time_shift(base, shift)
    return torch.cat([shifted, shifted.new_zeros(1)]).float()


@torch.no_grad()
def sample_euler(
    velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Condition,
    null: Condition | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Euler sampler of a rectified flow, with classifier-free guidance when cfg_scale != 1
    (combined as the velocity's family does: cdm.guidance)."""
    x = noise
    guided = null is not None and cfg_scale != 1.0
    both = Condition.cat([cond, null.expand(len(cond))]) if guided else cond
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        sigma = s.expand(x.shape[0])
        if guided:
            v_c, v_u = velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            v = combine(velocity, v_c, v_u, cfg_scale)
        else:
            v = velocity(x, sigma, both)
        x = euler_step(x, v, s, s_next)
    return x
