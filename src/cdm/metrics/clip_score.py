"""CLIP score (Hessel et al., 2021): 100 * max(cos(image, prompt), 0) with an open_clip model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cdm.metrics.base import Scorer
from cdm.metrics.openclip import OpenClipEncoder


class ClipScorer(Scorer):
    """CLIP score; its normalised image features also feed the FD-to-teacher metric."""

    name = "clip"

    def __init__(
        self,
        model: str = "ViT-H-14",
        pretrained: str = "laion2b_s32b_b79k",
        *,
        cache_dir: str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(batch_size, device)
        self.encoder = OpenClipEncoder(model, pretrained, self.device, cache_dir)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        cos = (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)
        return 100 * cos.clamp(min=0)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings (N, embed_dim), float32."""
        parts = [
            self.encoder.images(images[lo : lo + self.batch_size]).cpu()
            for lo in range(0, len(images), self.batch_size)
        ]
        if not parts:
            return np.zeros((0, self.encoder.embed_dim), dtype=np.float32)
        return torch.cat(parts).numpy()
