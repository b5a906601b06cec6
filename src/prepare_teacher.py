"""Stage prepare_teacher: resolve and check the teacher, then measure it.

For the shapes world: load the committed teacher and judge (score reads the judge from
`judge.path` itself), check the judge on fresh renders, and write the teacher's judge alignment and Fréchet distance with and without
CFG to results/teacher.json.

For sd3 / longcat: resolve teacher.path (a local folder or a hub id), check it holds the
backend's pipeline family and that it loads and runs (one seeded forward and decode), link
it to models/teacher and write its parameter counts, geometry and that check to
results/teacher.json (the world metrics do not apply). With `teacher.lora` the LoRA is fused
into the transformer first (cdm.teacherlora): models/teacher holds the fused transformer and
links the rest, and the check runs on it.

The check's wall time goes to logs/timings/prepare_teacher.json, not to results/teacher.json
(a DVC metric that only moves when the teacher's numbers do: cdm.metrics.timings).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from cdm import params as P
from cdm.backends import backend_module, load_backend
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_dir, atomic_write_json
from cdm.metrics import timings as T
from cdm.world.evaluate import EvalPairs, teacher_report
from cdm.world.judge import Judge
from cdm.world.train import judge_accuracy

if TYPE_CHECKING:
    from cdm.world.teacher import WorldTeacher

log = logging.getLogger("prepare_teacher")
JUDGE_MIN_ACCURACY = 0.99


def check_judge(judge: Judge, renders: int, seed: int) -> dict[str, float]:
    accuracy = judge_accuracy(judge, renders, seed)
    worst = min(accuracy, key=accuracy.get)
    if accuracy[worst] < JUDGE_MIN_ACCURACY:
        raise ValueError(
            f"judge reads '{worst}' right on only {accuracy[worst]:.3f} of fresh renders "
            f"(need {JUDGE_MIN_ACCURACY}); retrain it with `make world-judge`"
        )
    return accuracy


def prepare_shapes(params: P.Params, models: str, out: str, timings: str) -> dict[str, float]:
    cfg, stage = params.teacher, params.prepare_teacher
    torch.manual_seed(params.seed)
    backend = load_backend(cfg.backend, cfg.path)
    judge = Judge.from_pretrained(params.judge.path)
    accuracy = check_judge(judge, stage.judge_renders, params.seed + 7)
    log.info("judge accuracy on %d fresh renders: %s", stage.judge_renders, accuracy)
    teacher: WorldTeacher = backend.teacher  # type: ignore[attr-defined]
    start = time.time()
    pairs = EvalPairs.world(stage.n_pairs)
    report = teacher_report(teacher, judge, pairs, cfg.steps, cfg.cfg_scale, stage.batch_size)
    report |= {
        "n_pairs": stage.n_pairs,
        "cfg_scale": cfg.cfg_scale,
        "steps": cfg.steps,
        "judge_accuracy": accuracy,
        "teacher_parameters": teacher.num_parameters,
    }
    seconds = {"eval_seconds": round(time.time() - start, 1)}
    log.info("teacher: %s; %s", report, seconds)
    with atomic_dir(f"{models}/teacher") as tmp:
        backend.save_teacher(tmp)
    atomic_write_json(out, report)
    atomic_write_json(timings, seconds)
    return report


def prepare_pipeline(params: P.Params, models: str, out: str, timings: str) -> dict:
    """A diffusers-pipeline teacher: resolve, check it loads and runs, link, report."""
    from cdm.backends import pipelines  # diffusers: for the pipeline backends only

    cfg = params.teacher
    backend = backend_module(cfg.backend)
    folder = backend.resolve(cfg.path)
    start = time.time()
    teacher = backend.load(folder, cfg.resolution)
    null = teacher.null_condition()
    del teacher  # the text encoders are not needed past this point
    with atomic_dir(f"{models}/teacher") as tmp:
        fused = None
        if cfg.lora is None:
            pipelines.link_tree(folder, tmp)
        else:  # your fine-tune: the LoRA fused into the transformer (cdm.teacherlora)
            from cdm import teacherlora

            fused = teacherlora.prepare(backend, folder, cfg.lora, tmp)
            log.info("teacher LoRA fused: %s", fused)
        # The check runs on what the later stages read: the fused teacher when there is one.
        velocity, shift, shape = backend.load_velocity(tmp, cfg.resolution)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sanity = pipelines.sanity_check(
            velocity, backend.load_decoder(tmp), null, shape, params.seed, device
        )
    report = {
        "backend": cfg.backend, "path": cfg.path, "resolved": str(folder.resolve()),
        "resolution": shape[-1] * pipelines.vae_factor(folder) * backend.FAMILY.latent_patch,
        "latent_shape": list(shape),
        "shift": shift, "parameters": pipelines.parameter_counts(folder), "sanity": sanity,
    }  # fmt: skip
    if fused is not None:
        report["lora"] = fused
    seconds = {"seconds": round(time.time() - start, 1)}
    log.info("teacher: %s; %s", report, seconds)
    atomic_write_json(out, report)
    atomic_write_json(timings, seconds)
    return report


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="output folder of the resolved models")
    parser.add_argument("--out", default="results/teacher.json")
    parser.add_argument("--timings", default=f"logs/{T.FOLDER}/prepare_teacher.json")
    args = parser.parse_args()
    params = P.load(args.params)
    if params.teacher.backend == "shapes":
        prepare_shapes(params, args.models, args.out, args.timings)
    else:
        prepare_pipeline(params, args.models, args.out, args.timings)


if __name__ == "__main__":
    run_stage(main)
