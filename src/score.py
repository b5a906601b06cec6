"""Stage score: judge-based world metrics of every sample set under samples/<model>/<steps>/.

Per set: judge alignment (all attributes right) and per attribute, Fréchet distance of judge
features to fresh real renders of the same prompts (seeds disjoint from the noise seeds),
precision/recall against the same real features, Fréchet distance to the teacher sampled
without CFG at its largest step count, NFE and images per second. Writes
results/scores.parquet (one row per image) and results/metrics.json.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_file, atomic_write_json
from cdm.metrics.frechet import frechet_distance
from cdm.metrics.manifold import precision_recall
from cdm.report.tables import model_key
from cdm.world.evaluate import EvalPairs, judge_scores
from cdm.world.judge import Judge
from cdm.world.prompts import ATTRIBUTES

log = logging.getLogger("score")
INDEX = "index.parquet"
REFERENCE = "teacher_nocfg"


def find_sets(samples: Path) -> list[tuple[str, int, Path]]:
    """(model, steps, folder) of every complete sample set, teachers first."""
    sets = []
    for index in samples.glob(f"*/*/{INDEX}"):
        folder = index.parent
        model = folder.parent.name
        if model.startswith(".") or not folder.name.isdigit():
            continue  # a set being written (atomic_dir's temporary folder)
        sets.append((model, int(folder.name), folder))
    return sorted(sets, key=lambda s: (model_key(s[0]), s[1]))


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


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", default="samples")
    parser.add_argument("--out", default="results")
    parser.add_argument(
        "--teachers", help="also score the teacher sets of this samples folder (the ablation's)"
    )
    args = parser.parse_args()
    params = P.load(args.params)
    cfg = params.score
    if params.teacher.backend != "shapes":
        raise ValueError(
            f"world metrics need the shapes backend; teacher.backend is '{params.teacher.backend}'"
        )
    sets = find_sets(Path(args.samples))
    if args.teachers:
        teachers = [s for s in find_sets(Path(args.teachers)) if s[0].startswith("teacher")]
        sets = sorted(teachers + sets, key=lambda s: (model_key(s[0]), s[1]))
    if not sets:
        raise FileNotFoundError(
            f"no sample sets under {args.samples}/<model>/<steps>/{INDEX}; run the sample stage first"
        )
    judge = Judge.from_pretrained(params.judge.path)
    indexes = {(m, s): pd.read_parquet(folder / INDEX) for m, s, folder in sets}

    # Real renders of every pair any set holds; a pair must mean the same prompt everywhere.
    all_pairs = pd.concat(indexes.values())[["pair", "prompt", "seed"]].drop_duplicates()
    clash = all_pairs["pair"].duplicated()
    if clash.any():
        pair = int(all_pairs["pair"][clash].iloc[0])
        raise ValueError(
            f"sample sets disagree on the prompt or seed of pair {pair}; rerun sample with one params.yaml"
        )
    real = real_features(judge, all_pairs.sort_values("pair"), cfg.batch_size)
    log.info("real features of %d pairs", len(real))

    features, rows, metrics = {}, [], {}
    for model, steps, folder in sets:
        index = indexes[(model, steps)].sort_values("pair").reset_index(drop=True)
        pairs = EvalPairs(index["prompt"].tolist(), index["seed"].tolist())
        images = load_images(folder, index["file"].tolist())
        scores = judge_scores(judge, images, pairs.attributes, cfg.batch_size)
        features[(model, steps)] = scores["features"]
        frame = index[["model", "steps", "pair", "prompt"]].copy()
        frame["correct"] = scores["all"].numpy()
        for k in ATTRIBUTES:
            frame[k] = scores[k].numpy()
        rows.append(frame)
    reference = [(m, s) for m, s, _ in sets if m == REFERENCE]
    ref = features[max(reference, key=lambda r: r[1])] if reference else None

    for (model, steps), frame in zip(features, rows, strict=True):
        fake = features[(model, steps)]
        target = torch.stack([real[p] for p in frame["pair"].tolist()])
        precision, recall = precision_recall(target, fake, cfg.k)
        seconds = indexes[(model, steps)]["seconds"].mean()
        values = {
            "alignment": float(frame["correct"].mean()),
            "fd": fd(fake, target),
            "precision": precision,
            "recall": recall,
            "fd_to_teacher_nocfg": math.nan if ref is None else fd(fake, ref),
            "images_per_s": 1.0 / seconds if seconds > 0 else math.nan,
            **{k: float(frame[k].mean()) for k in ATTRIBUTES},
        }
        entry = {k: _round(v) for k, v in values.items()}
        entry["nfe"] = int(indexes[(model, steps)]["nfe"].iloc[0])
        metrics.setdefault(model, {})[str(steps)] = entry
        log.info("%s @ %d: %s", model, steps, entry)

    out = Path(args.out)
    with atomic_file(out / "scores.parquet") as tmp:
        pd.concat(rows, ignore_index=True).to_parquet(tmp, index=False)
    atomic_write_json(out / "metrics.json", metrics)


if __name__ == "__main__":
    run_stage(main)
