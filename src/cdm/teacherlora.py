"""Your fine-tune as the teacher (`teacher.lora`): prepare_teacher fuses a diffusers/peft LoRA
into the teacher's transformer, so cache_teacher, distill and sample read the fused teacher in
models/teacher unchanged, for every diffusers backend (the transformer is whatever the
backend's `load_velocity` builds).

diffusers reads the file (its key conventions and adapter metadata: rank, alpha, patterns)
onto the transformer with `load_lora_adapter`; the adapter is then taken as factors
(cdm.lorafactors) and added to each weight in fp32, rounded once to the teacher's dtype.
The factors are kept beside the fused teacher (FACTORS): a LoRA-mode student is exported as
one LoRA against the base model by stacking them with its adapter (cdm.lora).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from cdm import lorafactors
from cdm.params import TeacherLora, teacher_lora_inputs

FACTORS = "teacher_lora.safetensors"  # in models/teacher: the fused LoRA, scale folded in
ADAPTER = "teacher_lora"
FOREIGN = ("lora_down", "lora_unet_", "diffusion_model.", "lora_te")  # kohya / ComfyUI keys


def file_keys(path: Path) -> tuple[list[str], str | None]:
    """The LoRA file's transformer keys and the prefix diffusers strips from them; a file in
    another layout, or one with text-encoder weights, is refused in one line."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    where = f"teacher.lora.path '{path}'"
    if any(k.startswith("text_encoder") for k in keys):
        raise ValueError(
            f"{where} holds text-encoder LoRA weights; only the transformer's part can be fused "
            "(the prompt cache is the base text encoders'): save the transformer's LoRA alone"
        )
    if any(marker in k for k in keys for marker in FOREIGN):
        raise ValueError(
            f"{where} is in a kohya/ComfyUI key layout; convert it to diffusers' (load it with "
            "the family's pipeline.load_lora_weights, then pipeline.save_lora_weights)"
        )
    if not any(".lora_A." in k for k in keys):
        raise ValueError(f"{where} has no lora_A/lora_B weights; expected a diffusers/peft LoRA")
    for prefix in ("transformer.", "base_model.model."):
        if all(k.startswith(prefix) for k in keys):
            return [k.removeprefix(prefix) for k in keys], prefix.rstrip(".")
    return keys, None


def read(transformer: torch.nn.Module, cfg: TeacherLora) -> lorafactors.Factors:
    """The LoRA of `cfg` as diffusers applies it to `transformer`, at cfg.scale, as factors;
    the transformer is left without adapters."""
    from safetensors.torch import load_file

    path = Path(cfg.path)
    keys, prefix = file_keys(path)
    modules = {n for n, _ in transformer.named_modules()}
    for key in keys:
        name = key.split(".lora_")[0]
        if name not in modules:
            raise ValueError(
                f"teacher.lora.path '{path}': module '{name}' is not in this "
                f"{type(transformer).__name__}; the LoRA was trained for another model"
            )
    try:
        if prefix == "base_model":  # peft's own file: keys without diffusers' prefix
            state = {
                k.removeprefix("base_model.model."): v for k, v in load_file(str(path)).items()
            }
            transformer.load_lora_adapter(state, prefix=None, adapter_name=ADAPTER)
        else:
            transformer.load_lora_adapter(
                str(path.parent), weight_name=path.name, prefix=prefix, adapter_name=ADAPTER
            )
    except (RuntimeError, ValueError) as exc:  # e.g. a size mismatch: another model's LoRA
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"teacher.lora.path '{path}' does not fit this {type(transformer).__name__} "
            f"({reason}); was the LoRA trained for another model?"
        ) from None
    try:
        factors = lorafactors.from_peft(transformer, ADAPTER, cfg.scale)
    except ValueError as exc:  # name the file: the message names only the module
        raise ValueError(f"teacher.lora.path '{path}': {exc}") from None
    finally:
        transformer.unload_lora()
    return factors


def prepare(backend: ModuleType, folder: Path, cfg: TeacherLora, out: Path) -> dict[str, Any]:
    """models/teacher with the LoRA fused: the fused transformer saved in the teacher's dtype,
    every other part linked, the factors beside it. Returns the report's `lora` entry."""
    from cdm.backends.export import save_transformer, weights_dtype
    from cdm.backends.pipelines import link_tree

    dtype = weights_dtype(folder / "transformer")
    velocity, _, _ = backend.load_velocity(folder, None, dtype)
    transformer = velocity.transformer
    factors = read(transformer, cfg)
    lorafactors.fuse(transformer, factors)
    save_transformer(transformer, out / "transformer", dtype)
    link_tree(folder, out, skip=("transformer",))
    entry = {"path": cfg.path, **teacher_lora_inputs(cfg)}
    entry |= {"modules": len(factors), "rank": lorafactors.rank(factors)}
    lorafactors.save(factors, out / FACTORS, note=entry)
    return entry


def fused(teacher_dir: str | Path) -> lorafactors.Factors | None:
    """The factors fused into a prepared teacher (None: it is the base model)."""
    path = Path(teacher_dir) / FACTORS
    return lorafactors.load(path) if path.is_file() else None
