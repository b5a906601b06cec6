"""The real-run overlays (configs/sd3-medium.yaml, configs/longcat-image.yaml): the authors'
recipe, a valid params file once applied, and a Snakemake DAG that dry-runs on the cluster
profile with the world-only stages left out."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cdm import params as P
from cdm.overlay import apply
from tests.conftest import PYTHON, ROOT, copy_project

BIN = str(Path(PYTHON).parent)
ENV = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
OVERLAYS = ["configs/sd3-medium.yaml", "configs/longcat-image.yaml"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_carries_the_authors_recipe(overlay):
    params = P.parse(yaml.safe_load(apply(ROOT / overlay, ROOT / "params.yaml", write=False)))
    d = params.distill
    assert (d.lr_student, d.lr_fake, d.warmup, d.batch_size) == (1e-5, 5e-6, 100, 16)
    assert (d.iterations, d.update_ratio, d.guidance, d.ema_max) == (4000, 2, 7.0, 0.999)
    assert (d.k_min, d.k_max, d.u_min, d.u_max) == (1, 28, 0.25, 0.95)
    assert d.inference_sigmas == [1.0, 0.75, 0.5, 0.25]
    assert d.zero_stage == 2 and d.gradient_checkpointing
    assert params.teacher.resolution == 1024 and params.teacher.backend != "shapes"
    # Fetched (sha256-checked) by the fetch_prompts rule; never part of the repository.
    assert params.prompts.eval_file == "data/pickscore_test_prompts.txt"
    tracked = subprocess.run(
        ["git", "ls-files", "data"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pickscore" not in tracked
    assert params.distill.num_processes == 8


def test_sd3_overlay_names_the_hub_model():
    data = yaml.safe_load((ROOT / "configs/sd3-medium.yaml").read_text())
    assert data["teacher"]["path"] == "stabilityai/stable-diffusion-3-medium-diffusers"


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
    assert "samples/cdm/4/index.parquet" in out and "samples/teacher_cfg/28" in out
    assert "models/judge" not in out
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
            "sample_student@cdm-4", "sample_teacher@teacher_cfg-28", "score", "report"} <= planned  # fmt: skip
    # The shapes DAG keeps its world metrics.
    shapes = _snakemake(copy_project(tmp_path / "shapes"))
    assert "rule score" in shapes and "rule report" in shapes


def test_a_configfile_overlay_is_refused_with_the_overlay_command():
    """The scripts read params.yaml; Snakemake's --configfile would change only the plan."""
    proc = subprocess.run(
        ["snakemake", "-n", "--cores", "1", "--configfile", "configs/sd3-medium.yaml"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "python -m cdm.overlay" in proc.stdout + proc.stderr
