"""The registry of preference scorers: config name -> class, the paper's default configs, and
building scorers from `score.models` (name -> constructor kwargs)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from cdm.metrics.aesthetic import AestheticScorer
from cdm.metrics.base import Scorer
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.clip_vitl14 import ClipVitL14Scorer
from cdm.metrics.hpsv3 import HPSv3Scorer
from cdm.metrics.pickscore import PickScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (ClipScorer, ClipVitL14Scorer, PickScorer, AestheticScorer, HPSv3Scorer)
}
# The paper's metrics (CLIP score twice: ViT-H-14 as its text says, ViT-L/14 as its code does).
DEFAULT_SCORER_CONFIGS: dict[str, dict[str, Any]] = {
    "clip": {},
    "clip_vitl14": {},
    "pickscore": {},
    "aesthetic": {},
    "hpsv3": {},
}

ScorerConfigs = Mapping[str, Mapping[str, Any] | None]


def build_scorer(name: str, config: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer registered as `name`, built from its constructor's keyword arguments."""
    if name not in SCORERS:
        raise KeyError(f"unknown scorer '{name}'; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name].from_config(config or {})


def unavailable_reason(name: str) -> str | None:
    """Why a configured metric cannot be scored here (None: it can); unknown names raise."""
    if name in SCORERS:
        return None
    known = ", ".join(sorted(SCORERS))
    raise ValueError(f"unknown metric '{name}' in the scorer configs; known: {known}")


def resolved_config(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scorer's constructor defaults overlaid with `config` (what it will actually use)."""
    params = inspect.signature(SCORERS[name].__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **(config or {})}


def build_one(name: str, config: Mapping[str, Any] | None, batch_size: int | None) -> Scorer:
    """The scorer of one `score.models` entry; `batch_size` applies where it names none."""
    kwargs = dict(config or {})
    if batch_size is not None:
        kwargs.setdefault("batch_size", batch_size)
    return build_scorer(name, kwargs)


def build_scorers(
    configs: ScorerConfigs, batch_size: int | None = None
) -> tuple[dict[str, Scorer], dict[str, str]]:
    """(scorers that can run, {metric: reason} of those that cannot); `batch_size` applies
    where a config names none."""
    scorers, skipped = {}, {}
    for name, config in configs.items():
        reason = unavailable_reason(name)
        if reason is not None:
            skipped[name] = reason
            continue
        scorers[name] = build_one(name, config, batch_size)
    return scorers, skipped
