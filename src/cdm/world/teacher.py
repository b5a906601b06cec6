"""The world's teacher: a tiny SD3 transformer plus its text encoder, saved diffusers-style.

Folder layout (as a diffusers pipeline folder):
    transformer/   SD3Transformer2DModel (config.json + safetensors)
    text_encoder/  CLIPTextModelWithProjection
    tokenizer/     vocab.json of the WordTokenizer
    scheduler/     FlowMatchEulerDiscreteScheduler config (carries the time shift)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection

from cdm.conditioning import Condition
from cdm.world.text import WordTokenizer, encode, tiny_text_encoder

PARTS = ("transformer", "text_encoder", "tokenizer", "scheduler")


def tiny_transformer(
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    text_width: int = 64,
) -> SD3Transformer2DModel:
    """SD3's MMDiT in a configuration small enough for a CPU, in pixel space (3 channels)."""
    return SD3Transformer2DModel(
        sample_size=image_size,
        patch_size=patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=text_width,
        pos_embed_max_size=image_size // patch_size,
        qk_norm="rms_norm",
    )


@dataclass
class WorldTeacher:
    transformer: SD3Transformer2DModel
    text_encoder: CLIPTextModelWithProjection
    tokenizer: WordTokenizer
    shift: float

    @classmethod
    def new(cls, shift: float, **arch: int) -> WorldTeacher:
        tokenizer = WordTokenizer.for_world()
        text_width = arch.get("text_width", 64)
        return cls(
            tiny_transformer(**arch), tiny_text_encoder(tokenizer, text_width), tokenizer, shift
        )

    def condition(self, prompts: list[str]) -> Condition:
        """Encode prompts ("" is the null prompt) with gradients if the encoder trains."""
        ids = self.tokenizer(prompts).to(self.text_encoder.device)
        return Condition(*encode(self.text_encoder, ids))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        FlowMatchEulerDiscreteScheduler(shift=self.shift).save_pretrained(path / "scheduler")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WorldTeacher:
        path = Path(path)
        missing = [p for p in PARTS if not (path / p).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a shapes-world teacher folder (missing {', '.join(missing)}); "
                "expected transformer/, text_encoder/, tokenizer/, scheduler/ from `make world-teacher`"
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        return cls(
            SD3Transformer2DModel.from_pretrained(path / "transformer").eval(),
            CLIPTextModelWithProjection.from_pretrained(path / "text_encoder").eval(),
            WordTokenizer.from_pretrained(path / "tokenizer"),
            float(scheduler.config.shift),
        )

    def requires_grad_(self, flag: bool) -> WorldTeacher:
        self.transformer.requires_grad_(flag)
        self.text_encoder.requires_grad_(flag)
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for m in (self.transformer, self.text_encoder) for p in m.parameters())
