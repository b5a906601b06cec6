"""Name -> backend registry; its keys are the choices of `teacher.backend` in params.yaml."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cdm.backends.base import Backend
from cdm.backends.shapes import ShapesBackend

BACKENDS: dict[str, Callable[[str | Path], Backend]] = {
    "shapes": ShapesBackend.load,
}


def load_backend(name: str, path: str | Path) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not available; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](path)
