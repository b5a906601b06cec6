"""LoRA deltas as factor pairs: {module name: (A (r, in), B (out, r))}, the weight delta
B @ A with every scale (alpha / rank, a fuse scale) folded into B.

In this form two LoRAs on one model add up exactly: per module, [B1 B2] @ [A1; A2] =
B1 A1 + B2 A2, a LoRA of the summed rank. That is how a LoRA-mode student distilled from a
fused teacher LoRA (`teacher.lora`) is exported against the base model: the teacher's
factors stacked with the student adapter's. Ranks are padded with zeros to one rank for
every module (a zero row of A and column of B add nothing), so the file needs no per-module
rank or alpha: alpha = rank, scale 1, in diffusers, peft, ComfyUI and kohya alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
PREFIX = "transformer."  # diffusers' key prefix of a transformer LoRA


def from_peft(module: torch.nn.Module, adapter: str, scale: float = 1.0) -> Factors:
    """The factors of peft adapter `adapter` on `module`'s linears (fp32), its scaling and
    `scale` folded into B. DoRA, a LoRA bias or a non-linear layer has no such form: refused."""
    from peft.tuners.lora import LoraLayer

    out: Factors = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter) or layer.lora_B[adapter].bias is not None:
            raise ValueError(
                f"{name}: a DoRA or LoRA-bias adapter is not a low-rank delta; use a plain LoRA"
            )
        base = type(layer.get_base_layer()).__name__
        if not isinstance(layer.get_base_layer(), torch.nn.Linear):
            raise ValueError(f"{name}: a LoRA on a {base}; only linear layers are supported")
        a = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32)
        b = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32)
        out[name] = (a.clone(), b * (float(layer.scaling[adapter]) * scale))
    return out


def rank(factors: Factors) -> int:
    return max((a.shape[0] for a, _ in factors.values()), default=0)


def padded(factors: Factors, r: int) -> Factors:
    """Every module at rank `r`: zero rows of A and zero columns of B (the delta unchanged)."""
    out: Factors = {}
    for name, (a, b) in factors.items():
        extra = r - a.shape[0]
        out[name] = (
            torch.cat([a, a.new_zeros(extra, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
        )
    return out


def stack(*parts: Factors) -> Factors:
    """One LoRA whose delta is the sum of the parts' deltas, at one rank for every module."""
    widths = [rank(p) for p in parts]
    names = sorted({n for p in parts for n in p})
    out: Factors = {}
    for name in names:
        pieces_a, pieces_b = [], []
        for part, width in zip(parts, widths, strict=True):
            if name in part:
                a, b = padded({name: part[name]}, width)[name]
            else:
                shape = next(p[name] for p in parts if name in p)
                a = shape[0].new_zeros(width, shape[0].shape[1])
                b = shape[1].new_zeros(shape[1].shape[0], width)
            pieces_a.append(a)
            pieces_b.append(b)
        out[name] = (torch.cat(pieces_a), torch.cat(pieces_b, dim=1))
    return out


@torch.no_grad()
def fuse(module: torch.nn.Module, factors: Factors) -> None:
    """W <- W + B @ A for every module, summed in fp32 and rounded once to W's dtype."""
    for name, (a, b) in factors.items():
        weight = module.get_submodule(name).weight
        weight.data = (weight.float() + (b @ a).to(weight.device)).to(weight.dtype)


def save(factors: Factors, path: Path, note: dict | None = None) -> Path:
    """A diffusers LoRA file (transformer.<module>.lora_A/lora_B.weight, alpha = rank: scale
    1) with diffusers' adapter metadata, so load_lora_weights and load_lora_adapter read it
    as it is; `note` (JSON) goes into the header as `cdm`."""
    from safetensors.torch import save_file

    r = rank(factors)
    state = {}
    for name, (a, b) in padded(factors, r).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(factors)}
    meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"{PREFIX}{k}": v for k, v in config.items()}),
    }
    if note is not None:
        meta["cdm"] = json.dumps(note, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def load(path: Path) -> Factors:
    """The factors of a file `save` wrote (its alpha = rank: B as stored)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    out: Factors = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            out[name] = (a.float(), state[key.replace(".lora_A.", ".lora_B.")].float())
    return out


def note(path: Path) -> dict:
    """The `cdm` header entry `save` wrote ({} when none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("cdm")
    return json.loads(text) if text else {}
