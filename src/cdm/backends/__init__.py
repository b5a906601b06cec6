"""Name -> backend registry; its keys are the choices of `teacher.backend` in params.yaml.

Each backend module offers `load(path)` (the whole teacher, text encoders included, for
prepare_teacher and cache_teacher), `load_velocity(path)` (the velocity network alone,
for distill and sample), `load_decoder(path)` (latents -> uint8 images, for sample) and
`export(student, teacher_dir, out, inference)`.
"""

from __future__ import annotations

from types import ModuleType

from cdm.backends import shapes
from cdm.backends.base import Backend

BACKENDS: dict[str, ModuleType] = {"shapes": shapes}


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend '{name}' is not available; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_backend(name: str, path) -> Backend:
    return backend_module(name).load(path)
