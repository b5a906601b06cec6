"""Backend `sd3`: Stable Diffusion 3 pipelines (diffusers' StableDiffusion3Pipeline).

Distillation runs in the VAE's latent space (16 channels for SD3) with the transformer's
SD3 conventions (TransformerVelocity: timestep = 1000 sigma) and the scheduler's shift
(3.0 for SD3-Medium). The three text encoders (two CLIPs and T5) are loaded only by `load`,
for cache_teacher; `load_velocity` and `load_decoder` never touch them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from cdm.backends import few_step, pipelines
from cdm.backends.export import export_student
from cdm.conditioning import Condition
from cdm.velocity import TransformerVelocity

# SD3 and SD3.5 weights are under the Stability AI Community License (their hub cards:
# license other, license_name stabilityai-ai-community, the text in LICENSE.md).
LICENSE = {
    "license": "other",
    "license_name": "stabilityai-ai-community",
    "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md",
}
FAMILY = pipelines.Family(
    backend="sd3",
    pipeline="StableDiffusion3Pipeline",
    parts=("transformer", "scheduler", "vae"),
    default_call=lambda raw, shift, base: few_step.sd3_default_call(
        raw, shift, int(base.get("num_train_timesteps", 1000))
    ),
    explicit=lambda shift, base: few_step.flow_map(
        shift, int(base.get("num_train_timesteps", 1000))
    ),
    call="num_inference_steps={steps}, guidance_scale=1.0{extra}",
    license=LICENSE,
)


def resolve(path: str | Path) -> Path:
    return pipelines.resolve(path, FAMILY)


def geometry(folder: Path, resolution: int | None) -> tuple[float, tuple[int, int, int], int]:
    """(shift, latent shape (C, h, w), image tokens) from the configs alone (no weights).

    resolution None: the transformer's sample_size latents (1024 px for SD3-Medium).
    """
    config = SD3Transformer2DModel.load_config(folder / "transformer")
    factor, patch = pipelines.vae_factor(folder), int(config["patch_size"])
    if resolution is None:
        size = int(config["sample_size"])
    elif resolution % (factor * patch):
        raise ValueError(
            f"teacher.resolution ({resolution}) must be a multiple of {factor * patch} "
            f"(VAE factor {factor} x patch {patch}) for this sd3 model"
        )
    else:
        size = resolution // factor
    limit = config.get("pos_embed_max_size")
    if limit is not None and size // patch > int(limit):
        raise ValueError(
            f"teacher.resolution ({size * factor}) exceeds this sd3 model's position grid "
            f"({int(limit) * patch * factor} px at most)"
        )
    tokens = (size // patch) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")
    shift = few_step.effective_shift(dict(scheduler), tokens)
    return shift, (int(config["in_channels"]), size, size), tokens


class SD3Teacher(pipelines.PipelineTeacher):
    """The teacher as cache_teacher and prepare_teacher see it: text encoders loaded, the
    transformer and VAE only when asked for."""

    name = "sd3"
    family = FAMILY
    # encode_prompt's defaults: both CLIPs keep 77 tokens, T5 max_sequence_length 256.
    token_limits = {"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": 256}

    def __init__(self, folder: Path, resolution: int | None = None):
        self.folder, self.resolution = folder, resolution
        self.shift, self.latent_shape, _ = geometry(folder, resolution)
        self.device, dtype = pipelines.text_device()
        self.pipe = _text_pipeline(folder, dtype)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        """StableDiffusion3Pipeline.encode_prompt: CLIP-L + CLIP-G + T5 tokens, pooled CLIPs."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False
        )
        return Condition(embeds.cpu(), pooled.cpu())


def _text_pipeline(folder: Path, dtype: torch.dtype):
    """The pipeline with its text encoders and tokenizers only. The transformer is built on
    the meta device from its config (no weights): encode_prompt reads its
    joint_attention_dim when a pipeline has no T5."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusion3Pipeline

    with init_empty_weights():
        stub = SD3Transformer2DModel.from_config(
            SD3Transformer2DModel.load_config(folder / "transformer")
        )
    optional = {}
    for part in ("text_encoder_3", "tokenizer_3"):
        if not (folder / part).is_dir():  # a pipeline saved without T5
            optional[part] = None
    return StableDiffusion3Pipeline.from_pretrained(
        folder, transformer=stub, vae=None, dtype=dtype, **optional
    )


def load(path: str | Path, resolution: int | None = None) -> SD3Teacher:
    return SD3Teacher(pipelines.check(path, FAMILY), resolution)


def load_velocity(
    path: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None
) -> tuple[TransformerVelocity, float, tuple[int, int, int]]:
    """The transformer alone (no text encoder): (velocity, shift, latent shape); its weights
    read in `dtype` (None: fp32)."""
    transformer, shift, shape = pipelines.load_transformer(
        path, FAMILY, geometry, resolution, dtype
    )
    return TransformerVelocity(transformer), shift, shape


def load_decoder(path: str | Path) -> pipelines.VaeDecoder:
    """The VAE alone: latents / scaling_factor + shift_factor -> decode -> uint8 (B, H, W, 3)."""
    return pipelines.load_vae_decoder(path, FAMILY)


def export(
    student: TransformerVelocity,
    teacher_dir: str | Path,
    out: Path,
    inference: dict,
    params: dict | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """A complete StableDiffusion3Pipeline folder whose stock call with num_inference_steps=k
    runs our k-step sigmas at every k, the recipe's at its step count (see few_step), plus
    inference.json and a model card; the transformer in the teacher's dtype unless `dtype`."""
    export_student(
        student.transformer, FAMILY, geometry, teacher_dir, out, inference, params, dtype,
        base_model,
    )  # fmt: skip
