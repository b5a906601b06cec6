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
        """Velocity in float32 whatever the weights' precision (bf16 on GPU)."""
        dtype = self.transformer.dtype
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=1000 * sigma.float(),
            return_dict=False,
        )[0].float()
