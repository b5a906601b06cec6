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
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from huggingface_hub import ModelCard, ModelCardData

from cdm.backends import few_step
from cdm.conditioning import Condition
from cdm.overlay import leaves
from cdm.sampling import inference_sigmas

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Written by export beside the pipeline's own parts; never copied from a teacher folder.
OWN_FILES = (
    "transformer", "scheduler", "README.md", "inference.json", "params.json", "model_index.json",
)  # fmt: skip
DECODE_PIXELS = 2 * 1024 * 1024  # per VAE call (two 1024 px images): decoding is memory-hungry


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline family as a backend sees it."""

    backend: str  # teacher.backend
    pipeline: str  # model_index.json `_class_name`
    parts: tuple[str, ...]  # subfolders the velocity, shift, geometry and decoder need
    # (raw sigmas, shift, teacher scheduler config) -> the scheduler config under which a stock
    # default call runs our sigmas at every step count, or None when raw needs sigmas=raw
    default_call: Callable[[list[float], float, dict], dict | None]
    explicit: Callable[[float, dict], dict]  # (shift, teacher config) -> config for sigmas=raw
    call: str  # the stock call shown in the model card, with {steps} and {extra}
    license: dict[str, str]  # model card license fields when the teacher's card declares none

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
    across filesystems fall back to a symlink (a resolved reference) or a copy (self-contained).

    Hidden entries are left out: an orchestrator's marker such as Snakemake's
    .snakemake_timestamp, hard-linked into an export, would tie the two folders' timestamps
    (touching the student's would make the teacher look updated)."""
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(src)
        if rel.parts and rel.parts[0] in skip:
            continue
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith(".") or (not rel.parts and name in skip):
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
    pipe: Any
    # Tokenizer attribute -> the tokens the pipeline's encode_prompt keeps of a prompt.
    token_limits: ClassVar[dict[str, int]] = {}

    def encode(self, prompts: list[str]) -> Condition:
        raise NotImplementedError

    def truncated(self, prompts: list[str]) -> int:
        """How many prompts some text encoder sees cut (longer than its token limit)."""
        cut: set[int] = set()
        for attr, limit in self.token_limits.items():
            tokenizer = getattr(self.pipe, attr, None)
            if tokenizer is None:
                continue
            ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
            cut |= {i for i, row in enumerate(ids) if len(row) > limit}
        return len(cut)

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


# --- export -------------------------------------------------------------------------------

CARD_TAGS = ["text-to-image", "diffusers", "distillation", "cdm"]
CARD_STEPS = (1, 2, 4, 8)  # step counts whose stock sigmas the model card lists
GRID = "sample_grid.png"  # the sample grid add_results_to_card puts beside README.md
RESULTS = ("<!-- cdm-results -->", "<!-- /cdm-results -->")  # bounds of the results section
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
CACHED_REPO = re.compile(r"models--(.+?)--(.+)")  # a hub-cache folder name: models--org--name


def weights_dtype(folder: Path) -> torch.dtype:
    """The floating dtype that holds most parameters of `folder`'s safetensors files."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                size = int(torch.Size(part.get_shape()).numel())
                sizes[part.get_dtype()] = sizes.get(part.get_dtype(), 0) + size
    floating = {name: size for name, size in sizes.items() if name in DTYPES}
    if not floating:
        raise ValueError(f"no floating-point safetensors weights in {folder}")
    return DTYPES[max(floating, key=floating.__getitem__)]


def save_transformer(transformer: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained in `dtype`, leaving `transformer` as it is: a twin built without weights
    takes converted copies of its tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        twin = type(transformer).from_config(transformer.config)
    state = {
        key: value.detach().to(dtype) if value.is_floating_point() else value
        for key, value in transformer.state_dict().items()
    }
    twin.load_state_dict(state, assign=True)
    twin.save_pretrained(folder)


def few_step_scheduler(
    family: Family, teacher_dir: Path, raw: list[float], shift: float, seq_len: int
) -> tuple[dict[str, Any], bool]:
    """The student's scheduler config and whether a stock default call at the recipe's step
    count runs the recipe (else the call passes sigmas=raw). Checked by replaying the
    pipeline's own sigma computation, at the recipe and at CARD_STEPS default calls."""
    base = dict(FlowMatchEulerDiscreteScheduler.load_config(teacher_dir / "scheduler"))
    config = family.default_call(raw, shift, base)
    passed = few_step.pipeline_raw(family.pipeline, len(raw))
    exact = config is not None and few_step.matches(config, raw, shift, seq_len, passed)
    if not exact:
        config = family.explicit(shift, base)
        if not few_step.matches(config, raw, shift, seq_len, raw):
            raise ValueError(
                f"no {family.pipeline} scheduler config reproduces sigmas {raw} at shift {shift}"
            )
    for steps in CARD_STEPS:
        even, passed = few_step.default_raw(steps), few_step.pipeline_raw(family.pipeline, steps)
        if not few_step.matches(config, even, shift, seq_len, passed):
            raise ValueError(f"the {family.pipeline} scheduler misses our {steps}-step sigmas")
    return config, exact


