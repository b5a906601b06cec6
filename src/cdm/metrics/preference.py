"""Preference metrics of real sample sets (SD3-Medium, LongCat-Image runs).

Per sample set `samples/<model>/<steps>/`: every configured scorer (CLIP score, PickScore,
aesthetic score, HPSv3) on each image and its prompt, the means with
95% bootstrap intervals over prompts, and the Fréchet distance of the set's CLIP image features
(the clip scorer's own, so no extra model) to the teacher sets with and without CFG at their
largest step count. `paired_difference` compares two sets of the same pairs. Which weights,
preprocessing and formula stand behind each number is recorded by `cdm.metrics.conventions`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cdm.metrics.base import Scorer
from cdm.metrics.bootstrap import bootstrap_ci
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.conventions import conventions, fd_conventions
from cdm.metrics.frechet import frechet_distance
from cdm.metrics.scorers import ScorerConfigs, build_scorers, unavailable_reason

INDEX = "index.parquet"
CLIP = "clip"  # the scorer whose image features give the FD metrics
TEACHER_CFG, TEACHER_NOCFG = "teacher_cfg", "teacher_nocfg"
FD_KEYS = {TEACHER_CFG: "fd_to_teacher_cfg", TEACHER_NOCFG: "fd_to_teacher_nocfg"}
LEVEL = 0.95
CHUNK = 256  # images decoded at once: a 2,048-image set of 1024 px PNGs is 6 GB as arrays

SetKey = tuple[str, int]
Reference = SetKey | None | Literal["auto"]


class PreferenceResult(NamedTuple):
    per_image: pd.DataFrame  # model, steps, pair, prompt, one column per scored metric
    metrics: dict[str, dict[str, dict[str, Any]]]  # model -> str(steps) -> values
    skipped: dict[str, str]  # metric -> one-line reason its column is absent
    conventions: dict[str, dict[str, Any]]  # metric -> weights, preprocessing, formula


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over paired images and its bootstrap interval (prompts resampled)."""

    mean: float
    low: float
    high: float
    level: float
    n_prompts: int

    @property
    def holds(self) -> bool:
        """The difference holds only when its interval excludes zero."""
        return self.low > 0 or self.high < 0


# ---------------------------------------------------------------- sample sets


