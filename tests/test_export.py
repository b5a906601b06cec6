"""Exported students on tiny offline SD3 and LongCat-Image teachers (bf16 transformers).

Stock diffusers runs the exported folder at 1, 2, 4 and 8 steps: the sigmas its scheduler ends
up with are finite, fall from 1 to 0, are the project's sampler's sigmas at that step count
(the recipe's at 4) and are what few_step.exported_sigmas replays, bit for bit. The model card
parses with huggingface_hub and names license and base model; the transformer keeps the
teacher's dtype; add_results_to_card writes a metrics table and a sample grid.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

from cdm import manifest
from cdm.backends import export, few_step, flux2, longcat, sd3
from cdm.sampling import inference_sigmas
from tests import tiny_pipelines

RECIPE = [1.0, 0.75, 0.5, 0.25]
STEPS = (1, 2, 4, 8)
# backend -> (builder, module, resolution in px, extra call arguments)
BACKENDS = {
    "sd3": (tiny_pipelines.sd3_pipeline, sd3, 16, {}),
    "longcat": (tiny_pipelines.longcat_pipeline, longcat, 32, {"enable_prompt_rewrite": False}),
    "flux2-klein": (tiny_pipelines.flux2_pipeline, flux2, 32, {}),
}
SD3_HUB = "stabilityai/stable-diffusion-3-medium-diffusers"


def _dtypes(folder) -> set[str]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            found |= {f.get_slice(key).get_dtype() for key in f.keys()}
    return found


@pytest.fixture(scope="module", params=list(BACKENDS))
def exported(request, tmp_path_factory):
    """(backend, teacher folder, student folder, the student module, its shift)."""
    backend = request.param
    build, module, resolution, _ = BACKENDS[backend]
    root = tmp_path_factory.mktemp(f"export_{backend}")
    pipe = build()
    pipe.transformer.to(torch.bfloat16)
    teacher = tiny_pipelines.save(pipe, root / "teacher")
    velocity, shift, _ = module.load_velocity(teacher, resolution)
    velocity.float()  # the student's EMA is fp32
    inference = {"sigmas_raw": RECIPE, "shift": shift, "steps": 4, "guidance": 1.0}
    params = {
        "teacher": {"path": str(teacher), "resolution": resolution},
        "distill": {"lr_student": 1e-5},
        "seed": 0,
    }
    module.export(velocity, teacher, root / "student", inference | {"method": "cdm"}, params)
    return backend, teacher, root / "student", velocity, shift


def _stock_sigmas(backend: str, folder, steps: int) -> torch.Tensor:
    """The sigmas stock diffusers' scheduler holds after a default call on the folder."""
    import diffusers

    _, module, resolution, extra = BACKENDS[backend]
    cls = getattr(diffusers, module.FAMILY.pipeline)
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe(
        prompt="a red cat", num_inference_steps=steps, guidance_scale=1.0, height=resolution,
        width=resolution, output_type="latent", generator=torch.Generator().manual_seed(0),
        **extra,
    )  # fmt: skip
    return pipe.scheduler.sigmas.cpu()


def test_stock_pipeline_runs_our_sigmas_at_1_2_4_8_steps(exported):
    backend, _, folder, _, shift = exported
    for steps in STEPS:
        stock = _stock_sigmas(backend, folder, steps)
        assert stock.shape == (steps + 1,) and torch.isfinite(stock).all(), (steps, stock)
        # FLUX.2's static shift S t / (1 + (S - 1) t), in float32, may put t = 1 an ulp low.
        ulp = torch.finfo(torch.float32).eps if backend == "flux2-klein" else 0.0
        assert 1 - stock[0] <= ulp and stock[-1] == 0 and (stock.diff() < 0).all(), (steps, stock)
        # What sample.py samples on: the stock sigmas, bit for bit.
        replay = few_step.exported_sigmas(folder, steps)
        assert replay.dtype == torch.float32 and torch.equal(replay, stock.float()), steps
        # The project's own schedule at that count: the recipe at 4, linspace(1, 1/n, n) else.
        ours = inference_sigmas(steps, shift, RECIPE if steps == 4 else None)
        torch.testing.assert_close(stock.float(), ours, rtol=0, atol=1e-6)
        if backend == "sd3":  # float64 schedule: its float32 rounding is ours exactly
            assert stock.dtype == torch.float64 and torch.equal(stock.float(), ours), steps


