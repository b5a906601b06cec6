"""CLIPScore as the paper's released evaluation code computes it: transformers CLIP
`openai/clip-vit-large-patch14`, 100 * cos(image, prompt) (no clamp at 0).

Its preprocessing, not the CLIP processor's: the image as floats in [0, 1], a bilinear resize of
the shorter side to the vision tower's size (224), a centre crop to it, the CLIP mean and std;
the prompt padded and truncated to the text tower's 77 positions. The paper's text names
ViT-H-14 instead, which `clip` (cdm.metrics.clip_score) scores; both are recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import CLIPModel, CLIPTokenizer

from cdm.metrics.base import Scorer, load_pretrained

MODEL = "openai/clip-vit-large-patch14"


class ClipVitL14Scorer(Scorer):
    """100 * cos of the L2-normalised image and prompt embeddings of a transformers CLIP."""

    name = "clip_vitl14"

    def __init__(
        self,
        model: str = MODEL,
        *,
        antialias: bool = True,  # torchvision's default for tensors
        cache_dir: str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        loaded = load_pretrained(CLIPModel, model, "CLIP ViT-L/14", cache_dir)
        self.model = loaded.to(self.device, self.dtype).eval()
        self.tokenizer = load_pretrained(CLIPTokenizer, model, "CLIP ViT-L/14 tokenizer", cache_dir)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.antialias = antialias

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, size, size): floats, bilinear shorter-side resize, centre crop, normalise."""
        x = TF.to_tensor(image.convert("RGB"))
        x = TF.resize(x, self.size, InterpolationMode.BILINEAR, antialias=self.antialias)
        x = TF.center_crop(x, [self.size, self.size])
        return TF.normalize(x, list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD))

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.pixels(im) for im in images]).to(self.device, self.dtype)
        text = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels,
        )
        cos = (
            F.normalize(out.image_embeds.float(), dim=-1)
            * F.normalize(out.text_embeds.float(), dim=-1)
        ).sum(-1)
        return 100 * cos
