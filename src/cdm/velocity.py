"""`velocity(x, sigma, cond)`: the one call every model family is adapted to."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cdm.conditioning import Condition

if TYPE_CHECKING:  # diffusers loads with the backend that builds the transformer
    from diffusers import SD3Transformer2DModel


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


class LongCatVelocity(torch.nn.Module):
    """Wraps diffusers' LongCatImageTransformer2DModel as velocity(x, sigma, cond).

    x is the unpacked latent (B, 16, h, w); the transformer reads 2x2 patches packed into
    tokens (B, h/2 * w/2, 64) with 3-axis rotary position ids: text tokens (0, i, i), image
    tokens (1, text_tokens + row, text_tokens + col), as LongCatImagePipeline builds them.
    It takes timestep = sigma (it multiplies by 1000 itself), and its flow is SD3's:
    FlowMatchEulerDiscreteScheduler steps x + (s' - s) v from sigma 1 (noise), so v = eps - x0.
    """

    def __init__(self, transformer: torch.nn.Module, text_tokens: int):
        super().__init__()
        self.transformer = transformer
        self.text_tokens = text_tokens  # LongCatImagePipeline.tokenizer_max_length

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import (
            LongCatImagePipeline,
            prepare_pos_ids,
        )

        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        txt_ids = prepare_pos_ids(0, "text", (0, 0), num_token=cond.embeds.shape[1])
        start = (self.text_tokens, self.text_tokens)
        img_ids = prepare_pos_ids(1, "image", start, height=h // 2, width=w // 2)
        out = self.transformer(
            hidden_states=LongCatImagePipeline._pack_latents(x.to(dtype), b, c, h, w),
            encoder_hidden_states=cond.embeds.to(dtype),
            timestep=sigma.to(dtype),
            txt_ids=txt_ids.to(x.device),
            img_ids=img_ids.to(x.device),
            return_dict=False,
        )[0]
        return unpack_longcat(out.float(), c, h, w)


def unpack_longcat(tokens: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4 C) tokens -> (B, C, h, w) latents (the pipeline's packing undone)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h, w)


class Flux2Velocity(torch.nn.Module):
    """Wraps diffusers' Flux2Transformer2DModel as velocity(x, sigma, cond).

    x is Flux2KleinPipeline's own latent: the VAE's 32 channels patchified 2x2 into 128 and
    batch-norm normalised, (B, 128, h, w), so the flow runs where the pipeline's does. The
    transformer reads it flattened to tokens (B, h w, 128) with 4-axis position ids
    (t, h, w, l): image (0, row, col, 0), text (0, 0, 0, i). It takes timestep = sigma (the
    pipeline passes its scheduler's timestep / 1000; the model multiplies by 1000) and no
    guidance embedding ([klein] base guides by two-pass CFG). Its flow is SD3's (sigma = 1 is
    noise, v = eps - x0).
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        embeds = cond.embeds.to(dtype)
        out = self.transformer(
            hidden_states=Flux2KleinPipeline._pack_latents(x.to(dtype)),
            encoder_hidden_states=embeds,
            timestep=sigma.to(dtype),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(x[:1]).to(x.device),
            txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds[:1]).to(x.device),
            guidance=None,
            return_dict=False,
        )[0]
        # Tokens come back in the order they went in (row-major): undo the flattening.
        return out.float().permute(0, 2, 1).reshape(b, c, h, w)
