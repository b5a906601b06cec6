"""Preview grids during distillation: the student EMA sampled at its recipe on fixed prompts
and fixed noise, so that grids of successive student steps show the run's progress."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdm.conditioning import Condition
from cdm.io import atomic_file
from cdm.sampling import inference_sigmas, sample_euler

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> uint8 (B, H, W, 3)


def preview_writer(
    decode: Decode,
    cond: Condition,
    shift: float,
    latent_shape: tuple[int, ...],
    raw_sigmas: list[float],
    seed: int,
    out_dir: Path,
    device: torch.device,
) -> Callable[[int, torch.nn.Module], Path]:
    """A callback (student step, model) -> out_dir/step-<step>.png: one row of len(cond)
    images, the same prompts and noise at every step."""
    noise = torch.randn((len(cond), *latent_shape), generator=torch.Generator().manual_seed(seed))
    sigmas = inference_sigmas(len(raw_sigmas), shift, raw_sigmas)

    def write(step: int, model: torch.nn.Module) -> Path:
        dtype = next(model.parameters()).dtype
        x = sample_euler(model, noise.to(device, dtype), sigmas.to(device), cond.to(device, dtype))
        row = np.concatenate(list(decode(x).cpu().numpy()), axis=1)
        path = out_dir / f"step-{step:06d}.png"
        with atomic_file(path) as tmp:
            Image.fromarray(row).save(tmp, format="PNG")
        return path

    return write
