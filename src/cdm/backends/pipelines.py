"""What the diffusers-pipeline backends (sd3, longcat) share: resolving a folder or hub id,
checking it holds the expected family, linking it, decoding with its VAE, counting its
parameters, and exporting a student as a complete pipeline folder with a model card."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from cdm.backends import few_step
from cdm.conditioning import Condition
from cdm.sampling import inference_sigmas

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Written by export beside the pipeline's own parts; never copied from a teacher folder.
OWN_FILES = ("transformer", "scheduler", "README.md", "inference.json", "params.json")
DECODE_PIXELS = 2 * 1024 * 1024  # per VAE call (two 1024 px images): decoding is memory-hungry


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline family as a backend sees it."""

    backend: str  # teacher.backend
    pipeline: str  # model_index.json `_class_name`
    parts: tuple[str, ...]  # subfolders the velocity, shift, geometry and decoder need
    # (raw sigmas, shift, teacher scheduler config) -> overrides for a stock default call, or None
    default_call: Callable[[list[float], float, dict], dict | None]
    explicit: Callable[[float], dict]  # overrides when the call must pass sigmas=raw
    pipeline_raw: Callable[[int], list[float] | None]  # sigmas the pipeline passes itself
    call: str  # the stock call shown in the model card, with {steps} and {extra}

    def expected(self) -> str:
        return (
            f"a {self.pipeline} folder (diffusers format) or hub id "
            f"for teacher.backend '{self.backend}'"
        )


def resolve(path: str | Path, family: Family) -> Path:
    """A local folder, or a hub id downloaded to the hub cache; checked to be the family."""
    text = str(path)
    folder = Path(text)
    if not folder.exists():
        if not HUB_ID.match(text):
            raise FileNotFoundError(
                f"teacher.path '{text}' does not exist; expected {family.expected()}"
            )
        from diffusers import DiffusionPipeline

        try:
            folder = Path(DiffusionPipeline.download(text))
        except Exception as exc:  # any hub failure is the same input error
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise FileNotFoundError(
                f"teacher.path '{text}' is not a local folder and could not be fetched from the "
                f"hub ({reason}); expected {family.expected()}"
            ) from None
    return check(folder, family)


def check(folder: str | Path, family: Family, what: str = "teacher.path") -> Path:
    """`folder` is a pipeline folder of the family with the parts the backend reads."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} '{folder}' is not a folder; expected {family.expected()}")
    if not index.is_file():
        raise ValueError(
            f"{what} '{folder}' has no model_index.json, so it is not a diffusers pipeline; "
            f"expected {family.expected()}"
        )
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        found = None
    if found != family.pipeline:
        raise ValueError(f"{what} '{folder}' holds a {found}, expected {family.expected()}")
    missing = [p for p in family.parts if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{what} '{folder}' lacks {', '.join(missing)}/; expected a complete {family.pipeline}"
        )
    return folder


def link_tree(src: Path, dst: Path, fallback: str = "symlink", skip: tuple[str, ...] = ()) -> None:
    """Mirror `src` into `dst` with hard links to the real files (hub caches hold symlinks);
    across filesystems fall back to a symlink (a resolved reference) or a copy (self-contained)."""
    for root, _, files in os.walk(src, followlinks=True):
        rel = Path(root).relative_to(src)
        if rel.parts and rel.parts[0] in skip:
            continue
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if not rel.parts and name in skip:
                continue
            real = (Path(root) / name).resolve()
            try:
                os.link(real, dst / rel / name)
            except OSError:
                if fallback == "symlink":
                    os.symlink(real, dst / rel / name)
                else:
                    shutil.copy2(real, dst / rel / name)


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters of every component with safetensors weights, read from the file headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = 0
        for file in sorted(part.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    total += int(torch.Size(f.get_slice(key).get_shape()).numel())
        if total:
            counts[part.name] = total
    return counts


def vae_factor(folder: Path) -> int:
    config = AutoencoderKL.load_config(folder / "vae")
    return 2 ** (len(config["block_out_channels"]) - 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded like diffusers' postprocess."""
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


class VaeDecoder:
    """Latents -> uint8 images with the pipeline's VAE and its scaling and shift factors."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae.to(latents.device)
        pixels = latents.shape[-2] * latents.shape[-1] * self.factor**2
        out = []
        for chunk in latents.split(max(1, DECODE_PIXELS // pixels)):
            z = chunk.to(vae.dtype) / self.scale + self.shift
            out.append(to_uint8(vae.decode(z, return_dict=False)[0]))
        return torch.cat(out)


def load_vae_decoder(path: str | Path, family: Family) -> VaeDecoder:
    """The VAE alone of a `family` folder: latents / scaling_factor + shift_factor -> decode
    -> uint8 (B, H, W, 3)."""
    folder = check(path, family, "model folder")
    return VaeDecoder(AutoencoderKL.from_pretrained(folder / "vae"))


class PipelineTeacher:
    """What the diffusers teachers (sd3, longcat) share; a subclass sets `family` and
    `folder` and encodes prompts its pipeline's way."""

    family: Family
    folder: Path

    def encode(self, prompts: list[str]) -> Condition:
        raise NotImplementedError

    def null_condition(self) -> Condition:
        """The empty prompt, as the pipeline encodes its default negative prompt for CFG."""
        return self.encode([""])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return load_vae_decoder(self.folder, self.family)(latents)

    def save_teacher(self, path: Path) -> None:
        link_tree(self.folder, path)


