"""What every preference scorer shares: the interface (images + prompts -> one float per
image), batching under no_grad, the device and dtype choice, offline loading of pretrained
parts, and what a failed image becomes.

A failed image: the authors' code writes -10.0 for an image its scorer fails on and leaves it
out of the means. Here a batch that raises is redone one image at a time; an image that still
raises, or whose output is not finite, scores NaN and its reason is kept (`Scored.failures`),
so the set's means and intervals skip it and metrics.json counts it. Out of memory is never an
image's fault and still stops the stage, as does a call in which every image fails."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

from cdm.hub import HUB_ID

FETCH_COMMAND = "python -m cdm.fetch weights"

S = TypeVar("S", bound="Scorer")
L = TypeVar("L")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_dtype(
    dtype: str | torch.dtype | None, device: torch.device, cuda_default: torch.dtype
) -> torch.dtype:
    """An explicit dtype ('bfloat16' or torch.bfloat16), else `cuda_default` on CUDA (where the
    scorer's authors run it so) and fp32 elsewhere (a CPU computes bf16 slowly)."""
    if dtype is None:
        return cuda_default if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype '{dtype}' is no torch dtype; use e.g. float32 or bfloat16")
    return found


class Scored(NamedTuple):
    values: np.ndarray  # (N,) or (N, D) float64; NaN rows are failed images
    failures: dict[int, str]  # index of a failed image -> one-line reason


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def missing_weights(what: str, model_id: str, why: str = "") -> FileNotFoundError:
    """The one-line error of weights absent offline: the real run cannot download them."""
    because = f" ({why})" if why else ""
    return FileNotFoundError(
        f"{what} weights '{model_id}' are not available offline{because}; "
        f"fetch them with `{FETCH_COMMAND}`"
    )


def load_pretrained(loader: type[L], model_id: str, what: str, cache_dir: str | None = None) -> L:
    """`loader.from_pretrained` (a transformers class) from a local folder or the hub cache only."""
    if not Path(model_id).exists() and not HUB_ID.match(model_id):
        raise missing_weights(what, model_id)
    try:
        return loader.from_pretrained(model_id, cache_dir=cache_dir, local_files_only=True)  # type: ignore[attr-defined]
    except OSError as exc:  # transformers' way of saying "not in this folder or cache"
        raise missing_weights(what, model_id) from exc


class Scorer(ABC):
    """Scores (image, prompt) pairs: one float per image, higher is preferred."""

    name: ClassVar[str]  # the registry key (see cdm.metrics.scorers)

    cuda_dtype: ClassVar[torch.dtype] = torch.float32  # the authors' precision on a GPU

    def __init__(
        self,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = as_dtype(dtype, self.device, self.cuda_dtype)

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """Build from a config mapping (the constructor's keyword arguments)."""
        return cls(**config)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per image (float64, shape (N,)); NaN where the image failed."""
        return self.scored(images, prompts).values

    def scored(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Scored:
        """score() with the reason of each failed image."""
        return self.batched(self.score_batch, images, prompts)

    @torch.no_grad()
    def batched(
        self,
        fn: Callable[[list[Image.Image], list[str]], torch.Tensor],
        images: Sequence[Image.Image],
        prompts: Sequence[str],
    ) -> Scored:
        """`fn` (B pairs -> (B, ...) rows) batch_size pairs at a time, failures as NaN rows."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rows: list[torch.Tensor | None] = []
        failures: dict[int, str] = {}
        for lo in range(0, len(images), self.batch_size):
            ims, ps = (
                list(images[lo : lo + self.batch_size]),
                list(prompts[lo : lo + self.batch_size]),
            )
            try:
                rows += list(fn(ims, ps).float().cpu())
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 (redone image by image to find the failed ones)
                for i, (im, p) in enumerate(zip(ims, ps, strict=True)):
                    try:
                        rows.append(fn([im], [p]).float().cpu()[0])
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as exc:  # noqa: BLE001 (the image's failure, kept)
                        failures[lo + i] = _reason(exc)
                        rows.append(None)
        done = [r for r in rows if r is not None]
        if not rows:
            return Scored(np.zeros(0), {})
        if not done:
            first = failures[min(failures)]
            raise ValueError(f"{self.name} failed on all {len(rows)} images ({first})")
        nan = torch.full_like(done[0], math.nan)
        values = torch.stack([nan if r is None else r for r in rows]).double().numpy()
        for i, row in enumerate(values.reshape(len(values), -1)):
            if i not in failures and not np.isfinite(row).all():
                failures[i] = "non-finite output"
                values[i] = math.nan
        return Scored(values, failures)

    @abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of one batch; called under no_grad."""
