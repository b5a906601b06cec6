"""Train the shapes world's pretrained models once: `judge` or `teacher`.

Like SD3-Medium for the real backend, these are inputs of the pipeline, not stages
of it: `make world-judge` / `make world-teacher` run this, and the weights are
committed together with the params and loss record that produced them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_dir
from cdm.places import TRAINED_MARKER, check_owned_out
from cdm.world.evaluate import EvalPairs, teacher_report
from cdm.world.judge import Judge
from cdm.world.train import train_judge, train_teacher

if TYPE_CHECKING:  # diffusers: only the teacher needs it
    from cdm.world.teacher import WorldTeacher

log = logging.getLogger("train_world")


def teacher(params: P.Params, out: Path, marker: str | None) -> None:
    cfg = params.world_teacher
    judge = Judge.from_pretrained(params.judge.path)
    pairs = EvalPairs.world(cfg.eval_pairs)
    evals = []

    def evaluate(model: WorldTeacher, step: int) -> dict[str, float]:
        report = teacher_report(model, judge, pairs, params.teacher.steps, params.teacher.cfg_scale)
        evals.append({"step": step} | {k: round(v, 4) for k, v in report.items()})
        return evals[-1]

    arch = {k: getattr(cfg, k) for k in ("num_layers", "heads", "head_dim", "text_width")}
    with atomic_dir(out) as tmp:
        train_teacher(
            tmp, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
            ema_decay=cfg.ema_decay, p_uncond=cfg.p_uncond, caption_noise=cfg.caption_noise, shift=cfg.shift, seed=cfg.seed,
            arch=arch, evaluate=evaluate, eval_every=cfg.eval_every,
        )  # fmt: skip
        (tmp / "params.json").write_text(json.dumps(cfg.model_dump(), indent=1))
        (tmp / "evals.json").write_text(json.dumps(evals, indent=1))
        mark(tmp, marker)


def judge(params: P.Params, out: Path, marker: str | None) -> None:
    cfg = params.world_judge
    with atomic_dir(out) as tmp:
        accuracy = train_judge(tmp, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
        mark(tmp, marker)
    log.info("judge accuracy on fresh renders: %s", accuracy)


def mark(folder: Path, marker: str | None) -> None:
    """Mark a folder made for --out as this script's, so that a rerun may replace it."""
    if marker is not None:
        (folder / marker).write_text("written by src/train_world.py; rerun replaces\n")


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("what", choices=["judge", "teacher"])
    parser.add_argument("--out", help="output folder (default: the section's `out` param)")
    parser.add_argument("--steps", type=int, help="override the step count (quick checks, tests)")
    args = parser.parse_args()
    params = P.load(args.params)
    section = "world_teacher" if args.what == "teacher" else "world_judge"
    if args.steps is not None:
        params = P.parse(
            params.model_dump()
            | {section: getattr(params, section).model_dump() | {"steps": args.steps}}
        )
    if args.out:  # replaced whole (atomic_dir): never a folder this script did not make
        check_owned_out(Path(args.out), "train_world", TRAINED_MARKER)
    out = Path(args.out or getattr(params, section).out)
    marker = TRAINED_MARKER if args.out else None
    (teacher if args.what == "teacher" else judge)(params, out, marker)


if __name__ == "__main__":
    run_stage(main)
