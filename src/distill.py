"""Stage distill: CDM distillation of the teacher into a few-step student, one method per run.

Single process: `python src/distill.py --method cdm`. Several processes or GPUs:
`python -m cdm.launch --config_file configs/accelerate/<cfg>.yaml src/distill.py --method cdm`
(accelerate launch, ending in the worker's one-line error on failure: cdm.launch).
A rerun after a crash resumes from the newest checkpoint in checkpoints/<method>/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cdm import lora, loralayout, manifest, teacherlora, zero
from cdm import params as P
from cdm.backends import backend_module
from cdm.cache import open_condition
from cdm.checkpoints import claim_run, run_name
from cdm.cli import run_stage, stage_parser
from cdm.engine import RunPaths, train, weights_dtype
from cdm.io import atomic_dir, atomic_write_text
from cdm.lifeline import launched, tie_to_parent
from cdm.preview import preview_writer

log = logging.getLogger("distill")
ROOT = Path(__file__).resolve().parents[1]


def load_teacher(backend, path: str, resolution: int | None, device: torch.device):
    """The teacher's velocity read from disk in the dtype it trains in (bf16 on GPUs): every
    rank reads it, so fp32 would hold 4 P bytes of host memory per process, 8 per node."""
    return backend.load_velocity(path, resolution, weights_dtype(device))


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a preset under `methods` in params.yaml")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--cache", default="cache/prompts")
    parser.add_argument("--out", default="models/students", help="students go to <out>/<method>/")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--seed", type=int, help="distillation seed (default: params `seed`)")
    parser.add_argument("--stop-after", type=int, help="stop at this iteration (tests of resume)")
    args = parser.parse_args()
    if launched():  # a killed launcher must not leave this worker writing
        tie_to_parent()
    params = P.load(args.params)
    if args.method not in params.methods:
        raise ValueError(
            f"unknown method '{args.method}'; choose one of {', '.join(params.methods)}"
        )
    method, cfg = params.methods[args.method], params.distill
    train_cond, _ = open_condition(args.cache, "train")  # sharded: read batch by batch
    null, _ = open_condition(args.cache, "null")
    backend = backend_module(params.teacher.backend)
    device = (
        torch.device("cuda", zero.local_rank())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    velocity, shift, latent_shape = load_teacher(
        backend, args.teacher, params.teacher.resolution, device
    )
    ds_file = ROOT / "configs" / "deepspeed" / f"zero{cfg.zero_stage}.json"
    seed = params.seed if args.seed is None else args.seed
    resolved = P.student_inputs(params, args.method, seed)
    run_dir = Path(args.checkpoints) / run_name(args.method, resolved)  # resumed by a rerun
    claim_run(run_dir)  # one writer per run, by hand too: a second one stops here in one line
    logs = Path(args.logs) / args.method
    preview = preview_writer(
        backend.load_decoder(args.teacher), train_cond.take(slice(0, cfg.preview_images)), shift,
        latent_shape, cfg.inference_sigmas, seed, logs / "previews", device,
    )  # fmt: skip
    export_dtype = torch.float32
    if cfg.lora is not None:  # the merged student is built in the dtype it is saved in
        from cdm.backends.export import weights_dtype

        export_dtype = weights_dtype(Path(args.teacher) / "transformer")
    ema = train(
        velocity, train_cond, null, shift, latent_shape, method, cfg,
        RunPaths(run_dir, run_dir / "train.csv", logs / "train.csv"),
        seed, device, json.loads(ds_file.read_text()), args.stop_after, preview, export_dtype,
    )  # fmt: skip
    if args.stop_after is not None and args.stop_after < cfg.iterations:
        return
    if zero.rank() == 0:
        # The working log lives beside the checkpoints (it survives a crash); publish it.
        log_csv = Path(args.logs) / args.method / "train.csv"
        atomic_write_text(log_csv, (run_dir / "train.csv").read_text())
        inference = {
            "sigmas_raw": cfg.inference_sigmas, "shift": shift, "steps": len(cfg.inference_sigmas),
            "guidance": 1.0, "method": args.method,
        }  # fmt: skip
        with atomic_dir(Path(args.out) / args.method) as tmp:
            card = resolved | {"teacher": params.teacher.model_dump()}
            layout = None
            if cfg.lora is not None:  # the adapter as a diffusers LoRA, then merged for the rest
                # Against the base model: with a fused teacher LoRA, stacked with its factors.
                saved = lora.save_diffusers_lora(ema, tmp, teacherlora.fused(args.teacher))
                layout = loralayout.export(params.teacher.backend, saved)  # ComfyUI / kohya keys
                ema = lora.merged(ema)
            backend.export(ema, args.teacher, tmp, inference, card)
            if cfg.lora is not None and (tmp / "README.md").is_file():
                readme = tmp / "README.md"
                fine_tune = params.teacher.lora.path if params.teacher.lora else None
                section = lora.card_section(
                    params.teacher.path, fine_tune, layout.name if layout else None,
                    backend.FAMILY.pipeline,  # README.md: a diffusers-pipeline backend
                )  # fmt: skip
                readme.write_text(readme.read_text() + section)
            (tmp / "params.json").write_text(json.dumps(resolved, indent=1))
            manifest.write(tmp)  # last: what the sampler and publish check the export against
        log.info("student written to %s", Path(args.out) / args.method)
    zero.barrier()


if __name__ == "__main__":
    run_stage(main)
