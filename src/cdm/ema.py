"""In-place parameter blends: the student EMA and the fake-score <- student blend (docs/method.md)."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(n: int, max_decay: float = 0.999) -> float:
    """EMA decay at update n: min((1 + n) / (10 + n), max_decay)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return min((1 + n) / (10 + n), max_decay)


@torch.no_grad()
def blend_(target: nn.Module, source: nn.Module, keep: float) -> None:
    """F <- keep F + (1 - keep) G, parameter by parameter, in place on `target`.

    Used for the fake-score blend (keep = 0.999) and the student EMA (keep = ema_decay(n)).
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")
    t_params = dict(target.named_parameters())
    s_params = dict(source.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("target and source have different parameter names")
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch for {name}: {tuple(t.shape)} vs {tuple(s.shape)}")
        t.mul_(keep).add_(s.to(device=t.device, dtype=t.dtype), alpha=1.0 - keep)
