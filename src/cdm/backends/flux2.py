"""Backend `flux2-klein`: FLUX.2 [klein] base pipelines (diffusers' Flux2KleinPipeline).

The teacher is the undistilled [klein] base model (black-forest-labs/FLUX.2-klein-base-4B,
Apache-2.0; the base 9B runs the same way under its own licence): the distilled [klein]
models are already few-step students and guide by nothing. The base model guides by true
CFG, two passes with the empty prompt as negative and no guidance embedding
(guidance_embeds false, guidance=None), which is what the CA loss's cond / null pair is.

The flow runs on the pipeline's latents: the VAE's (AutoencoderKLFlux2) 32 channels
patchified 2x2 into 128 and normalised by the VAE's batch-norm statistics; one latent cell
spans 16 px. Flux2Velocity takes timestep = sigma (SD3 conventions, v = eps - x0). The text
encoder (Qwen3) gives the hidden states of layers 9, 18 and 27 of the chat-templated,
512-token padded prompt, stacked along the width; it is loaded only by `load`.

Time shift: the pipeline passes mu = compute_empirical_mu(image tokens, steps), which moves
with the step count. Distillation uses the teacher's shift at its default call
(TEACHER_STEPS = 50: the base model's sampling), exp(mu(tokens, 50)); the exported
scheduler turns dynamic shifting off so that stock calls run our sigmas at every k.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

from cdm.backends import few_step, pipelines
from cdm.backends.export import export_student
from cdm.velocity import Flux2Velocity

TEXT_TOKENS = 512  # Flux2KleinPipeline's max_sequence_length: the templated prompt, padded
DEFAULT_SAMPLE_SIZE = 128  # Flux2KleinPipeline.default_sample_size (x the VAE factor = px)
TEACHER_STEPS = 50  # the pipeline's default num_inference_steps: the shift the teacher runs at
PATCH = 2  # the pipeline patchifies the VAE latent 2x2 before the transformer

# What black-forest-labs/FLUX.2-klein-base-4B's hub card declares; the 9B's card declares
# the FLUX non-commercial licence, which export copies from a teacher folder's README.md.
LICENSE = {"license": "apache-2.0"}

FAMILY = pipelines.Family(
    backend="flux2-klein",
    pipeline="Flux2KleinPipeline",
    parts=("transformer", "scheduler", "vae"),
    default_call=lambda raw, shift, base: few_step.on_base(
        few_step.static_default_call(raw, shift), base
    ),
    explicit=lambda shift, base: base | few_step.plain(shift),
    call="num_inference_steps={steps}, guidance_scale=1.0{extra}",
    license=LICENSE,
    latent_patch=PATCH,
    # A step-distilled [klein]: the stock call then skips CFG whatever guidance_scale says.
    index={"is_distilled": True},
)


def resolve(path: str | Path) -> Path:
    return pipelines.resolve(path, FAMILY)


def geometry(folder: Path, resolution: int | None) -> tuple[float, tuple[int, int, int], int]:
    """(shift, latent shape (128, h, w), image tokens) from the configs alone."""
    config = Flux2Transformer2DModel.load_config(folder / "transformer")
    if int(config.get("patch_size", 1)) != 1:
        raise ValueError(
            f"this flux2-klein transformer has patch_size {config['patch_size']}; "
            "Flux2KleinPipeline feeds it patchified latents and needs patch_size 1"
        )
    cell = pipelines.vae_factor(folder) * PATCH
    resolution = DEFAULT_SAMPLE_SIZE * cell // PATCH if resolution is None else resolution
    if resolution % cell:
        raise ValueError(
            f"teacher.resolution ({resolution}) must be a multiple of {cell} "
            f"(VAE factor {cell // PATCH} x patch {PATCH}) for this flux2-klein model"
        )
    size = resolution // cell
    tokens = size * size
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")
    shift = few_step.empirical_shift(dict(scheduler), tokens, TEACHER_STEPS)
    return shift, (int(config["in_channels"]), size, size), tokens


class Flux2Decoder(pipelines.VaeDecoder):
    """Flux2KleinPipeline's decode: undo the batch-norm normalisation with the VAE's running
    statistics, unpatchify 128 -> 32 channels, decode."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        self.factor *= PATCH

    def vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return Flux2KleinPipeline._unpatchify_latents(z * std.to(z.device, z.dtype) + mean)


class Flux2Teacher(pipelines.TextEncoderTeacher):
    """The teacher as cache_teacher and prepare_teacher see it: the text encoder loaded, the
    transformer and VAE only when asked for."""

    name = "flux2-klein"
    family = FAMILY
    geometry = staticmethod(geometry)

    def embeds(self, prompts: list[str]) -> torch.Tensor:
        """Flux2KleinPipeline.encode_prompt: Qwen3's layers 9, 18, 27 of the templated prompt
        (TEXT_TOKENS tokens) side by side."""
        return self.pipe.encode_prompt(prompts, device=self.device)[0]

    def truncated(self, prompts: list[str]) -> int:
        """How many prompts the encoder sees cut: the chat template's tokens count too."""
        tokenizer = self.pipe.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False,
                add_generation_prompt=True, enable_thinking=False,
            )
            for p in prompts
        ]  # fmt: skip
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        return sum(len(row) > TEXT_TOKENS for row in ids)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return load_decoder(self.folder)(latents)


def load(path: str | Path, resolution: int | None = None) -> Flux2Teacher:
    return Flux2Teacher(pipelines.check(path, FAMILY), resolution)


def load_velocity(
    path: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None
) -> tuple[Flux2Velocity, float, tuple[int, int, int]]:
    """The transformer alone (no text encoder): (velocity, shift, latent shape); its weights
    read in `dtype` (None: fp32)."""
    transformer, shift, shape = pipelines.load_transformer(
        path, FAMILY, geometry, resolution, dtype
    )
    return Flux2Velocity(transformer), shift, shape


def load_decoder(path: str | Path) -> Flux2Decoder:
    """The VAE alone: batch-norm statistics undone, unpatchified, decoded -> uint8 (B, H, W, 3)."""
    from diffusers import AutoencoderKLFlux2

    folder = pipelines.check(path, FAMILY, "model folder")
    return Flux2Decoder(AutoencoderKLFlux2.from_pretrained(folder / "vae"))


def export(
    student: Flux2Velocity,
    teacher_dir: str | Path,
    out: Path,
    inference: dict,
    params: dict | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """A complete Flux2KleinPipeline folder (is_distilled: no CFG) whose stock call with
    num_inference_steps=k runs our k-step sigmas at every k, the recipe's at its step count,
    plus a model card; the transformer in the teacher's dtype unless `dtype`."""
    export_student(
        student.transformer, FAMILY, geometry, teacher_dir, out, inference, params, dtype,
        base_model,
    )  # fmt: skip
