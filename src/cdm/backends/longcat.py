"""Backend `longcat`: LongCat-Image pipelines (diffusers' LongCatImagePipeline).

The transformer (LongCatImageTransformer2DModel, a Flux-style MMDiT) reads 2x2-packed
latent tokens with rotary position ids and takes timestep = sigma; LongCatVelocity adapts
it to velocity(x, sigma, cond) on unpacked 16-channel latents. Its flow follows the SD3
conventions (sigma = 1 is noise, v = eps - x0). The shift is the scheduler's dynamic
shift at the image's token count (exp(mu), mu from calculate_shift). The text encoder
(Qwen2.5-VL) is loaded only by `load`, for cache_teacher; prompts are encoded as given
(the pipeline's optional prompt rewriting is not applied).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import LongCatImageTransformer2DModel

from cdm.backends import pipelines
from cdm.backends.export import export_student
from cdm.velocity import LongCatVelocity

TEXT_TOKENS = 512  # LongCatImagePipeline.tokenizer_max_length: prompt length, image id offset
DEFAULT_SAMPLE_SIZE = 128  # LongCatImagePipeline.default_sample_size (x the VAE factor = px)

# The license meituan-longcat/LongCat-Image's hub card declares.
LICENSE = {"license": "apache-2.0"}


FAMILY = pipelines.passing_family(
    "longcat",
    "LongCatImagePipeline",
    "num_inference_steps={steps}, guidance_scale=1.0, enable_prompt_rewrite=False{extra}",
    LICENSE,
)


def resolve(path: str | Path) -> Path:
    return pipelines.resolve(path, FAMILY)


def geometry(folder: Path, resolution: int | None) -> tuple[float, tuple[int, int, int], int]:
    """(shift, unpacked latent shape (C, h, w), image tokens) from the configs alone."""
    config = LongCatImageTransformer2DModel.load_config(folder / "transformer")
    channels = int(config["in_channels"])
    return pipelines.packed_geometry(folder, resolution, channels, "longcat", DEFAULT_SAMPLE_SIZE)


class LongCatTeacher(pipelines.TextEncoderTeacher):
    """The teacher as cache_teacher and prepare_teacher see it: the text encoder loaded, the
    transformer and VAE only when asked for."""

    name = "longcat"
    family = FAMILY
    token_limits = {"tokenizer": TEXT_TOKENS}  # the prompt's own tokens, before the template
    geometry = staticmethod(geometry)

    def embeds(self, prompts: list[str]) -> torch.Tensor:
        """LongCatImagePipeline.encode_prompt: the last hidden states of the padded prompt
        (TEXT_TOKENS tokens)."""
        return self.pipe.encode_prompt(prompts)[0]


def load(path: str | Path, resolution: int | None = None) -> LongCatTeacher:
    return LongCatTeacher(pipelines.check(path, FAMILY), resolution)


def load_velocity(
    path: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None
) -> tuple[LongCatVelocity, float, tuple[int, int, int]]:
    """The transformer alone (no text encoder): (velocity, shift, latent shape); its weights
    read in `dtype` (None: fp32)."""
    transformer, shift, shape = pipelines.load_transformer(
        path, FAMILY, geometry, resolution, dtype
    )
    return LongCatVelocity(transformer, TEXT_TOKENS), shift, shape


def load_decoder(path: str | Path) -> pipelines.VaeDecoder:
    """The VAE alone: latents / scaling_factor + shift_factor -> decode -> uint8 (B, H, W, 3)."""
    return pipelines.load_vae_decoder(path, FAMILY)


def export(
    student: LongCatVelocity,
    teacher_dir: str | Path,
    out: Path,
    inference: dict,
    params: dict | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """A complete LongCatImagePipeline folder whose stock call with num_inference_steps=k (and
    enable_prompt_rewrite=False) runs our k-step sigmas at every k, the recipe's at its step
    count, plus a model card; the transformer in the teacher's dtype unless `dtype`."""
    export_student(
        student.transformer, FAMILY, geometry, teacher_dir, out, inference, params, dtype,
        base_model,
    )  # fmt: skip