def text_device() -> tuple[torch.device, torch.dtype]:
    """Where cache_teacher runs the text encoders: bf16 on a GPU, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


# --- export -------------------------------------------------------------------------------


def few_step_scheduler(
    family: Family, teacher_dir: Path, raw: list[float], shift: float, seq_len: int
) -> tuple[dict[str, Any], bool]:
    """The student's scheduler config and whether a stock default call reproduces our sigmas
    (checked by replaying the pipeline's own sigma computation)."""
    base = dict(FlowMatchEulerDiscreteScheduler.load_config(teacher_dir / "scheduler"))
    overrides = family.default_call(raw, shift, base)
    pipeline_raw = family.pipeline_raw(len(raw))
    if overrides is not None and few_step.matches(
        base | overrides, raw, shift, seq_len, pipeline_raw
    ):
        return base | overrides, True
    config = base | family.explicit(shift)
    if not few_step.matches(config, raw, shift, seq_len, raw):
        raise ValueError(
            f"no {family.pipeline} scheduler config reproduces sigmas {raw} at shift {shift}"
        )
    return config, False


def export_pipeline(
    transformer: torch.nn.Module,
    family: Family,
    teacher_dir: str | Path,
    out: Path,
    inference: dict[str, Any],
    seq_len: int,
    params: dict[str, Any] | None = None,
) -> None:
    """A complete pipeline folder: the student transformer, the teacher's other parts (hard
    links or copies), a few-step scheduler config, inference.json and a model card."""
    teacher_dir = Path(teacher_dir)
    transformer.save_pretrained(out / "transformer")
    link_tree(teacher_dir, out, fallback="copy", skip=OWN_FILES)
    raw, shift = [float(s) for s in inference["sigmas_raw"]], float(inference["shift"])
    config, exact = few_step_scheduler(family, teacher_dir, raw, shift, seq_len)
    FlowMatchEulerDiscreteScheduler.from_config(config).save_pretrained(out / "scheduler")
    recipe = inference | {"default_call_exact": exact}
    (out / "inference.json").write_text(json.dumps(recipe, indent=1))
    (out / "README.md").write_text(model_card(family, recipe, config, params or {}))


def model_card(
    family: Family, recipe: dict[str, Any], scheduler: dict[str, Any], params: dict[str, Any]
) -> str:
    raw, shift, steps = recipe["sigmas_raw"], float(recipe["shift"]), len(recipe["sigmas_raw"])
    sigmas = [round(s, 6) for s in inference_sigmas(steps, shift, raw).tolist()]
    method = recipe.get("method", "cdm")
    teacher = params.get("teacher", {}).get("path", "the teacher")
    extra = "" if recipe["default_call_exact"] else f", sigmas={list(raw)}"
    keys = ("use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal", "shift")
    sched = ", ".join(f"{k}={scheduler.get(k)}" for k in keys)
    how = (
        "The scheduler config above makes this default call run exactly these sigmas."
        if recipe["default_call_exact"]
        else "These raw sigmas are not evenly spaced: pass them as `sigmas=` as shown."
    )
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        f"base_model: {teacher}",
        "tags: [cdm, distribution-matching, few-step, distillation]",
        "---",
        "",
        f"# {family.pipeline}: few-step student ({method}) of {teacher}",
        "",
        "Distilled with Continuous-Time Distribution Matching (CDM, arXiv 2605.06376): the",
        "transformer is the student's EMA; every other part is the teacher's.",
        "",
        "## Inference recipe",
        "",
        f"- steps: {steps}",
        f"- raw sigmas: {list(raw)}, time shift {shift:g}: sigmas {sigmas} (Euler)",
        f"- guidance scale: {recipe.get('guidance', 1.0)} (no classifier-free guidance)",
        f"- scheduler: {sched}",
        "",
        "```python",
        "import torch",
        f"from diffusers import {family.pipeline}",
        "",
        f'pipe = {family.pipeline}.from_pretrained("<this folder>", dtype=torch.bfloat16)',
        'pipe.to("cuda")',
        f"image = pipe(prompt, {family.call.format(steps=steps, extra=extra)}).images[0]",
        "```",
        "",
        how,
        "",
        "## Distillation",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for section in ("method", "distill", "teacher"):
        for key, value in params.get(section, {}).items():
            lines.append(f"| {section}.{key} | {value} |")
    if "seed" in params:
        lines.append(f"| seed | {params['seed']} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def sanity_check(
    velocity: torch.nn.Module,
    decode: Callable[[torch.Tensor], torch.Tensor],
    null: Any,
    shape: tuple[int, int, int],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """One forward at sigma = 1 on seeded noise (null prompt) and the decode of its clean
    estimate: both must be finite."""
    velocity = velocity.to(device).eval()
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    v = velocity(x, torch.ones(1, device=device), null.to(device))
    image = decode(x - v)
    if not torch.isfinite(v).all():
        raise ValueError("the teacher's velocity is not finite on seeded noise; check the weights")
    return {
        "velocity_shape": list(v.shape),
        "velocity_mean": round(v.mean().item(), 6),
        "velocity_std": round(v.std().item(), 6),
        "image_shape": list(image.shape),
        "image_mean": round(image.float().mean().item(), 3),
    }
