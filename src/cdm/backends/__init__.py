"""Name -> backend registry; its keys are the choices of `teacher.backend` in params.yaml.

The registry names each backend's module without importing it: a backend's libraries
(diffusers' pipeline classes, a text encoder's package) load only when that backend is used,
so the shapes world never pays for SD3, LongCat or Qwen-Image, nor a report for any of them.

Each backend module offers `load(path, resolution)` (the whole teacher, text encoders
included, for prepare_teacher and cache_teacher), `load_velocity(path, resolution, dtype)` (the
velocity network alone, for distill and sample), `load_decoder(path)` (latents -> uint8
images, for sample) and `export(student, teacher_dir, out, inference, params)`. The
diffusers-pipeline backends (sd3, longcat, qwen-image, flux2-klein) also offer
`resolve(path)`: a local folder or hub id, checked to hold their pipeline family.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdm.backends.base import Backend

BACKENDS: dict[str, str] = {
    "shapes": "cdm.backends.shapes",
    "sd3": "cdm.backends.sd3",
    "longcat": "cdm.backends.longcat",
    "qwen-image": "cdm.backends.qwenimage",
    "flux2-klein": "cdm.backends.flux2",
}


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not available; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def load_backend(name: str, path, resolution: int | None = None) -> Backend:
    return backend_module(name).load(path, resolution)
