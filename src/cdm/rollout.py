"""Backward simulation of the student (paper §3.2), computing each sample only as far as needed.

The losses read, per sample, the on-trajectory latent x_{s_i} at its anchor i, the velocity
v_i there and the clean estimate made there, x0_hat_i = x_{s_i} - s_i v_i: DM and CDM re-noise
the distribution of that estimate, and the fake score learns exactly it (docs/method.md, fake-score
update). A sample therefore needs i + 1 = min(i + 1, K) student evaluations, not K: at step k
only the samples whose anchor is k or later are evaluated, so the batch shrinks as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdm.conditioning import Condition
from cdm.flow import euler_step, x0_from_v

Velocity = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


@dataclass
class Rollout:
    x_anchor: torch.Tensor  # x_{s_i}, on the trajectory
    v_anchor: torch.Tensor  # v_G(x_{s_i}, s_i)
    sigma_anchor: torch.Tensor  # s_i, (B,)
    x0_anchor: torch.Tensor  # x0_hat_i: the fake score's training sample
    n_evals: int  # student sample-evaluations spent


def evals_needed(anchor: torch.Tensor, k: int) -> torch.Tensor:
    """Student evaluations each sample needs: min(anchor + 1, K) (anchor < K: anchor + 1)."""
    return (anchor + 1).clamp(max=k)


@torch.no_grad()
def rollout(
    velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Condition,
    anchor: torch.Tensor,
    steps: int | None = None,
) -> Rollout:
    """Shrinking Euler rollout of `velocity` from `noise` along `sigmas` (K + 1 values).

    `steps` forces at least that many forward calls (a 1-sample dummy call once no sample
    is left): under ZeRO-3 every rank must run every forward, so ranks pass the global
    maximum of their needs.
    """
    k_total = len(sigmas) - 1
    need = evals_needed(anchor, k_total)
    n_calls = int(need.max()) if steps is None else max(steps, int(need.max()))
    x = noise.clone()
    x_anchor, v_anchor = torch.empty_like(x), torch.empty_like(x)
    n_evals = 0
    for k in range(n_calls):
        active = (need > k).nonzero().squeeze(1)
        if len(active) == 0:  # only to keep step with the other ranks
            velocity(x[:1], sigmas[min(k, k_total - 1)].expand(1), cond.take(slice(0, 1)))
            continue
        s, s_next = sigmas[k], sigmas[k + 1]
        x_k = x[active]
        v_k = velocity(x_k, s.expand(len(active)), cond.take(active))
        n_evals += len(active)
        at_anchor = anchor[active] == k
        x_anchor[active[at_anchor]] = x_k[at_anchor]
        v_anchor[active[at_anchor]] = v_k[at_anchor]
        x[active] = euler_step(x_k, v_k, s, s_next)
    s_i = sigmas[anchor]
    x0_anchor = x0_from_v(x_anchor, v_anchor, s_i)
    return Rollout(x_anchor, v_anchor, s_i, x0_anchor, n_evals)


@torch.no_grad()
def full_rollout(
    velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, cond: Condition
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Reference K-step rollout of the whole batch: latents x_k (K + 1), velocities and
    clean estimates (K each). The shrinking rollout must agree with it."""
    xs, vs, x0s = [noise], [], []
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = velocity(xs[-1], s.expand(len(noise)), cond)
        vs.append(v)
        x0s.append(x0_from_v(xs[-1], v, s))
        xs.append(euler_step(xs[-1], v, s, s_next))
    return xs, vs, x0s
