"""A distilled student as a complete diffusers pipeline folder (sd3, longcat, flux2-klein): the student
transformer in the teacher's dtype, the teacher's other parts linked, a scheduler under which
stock calls run our sigmas at every step count (configs from cdm.backends.few_step), its
model_index.json, inference.json and a model card; and the run's results added to that card
(cdm.publish)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import ModelCard, ModelCardData

from cdm.backends import few_step
from cdm.backends.pipelines import Family, link_tree
from cdm.hub import HUB_ID, cached_repo
from cdm.params import leaves
from cdm.sampling import inference_sigmas

# Written by export beside the pipeline's own parts; never copied from a teacher folder.
OWN_FILES = (
    "transformer", "scheduler", "README.md", "inference.json", "params.json", "model_index.json",
    "teacher_lora.safetensors",  # a fused teacher LoRA's factors (cdm.teacherlora): in the LoRA
)  # fmt: skip
CARD_TAGS = ["text-to-image", "diffusers", "distillation", "cdm"]
CARD_STEPS = (1, 2, 4, 8)  # step counts whose stock sigmas the model card lists
GRID = "sample_grid.png"  # the sample grid add_results_to_card puts beside README.md
RESULTS = ("<!-- cdm-results -->", "<!-- /cdm-results -->")  # bounds of the results section
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


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
    index |= family.index | {"scheduler": ["diffusers", type(scheduler).__name__]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    stock = few_step.stock_call(family.pipeline, seq_len)
    recipe = inference | {"default_call_exact": exact, few_step.STOCK: stock}
    (out / "inference.json").write_text(json.dumps(recipe, indent=1))
    schedule = {k: few_step.exported_sigmas(out, k) for k in sorted({*CARD_STEPS, len(raw)})}
    fields = teacher_license(teacher_dir, family) | teacher_fields(teacher_dir, params, base_model)
    card = model_card(family, recipe, type(scheduler).__name__, schedule, params, fields, dtype)
    card.save(out / "README.md")


def export_student(
    transformer: torch.nn.Module,
    family: Family,
    geometry: Callable[[Path, int | None], tuple[float, tuple[int, int, int], int]],
    teacher_dir: str | Path,
    out: Path,
    inference: dict[str, Any],
    params: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """export_pipeline at the image token count `geometry` gives for params'
    teacher.resolution (None: the family's default)."""
    teacher_dir = Path(teacher_dir)
    resolution = (params or {}).get("teacher", {}).get("resolution")
    _, _, tokens = geometry(teacher_dir, resolution)
    export_pipeline(
        transformer, family, teacher_dir, out, inference, tokens, params, dtype, base_model
    )


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
        f"image = pipe(prompt=prompt, {family.call.format(steps=steps, extra=extra)}).images[0]",
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
