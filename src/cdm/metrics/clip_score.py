"""CLIP score (Hessel et al., 2021): 100 * max(cos(image, prompt), 0) with an open_clip model
(the paper's text names ViT-H-14; `clip_vitl14` is the variant its released code computes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cdm.metrics.base import Scored, Scorer
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
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        self.encoder = OpenClipEncoder(model, pretrained, self.device, cache_dir, self.dtype)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.score_and_features_batch(images, prompts)[:, 0]

    def score_and_features_batch(
        self, images: list[Image.Image], prompts: list[str]
    ) -> torch.Tensor:
        """(B, 1 + embed_dim): the score, then the image features it was computed from."""
        features = self.encoder.images(images)
        cos = (features * self.encoder.texts(prompts)).sum(-1)
        return torch.cat([100 * cos.clamp(min=0)[:, None], features], 1)

    def scored_with_features(
        self, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> tuple[Scored, np.ndarray]:
        """Scores and the image features (float32) of one pass of the image encoder: the FD
        metrics read the features the score used (NaN rows where an image failed)."""
        both = self.batched(self.score_and_features_batch, images, prompts)
        values = both.values.reshape(len(images), 1 + self.encoder.embed_dim)
        return Scored(values[:, 0], both.failures), values[:, 1:].astype(np.float32)

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
