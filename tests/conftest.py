"""Shared fixtures: tiny models built offline, and paths of the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


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
