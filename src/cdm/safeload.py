"""DeepSpeed checkpoints read as data only: a resume never unpickles code.

DeepSpeed's checkpoint engine loads its `.pt` files with `torch.load(weights_only=False)`, so
a pickle placed in a checkpoint folder (shared scratch, a copied run) would run at the next
resume; the manifest proves nothing, since whoever writes the files writes it too. While
`weights_only_loads` is active, each engine's loads use `weights_only=True`, allowing only the
few DeepSpeed classes its own files hold (the loss scaler, the ZeRO stage, fragment addresses).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from cdm.cli import StageFailure


def deepspeed_globals() -> list[Any]:
    """The non-tensor classes in DeepSpeed's model and ZeRO optimizer state files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_data_only(path: str, map_location: Any = None) -> Any:
    """torch.load with weights_only; anything else in the file is refused in one line."""
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        what = str(exc).split("Unsupported global: ")[-1].split(".")[0].strip()
        raise StageFailure(
            f"{path} holds more than tensors and settings ({what or 'an object'}); refused: "
            "loading it could run code. Remove that checkpoint folder (or the run's) to resume "
            "from an earlier one or start afresh"
        ) from None


@contextlib.contextmanager
def weights_only_loads(*engines: Any) -> Iterator[None]:
    """Each DeepSpeed engine's checkpoint loads go through load_data_only in this block."""
    patched = {id(e.checkpoint_engine): e.checkpoint_engine for e in engines}.values()
    for checkpoint_engine in patched:
        checkpoint_engine.load = load_data_only  # the instance's, over the class's method
    try:
        yield
    finally:
        for checkpoint_engine in patched:
            del checkpoint_engine.load
