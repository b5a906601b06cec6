"""`velocity(x, sigma, cond)`: the one call every model family is adapted to."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from cdm.conditioning import Condition


class TransformerVelocity(torch.nn.Module):
    """Wraps an SD3-style transformer; sigma in [0, 1] maps to timestep 1000 * sigma."""

    def __init__(self, transformer: SD3Transformer2DModel):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.embeds.to(x.dtype),
            pooled_projections=cond.pooled.to(x.dtype),
            timestep=1000 * sigma.to(x.dtype),
            return_dict=False,
        )[0]
