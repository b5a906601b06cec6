"""The real-run overlays (configs/sd3-medium.yaml, configs/longcat-image.yaml): the authors'
presets value by value (docs/method.md's table; configs/flux2-klein*.yaml: LongCat's but the
teacher), a valid params file once applied, and a
Snakemake DAG that dry-runs on the cluster profile with the world-only stages left out."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdm import params as P
from cdm.overlay import apply
from cdm.params import leaves
from tests.conftest import PYTHON, ROOT, copy_project

BIN = str(Path(PYTHON).parent)
ENV = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
OVERLAYS = ["configs/sd3-medium.yaml", "configs/longcat-image.yaml"]
# docs/method.md's table of the authors' presets: a column per overlay, a row per params key.
PRESETS = ROOT / "docs" / "method.md"
PRESETS_HEADING = "## The authors' presets, value by value"
COLUMNS = {"configs/sd3-medium.yaml": "SD3-Medium", "configs/longcat-image.yaml": "LongCat-Image"}
CELL = re.compile(r"^`(.*)`$")
# Keys the presets table leaves out: `compare` loads published baselines (their model cards'
# recipes, held by test_sd3_overlay_names_the_papers_baselines), not the authors' training preset;
# `dpg` spells out Table 1's sets for DVC, held equal to them by cdm.params (dpg_sets).
NOT_PRESET = ("compare.", "dpg.")


def preset_leaves(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in leaves(data).items() if not k.startswith(NOT_PRESET)}


def preset_table() -> dict[str, dict[str, Any]]:
    """docs/method.md's table of the authors' presets: column -> {params key path: value}."""
    text = PRESETS.read_text()
    assert PRESETS_HEADING in text, f"{PRESETS} lost its section '{PRESETS_HEADING}'"
    lines = text.split(PRESETS_HEADING, 1)[1].splitlines()
    rows = [line for line in lines[: _table_end(lines)] if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, Any]] = {name: {} for name in header[1:-1]}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = CELL.match(cells[0]).group(1)
        for name, cell in zip(header[1:-1], cells[1:-1], strict=True):
            assert key not in table[name], f"row {key} twice"
            table[name][key] = yaml.safe_load(CELL.match(cell).group(1))
    return table


def _table_end(lines: list[str]) -> int:
    """Index of the first line after the first table in `lines`."""
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))


def differences(overlay: Path, column: str) -> list[str]:
    """Every key whose value in the overlay file is not the table's, or that only one has."""
    got, want = preset_leaves(yaml.safe_load(overlay.read_text())), preset_table()[column]
    return [
        f"{key}: overlay {got.get(key, '(absent)')!r}, table {want.get(key, '(absent)')!r}"
        for key in sorted(got.keys() | want.keys())
        if key not in got or key not in want or not _same(got[key], want[key])
    ]


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (1 is not 1.0, "4" is not 4), lists item by item."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_equals_the_authors_preset_value_by_value(overlay):
    assert differences(ROOT / overlay, COLUMNS[overlay]) == []
    # Applied to params.yaml, every value survives validation as it stands in the table.
    params = P.parse(yaml.safe_load(apply(ROOT / overlay, ROOT / "params.yaml", write=False)))
    for key, value in preset_table()[COLUMNS[overlay]].items():
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        assert _same(node, value), (key, node, value)


def _mutated(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value * 2
    return "changed"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_changing_any_one_overlay_value_is_caught(overlay, tmp_path):
    data = yaml.safe_load((ROOT / overlay).read_text())
    missed = []
    for key in preset_leaves(data):
        *parents, last = key.split(".")
        copy = yaml.safe_load((ROOT / overlay).read_text())
        node = copy
        for part in parents:
            node = node[part]
        node[last] = _mutated(node[last])
        changed = tmp_path / f"{key}.yaml"
        changed.write_text(yaml.safe_dump(copy))
        if [d.split(":")[0] for d in differences(changed, COLUMNS[overlay])] != [key]:
            missed.append(key)
    assert missed == []
    # A key the table lacks is caught too.
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(data | {"distill": data["distill"] | {"max_nonfinite": 5}}))
    assert [d.split(":")[0] for d in differences(extra, COLUMNS[overlay])] == [
        "distill.max_nonfinite"
    ]


# FLUX.2 [klein] overlay -> the LongCat-Image preset it carries over, and the keys it sets
# otherwise: the teacher (backend, hub id, the pipeline's guidance_scale 4.0) and, for full
# fine-tuning, ZeRO-2 (the 4B fits an 80 GiB GPU with it: tests/test_plan.py).
FLUX2 = {
    "configs/flux2-klein.yaml": ("configs/longcat-image.yaml", {"distill.zero_stage"}),
    "configs/flux2-klein-lora.yaml": ("configs/longcat-image-lora.yaml", set()),
}
FLUX2_TEACHER = {"teacher.backend", "teacher.path", "teacher.cfg_scale"}


