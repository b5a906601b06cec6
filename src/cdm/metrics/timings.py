"""Timings apart from the metrics: results/metrics.json and results/teacher.json hold only
what code, params and seed fix (DVC metrics, committed), so a rerun leaves them unchanged;
the seconds and images per second of a run vary with the machine's load and go to
logs/timings/<stage>.json, which the report copies into results/provenance.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEYS = ("images_per_s",)  # per sample set, in score's metrics
FOLDER = "timings"  # under logs/: one file per stage that times itself


def split(metrics: dict) -> tuple[dict, dict]:
    """(metrics without timings, {model: {steps: {key: value}}} of the timings)."""
    kept: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    for model, by_steps in metrics.items():
        for steps, entry in by_steps.items():
            kept.setdefault(model, {})[steps] = {k: v for k, v in entry.items() if k not in KEYS}
            timed = {k: entry[k] for k in KEYS if k in entry}
            if timed:
                timings.setdefault(model, {})[steps] = timed
    return kept, timings


def merge(metrics: dict, timings: dict) -> dict:
    """The metrics with each set's timings beside its numbers again (the report's tables)."""
    return {
        model: {
            steps: entry | (timings.get(model) or {}).get(steps, {})
            for steps, entry in by_steps.items()
        }
        for model, by_steps in metrics.items()
    }


def read(logs: str | Path) -> dict[str, Any]:
    """{stage: timings} of every logs/timings/<stage>.json there is."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(logs, FOLDER).glob("*.json"))}
