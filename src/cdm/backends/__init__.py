"""Name -> backend registry; its keys are the choices of `teacher.backend` in params.yaml.

Each backend module offers `load(path, resolution)` (the whole teacher, text encoders
included, for prepare_teacher and cache_teacher), `load_velocity(path, resolution, dtype)` (the
velocity network alone, for distill and sample), `load_decoder(path)` (latents -> uint8
images, for sample) and `export(student, teacher_dir, out, inference, params)`. The
diffusers-pipeline backends (sd3, longcat) also offer `resolve(path)`: a local folder or
hub id, checked to hold their pipeline family.
"""

from __future__ import annotations

from types import ModuleType

from cdm.backends import longcat, sd3, shapes
from cdm.backends.base import Backend

BACKENDS: dict[str, ModuleType] = {"shapes": shapes, "sd3": sd3, "longcat": longcat}


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not available; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_backend(name: str, path, resolution: int | None = None) -> Backend:
    return backend_module(name).load(path, resolution)
