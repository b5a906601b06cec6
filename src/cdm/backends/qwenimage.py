"""Backend `qwen-image`: Qwen-Image pipelines (diffusers' QwenImagePipeline).

The transformer (QwenImageTransformer2DModel, a 20B MMDiT of 60 double-stream blocks) reads
2x2-packed latent tokens and takes timestep = sigma; QwenImageVelocity adapts it to
velocity(x, sigma, cond) on unpacked 16-channel latents, with SD3's flow conventions. The
shift is the scheduler's dynamic shift at the image's token count (exp(mu)). The text
encoder (Qwen2.5-VL-7B) is loaded only by `load`, for cache_teacher. Its embeddings have
a per-prompt length: they are cached padded to TEXT_TOKENS with their mask in the
Condition's pooled slot. True CFG (two passes, the result rescaled to the conditional
velocity's norm) is the velocity's `guide`. The VAE (AutoencoderKLQwenImage) is a video
VAE: latents get a frame axis and latents_mean / latents_std instead of scaling factors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from cdm.backends import pipelines
from cdm.backends.export import export_student
from cdm.conditioning import Condition
from cdm.velocity import QwenImageVelocity

# Prompt tokens kept (the pipeline's max_sequence_length, 1024 at most): the embeddings are
# padded to this length so that every cached prompt has one shape (LongCat's 512).
TEXT_TOKENS = 512
DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (x the VAE factor = px)
LICENSE = {"license": "apache-2.0"}  # what Qwen/Qwen-Image's hub card declares


FAMILY = pipelines.passing_family(
    "qwen-image", "QwenImagePipeline", "num_inference_steps={steps}, true_cfg_scale=1.0{extra}",
    LICENSE,
)  # fmt: skip


def resolve(path: str | Path) -> Path:
    return pipelines.resolve(path, FAMILY)


def geometry(folder: Path, resolution: int | None) -> tuple[float, tuple[int, int, int], int]:
    """(shift, unpacked latent shape (C, h, w), image tokens) from the configs alone."""
    config = QwenImageTransformer2DModel.load_config(folder / "transformer")
    channels = int(config["in_channels"])
    return pipelines.packed_geometry(
        folder, resolution, channels, "qwen-image", DEFAULT_SAMPLE_SIZE
    )


def pad(embeds: torch.Tensor, mask: torch.Tensor | None, length: int = TEXT_TOKENS) -> Condition:
    """encode_prompt's (embeds, mask or None) padded with zeros to `length` tokens; the mask
    (1 = prompt token) as the pooled tensor, float like the embeddings."""
    b, n, _ = embeds.shape
    mask = embeds.new_ones(b, n) if mask is None else mask.to(embeds.dtype)
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - n))
    return Condition(embeds, torch.nn.functional.pad(mask, (0, length - n)))


class QwenVaeDecoder:
    """Latents -> uint8 images as QwenImagePipeline decodes: a frame axis added, latents x
    latents_std + latents_mean (the pipeline divides by 1 / std), the first frame kept."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.factor = 2 ** len(vae.config.temperal_downsample)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae, config = self.vae.to(latents.device), self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        pixels = latents.shape[-2] * latents.shape[-1] * self.factor**2
        out = []
        for chunk in latents.split(max(1, pipelines.DECODE_PIXELS // pixels)):
            z = chunk.unsqueeze(2).to(vae.dtype)
            mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
            images = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
            out.append(pipelines.to_uint8(images))
        return torch.cat(out)


class QwenImageTeacher(pipelines.PipelineTeacher):
    """The teacher as cache_teacher and prepare_teacher see it: the text encoder loaded, the
    transformer and VAE only when asked for."""

    name = "qwen-image"
    family = FAMILY
    token_limits = {"tokenizer": TEXT_TOKENS}  # the prompt's tokens (plus the template's end)

    def __init__(self, folder: Path, resolution: int | None = None):
        from diffusers import QwenImagePipeline

        self.open_text(folder, resolution, geometry, QwenImagePipeline)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        """QwenImagePipeline.encode_prompt (the last hidden states after the chat template's
        system part), cut at TEXT_TOKENS and padded to it, the mask in `pooled`."""
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=TEXT_TOKENS
        )
        return pad(embeds, mask).to("cpu")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return load_decoder(self.folder)(latents)


def load(path: str | Path, resolution: int | None = None) -> QwenImageTeacher:
    return QwenImageTeacher(pipelines.check(path, FAMILY), resolution)


def load_velocity(
    path: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None
) -> tuple[QwenImageVelocity, float, tuple[int, int, int]]:
    """The transformer alone (no text encoder): (velocity, shift, latent shape); its weights
    read in `dtype` (None: fp32)."""
    transformer, shift, shape = pipelines.load_transformer(
        path, FAMILY, geometry, resolution, dtype
    )
    return QwenImageVelocity(transformer), shift, shape


def load_decoder(path: str | Path) -> QwenVaeDecoder:
    """The VAE alone (AutoencoderKLQwenImage), decoding as the pipeline does."""
    from diffusers import AutoencoderKLQwenImage

    folder = pipelines.check(path, FAMILY, "model folder")
    return QwenVaeDecoder(AutoencoderKLQwenImage.from_pretrained(folder / "vae"))


def export(
    student: QwenImageVelocity,
    teacher_dir: str | Path,
    out: Path,
    inference: dict,
    params: dict | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """A complete QwenImagePipeline folder whose stock call with num_inference_steps=k (and
    true_cfg_scale=1.0) runs our k-step sigmas at every k, the recipe's at its step count,
    plus a model card; the transformer in the teacher's dtype unless `dtype`."""
    export_student(
        student.transformer, FAMILY, geometry, teacher_dir, out, inference, params, dtype,
        base_model,
    )  # fmt: skip
