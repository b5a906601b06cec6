"""PickScore (Kirstain et al., 2023): a CLIP fine-tuned on human preferences;
score = logit_scale.exp() * cos(image, prompt), the logit its training used."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from cdm.metrics.base import Scorer, load_pretrained


class PickScorer(Scorer):
    """PickScore of transformers CLIP weights (`model`) with the CLIP-H processor (`processor`)."""

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        cache_dir: str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        loaded = load_pretrained(CLIPModel, model, "PickScore", cache_dir)
        self.model = loaded.to(self.device, self.dtype).eval()
        self.processor = load_pretrained(CLIPProcessor, processor, "PickScore processor", cache_dir)
        # Prompts longer than the text tower's positions are cut, as PickScore's own code does.
        self.max_length = self.model.config.text_config.max_position_embeddings

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        text = self.processor(
            text=prompts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
        )
        # image_embeds and text_embeds come out L2-normalised; the pairs are row-aligned.
        cos = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
        return self.model.logit_scale.float().exp() * cos
