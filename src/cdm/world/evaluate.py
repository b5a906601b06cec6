"""Held-out evaluation pairs of the world and judge-based scoring of generated images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cdm.metrics.frechet import frechet_distance
from cdm.samplefiles import NOISE_SEED_BASE
from cdm.sampling import inference_sigmas, sample_euler
from cdm.velocity import TransformerVelocity
from cdm.world.judge import Judge
from cdm.world.prompts import ATTRIBUTES, all_prompts, parse_prompt
from cdm.world.render import render

if TYPE_CHECKING:  # diffusers loads with the teacher, not with the pairs
    from cdm.world.teacher import WorldTeacher

# Seed ranges: training draws from its own generator; these keep evaluation disjoint.
REAL_SEED_BASE = 2_000_000


@dataclass(frozen=True)
class EvalPairs:
    """n prompt/seed pairs cycling through every world prompt."""

    prompts: list[str]
    seeds: list[int]

    @classmethod
    def of(cls, prompts: Sequence[str], pairs: Iterable[int]) -> EvalPairs:
        """Pair j uses prompt j % len(prompts) and noise seed NOISE_SEED_BASE + j."""
        if not prompts:
            raise ValueError("no evaluation prompts; the eval prompt cache is empty")
        pairs = list(pairs)
        return cls([prompts[j % len(prompts)] for j in pairs], [NOISE_SEED_BASE + j for j in pairs])

    @classmethod
    def world(cls, n: int, offset: int = 0) -> EvalPairs:
        return cls.of(all_prompts(), range(offset, offset + n))

    @property
    def pairs(self) -> list[int]:
        """Index j of each pair (its noise seed is NOISE_SEED_BASE + j)."""
        return [s - NOISE_SEED_BASE for s in self.seeds]

    @property
    def attributes(self) -> torch.Tensor:
        return torch.tensor([parse_prompt(p).as_tuple() for p in self.prompts])

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Per-pair initial noise: the same pair gets the same noise for every model."""
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in self.seeds]
        )

    def real_images(self) -> torch.Tensor:
        """Fresh renders of the same prompts with seeds disjoint from the noise seeds."""
        attrs = [parse_prompt(p) for p in self.prompts]
        return render(attrs, [s - NOISE_SEED_BASE + REAL_SEED_BASE for s in self.seeds])


def judge_scores(
    judge: Judge, images: torch.Tensor, attributes: torch.Tensor, batch_size: int = 512
) -> dict[str, torch.Tensor]:
    """Per-image correctness of each attribute and of all of them, plus judge features."""
    pred, feats = judge.predict(images, batch_size)
    right = pred == attributes
    out = {k: right[:, i] for i, k in enumerate(ATTRIBUTES)}
    out["all"] = right.all(1)
    out["features"] = feats
    return out


@torch.no_grad()
def sample_teacher(
    teacher: WorldTeacher, pairs: EvalPairs, steps: int, cfg_scale: float, batch_size: int = 256
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] of the teacher at `steps` Euler steps."""
    velocity = TransformerVelocity(teacher.transformer)
    size = teacher.transformer.config.sample_size
    noise = pairs.noise((3, size, size))
    sigmas = inference_sigmas(steps, teacher.shift)
    null = teacher.condition([""])
    out = []
    for lo in range(0, len(pairs.prompts), batch_size):
        cond = teacher.condition(pairs.prompts[lo : lo + batch_size])
        out.append(
            sample_euler(velocity, noise[lo : lo + batch_size], sigmas, cond, null, cfg_scale)
        )
    return torch.cat(out).clamp(-1, 1)


def teacher_report(
    teacher: WorldTeacher,
    judge: Judge,
    pairs: EvalPairs,
    steps: int,
    cfg_scale: float,
    batch_size: int = 256,
) -> dict[str, float]:
    """Judge alignment and Fréchet distance to real renders, with and without CFG."""
    attrs = pairs.attributes
    real = judge_scores(judge, pairs.real_images(), attrs)["features"]
    report: dict[str, float] = {}
    for name, scale in (("cfg", cfg_scale), ("nocfg", 1.0)):
        images = sample_teacher(teacher, pairs, steps, scale, batch_size)
        scores = judge_scores(judge, images, attrs)
        report[f"alignment_{name}"] = float(scores["all"].float().mean())
        for k in ATTRIBUTES:
            report[f"{k}_{name}"] = float(scores[k].float().mean())
        report[f"fd_{name}"] = frechet_distance(scores["features"], real)
    return report
