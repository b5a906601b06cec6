"""World metrics of sample sets (the shapes backend): judge alignment per attribute, Fréchet
distance of judge features to fresh real renders and to the CFG-free teacher, precision and
recall, NFE and images per second. The world's counterpart of cdm.metrics.preference: it
needs the world's judge and renders, so it lives here and uses cdm.metrics' statistics."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cdm.metrics.frechet import frechet_distance
from cdm.metrics.manifold import precision_recall
from cdm.world.evaluate import EvalPairs, judge_scores
from cdm.world.judge import Judge
from cdm.world.prompts import ATTRIBUTES

log = logging.getLogger("score")
INDEX = "index.parquet"
REFERENCE = "teacher_nocfg"


def load_images(folder: Path, files: list[str]) -> torch.Tensor:
    """PNGs -> (N, 3, H, W) in [-1, 1], the inverse of the backend's decode."""
    arrays = [np.asarray(Image.open(folder / f).convert("RGB")) for f in files]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return images / 127.5 - 1


def real_features(judge: Judge, pairs: pd.DataFrame, batch_size: int) -> dict[int, torch.Tensor]:
    """Judge features of fresh real renders, one per pair (rendered once for every set)."""
    feats = {}
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs.iloc[lo : lo + batch_size]
        real = EvalPairs(chunk["prompt"].tolist(), chunk["seed"].tolist())
        _, f = judge.predict(real.real_images(), batch_size)
        feats.update(zip(chunk["pair"].tolist(), f, strict=True))
    return feats


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance, clipped at 0 (a set against itself can come out at -1e-9)."""
    return max(0.0, frechet_distance(a, b))


def _round(x: float) -> float:
    return x if math.isnan(x) else round(float(x), 4)


def world_metrics(
    sets: list[tuple[str, int, Path]], judge_path: str, batch_size: int, k: int
) -> tuple[pd.DataFrame, dict]:
    """(one row per image, {model: {steps: metrics}}) of every set, judged by the world's judge."""
    judge = Judge.from_pretrained(judge_path)
    indexes = {(m, s): pd.read_parquet(folder / INDEX) for m, s, folder in sets}

    # Real renders of every pair any set holds; a pair must mean the same prompt everywhere.
    all_pairs = pd.concat(indexes.values())[["pair", "prompt", "seed"]].drop_duplicates()
    clash = all_pairs["pair"].duplicated()
    if clash.any():
        pair = int(all_pairs["pair"][clash].iloc[0])
        raise ValueError(
            f"sample sets disagree on the prompt or seed of pair {pair}; rerun sample with one params.yaml"
        )
    real = real_features(judge, all_pairs.sort_values("pair"), batch_size)
    log.info("real features of %d pairs", len(real))

    features, rows, metrics = {}, [], {}
    for model, steps, folder in sets:
        index = indexes[(model, steps)].sort_values("pair").reset_index(drop=True)
        pairs = EvalPairs(index["prompt"].tolist(), index["seed"].tolist())
        images = load_images(folder, index["file"].tolist())
        scores = judge_scores(judge, images, pairs.attributes, batch_size)
        features[(model, steps)] = scores["features"]
        frame = index[["model", "steps", "pair", "prompt"]].copy()
        frame["correct"] = scores["all"].numpy()
        for a in ATTRIBUTES:
            frame[a] = scores[a].numpy()
        rows.append(frame)
    reference = [(m, s) for m, s, _ in sets if m == REFERENCE]
    ref = features[max(reference, key=lambda r: r[1])] if reference else None

    for (model, steps), frame in zip(features, rows, strict=True):
        fake = features[(model, steps)]
        target = torch.stack([real[p] for p in frame["pair"].tolist()])
        precision, recall = precision_recall(target, fake, k)
        seconds = indexes[(model, steps)]["seconds"].mean()
        values = {
            "alignment": float(frame["correct"].mean()),
            "fd": fd(fake, target),
            "precision": precision,
            "recall": recall,
            "fd_to_teacher_nocfg": math.nan if ref is None else fd(fake, ref),
            "images_per_s": 1.0 / seconds if seconds > 0 else math.nan,
            **{a: float(frame[a].mean()) for a in ATTRIBUTES},
        }
        entry = {key: _round(v) for key, v in values.items()}
        entry["nfe"] = int(indexes[(model, steps)]["nfe"].iloc[0])
        metrics.setdefault(model, {})[str(steps)] = entry
        log.info("%s @ %d: %s", model, steps, entry)
    return pd.concat(rows, ignore_index=True), metrics
