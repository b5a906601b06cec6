"""The one small interface every model family is adapted to."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from cdm.conditioning import Condition


class Backend(Protocol):
    """A loaded teacher of one model family.

    The engine, sampler and scorer see only this: `velocity(x, sigma, cond)` networks,
    conditioning tensors, latent geometry, the time shift, decoding and export.
    """

    name: str
    shift: float
    latent_shape: tuple[int, int, int]

    def encode(self, prompts: list[str]) -> Condition:
        """Text conditioning; used only by cache_teacher."""
        ...

    def null_condition(self) -> Condition:
        """Conditioning of the empty prompt (for CFG)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images (B, H, W, 3)."""
        ...

    def save_teacher(self, path: Path) -> None:
        """Write the resolved teacher to `path` (models/teacher/)."""
        ...