def test_the_scheduler_replay_is_the_stock_call(exported):
    """pipeline_sigmas/exported_sigmas replay the stock call with no pipeline at all, which is
    what export checks and what sample.py uses at any step count."""
    backend, _, folder, _, shift = exported
    for steps in (3, 5, 6):
        stock = _stock_sigmas(backend, folder, steps)
        assert torch.equal(few_step.exported_sigmas(folder, steps), stock.float()), steps
        torch.testing.assert_close(stock.float(), inference_sigmas(steps, shift), rtol=0, atol=1e-6)


def test_recipe_and_scheduler_files(exported):
    backend, _, folder, _, _ = exported
    recipe = json.loads((folder / "inference.json").read_text())
    assert recipe["default_call_exact"] and recipe[few_step.STOCK]["pipeline"] == (
        BACKENDS[backend][1].FAMILY.pipeline
    )
    index = json.loads((folder / "model_index.json").read_text())
    expected = few_step.FLOW_MAP if backend == "sd3" else few_step.FLOW_MATCH
    assert index["scheduler"] == ["diffusers", expected]
    config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert config["_class_name"] == expected
    assert not (folder / "model_index.json").samefile(exported[1] / "model_index.json")


def test_transformer_keeps_the_teachers_dtype(exported, tmp_path):
    backend, teacher, folder, velocity, shift = exported
    assert _dtypes(teacher / "transformer") == {"BF16"}
    assert _dtypes(folder / "transformer") == {"BF16"}
    assert {p.dtype for p in velocity.parameters()} == {torch.float32}  # left as it was
    module = BACKENDS[backend][1]
    inference = {"sigmas_raw": RECIPE, "shift": shift, "steps": 4}
    module.export(velocity, teacher, tmp_path / "fp16", inference, dtype=torch.float16)
    assert _dtypes(tmp_path / "fp16" / "transformer") == {"F16"}
    loaded = module.load_velocity(tmp_path / "fp16")[0]
    saved = dict(loaded.transformer.state_dict())
    for key, value in velocity.transformer.state_dict().items():
        torch.testing.assert_close(saved[key].float(), value.half().float(), rtol=0, atol=0)


def test_model_card_parses_with_license_and_base_model(exported):
    backend, teacher, folder, _, _ = exported
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    if backend == "sd3":
        assert data["license"] == "other" and data["license_name"] == "stabilityai-ai-community"
        assert data["license_link"].endswith("LICENSE.md")
    else:
        assert data["license"] == "apache-2.0"
    assert set(export.CARD_TAGS) <= set(data["tags"])
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    # A local teacher: no hub id to name, its path in a field of its own.
    assert "base_model" not in data and data["teacher_local_path"] == str(teacher)
    assert "[1.0, 0.75, 0.5, 0.25]" in card.text and "| distill.lr_student |" in card.text
    assert "num_inference_steps=4, guidance_scale=1.0" in card.text
    for steps in STEPS:
        assert f"\n| {steps} | [1.0, " in card.text


def test_base_model_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "sd3_local"
    local.mkdir()
    fields = export.teacher_fields(local, {"teacher": {"path": SD3_HUB}}, None)
    assert fields == {"base_model": SD3_HUB, "base_model_relation": "finetune"}
    params = {"teacher": {"path": "sd3_local"}}
    assert export.teacher_fields(local, params, None) == {"teacher_local_path": "sd3_local"}
    fields = export.teacher_fields(local, params, SD3_HUB)
    assert fields["base_model"] == SD3_HUB and fields["teacher_local_path"] == "sd3_local"
    cache = tmp_path / "hub/models--stabilityai--stable-diffusion-3-medium-diffusers/snapshots/a1"
    fields = export.teacher_fields(cache, {"teacher": {"path": str(cache)}}, None)
    assert fields["base_model"] == SD3_HUB and fields["teacher_local_path"] == str(cache)


def test_the_teachers_own_card_license_wins(tmp_path):
    assert export.teacher_license(tmp_path, sd3.FAMILY) == sd3.LICENSE
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a teacher\n")
    assert export.teacher_license(tmp_path, sd3.FAMILY) == {"license": "mit"}
    (tmp_path / "README.md").write_text("---\n[unparsable\n---\n")
    assert export.teacher_license(tmp_path, longcat.FAMILY) == {"license": "apache-2.0"}


