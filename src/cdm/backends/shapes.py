"""Backend of the embedded shapes world: pixel space, tiny SD3 transformer, word tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

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
    def load(cls, path: str | Path, resolution: int | None = None) -> ShapesBackend:
        backend = cls(WorldTeacher.from_pretrained(path))
        _check_resolution(resolution, backend.latent_shape[-1])
        return backend

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        return self.teacher.condition(prompts)

    def null_condition(self) -> Condition:
        return self.encode([""])

    def truncated(self, prompts: list[str]) -> int:
        """How many prompts the word tokenizer cuts (max_length less start and end)."""
        room = self.teacher.tokenizer.max_length - 2
        return sum(len(p.split()) > room for p in prompts)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel space already: [-1, 1] -> uint8 (B, H, W, 3)."""
        return decode(latents)

    def save_teacher(self, path: Path) -> None:
        self.teacher.save_pretrained(path)


def _check_resolution(resolution: int | None, size: int) -> None:
    if resolution is not None and resolution != size:
        raise ValueError(
            f"teacher.resolution ({resolution}): the shapes world renders {size} px only; "
            "leave it null for the shapes backend"
        )


def load_velocity(
    path: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None
) -> tuple[TransformerVelocity, float, tuple[int, int, int]]:
    """The teacher's velocity network alone (no text encoder): (model, shift, latent shape);
    its weights read in `dtype` (None: fp32)."""
    path = Path(path)
    if not (path / "transformer").is_dir() or not (path / "scheduler").is_dir():
        raise FileNotFoundError(
            f"{path} is not a resolved teacher (expected transformer/ and scheduler/); "
            "run the prepare_teacher stage first"
        )
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
    shift = float(FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler").config.shift)
    c, size = int(transformer.config.in_channels), int(transformer.config.sample_size)
    _check_resolution(resolution, size)
    return TransformerVelocity(transformer), shift, (c, size, size)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Pixel space already: [-1, 1] -> uint8 (B, H, W, 3)."""
    images = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


def load_decoder(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> uint8 images (B, H, W, 3) without loading the teacher (no VAE in pixel space)."""
    return decode


def export(
    student: TransformerVelocity,
    teacher_dir: str | Path,
    out: Path,
    inference: dict,
    params: dict | None = None,
) -> None:
    """A teacher-shaped folder whose transformer is the student; `inference.json` gives its
    few-step recipe (raw sigmas, shift, guidance). Text parts are copied, not loaded."""
    teacher_dir = Path(teacher_dir)
    student.transformer.save_pretrained(out / "transformer")
    for part in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(teacher_dir / part, out / part)
    (out / "inference.json").write_text(json.dumps(inference, indent=1))


load = ShapesBackend.load
