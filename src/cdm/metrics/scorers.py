"""The registry of preference scorers: config name -> class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdm.metrics.aesthetic import AestheticScorer
from cdm.metrics.base import Scorer
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.hpsv3 import HPSv3Scorer
from cdm.metrics.pickscore import PickScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (ClipScorer, PickScorer, AestheticScorer, HPSv3Scorer)
}


def build_scorer(name: str, config: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer registered as `name`, built from its constructor's keyword arguments."""
    if name not in SCORERS:
        raise KeyError(f"unknown scorer '{name}'; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name].from_config(config or {})
