"""Shared fixtures: tiny models built offline, and paths of the project."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


def copy_project(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The project's files (tracked and new, links kept as links) into `dst`, without
    results/, tests/ and the names in `skip`: a scratch checkout for orchestrator tests."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        src = ROOT / name
        if name.startswith(("results/", "tests/")) or name in skip:
            continue
        if src.is_file() or src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    return dst


def edit_params(path: Path, **changes: dict) -> None:
    """Update sections of a params file (each section's keys merged with `changes`)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        data[section] = data[section] | values
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# A shapes-world run small enough for the orchestrator tests: the tiny teacher, 8 pairs.
TINY_WORLD = {
    "teacher": {"path": "tiny_teacher", "steps": 2},
    "prepare_teacher": {"n_pairs": 8, "judge_renders": 512},
    "prompts": {"eval_pairs": 8},
    "distill": {"iterations": 4, "batch_size": 2, "k_max": 4, "checkpoint_every": 1},
    "sample": {"student_steps": [1], "teacher_steps": [2], "batch_size": 8},
    "report": {"grid_prompts": 2, "steps": "1"},
}


def tiny_world_project(dst: Path, teacher: Path, **changes: dict) -> Path:
    """A scratch copy of the project (no dvc.lock) with the tiny teacher and TINY_WORLD
    params, each section further updated by `changes`."""
    copy_project(dst, skip=("dvc.lock",))
    shutil.copytree(teacher, dst / "tiny_teacher")
    merged = {k: TINY_WORLD.get(k, {}) | changes.get(k, {}) for k in {*TINY_WORLD, *changes}}
    edit_params(dst / "params.yaml", **merged)
    return dst


def call_stage(cwd: Path, script: str, *args: str) -> tuple[int, str]:
    """Run a stage script of src/ as __main__ in this process: (exit code, stderr).

    Saves the ~8 s start of a Python with torch that a subprocess per call would cost.
    """
    old_cwd, old_argv, err = os.getcwd(), sys.argv, io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = [script, *args]
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / "src" / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return code, err.getvalue()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised world teacher (one layer), saved diffusers-style."""
    from cdm.world.teacher import WorldTeacher

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_teacher")
    WorldTeacher.new(shift=2.0, num_layers=1, heads=2, head_dim=8, text_width=16).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random SD3 and LongCat-Image pipelines saved with save_pretrained (offline)."""
    from tests import tiny_pipelines

    root = tmp_path_factory.mktemp("tiny_pipelines")
    builders = {"sd3": tiny_pipelines.sd3_pipeline, "longcat": tiny_pipelines.longcat_pipeline}
    return {name: tiny_pipelines.save(build(), root / name) for name, build in builders.items()}
