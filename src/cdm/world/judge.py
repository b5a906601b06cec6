"""The judge: a small CNN that reads every attribute of a render.

Its penultimate features (FEATURE_DIM) are the embedding the world metrics use
(Fréchet distance, precision/recall), as Inception features are for real images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cdm.world.prompts import ATTRIBUTES

FEATURE_DIM = 128
WEIGHTS = "judge.safetensors"


class Judge(nn.Module):
    def __init__(self, image_size: int = 32, width: int = 32):
        super().__init__()
        self.image_size = image_size
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (image_size // 8) ** 2, FEATURE_DIM), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict(
            {k: nn.Linear(FEATURE_DIM, len(v)) for k, v in ATTRIBUTES.items()}
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, FEATURE_DIM) of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {k: head(feats) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, batch_size: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attribute predictions (B, n_kinds) in ATTRIBUTES order, features (B, FEATURE_DIM))."""
        preds, feats = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk.float())
            preds.append(torch.stack([self.heads[k](f).argmax(1) for k in ATTRIBUTES], 1))
            feats.append(f)
        return torch.cat(preds), torch.cat(feats)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)
        (path / "config.json").write_text(json.dumps({"image_size": self.image_size}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Judge:
        path = Path(path)
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"no judge weights at {path / WEIGHTS}; run `make world-judge`")
        judge = cls(**json.loads((path / "config.json").read_text()))
        judge.load_state_dict(load_file(path / WEIGHTS))
        return judge.eval()
