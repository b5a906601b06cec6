"""Stage score: metrics of every sample set under samples/<model>/<steps>/.

The shapes world: judge-based world metrics (cdm.world.metrics). sd3 / longcat: the paper's
preference metrics (CLIP score, PickScore, aesthetic, HPSv3 when available) with 95%
bootstrap intervals over prompts, and the Fréchet distance of CLIP image features to the
teacher's sets (cdm.metrics.preference), each number beside the conventions that made it.
Scorer weights load offline (HF_HUB_OFFLINE=1): `python -m cdm.fetch weights` first.
Writes results/scores.parquet (one row per image), results/metrics.json and the images per
second of every set to logs/timings/score.json (timings are no metrics: cdm.metrics.timings).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_file, atomic_write_json
from cdm.metrics import timings as T
from cdm.report.grid import sample_sets
from cdm.report.tables import model_key

log = logging.getLogger("score")
INDEX = "index.parquet"


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", default="samples")
    parser.add_argument("--out", default="results")
    parser.add_argument(
        "--teachers", help="also score the teacher sets of this samples folder (the ablation's)"
    )
    parser.add_argument("--timings", default=f"logs/{T.FOLDER}/score.json")
    args = parser.parse_args()
    params = P.load(args.params)
    cfg = params.score
    # Only the params' sets: an old set of a method the params no longer name is not read.
    wanted = P.sample_sets(params)
    if args.teachers:  # the ablation: its presets and steps here, the teacher sets there
        teachers = [s for s in wanted if s[0] in P.TEACHER_SETS]
        ablation = params.ablation
        students = P.sample_sets(params, ablation.methods, ablation.steps)[len(teachers) :]
        sets = sorted(
            sample_sets(Path(args.teachers), teachers) + sample_sets(Path(args.samples), students),
            key=lambda s: (model_key(s[0]), s[1]),
        )
    else:
        sets = sample_sets(Path(args.samples), wanted)
    if not sets:
        raise FileNotFoundError(
            f"no sample sets under {args.samples}/<model>/<steps>/{INDEX}; run the sample stage first"
        )
    if params.teacher.backend == "shapes":
        from cdm.world.metrics import world_metrics

        scores, metrics = world_metrics(sets, params.judge.path, cfg.batch_size, cfg.k)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # compute nodes: fetched weights only
        from cdm.metrics.preference import score_sets

        result = score_sets(sets, cfg.models, cfg.batch_size, cfg.n_boot, seed=params.seed)
        scores, metrics = result.per_image, result.metrics
        for reason in result.skipped.values():
            log.warning("%s", reason)
        for by_steps in metrics.values():  # the conventions beside every number
            for entry in by_steps.values():
                entry["conventions"] = result.conventions
                entry["skipped"] = result.skipped
    metrics, timings = T.split(metrics)
    out = Path(args.out)
    with atomic_file(out / "scores.parquet") as tmp:
        scores.to_parquet(tmp, index=False)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(Path(args.timings), timings)


if __name__ == "__main__":
    run_stage(main)
