"""Text conditioning in SD3 form: per-token embeddings plus one pooled vector per prompt."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Condition(NamedTuple):
    """Prompt embeddings (B, L, D) and pooled embeddings (B, P)."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def take(self, index: torch.Tensor | slice) -> Condition:
        return Condition(self.embeds[index], self.pooled[index])

    def to(self, *args, **kwargs) -> Condition:
        return Condition(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, n: int) -> Condition:
        """Repeat a single condition (1, ...) n times."""
        return Condition(self.embeds.expand(n, -1, -1), self.pooled.expand(n, -1))

    @staticmethod
    def cat(parts: list[Condition]) -> Condition:
        return Condition(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]))
