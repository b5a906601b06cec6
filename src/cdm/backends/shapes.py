"""Backend of the embedded shapes world: pixel space, tiny SD3 transformer, word tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from cdm.conditioning import Condition
from cdm.velocity import TransformerVelocity
from cdm.world.teacher import WorldTeacher


class ShapesBackend:
    name = "shapes"

    def __init__(self, teacher: WorldTeacher):
        self.teacher = teacher.requires_grad_(False)
        self.shift = teacher.shift
        size = int(teacher.transformer.config.sample_size)
        self.latent_shape = (int(teacher.transformer.config.in_channels), size, size)

    @classmethod
    def load(cls, path: str | Path) -> ShapesBackend:
        return cls(WorldTeacher.from_pretrained(path))

    def velocity_model(self) -> torch.nn.Module:
        return TransformerVelocity(self.teacher.transformer)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        return self.teacher.condition(prompts)

    def null_condition(self) -> Condition:
        return self.encode([""])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel space already: [-1, 1] -> uint8 (B, H, W, 3)."""
        images = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous()

    def save_teacher(self, path: Path) -> None:
        self.teacher.save_pretrained(path)