def cached_repo(path: str) -> str | None:
    """org/name of a hub-cache folder (.../models--org--name/snapshots/<revision>)."""
    for part in Path(path).parts:
        found = CACHED_REPO.fullmatch(part)
        if found:
            return f"{found[1]}/{found[2]}"
    return None


def teacher_fields(teacher_dir: Path, params: dict[str, Any], base_model: str | None) -> dict:
    """Card fields naming the teacher: base_model, a hub id (`base_model`, params teacher.hub_id,
    teacher.path when it is a hub id, or the repo of a hub-cache folder), when one is known;
    teacher_local_path when teacher.path is a local folder."""
    teacher = params.get("teacher", {})
    path = str(teacher.get("path") or teacher_dir)
    local = Path(path).exists() or not HUB_ID.match(path)
    hub = base_model or teacher.get("hub_id") or (cached_repo(path) if local else path)
    fields: dict[str, str] = {"base_model": hub, "base_model_relation": "finetune"} if hub else {}
    return fields | ({"teacher_local_path": path} if local else {})


def teacher_license(teacher_dir: Path, family: Family) -> dict[str, str]:
    """The license fields of the teacher's own card (a README.md in its folder), else the
    family's (the license its hub card declares)."""
    readme, data = teacher_dir / "README.md", {}
    if readme.is_file():
        try:
            data = ModelCard.load(readme).data.to_dict()
        except Exception:  # a card that does not parse declares nothing
            data = {}
    found = {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}
    return found if "license" in found else dict(family.license)


