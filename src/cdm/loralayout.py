"""The student LoRA in the key layout ComfyUI and kohya-ss tools read, per model family.

Our LoRA files are diffusers' (`transformer.<diffusers module>.lora_A/lora_B.weight`). Where
users load LoRAs the keys differ, and a layout a loader does not know loads nothing ("lora
key not loaded"). What each family's loaders read (ComfyUI's comfy/lora.py key maps,
kohya-ss/musubi-tuner's saved names, diffusers' converters in lora_conversion_utils):

- qwen-image: kohya/musubi-tuner's `lora_unet_<diffusers module, dots as _>` with
  `.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`. ComfyUI's Qwen-Image model
  uses diffusers' module names, so its generic `lora_unet_` map reads it; diffusers
  converts it back (QwenImagePipeline.lora_state_dict).
- flux2-klein: kohya's names of the original (BFL) FLUX.2 modules: double blocks'
  `img_attn_qkv` / `txt_attn_qkv` (q, k, v fused), `img_attn_proj`, `img_mlp_0/2`, single
  blocks' `linear1` / `linear2`. ComfyUI's FLUX.2 model has those modules; diffusers
  converts it back (Flux2Pipeline's kohya converter). A fused qkv LoRA is the q, k and v
  LoRAs block-diagonal: A = [A_q; A_k; A_v], B = diag(B_q, B_k, B_v) (rank 3r), exact.
- sd3 (SD3 / SD3.5): ComfyUI maps diffusers' own SD3 keys (`transformer.<module>`) onto its
  MMDiT (comfy/lora.py: "regular diffusers sd3 lora format"), so the diffusers file is the
  ComfyUI file: no second layout. longcat: no ComfyUI LoRA map is known; none either.

Every scale is in the factors (cdm.lorafactors), so alpha = rank (scale 1) per module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from cdm import lorafactors
from cdm.lorafactors import Factors

FILE = "lora_comfyui_kohya.safetensors"  # beside pytorch_lora_weights.safetensors

# FLUX.2: diffusers module (after the block index) -> original name; fused q, k, v by slot.
FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
    "ff.linear_in": "img_mlp_0", "ff.linear_out": "img_mlp_2",
    "ff_context.linear_in": "txt_mlp_0", "ff_context.linear_out": "txt_mlp_2",
}  # fmt: skip
FLUX2_QKV = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
}  # fmt: skip
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def kohya_entry(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """One module's kohya keys; alpha = rank, as every scale is in B."""
    return {
        f"{name}.lora_down.weight": a.contiguous(),
        f"{name}.lora_up.weight": b.contiguous(),
        f"{name}.alpha": torch.tensor(float(a.shape[0])),
    }


def qwen_image(factors: Factors) -> dict[str, torch.Tensor]:
    """Qwen-Image: kohya/musubi names are the diffusers module names with dots as _."""
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        out |= kohya_entry("lora_unet_" + name.replace(".", "_"), a, b)
    return out


def _qkv(factors: Factors, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused projection's LoRA from its parts' (a part without one: zeros)."""
    present = next(factors[n] for n in names if n in factors)
    r, width, out_dim = present[0].shape[0], present[0].shape[1], present[1].shape[0]
    a_parts, b_parts = [], []
    for n in names:
        a, b = factors.get(n, (present[0].new_zeros(r, width), present[1].new_zeros(out_dim, r)))
        a_parts.append(a)
        b_parts.append(b)
    return torch.cat(a_parts), torch.block_diag(*b_parts)


def flux2(factors: Factors) -> dict[str, torch.Tensor]:
    """FLUX.2: kohya names of the original modules, q, k and v fused block-diagonally."""
    factors = lorafactors.padded(factors, lorafactors.rank(factors))  # one r for the fusing
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, (a, b) in sorted(factors.items()):
        match = BLOCK.match(name)
        if match is None:
            if name not in FLUX2_TOP:
                raise ValueError(_unmapped(name, "flux2-klein"))
            out |= kohya_entry(f"lora_unet_{FLUX2_TOP[name]}", a, b)
            continue
        kind, index, rel = match.groups()
        if kind == "single_transformer_blocks":
            if rel not in FLUX2_SINGLE:
                raise ValueError(_unmapped(name, "flux2-klein"))
            out |= kohya_entry(f"lora_unet_single_blocks_{index}_{FLUX2_SINGLE[rel]}", a, b)
            continue
        fused = next((k for k, parts in FLUX2_QKV.items() if rel in parts), None)
        if fused is not None:
            key = f"lora_unet_double_blocks_{index}_{fused}"
            if key not in done:
                parts = tuple(f"{kind}.{index}.{p}" for p in FLUX2_QKV[fused])
                out |= kohya_entry(key, *_qkv(factors, parts))
                done.add(key)
        elif rel in FLUX2_DOUBLE:
            out |= kohya_entry(f"lora_unet_double_blocks_{index}_{FLUX2_DOUBLE[rel]}", a, b)
        else:
            raise ValueError(_unmapped(name, "flux2-klein"))
    return out


def _unmapped(name: str, family: str) -> str:
    return (
        f"LoRA module '{name}' has no kohya/ComfyUI name for {family}; drop it from "
        "distill.lora.targets (the diffusers file loads it)"
    )


# backend -> the layout writer (backends absent here have none: see the module text).
LAYOUTS: dict[str, Callable[[Factors], dict[str, torch.Tensor]]] = {
    "qwen-image": qwen_image,
    "flux2-klein": flux2,
}


def export(backend: str, diffusers_file: Path) -> Path | None:
    """FILE beside `diffusers_file` (a LoRA lorafactors or diffusers' writer saved, alpha = r
    or with metadata) in `backend`'s kohya/ComfyUI layout; None when the family has none."""
    if backend not in LAYOUTS:
        return None
    from safetensors.torch import save_file

    state = LAYOUTS[backend](read_diffusers(diffusers_file))
    path = diffusers_file.parent / FILE
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def read_diffusers(path: Path) -> Factors:
    """A diffusers LoRA file's factors with its alpha / r folded into B (metadata lora_alpha
    and r, as diffusers' writer stores them; none: scale 1)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    meta = json.loads(raw) if raw else {}
    r, alpha = meta.get(f"{lorafactors.PREFIX}r"), meta.get(f"{lorafactors.PREFIX}lora_alpha")
    if meta.get(f"{lorafactors.PREFIX}rank_pattern") or meta.get(
        f"{lorafactors.PREFIX}alpha_pattern"
    ):
        raise ValueError(f"{path}: per-module rank or alpha patterns are not supported")
    root = float(r) ** 0.5 if meta.get(f"{lorafactors.PREFIX}use_rslora") else float(r or 1)
    scale = float(alpha) / root if r and alpha else 1.0  # peft's alpha / r (rsLoRA: / sqrt r)
    return {name: (a, b * scale) for name, (a, b) in lorafactors.load(path).items()}
