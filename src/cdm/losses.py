"""Student and fake-score losses of CDM, in x0 space and float32 (docs/method.md; paper §3.1, §3.3).

Every student loss has the form ``mean((x0_s - sg(x0_s + d))^2)`` whose gradient w.r.t. x0_s
is ``-2 d / N``: it pushes the student's clean estimate along the direction d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cdm.flow import velocity_target


class MatchLoss(NamedTuple):
    """A student loss and the batch-mean of its per-sample normaliser w (detached, 0-dim)."""

    loss: torch.Tensor
    weight: torch.Tensor


def normaliser(a: torch.Tensor, x0_s: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """w = 1 / max(mean_{C,H,W} |A - sg(x0_s)|, floor), per sample, shape (B, 1, ..., 1).

    Detached: w scales the direction, it is not differentiated (docs/method.md; paper §3.1).
    """
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    diff = (a.detach().float() - x0_s.detach().float()).abs()
    dims = tuple(range(1, diff.ndim))
    scale = diff.mean(dim=dims, keepdim=True) if dims else diff
    return scale.clamp_min(floor).reciprocal()


def matching_loss(x0_s: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """mean((x0_s - sg(x0_s + d))^2); value mean(d^2), gradient -2 d / N w.r.t. x0_s."""
    x = x0_s.float()
    d = direction.detach().float()
    return (x - (x + d).detach()).square().mean()


def ca_loss(
    x0_s: torch.Tensor,
    x0_cond: torch.Tensor,
    x0_uncond: torch.Tensor,
    guidance: float,
    floor: float = 0.1,
    guided: torch.Tensor | None = None,
) -> MatchLoss:
    """CFG augmentation (paper §3.1, Decoupled DMD): d = w g (x0_c - x0_u), w from A = x0_c.

    g (x0_c - x0_u) is the CFG teacher's offset from x0_c at scale g + 1; `guided`, that
    teacher's clean estimate where the family's CFG is not linear (cdm.guidance), replaces it
    by guided - x0_c."""
    w = normaliser(x0_cond, x0_s, floor)
    if guided is None:
        d = w * guidance * (x0_cond.float() - x0_uncond.float())
    else:
        d = w * (guided.float() - x0_cond.float())
    return MatchLoss(matching_loss(x0_s, d), w.mean())


def dm_loss(
    x0_s: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, floor: float = 0.1
) -> MatchLoss:
    """Distribution matching (paper §3.1): d = w (x0_r - x0_f), w from A = x0_r."""
    w = normaliser(x0_real, x0_s, floor)
    d = w * (x0_real.float() - x0_fake.float())
    return MatchLoss(matching_loss(x0_s, d), w.mean())


def cdm_loss(
    x0_s_off: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, floor: float = 0.1
) -> MatchLoss:
    """Off-trajectory continuous-time matching (paper §3.3): the DM formula at (x', s').

    x' = x_{s_i} + (s' - s_i) v_i (flow.euler_step), x0_s' = x' - s' v_G(x', s'), and the
    teacher / fake-score estimates are taken after re-noising sg(x0_s').
    """
    return dm_loss(x0_s_off, x0_real, x0_fake, floor)


def fake_score_loss(v_fake: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Fake-score flow matching: mean((v_F - (eps - x0))^2); the target is detached."""
    target = velocity_target(x0.detach().float(), eps.detach().float())
    return (v_fake.float() - target).square().mean()


def renoise_tau(
    batch: int,
    generator: torch.Generator,
    low: float = 0.02,
    high: float = 0.98,
    upper: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample re-noising level, float32 shape (batch,).

    ``upper is None``: tau = clamp(U(0, 1), low, high) (DM, CDM, s', fake score): the
    recipe's "U(0.02, 0.98)" as the authors draw it, with `low` and `high` each holding
    their share of the mass (2% with the defaults).
    Otherwise tau = clamp(U(0, upper), low, high) (CA: no higher than the anchor s_i).
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
    if upper is None:
        return u.clamp(low, high)
    if upper.shape != (batch,):
        raise ValueError(f"upper must have shape ({batch},), got {tuple(upper.shape)}")
    return (u.to(upper.device) * upper.float()).clamp(low, high)
