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