def test_explicit_base_model_reaches_the_card(exported, tmp_path):
    backend, teacher, _, velocity, shift = exported
    module = BACKENDS[backend][1]
    inference = {"sigmas_raw": RECIPE, "shift": shift, "steps": 4}
    module.export(velocity, teacher, tmp_path / "s", inference, base_model="org/teacher")
    data = ModelCard.load(tmp_path / "s" / "README.md").data.to_dict()
    assert data["base_model"] == "org/teacher" and data["base_model_relation"] == "finetune"


def test_add_results_to_card_writes_the_table_and_the_grid(exported, tmp_path):
    _, _, folder, _, _ = exported
    student = tmp_path / "student"
    student.mkdir()
    (student / "README.md").write_text((folder / "README.md").read_text())
    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(grid)
    metrics = {"clip_score": 0.312345, "fid": {"4": 12.5}, "n": 3}
    export.add_results_to_card(student, metrics, grid)
    card = ModelCard.load(student / "README.md")
    assert "| clip_score | 0.3123 |" in card.text and "| fid.4 | 12.5 |" in card.text
    assert "| n | 3 |" in card.text and f"![sample grid]({export.GRID})" in card.text
    assert (student / export.GRID).read_bytes() == grid.read_bytes()
    assert card.data.to_dict() == ModelCard.load(folder / "README.md").data.to_dict()
    export.add_results_to_card(student, {"clip_score": 0.5}, None)  # replaces the section
    text = (student / "README.md").read_text()
    assert text.count("## Results") == 1 and "| clip_score | 0.5 |" in text
    assert "0.3123" not in text and "![sample grid]" not in text
    assert text.startswith("---\n") and "## Distillation" in text


def test_no_flow_match_config_is_both_exact_and_finite():
    """Why SD3 exports FlowMapEulerDiscreteScheduler: FlowMatchEuler matches the recipe at one
    step count only through shift_terminal, which divides 0 by 0 at 1 step."""
    base = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    stretched = {k: v for k, v in base.items() if not k.startswith("_")} | {"shift_terminal": 0.5}
    with np.errstate(invalid="ignore", divide="ignore"):
        assert math.isnan(few_step.pipeline_sigmas(stretched, 1, 4096)[0])
    config = few_step.sd3_default_call(RECIPE, 3.0, 1000)
    for steps in STEPS:
        sigmas = few_step.pipeline_sigmas(config, steps, 4096)
        torch.testing.assert_close(sigmas, inference_sigmas(steps, 3.0), rtol=0, atol=0)


def test_publish_links_the_student_and_puts_the_results_in_its_own_card(exported, tmp_path):
    """The student the orchestrators track stays as it is; the published copy shares its
    weights (hard links) and its card carries the method's metrics and the sample grid."""
    from cdm.publish import main as publish

    _, _, folder, _, _ = exported
    students, results = tmp_path / "students", tmp_path / "results"
    shutil.copytree(folder, students / "cdm")
    manifest.write(students / "cdm")  # as the distill stage completes an export
    card_before = (students / "cdm" / "README.md").read_text()
    (results / "plots").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(results / "plots" / "samples.png")
    metrics = {"cdm": {"4": {"clip": 31.2, "clip_ci": [30.0, 32.0], "conventions": {}},
                       "2": {"clip": 29.5}}, "teacher_cfg": {"28": {"clip": 33.0}}}  # fmt: skip
    (results / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "exports" / "cdm"
    args = ["cdm", "--students", str(students), "--results", str(results), "--out", str(out)]
    assert publish(args) == 0
    text = (out / "README.md").read_text()
    assert "| 4 steps.clip | 31.2 |" in text and "| 2 steps.clip | 29.5 |" in text
    assert "conventions" not in text and f"![sample grid]({export.GRID})" in text
    assert (students / "cdm" / "README.md").read_text() == card_before
    weights = next((out / "transformer").glob("*.safetensors"))
    twin = students / "cdm" / "transformer" / weights.name
    assert weights.stat().st_ino == twin.stat().st_ino
    assert publish(["dmd2", "--students", str(students), "--results", str(results)]) == 2
