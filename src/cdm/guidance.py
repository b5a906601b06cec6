"""How a model family combines its conditional and unconditional velocities under CFG.

Most families take the linear combination v_u + s (v_c - v_u) (cdm.flow.cfg). A velocity
adapter whose pipeline does more defines `guide(v_c, v_u, scale)` (Qwen-Image rescales the
result to the norm of v_c): the teacher's CFG samples and the CA loss's guided teacher use
it, so both are what the stock pipeline computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdm.flow import cfg

Guide = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def guide_of(velocity: object) -> Guide | None:
    """The family's non-linear CFG combination, or None for the linear one. A LoRA-mode
    teacher (cdm.lora.Teacher) is a view of its shared velocity module."""
    return getattr(getattr(velocity, "shared", velocity), "guide", None)


def combine(velocity: object, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float):
    """The guided velocity the family's pipeline forms at guidance `scale`."""
    guide = guide_of(velocity)
    return cfg(v_cond, v_uncond, scale) if guide is None else guide(v_cond, v_uncond, scale)
