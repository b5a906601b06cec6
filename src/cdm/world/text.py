"""Word-level tokenizer and the tiny CLIP-style text encoder of the shapes world."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from cdm.world.prompts import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB_FILE = "vocab.json"


class WordTokenizer:
    """Splits on whitespace; each word maps to one id. Fixed length: BOS words EOS PAD..."""

    def __init__(self, vocab: dict[str, int], max_length: int = 14):
        for special in (PAD, BOS, EOS, UNK):
            if special not in vocab:
                raise ValueError(f"tokenizer vocab lacks the special token {special}")
        self.vocab = dict(vocab)
        self.max_length = max_length

    @classmethod
    def for_world(cls, max_length: int = 14) -> WordTokenizer:
        words = [PAD, BOS, EOS, UNK, *vocabulary()]
        return cls({w: i for i, w in enumerate(words)}, max_length)

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length); words past max_length - 2 are cut."""
        unk = self.vocab[UNK]
        rows = []
        for prompt in prompts:
            ids = [self.vocab.get(w, unk) for w in prompt.lower().split()][: self.max_length - 2]
            ids = [self.vocab[BOS], *ids, self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        payload = {"max_length": self.max_length, "vocab": self.vocab}
        (path / VOCAB_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WordTokenizer:
        file = Path(path) / VOCAB_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer vocab at {file}; expected a saved WordTokenizer")
        payload = json.loads(file.read_text())
        return cls(payload["vocab"], payload["max_length"])


def tiny_text_encoder(tokenizer: WordTokenizer, width: int = 64) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text transformer: token embeddings (B, L, width) and a pooled vector."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.max_length,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.vocab[BOS],
        eos_token_id=tokenizer.eos_id,
    )
    return CLIPTextModelWithProjection(config)


def encode(
    encoder: CLIPTextModelWithProjection, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings (B, L, D), pooled (B, D)), the SD3-style conditioning pair."""
    out = encoder(input_ids=input_ids)
    return out.last_hidden_state, out.text_embeds