def read_index(folder: Path) -> pd.DataFrame:
    """A set's index rows in pair order."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sample index; run the sample stage for this set")
    index = pd.read_parquet(path)
    if index.empty:
        raise ValueError(f"{path}: the sample set holds no images; rerun the sample stage")
    return index.sort_values("pair", kind="stable").reset_index(drop=True)


def missing_image(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: image listed in {INDEX} is missing; resample this set")


def check_files(folder: Path, index: pd.DataFrame) -> None:
    for name in index["file"]:
        if not (folder / name).is_file():
            raise missing_image(folder / name)


def load_png(path: Path) -> Image.Image:
    """A decoded RGB image; a missing or corrupt file is one line naming it."""
    if not path.is_file():
        raise missing_image(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes fully: a truncated file fails here
    # PIL reports a broken PNG chunk as SyntaxError, truncated data as OSError
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable PNG ({reason}); resample this set") from None


def image_chunks(
    folder: Path, index: pd.DataFrame, size: int = CHUNK
) -> Iterator[tuple[list[Image.Image], list[str]]]:
    """(images, prompts) of the set in pair order, `size` at a time."""
    files, prompts = index["file"].tolist(), index["prompt"].tolist()
    for lo in range(0, len(files), size):
        images = [load_png(Path(folder) / f) for f in files[lo : lo + size]]
        yield images, prompts[lo : lo + size]


def score_folder(
    folder: Path, index: pd.DataFrame, scorers: Mapping[str, Scorer], chunk: int = CHUNK
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Per-image scores of every scorer, and the clip scorer's image features (or None)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    features: list[np.ndarray] = []
    clip = scorers.get(CLIP)
    for images, prompts in image_chunks(folder, index, chunk):
        for name, scorer in scorers.items():
            parts[name].append(scorer.score(images, prompts))
        if isinstance(clip, ClipScorer):
            features.append(clip.image_features(images))
    scores = {name: np.concatenate(p) for name, p in parts.items()}
    return scores, np.concatenate(features) if features else None


def check_sets(sets: Sequence[tuple[str, int, Path]]) -> None:
    if not sets:
        raise ValueError("no sample sets to score; run the sample stage first")
    keys = [(m, int(s)) for m, s, _ in sets]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"sample set {dupes[0][0]}@{dupes[0][1]} is listed twice")


def pick_reference(
    sets: Sequence[tuple[str, int, Path]], model: str, ref: Reference
) -> SetKey | None:
    """'auto': the teacher set `model` at its largest step count among `sets`."""
    keys = [(m, int(s)) for m, s, _ in sets]
    if ref == "auto":
        steps = [s for m, s in keys if m == model]
        return (model, max(steps)) if steps else None
    if ref is not None and (ref[0], int(ref[1])) not in keys:
        raise ValueError(f"reference set {ref[0]}@{ref[1]} is not among the sets scored")
    return None if ref is None else (ref[0], int(ref[1]))


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance, clipped at 0 (a set against itself can come out at -1e-9)."""
    return max(0.0, frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


def summarise(
    index: pd.DataFrame, scores: Mapping[str, np.ndarray], n_boot: int, seed: int
) -> dict[str, Any]:
    """Mean and bootstrap interval of each metric, NFE and throughput of one set."""
    prompts = index["prompt"].tolist()
    entry: dict[str, Any] = {}
    for name, values in scores.items():
        ci = bootstrap_ci(values, prompts, n_boot=n_boot, level=LEVEL, seed=seed)
        entry[name] = ci.mean
        entry[f"{name}_ci"] = [ci.low, ci.high]
    seconds = float(index["seconds"].mean())
    entry["nfe"] = int(index["nfe"].iloc[0])
    entry["images_per_s"] = 1.0 / seconds if seconds > 0 else math.nan
    entry["n_images"] = len(index)
    return entry


def score_sets(
    sets: Sequence[tuple[str, int, Path]],
    scorer_configs: ScorerConfigs,
    batch_size: int | None = None,
    n_boot: int = 1000,
    *,
    reference_cfg: Reference = "auto",
    reference_nocfg: Reference = "auto",
    seed: int = 0,
    scorers: Mapping[str, Scorer] | None = None,
    chunk: int = CHUNK,
) -> PreferenceResult:
    """Score every set (model, steps, folder) with every configured metric.

    The scorers are built once from `scorer_configs` (name -> constructor kwargs; `scorers`
    passes ready ones instead) and reused across sets. A reference is a (model, steps) among
    `sets`, None for no FD, or "auto": that teacher at its largest step count in `sets`."""
    check_sets(sets)
    for name in scorer_configs:
        unavailable_reason(name)  # an unknown metric name fails before anything is read
    refs = {
        TEACHER_CFG: pick_reference(sets, TEACHER_CFG, reference_cfg),
        TEACHER_NOCFG: pick_reference(sets, TEACHER_NOCFG, reference_nocfg),
    }
    # Every index and image present before any model loads: fail in seconds, not after a set.
    indexes = {(m, int(s)): read_index(Path(f)) for m, s, f in sets}
    for (_, _, folder), index in zip(sets, indexes.values(), strict=True):
        check_files(Path(folder), index)
    if scorers is None:
        scorers, skipped = build_scorers(scorer_configs, batch_size)
    else:
        skipped = {
            n: r for n in scorer_configs if (r := unavailable_reason(n)) and n not in scorers
        }
    frames, features, entries = [], {}, {}
    for model, steps, folder in sets:
        key = (model, int(steps))
        index = indexes[key]
        scores, features[key] = score_folder(Path(folder), index, scorers, chunk)
        frame = index[["pair", "prompt"]].copy()
        frame.insert(0, "steps", key[1])
        frame.insert(0, "model", model)
        for name, values in scores.items():
            frame[name] = values
        frames.append(frame)
        entries[key] = summarise(index, scores, n_boot, seed)
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in entries.items():
        for teacher, ref in refs.items():
            own, other = features[key], features.get(ref) if ref else None
            entry[FD_KEYS[teacher]] = math.nan if own is None or other is None else fd(own, other)
        metrics.setdefault(key[0], {})[str(key[1])] = entry
    notes = conventions(scorer_configs, scorers)
    notes.update(fd_conventions({FD_KEYS[t]: ref for t, ref in refs.items()}, CLIP in scorers))
    notes["ci"] = {
        "level": LEVEL,
        "method": "percentile bootstrap; prompts resampled with their images",
        "n_boot": n_boot,
        "seed": seed,
    }
    return PreferenceResult(pd.concat(frames, ignore_index=True), metrics, skipped, notes)


# ---------------------------------------------------------------- paired comparisons


def paired_difference(
    a_scores: Sequence[float] | np.ndarray,
    b_scores: Sequence[float] | np.ndarray,
    prompts: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> PairedDifference:
    """Mean of a - b (row i of both is the same pair) and its 95% interval over prompts."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    ci = bootstrap_ci(a - b, list(prompts), n_boot=n_boot, level=LEVEL, seed=seed)
    return PairedDifference(ci.mean, ci.low, ci.high, ci.level, ci.n_prompts)


def compare(
    per_image: pd.DataFrame,
    metric: str,
    a: SetKey,
    b: SetKey,
    n_boot: int = 1000,
    seed: int = 0,
) -> PairedDifference:
    """paired_difference of `metric` between sets a and b of score_sets' per-image table."""
    rows = [per_image[(per_image.model == m) & (per_image.steps == s)] for m, s in (a, b)]
    for (m, s), r in zip((a, b), rows, strict=True):
        if r.empty:
            raise ValueError(f"no per-image scores of {m}@{s}")
    x, y = (r.sort_values("pair") for r in rows)
    if x["pair"].tolist() != y["pair"].tolist():
        raise ValueError(f"{a[0]}@{a[1]} and {b[0]}@{b[1]} do not hold the same pairs")
    return paired_difference(x[metric], y[metric], x["prompt"].tolist(), n_boot, seed)
