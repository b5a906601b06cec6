"""Preference metrics of real sample sets (SD3-Medium, LongCat-Image runs).

Per sample set `samples/<model>/<steps>/`: every configured scorer (CLIP score, PickScore,
aesthetic score, HPSv3) on each image and its prompt, the means with
95% bootstrap intervals over prompts, and the Fréchet distance of the set's CLIP image features
(the clip scorer's own, from the same pass of its image encoder as its score) to the teacher
sets with and without CFG at their largest step count. `paired_difference` compares two sets
of the same pairs. Which weights, preprocessing and formula stand behind each number is
recorded by `cdm.metrics.conventions`.

One scorer is on the device at a time: it is built, scores every set, and is freed before the
next is built, so the GPU holds the largest scorer alone (HPSv3's 7B in bf16), not the sum.
An image a scorer fails on scores NaN (cdm.metrics.base): means and intervals skip it, and the
set's `failed` counts it per metric.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from cdm.metrics.conventions import fd_conventions, paper_table, scorer_conventions
from cdm.metrics.frechet import frechet_distance
from cdm.metrics.scorers import ScorerConfigs, build_one, unavailable_reason

log = logging.getLogger("score")

INDEX = "index.parquet"
CLIP = "clip"  # the scorer whose image features give the FD metrics
TEACHER_CFG, TEACHER_NOCFG = "teacher_cfg", "teacher_nocfg"
FD_KEYS = {TEACHER_CFG: "fd_to_teacher_cfg", TEACHER_NOCFG: "fd_to_teacher_nocfg"}
LEVEL = 0.95
CHUNK = 256  # images decoded at once: a 2,048-image set of 1024 px PNGs is 6 GB as arrays
DECODERS = min(8, os.cpu_count() or 1)  # the score job's CPUs (the SLURM profile gives 8)

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
    """(images, prompts) of the set in pair order, `size` at a time. Decoded on DECODERS
    threads (zlib releases the GIL): every scorer reads every set, so decoding adds up."""
    files, prompts = index["file"].tolist(), index["prompt"].tolist()
    with ThreadPoolExecutor(DECODERS) as pool:
        for lo in range(0, len(files), size):
            paths = [Path(folder) / f for f in files[lo : lo + size]]
            yield list(pool.map(load_png, paths)), prompts[lo : lo + size]


def score_folder(
    folder: Path, index: pd.DataFrame, name: str, scorer: Scorer, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-image scores of one scorer over a set, and, for the clip scorer, the image features
    of the same encoder pass (else None). A failed image is NaN, logged with its file."""
    parts, features = [], []
    files = index["file"].tolist()
    lo = 0
    for images, prompts in image_chunks(folder, index, chunk):
        if name == CLIP and isinstance(scorer, ClipScorer):
            scored, feats = scorer.scored_with_features(images, prompts)
            features.append(feats)
        else:
            scored = scorer.scored(images, prompts)
        for i, reason in scored.failures.items():
            log.warning("%s: %s failed on %s (%s)", folder, name, files[lo + i], reason)
        parts.append(scored.values)
        lo += len(images)
    return np.concatenate(parts), np.concatenate(features) if features else None


def release_device_memory() -> None:
    """Return a freed scorer's device memory before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    """Fréchet distance over the images that did not fail, clipped at 0 (a set against itself
    can come out at -1e-9)."""
    a, b = (x[np.isfinite(x).all(1)] for x in (a, b))
    return max(0.0, frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


def summarise(
    index: pd.DataFrame, scores: Mapping[str, np.ndarray], n_boot: int, seed: int
) -> dict[str, Any]:
    """Mean and bootstrap interval of each metric, NFE and throughput of one set."""
    prompts = np.asarray(index["prompt"].tolist(), dtype=object)
    entry: dict[str, Any] = {}
    for name, values in scores.items():
        ok = np.isfinite(values)  # failed images are left out, as the authors leave out -10.0
        ci = bootstrap_ci(values[ok], list(prompts[ok]), n_boot=n_boot, level=LEVEL, seed=seed)
        entry[name] = ci.mean
        entry[f"{name}_ci"] = [ci.low, ci.high]
    seconds = float(index["seconds"].mean())
    entry["nfe"] = int(index["nfe"].iloc[0])
    entry["images_per_s"] = 1.0 / seconds if seconds > 0 else math.nan
    entry["n_images"] = len(index)
    entry["failed"] = {name: int((~np.isfinite(v)).sum()) for name, v in scores.items()}
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

    Each scorer is built from `scorer_configs` (name -> constructor kwargs), scores every set
    and is freed before the next is built; `scorers` passes ready ones instead (the caller's,
    not freed). A reference is a (model, steps) among
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
    ready = dict(scorers or {})
    names = list(ready) if scorers is not None else list(scorer_configs)
    skipped: dict[str, str] = {}  # every registered metric can be scored here (see scorers)
    per_set: dict[SetKey, dict[str, np.ndarray]] = {key: {} for key in indexes}
    features: dict[SetKey, np.ndarray | None] = dict.fromkeys(indexes)
    notes: dict[str, dict[str, Any]] = {}
    for name in names:
        owned = name not in ready
        scorer = build_one(name, scorer_configs[name], batch_size) if owned else ready[name]
        if name in scorer_configs:  # described by the live scorer, before it is freed
            notes[name] = scorer_conventions(name, scorer_configs[name], scorer)
        for model, steps, folder in sets:
            key = (model, int(steps))
            values, feats = score_folder(Path(folder), indexes[key], name, scorer, chunk)
            per_set[key][name] = values
            if feats is not None:
                features[key] = feats
        if owned:
            del scorer
            release_device_memory()
    frames, entries = [], {}
    for model, steps, _ in sets:
        key = (model, int(steps))
        index, scores = indexes[key], per_set[key]
        frame = index[["pair", "prompt"]].copy()
        frame.insert(0, "steps", key[1])
        frame.insert(0, "model", model)
        for name in names:
            frame[name] = scores[name]
        frames.append(frame)
        entries[key] = summarise(index, scores, n_boot, seed)
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in entries.items():
        for teacher, ref in refs.items():
            own, other = features[key], features.get(ref) if ref else None
            entry[FD_KEYS[teacher]] = math.nan if own is None or other is None else fd(own, other)
        metrics.setdefault(key[0], {})[str(key[1])] = entry
    notes = {  # in the configs' order; a metric not scored here is described from its config
        n: notes[n] if n in notes else scorer_conventions(n, c) for n, c in scorer_configs.items()
    }
    notes.update(fd_conventions({FD_KEYS[t]: ref for t, ref in refs.items()}, CLIP in names))
    notes["paper_table"] = paper_table(names)
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
    """Mean of a - b (row i of both is the same pair) and its 95% interval over prompts; a pair
    whose image failed in either set (NaN) is left out."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    if len(prompts) != len(a):
        raise ValueError(f"{len(a)} scores but {len(prompts)} prompts")
    ok = np.isfinite(a) & np.isfinite(b)
    kept = [p for p, k in zip(prompts, ok, strict=True) if k]
    ci = bootstrap_ci((a - b)[ok], kept, n_boot=n_boot, level=LEVEL, seed=seed)
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
