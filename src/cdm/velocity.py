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


class QwenImageVelocity(torch.nn.Module):
    """Wraps diffusers' QwenImageTransformer2DModel as velocity(x, sigma, cond).

    x is the unpacked latent (B, 16, h, w), packed into 2x2-patch tokens like LongCat's; the
    rotary grid comes from img_shapes [(1, h/2, w/2)] per sample, text positions follow it.
    QwenImagePipeline passes timestep = t / 1000 = sigma (the transformer scales by 1000
    itself) and steps x + (s' - s) v from sigma 1 (noise), so v = eps - x0 as in SD3.
    The cached prompt embeddings are padded to a fixed length; `cond.pooled` carries their
    mask (1 = a prompt token), which the transformer's attention applies.
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        mask = cond.pooled.to(x.device) > 0.5
        out = self.transformer(
            hidden_states=QwenImagePipeline._pack_latents(x.to(dtype), b, c, h, w),
            encoder_hidden_states=cond.embeds.to(dtype),
            # The pipeline passes no mask when every token is a prompt token.
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            timestep=sigma.to(dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_longcat(out.float(), c, h, w)

    @staticmethod
    def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: v_u + scale (v_c - v_u), rescaled per packed token
        (16 channels x 2x2 patch) to the norm of v_c, computed on packed tokens as it does."""
        from diffusers import QwenImagePipeline

        b, c, h, w = v_cond.shape
        cond = QwenImagePipeline._pack_latents(v_cond, b, c, h, w)
        uncond = QwenImagePipeline._pack_latents(v_uncond, b, c, h, w)
        comb = uncond + scale * (cond - uncond)
        comb = comb * (
            torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)
        )
        return unpack_longcat(comb, c, h, w)


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