def export_pipeline(
    transformer: torch.nn.Module,
    family: Family,
    teacher_dir: str | Path,
    out: Path,
    inference: dict[str, Any],
    seq_len: int,
    params: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """A complete pipeline folder: the student transformer in the teacher's dtype (or `dtype`),
    the teacher's other parts (hard links or copies), a scheduler under which stock calls run
    our sigmas at every step count, its model_index.json, inference.json and a model card
    (base_model: see teacher_fields)."""
    teacher_dir, params = Path(teacher_dir), params or {}
    dtype = dtype or weights_dtype(teacher_dir / "transformer")
    save_transformer(transformer, out / "transformer", dtype)
    link_tree(teacher_dir, out, fallback="copy", skip=OWN_FILES)
    raw, shift = [float(s) for s in inference["sigmas_raw"]], float(inference["shift"])
    config, exact = few_step_scheduler(family, teacher_dir, raw, shift, seq_len)
    scheduler = few_step.scheduler_from(config)
    scheduler.save_pretrained(out / "scheduler")
    index = json.loads((teacher_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    stock = few_step.stock_call(family.pipeline, seq_len)
    recipe = inference | {"default_call_exact": exact, few_step.STOCK: stock}
    (out / "inference.json").write_text(json.dumps(recipe, indent=1))
    schedule = {k: few_step.exported_sigmas(out, k) for k in sorted({*CARD_STEPS, len(raw)})}
    fields = teacher_license(teacher_dir, family) | teacher_fields(teacher_dir, params, base_model)
    card = model_card(family, recipe, type(scheduler).__name__, schedule, params, fields, dtype)
    card.save(out / "README.md")


def model_card(
    family: Family,
    recipe: dict[str, Any],
    scheduler: str,
    schedule: dict[int, torch.Tensor],
    params: dict[str, Any],
    fields: dict[str, str],
    dtype: torch.dtype,
) -> ModelCard:
    """The card: YAML metadata (license, base_model, tags) and how to sample the student."""
    raw, shift, steps = recipe["sigmas_raw"], float(recipe["shift"]), len(recipe["sigmas_raw"])
    sigmas = [round(s, 6) for s in inference_sigmas(steps, shift, raw).tolist()]
    teacher = fields.get("base_model") or fields.get("teacher_local_path", "the teacher")
    extra = "" if recipe["default_call_exact"] else f", sigmas={list(raw)}"
    dtype_name = str(dtype).removeprefix("torch.")
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", tags=CARD_TAGS, **fields
    )
    lines = [
        f"# {family.pipeline}: few-step student ({recipe.get('method', 'cdm')}) of {teacher}",
        "",
        "Distilled with Continuous-Time Distribution Matching (CDM, arXiv 2605.06376): the",
        f"transformer is the student's EMA (saved in {dtype_name}); every other part is the",
        "teacher's, under the teacher's license.",
        "",
        "## Inference recipe",
        "",
        f"- steps: {steps}",
        f"- raw sigmas: {list(raw)}, time shift {shift:g}: sigmas {sigmas} (Euler)",
        f"- guidance scale: {recipe.get('guidance', 1.0)} (no classifier-free guidance)",
        f"- scheduler: {scheduler}, shift {shift:g}",
        "",
        "```python",
        "import torch",
        f"from diffusers import {family.pipeline}",
        "",
        f'pipe = {family.pipeline}.from_pretrained("<this folder>", torch_dtype=torch.{dtype_name})',
        'pipe.to("cuda")',
        f"image = pipe(prompt, {family.call.format(steps=steps, extra=extra)}).images[0]",
        "```",
        "",
        *schedule_text(recipe, scheduler, schedule),
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
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def schedule_text(
    recipe: dict[str, Any], scheduler: str, schedule: dict[int, torch.Tensor]
) -> list[str]:
    """What the stock call runs at each step count, as the card states it."""
    shift, steps = float(recipe["shift"]), len(recipe["sigmas_raw"])
    lines = [
        f"With `num_inference_steps=k` the stock call runs sigmas time_shift(linspace(1, 1/k, k),"
        f" {shift:g}) + [0] at every k, the schedule this project's sampler uses at k steps"
        + (
            "; the call above runs the recipe."
            if recipe["default_call_exact"]
            else f"; the recipe's raw sigmas differ, so at {steps} steps pass them as `sigmas=`."
        ),
    ]
    if scheduler == few_step.FLOW_MAP:
        lines[0] += (
            f" The scheduler is diffusers' {few_step.FLOW_MAP} (an Euler stepper; diffusers >= "
            f"{few_step.FLOW_MAP_DIFFUSERS}), whose sigmas are float64."
        )
    lines += ["", "| steps | sigmas |", "|---|---|"]
    for k, sigmas in schedule.items():
        lines.append(f"| {k} | {[round(s, 4) for s in sigmas.tolist()]} |")
    return lines


def add_results_to_card(
    student_dir: str | Path, metrics: dict[str, Any], grid_png: Path | None = None
) -> None:
    """Put a metrics table and a sample grid into an exported student's README.md: the grid is
    copied beside it as GRID. Calling it again replaces the section."""
    folder = Path(student_dir)
    card = ModelCard.load(folder / "README.md")
    lines = [RESULTS[0], "## Results", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in leaves(metrics).items()]
    if grid_png is not None:
        target = folder / GRID
        if not (target.exists() and target.samefile(grid_png)):
            shutil.copyfile(grid_png, target)
        lines += ["", f"![sample grid]({GRID})"]
    lines.append(RESULTS[1])
    text = card.text
    if RESULTS[0] in text and RESULTS[1] in text:
        head, rest = text.split(RESULTS[0], 1)
        text = head + rest.split(RESULTS[1], 1)[1].lstrip("\n")
    card.text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    card.save(folder / "README.md")


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")