@pytest.mark.parametrize("overlay", FLUX2)
def test_flux2_overlays_are_the_longcat_presets_but_the_teacher(overlay):
    preset, own = FLUX2[overlay]
    ours = preset_leaves(yaml.safe_load((ROOT / overlay).read_text()))
    theirs = preset_leaves(yaml.safe_load((ROOT / preset).read_text()))
    differing = {
        k for k in ours.keys() | theirs.keys()
        if k not in ours or k not in theirs or not _same(ours[k], theirs[k])
    }  # fmt: skip
    assert differing == FLUX2_TEACHER | own
    params = P.parse(yaml.safe_load(apply(ROOT / overlay, ROOT / "params.yaml", write=False)))
    assert (params.teacher.backend, params.teacher.cfg_scale) == ("flux2-klein", 4.0)
    assert params.teacher.path == "black-forest-labs/FLUX.2-klein-base-4B"  # Apache-2.0
    assert params.teacher.resolution % 16 == 0  # VAE factor 8 x patch 2


@pytest.mark.parametrize("overlay", [*OVERLAYS, *FLUX2])
def test_real_run_prompts_are_fetched_never_committed(overlay):
    params = P.parse(yaml.safe_load(apply(ROOT / overlay, ROOT / "params.yaml", write=False)))
    # Fetched (sha256-checked) by the fetch_prompts rule; never part of the repository.
    assert params.prompts.eval_file == "data/pickscore_test_prompts.txt"
    tracked = subprocess.run(
        ["git", "ls-files", "data"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pickscore" not in tracked


def test_sd3_overlay_names_the_hub_model():
    data = yaml.safe_load((ROOT / "configs/sd3-medium.yaml").read_text())
    assert data["teacher"]["path"] == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_sd3_overlay_names_the_papers_baselines():
    """Hyper-SD, Flash-SD3 and TDM as the paper's Table 1 runs them (their model cards)."""
    params = P.parse(yaml.safe_load(apply(ROOT / OVERLAYS[0], ROOT / "params.yaml", write=False)))
    hyper, flash, tdm = (params.compare[n] for n in ("hyper_sd", "flash_sd3", "tdm"))
    assert (hyper.lora.path, hyper.lora.file) == (
        "ByteDance/Hyper-SD",
        "Hyper-SD3-8steps-CFG-lora.safetensors",
    )
    assert hyper.lora.fuse and (hyper.steps, hyper.guidance) == (8, 5.0)
    assert (flash.lora.path, flash.lora.format, flash.steps) == ("jasperai/flash-sd3", "peft", 4)
    assert "text_encoder_3" in flash.drop and flash.guidance <= 1
    assert (tdm.lora.path, tdm.lora.scale, tdm.steps) == ("Luo-Yihong/TDM_sd3_lora", 0.125, 4)
    assert (tdm.vae.cls, tdm.vae.path) == ("AutoencoderTiny", "madebyollin/taesd3")
    assert tdm.scheduler.cls == "DPMSolverMultistepScheduler"
    assert tdm.scheduler.kwargs["flow_shift"] == 6.0
    # The base row: the teacher at 50 steps with CFG 4.5.
    assert (params.teacher.steps, params.teacher.cfg_scale) == (50, 4.5)
    assert params.sample.teacher_steps == [50]


@pytest.mark.parametrize("stage", [2, 3])
def test_eight_gpu_accelerate_configs(stage):
    config = yaml.safe_load((ROOT / f"configs/accelerate/zero{stage}-8gpu.yaml").read_text())
    assert config["num_processes"] == 8 and config["distributed_type"] == "DEEPSPEED"
    ds_file = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
    ds = yaml.safe_load(ds_file.read_text())
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == stage


def _snakemake(cwd: Path, *args: str) -> str:
    cmd = ["snakemake", "-n", "--cores", "all", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def test_sd3_overlay_dry_runs_on_the_slurm_profile(tmp_path):
    work = copy_project(tmp_path / "project")
    subprocess.run(
        [PYTHON, "-m", "cdm.overlay", "configs/sd3-medium.yaml"], cwd=work, env=ENV, check=True
    )
    out = _snakemake(work, "--profile", "slurm")
    assert "--config_file configs/accelerate/zero2-8gpu.yaml --num_processes 8" in out
    for rule in ("fetch_weights", "fetch_prompts", "prepare_teacher", "cache_teacher",
                 "distill", "score", "report"):  # fmt: skip
        assert f"rule {rule}:" in out, rule
    assert "samples/cdm/4/index.parquet" in out and "samples/teacher_cfg/50" in out
    for published in ("hyper_sd/8", "flash_sd3/4", "tdm/4"):  # the paper's baselines
        assert f"samples/{published}/index.parquet" in out, published
    assert "models/judge" not in out
    # DPG-Bench (prompts.dpg_file is set): Table 1's sets on its prompts, then score_dpg,
    # whose results the report reads.
    for rule in ("fetch_dpg", "cache_dpg", "sample_dpg", "score_dpg"):
        assert f"rule {rule}:" in out, rule
    for name, steps in P.dpg_sets(P.load(work / "params.yaml")):
        assert f"samples_dpg/{name}/{steps}/index.parquet" in out, name
    assert "samples_dpg/tdm/4/index.parquet" in out and "samples_dpg/teacher_cfg/50/" in out
    report = out.split("rule report:", 1)[1].split("\n\n", 1)[0]
    assert "results/dpg.json" in report
    # DVC plans the same stages (a dry run must --force: DVC hashes the missing upstream
    # outputs of a fresh clone otherwise).
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["dvc", "init", "-q", "--force"], cwd=work, env=ENV, check=True)
    proc = subprocess.run(
        ["dvc", "repro", "--dry", "--force"], cwd=work, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = set(re.findall(r"Running stage '([^']+)'", proc.stdout))
    assert {"fetch_weights", "prepare_teacher", "cache_teacher", "distill@dmd2", "distill@cdm",
            "sample_student@cdm-4", "sample_teacher@teacher_cfg-50", "score", "report",
            "sample_compare@hyper_sd", "sample_compare@flash_sd3", "sample_compare@tdm"} <= planned  # fmt: skip
    assert {"cache_dpg@dpg_bench", "score_dpg@dpg_bench", "sample_dpg@teacher_cfg",
            "sample_dpg@cdm", "sample_dpg@tdm"} <= planned  # fmt: skip
    # The shapes DAG keeps its world metrics, and has no DPG stage (prompts.dpg_file null).
    shapes_work = copy_project(tmp_path / "shapes")
    shapes = _snakemake(shapes_work)
    assert "rule score" in shapes and "rule report" in shapes
    # (score's code inputs name the metrics package, dpg.py included: look at rules and outputs)
    assert not re.search(r"rule \w*dpg\w*:", shapes), "a DPG rule in the shapes DAG"
    assert "samples_dpg" not in shapes and "results/dpg.json" not in shapes
    subprocess.run(["git", "init", "-q"], cwd=shapes_work, check=True)
    subprocess.run(["dvc", "init", "-q", "--force"], cwd=shapes_work, env=ENV, check=True)
    listed = subprocess.run(
        ["dvc", "stage", "list"], cwd=shapes_work, env=ENV, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "score" in listed.stdout and "dpg" not in listed.stdout


def test_a_configfile_overlay_is_refused_with_the_overlay_command():
    """The scripts read params.yaml; Snakemake's --configfile would change only the plan."""
    proc = subprocess.run(
        ["snakemake", "-n", "--cores", "1", "--configfile", "configs/sd3-medium.yaml"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "python -m cdm.overlay" in proc.stdout + proc.stderr


# configs/qwen-image-lora.yaml departs from the LongCat LoRA preset at these keys only (its
# comments say why); every other value is carried over.
QWEN_OWN = {
    "teacher.backend", "teacher.path", "teacher.cfg_scale", "cache_teacher.batch_size",
    "distill.batch_size", "distill.num_processes", "distill.accumulation", "sample.batch_size",
}  # fmt: skip


def test_qwen_image_lora_overlay_is_longcats_lora_preset_but_its_own_keys():
    qwen = leaves(yaml.safe_load((ROOT / "configs/qwen-image-lora.yaml").read_text()))
    longcat = leaves(yaml.safe_load((ROOT / "configs/longcat-image-lora.yaml").read_text()))
    differ = {k for k in qwen.keys() | longcat.keys() if not _same(qwen.get(k), longcat.get(k))}
    assert differ == QWEN_OWN
    params = P.parse(
        yaml.safe_load(
            apply(ROOT / "configs/qwen-image-lora.yaml", ROOT / "params.yaml", write=False)
        )
    )
    assert params.teacher.backend == "qwen-image" and params.distill.lora is not None
    cfg = params.distill
    assert cfg.num_processes * cfg.batch_size * cfg.accumulation == 64  # LongCat's global batch


def test_qwen_image_lora_overlay_validates(tmp_path):
    """`python -m cdm.validate` on params.yaml with the overlay applied (prompt files in
    place) accepts it; without the training prompts it says so in one line."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    apply(ROOT / "configs/qwen-image-lora.yaml", work / "params.yaml")
    (work / "data").mkdir()
    for name in ("train_prompts.txt", "pickscore_test_prompts.txt"):
        (work / "data" / name).write_text("a cat\n")
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.validate", "params.yaml", "--no-lock"], cwd=work, env=ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (work / "data" / "train_prompts.txt").unlink()
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.validate", "params.yaml", "--no-lock"], cwd=work, env=ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "prompts.train_file data/train_prompts.txt does not exist" in proc.stderr
