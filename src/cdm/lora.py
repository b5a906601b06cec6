"""LoRA distillation (`distill.lora`): one frozen transformer, two PEFT adapters on it.

The authors' second mode: the student G and the fake score F are LoRA adapters ('student',
'fake_score') on one shared copy of the teacher's transformer; the frozen teacher T is the
same module with its adapters disabled, so no network is held twice. Only adapter weights
are trained, blended (F <- keep F + (1 - keep) G), averaged (the student EMA) and
checkpointed. Each trained network reaches DeepSpeed as an `AdapterView`: a module whose
parameters are one adapter's weights and whose forward runs the shared base with that
adapter active.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdm import lorafactors
from cdm.lorafactors import Factors
from cdm.params import Lora

if TYPE_CHECKING:  # peft loads only in LoRA mode (the functions below import it)
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

STUDENT, FAKE = "student", "fake_score"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights finds it
BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # SD3 / LongCat (Flux-style)
# Relative names of the feed-forward linears: SD3's and LongCat's joint blocks (ff, ff_context)
# and LongCat's single blocks (proj_mlp in, proj_out out of attention + MLP).
FF_PREFIXES = ("ff.", "ff_context.")
SINGLE_FF = ("proj_mlp", "proj_out")


def targets(transformer: torch.nn.Module, cfg: Lora) -> list[str]:
    """Full names of the linears that get adapters: every linear of each block's attention
    (`attn.*`: SD3's to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; LongCat's the same plus
    its single blocks' to_q/k/v) and, with include_ff, the feed-forward linears.
    `cfg.targets` (suffixes of names) replaces that choice."""
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] not in BLOCKS or not isinstance(module, torch.nn.Linear):
            continue
        rel = ".".join(parts[2:])
        if cfg.targets is not None:
            chosen = any(rel == t or rel.endswith(f".{t}") for t in cfg.targets)
        else:
            ff = rel.startswith(FF_PREFIXES) or rel in SINGLE_FF
            chosen = rel.startswith("attn.") or (cfg.include_ff and ff)
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(
            f"distill.lora: no linear layer of {type(transformer).__name__} matches "
            f"targets {cfg.targets}; name suffixes such as attn.to_q or ff.net.2"
        )
    return names


def config(transformer: torch.nn.Module, cfg: Lora) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        init_lora_weights=cfg.init,
        target_modules=targets(transformer, cfg),
    )


def add_adapters(velocity: torch.nn.Module, cfg: Lora, seed: int) -> None:
    """Freeze `velocity` (a wrapper with `.transformer`) and add the two adapters to its
    transformer, drawn from `seed` alike on every rank; adapter weights are trainable fp32."""
    velocity.requires_grad_(False)
    import peft

    transformer = velocity.transformer
    lcfg = config(transformer, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in (STUDENT, FAKE):
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # the 2nd: wanted
            peft.inject_adapter_in_model(copy.deepcopy(lcfg), transformer, adapter_name=name)
    for name in (STUDENT, FAKE):
        for p in adapter_params(transformer, name).values():
            p.data = p.data.float()
            p.requires_grad_(True)
    _set(transformer, active=None)


def adapter_params(module: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """{parameter name: parameter} of adapter `name`, in module order (the same order for
    both adapters, so the blend and the EMA pair them partition against partition)."""
    return {n: p for n, p in module.named_parameters() if f".{name}." in n and "lora_" in n}


def _tuner_layers(module: torch.nn.Module) -> Iterator[BaseTunerLayer]:
    if "peft.tuners.tuners_utils" not in sys.modules:  # no adapter can exist: skip the import
        return iter(())
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def _set(module: torch.nn.Module, active: str | None) -> None:
    """Run `active` (None: no adapter, the teacher). Written on the layers directly: peft's
    set_adapter/enable_adapters also flip requires_grad, which must stay as the optimizers
    were built (a gradient checkpoint's recomputation reads the same switch)."""
    for layer in _tuner_layers(module):
        layer._disable_adapters = active is None
        if active is not None:
            layer._active_adapter = [active]


def running(module: torch.nn.Module) -> str | None:
    """The adapter `module` runs now (None: the bare base, the teacher). Not a LoRA module:
    ValueError."""
    layer = next(_tuner_layers(module), None)
    if layer is None:
        raise ValueError("not a LoRA module: it has no adapter layers")
    return None if layer.disable_adapters else layer.active_adapters[0]


@contextlib.contextmanager
def active(module: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Within: `module` runs adapter `name` (None: the bare teacher); the previous state after."""
    layers = list(_tuner_layers(module))
    saved = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    _set(module, name)
    try:
        yield
    finally:
        for layer, (disabled, act) in zip(layers, saved, strict=True):
            layer._disable_adapters, layer._active_adapter = disabled, act


class AdapterView(torch.nn.Module):
    """One adapter as a trainable network: its parameters are the adapter's weights alone
    (what DeepSpeed shards, updates and checkpoints); forward runs the shared base with it."""

    def __init__(self, shared: torch.nn.Module, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: its base stays outside
        self.adapter = name
        params = adapter_params(shared, name)
        self.names = list(params)
        self.weights = torch.nn.ParameterList(params.values())

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with active(self.shared, self.adapter):
            return self.shared(*args, **kwargs)

    def state(self) -> dict[str, torch.Tensor]:
        """{peft parameter name: tensor} of this adapter."""
        return {n: p.detach() for n, p in zip(self.names, self.weights, strict=True)}


class Teacher(torch.nn.Module):
    """The frozen teacher: the shared base with its adapters disabled."""

    def __init__(self, shared: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with active(self.shared, None):
            return self.shared(*args, **kwargs)


def engine_adapter(engine) -> contextlib.AbstractContextManager:
    """The adapter of an engine's network active (its backward may recompute checkpointed
    activations); nothing for a full network."""
    module = engine.module
    return (
        active(module.shared, module.adapter)
        if isinstance(module, AdapterView)
        else (contextlib.nullcontext())
    )


def student_module(
    shared: torch.nn.Module,
    ema_state: dict[str, torch.Tensor],
    view: AdapterView,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A copy of the base on the CPU in `dtype` (the export's: the teacher's on disk) with
    the student adapter holding the fp32 EMA weights (by the view's parameter order:
    `ema_state` keys are the view's `weights.<i>`), the fake-score adapter removed, the
    student active (preview, `save_diffusers_lora`, `merged`). The base is read tensor by
    tensor from wherever it lives (rank 0's GPU in a run) straight into the CPU copy: no
    second base on the GPU; `dtype` P bytes of host memory (cdm.plan)."""
    from cdm.zero import cpu_copy

    out = cpu_copy(shared, dtype).requires_grad_(False).eval()
    params = dict(out.named_parameters())
    for i, name in enumerate(view.names):
        # fp32 whatever the base's dtype: the merge adds the delta once, rounded once.
        params[name].data = ema_state[f"weights.{i}"].detach().to("cpu", torch.float32, copy=True)
    for layer in _tuner_layers(out):
        layer.delete_adapter(FAKE)
    out.transformer.peft_config.pop(FAKE, None)
    _set(out, STUDENT)
    return out


def is_lora(module: torch.nn.Module) -> bool:
    return any(True for _ in _tuner_layers(module))


@torch.no_grad()
def merged(student: torch.nn.Module) -> torch.nn.Module:
    """The student adapter merged into its linears, in place: the teacher's own architecture,
    so the project's sampling and export read it like a fully fine-tuned student."""
    tuners = {id(m) for m in _tuner_layers(student)}
    layers = [(n, m) for n, m in student.named_modules() if id(m) in tuners]
    for name, layer in layers:
        layer.merge(adapter_names=[STUDENT])
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(student.transformer, "peft_config"):
        del student.transformer.peft_config
    return student


def save_diffusers_lora(
    student: torch.nn.Module, folder: Path, teacher: Factors | None = None
) -> Path:
    """The student adapter as a diffusers LoRA (pytorch_lora_weights.safetensors, with its
    rank, alpha and targets as metadata): `StableDiffusion3Pipeline.from_pretrained(teacher)`
    then `.load_lora_weights(folder)`; any family's transformer: `.load_lora_adapter(folder,
    weight_name=LORA_FILE)`. With `teacher` (the factors of a fused teacher LoRA,
    cdm.teacherlora) the file is the few-step LoRA against the *base* model: the teacher's
    factors stacked with the student's, whose delta is exactly the sum (cdm.lorafactors)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    transformer = student.transformer
    if teacher is not None:
        student_part = lorafactors.from_peft(transformer, STUDENT)
        return lorafactors.save(lorafactors.stack(teacher, student_part), folder / LORA_FILE)
    state = get_peft_model_state_dict(transformer, adapter_name=STUDENT)
    meta = transformer.peft_config[STUDENT].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers={k: v.contiguous() for k, v in state.items()},
        transformer_lora_adapter_metadata=meta,
    )
    return folder / LORA_FILE


def networks(
    teacher: torch.nn.Module, cfg: Lora, seed: int, checkpointing: bool
) -> tuple[Teacher, AdapterView, AdapterView]:
    """(T, G, F) of LoRA mode on the teacher's own (already placed) module: the adapters are
    added to it, so G and F start at T and no second copy of the base exists."""
    add_adapters(teacher, cfg, seed)
    if checkpointing:
        teacher.transformer.enable_gradient_checkpointing()
    return Teacher(teacher), AdapterView(teacher, STUDENT), AdapterView(teacher, FAKE)


def card_section(
    base_model: str,
    fine_tune: str | None = None,
    layout: str | None = None,
    pipeline: str = "StableDiffusion3Pipeline",
) -> str:
    """The model card's paragraph on loading the exported adapter on the stock `pipeline`:
    `fine_tune` names a teacher LoRA fused before distillation (then the file is the LoRA
    against the base model), `layout` the kohya/ComfyUI copy of it (cdm.loralayout)."""
    against = (
        f"the base model `{base_model}`: it holds your fine-tune's LoRA (`{fine_tune}`, fused "
        "into the teacher) and the student's adapter in one"
        if fine_tune
        else "the frozen teacher"
    )
    text = (
        "\n## LoRA student\n\n"
        "Trained in LoRA mode (`distill.lora`): the student is an adapter on the frozen teacher. "
        f"`{LORA_FILE}` in this folder is the few-step LoRA against {against}; "
        "`transformer/` holds it merged. Load "
        "the adapter on the stock base model with the few-step scheduler of this folder:\n\n"
        "```python\n"
        f"from diffusers import {pipeline}\n\n"
        f'pipe = {pipeline}.from_pretrained("{base_model}")\n'
        'pipe.load_lora_weights("<this folder>")\n'
        'pipe.scheduler = type(pipe.scheduler).from_pretrained("<this folder>", '
        'subfolder="scheduler")\n'
        "```\n\n"
        "For LongCat-Image (no pipeline-level LoRA loader): "
        '`pipe.transformer.load_lora_adapter("<this folder>", prefix="transformer", '
        f'weight_name="{LORA_FILE}")` (without `weight_name` diffusers looks for a .bin).\n'
    )
    if layout:
        text += (
            f"\n`{layout}` is the same LoRA in the key layout ComfyUI and kohya-ss tools read "
            "(alpha = rank in every module: load it at strength 1).\n"
        )
    return text
