"""What every preference scorer shares: the interface (images + prompts -> one float per
image), batching under no_grad, the device choice, and offline loading of pretrained parts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image

from cdm.hub import HUB_ID

FETCH_COMMAND = "python -m cdm.fetch weights"

S = TypeVar("S", bound="Scorer")
L = TypeVar("L")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def missing_weights(what: str, model_id: str) -> FileNotFoundError:
    """The one-line error of weights absent offline: the real run cannot download them."""
    return FileNotFoundError(
        f"{what} weights '{model_id}' are not available offline; fetch them with `{FETCH_COMMAND}`"
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

    def __init__(self, batch_size: int = 32, device: str | torch.device | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else default_device()

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """Build from a config mapping (the constructor's keyword arguments)."""
        return cls(**config)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per image (float64, shape (N,)), computed batch_size pairs at a time."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        parts = [
            self.score_batch(
                list(images[lo : lo + self.batch_size]), list(prompts[lo : lo + self.batch_size])
            )
            .float()
            .cpu()
            for lo in range(0, len(images), self.batch_size)
        ]
        return torch.cat(parts).double().numpy() if parts else np.zeros(0)

    @abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of one batch; called under no_grad."""
