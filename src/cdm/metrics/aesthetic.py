"""LAION's improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image features.

The head's layer indices match the released `sac+logos+ava1-l14-linearMSE.pth`, so its state
dict loads as is (keys layers.{0,2,4,6,7}.*; the gaps are dropout layers).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from torch import nn

from cdm.metrics.base import Scorer, missing_weights
from cdm.metrics.openclip import OpenClipEncoder

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_HUB = f"camenduru/improved-aesthetic-predictor/{HEAD_FILE}"
HUB_FILE = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/(.+)$")  # owner/name/file


class AestheticHead(nn.Module):
    """768-1024-128-64-16-1 linear maps, no activations (dropout is inert at eval)."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def resolve_head(head: str, cache_dir: str | None = None) -> Path:
    """A head file: a path, a folder holding HEAD_FILE, or 'owner/name/file' in the hub cache."""
    path = Path(head)
    if path.is_dir():
        path = path / HEAD_FILE
    if path.is_file():
        return path
    hub = HUB_FILE.match(head)
    if hub:
        try:
            return Path(hf_hub_download(*hub.groups(), cache_dir=cache_dir, local_files_only=True))
        except FileNotFoundError:  # LocalEntryNotFoundError: not in the cache
            pass
    raise missing_weights("aesthetic head", head)


class AestheticScorer(Scorer):
    """Aesthetic score of each image (prompts are accepted for the interface, and ignored)."""

    name = "aesthetic"

    def __init__(
        self,
        head: str = HEAD_HUB,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        *,
        cache_dir: str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        path = resolve_head(head, cache_dir)  # before the CLIP: fail fast on a missing head
        self.path = path  # the file actually loaded (its sha256 goes to the conventions)
        self.encoder = OpenClipEncoder(
            clip_model, clip_pretrained, self.device, cache_dir, self.dtype
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        width = state["layers.0.weight"].shape[1]
        if width != self.encoder.embed_dim:
            raise ValueError(
                f"aesthetic head '{head}' takes {width}-d features but {clip_model} gives "
                f"{self.encoder.embed_dim}-d"
            )
        self.head = AestheticHead(width)
        self.head.load_state_dict(state)
        self.head.to(self.device).eval()  # fp32: it reads the features as float32

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.head(self.encoder.images(images))
