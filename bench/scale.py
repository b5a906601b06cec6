"""Benchmark: seconds per distillation iteration of the real `cdm.engine.train`, split by phase,
on a teacher built from a published config (random weights, cut to run anywhere), with peak
memory beside `cdm.plan.estimate` and the sample-evaluations per student step against the
authors' 50 forward-equivalents. Writes JSON.

    python bench/scale.py --model sd3 --layers 2 --width 64 --heads 2 --resolution 64 \\
        --iterations 4 --batch 2 --out bench/results/scale-sd3-tiny.json
    python bench/scale.py ... --lora 4     # LoRA mode (rank 4, alpha 8) at the same size

What it runs: the teacher transformer (SD3Transformer2DModel / LongCatImageTransformer2DModel
from the config stored in `cdm.plan.PUBLISHED`, `--layers/--width/--heads` overriding depth,
hidden size and heads; the text widths stay the published ones), wrapped in the backend's
velocity class (`cdm.velocity.TransformerVelocity` / `LongCatVelocity`), random prompt
embeddings of the real shapes (SD3: 333 tokens x 4096 + pooled 2048; LongCat: 512 x 3584),
and `cdm.engine.train` with params.yaml's `methods.<method>` and `distill` section (CLI
overrides), configs/deepspeed/zero<N>.json: two DeepSpeed engines, the rollout, the fake-score
step and blend, CA/DM/CDM, the EMA, csv logging and checkpoints (gloo + fp32 on CPU, bf16 on GPU).

How it measures, without touching src/: the module-level functions the engine calls are
replaced on the imported module objects by timing wrappers (`cdm.engine.rollout`,
`fake_score_step_loss`, `student_losses`, `_ema_update`, `_grad_norm`, `cdm.checkpoints.save`,
`cdm.runlog.RunLog.write`, `cdm.zero.blend_engines_`, `cdm.zero.make_engine` which also wraps each
engine's `backward` and `step`), and the velocity network's forward records which network
(teacher / student / fake) ran with how many samples. Time is charged to the innermost phase
running (teacher calls and fake-score evaluations inside the student losses are their own
phases); `other` is the loop's remainder (schedule draws, all_finite, the progress bar). On CUDA
every wrapper synchronises before reading the clock.

Evaluations per student step, in forward-equivalents per sample (a forward with gradient and
its backward count 3): the student's no-grad rollout calls, its forward with gradient (CA/DM at
the anchor, CDM off it), the fake score's flow-matching step (fwd+bwd) and its no-grad DM/CDM
evaluations, the teacher's CA (cond + uncond), DM and CDM evaluations. The authors' recipe
spends 50; with the rollout stopping at each sample's anchor the expectation is 33.5 (0.67).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from cdm import checkpoints, engine, lora, plan, zero
from cdm import params as P
from cdm.backends import few_step
from cdm.conditioning import Condition
from cdm.velocity import Flux2Velocity, LongCatVelocity, TransformerVelocity

ROOT = Path(__file__).resolve().parents[1]
HUB = {
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "longcat": "meituan-longcat/LongCat-Image",
    "flux2-klein": "black-forest-labs/FLUX.2-klein-base-4B",
}
AUTHORS_EVALS = 50.0  # forward-equivalents per student step in the authors' recipe (fwd+bwd = 3)
LIMIT_EVALS = 33.5  # rollout to each anchor + one student forward for CA and DM (ratio 0.67)
# LongCat's scheduler (Flux-style dynamic shift; FLUX.2 [klein]'s has the same keys, which
# its pipeline overrides with its own mu); not stored in plan.PUBLISHED.
LONGCAT_SCHEDULER = {
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}  # fmt: skip
SD3_SHIFT = 3.0  # SD3-Medium's scheduler shift


# --- the cut teacher ------------------------------------------------------------------------


def _rope_axes(head_dim: int, published: list[int]) -> list[int]:
    """Rotary axes scaled to `head_dim` (each even, summing to it), in the published ratio."""
    total = sum(published)
    axes = [max(2, 2 * round(a * head_dim / total / 2)) for a in published[:-1]]
    last = head_dim - sum(axes)
    if last < 2 or last % 2:
        raise ValueError(f"head dim {head_dim} cannot hold rotary axes like {published}")
    return [*axes, last]


def teacher_config(
    model: str, layers: int | None, width: int | None, heads: int | None, single: int | None
) -> dict[str, Any]:
    """The published transformer config with depth / hidden size / heads overridden."""
    config = copy.deepcopy(plan.PUBLISHED[HUB[model]]["transformer"])
    heads = heads or int(config["num_attention_heads"])
    width = width or heads * int(config["attention_head_dim"])
    if width % heads:
        raise ValueError(f"--width {width} must be a multiple of --heads {heads}")
    config["num_attention_heads"], config["attention_head_dim"] = heads, width // heads
    if model == "sd3":
        config["caption_projection_dim"] = width  # SD3 projects the text to the hidden size
        if layers:
            config["num_layers"] = layers
    else:
        if layers:
            config["num_layers"] = layers
            config["num_single_layers"] = 2 * layers if single is None else single
        elif single is not None:
            config["num_single_layers"] = single
        config["axes_dims_rope"] = _rope_axes(width // heads, config["axes_dims_rope"])
    return config


def build_teacher(
    model: str, config: dict[str, Any], resolution: int, seed: int
) -> tuple[torch.nn.Module, float, tuple[int, int, int], Condition, Condition, int]:
    """(velocity, shift, latent shape, one random prompt-cache entry per batch row + spare,
    null, image tokens) for the cut teacher with random weights."""
    from diffusers import (
        Flux2Transformer2DModel,
        LongCatImageTransformer2DModel,
        SD3Transformer2DModel,
    )

    factor = plan.PUBLISHED[HUB[model]]["vae_factor"]
    size = resolution // factor
    torch.manual_seed(seed)
    if model == "sd3":
        if (
            size % config["patch_size"]
            or size // config["patch_size"] > config["pos_embed_max_size"]
        ):
            raise ValueError(f"--resolution {resolution} does not fit SD3's patch / position grid")
        transformer = SD3Transformer2DModel.from_config(config)
        velocity: torch.nn.Module = TransformerVelocity(transformer)
        shape = (int(config["in_channels"]), size, size)
        tokens, text, pooled = (size // config["patch_size"]) ** 2, plan.SD3_TEXT_TOKENS, None
        shift = SD3_SHIFT
    elif size % 2:
        raise ValueError(f"--resolution {resolution} must be a multiple of {2 * factor}")
    elif model == "longcat":
        transformer = LongCatImageTransformer2DModel.from_config(config)
        velocity = LongCatVelocity(transformer, plan.LONGCAT_TEXT_TOKENS)
        shape = (int(config["in_channels"]) // 4, size, size)
        tokens, text, pooled = (size // 2) ** 2, plan.LONGCAT_TEXT_TOKENS, 1
        shift = few_step.effective_shift(LONGCAT_SCHEDULER, tokens)
    else:  # FLUX.2 [klein]: 2x2-patchified latents, the teacher's 50-step empirical shift
        from cdm.backends.flux2 import TEACHER_STEPS

        velocity = Flux2Velocity(Flux2Transformer2DModel.from_config(config))
        shape = (int(config["in_channels"]), size // 2, size // 2)
        tokens, text, pooled = (size // 2) ** 2, plan.FLUX2_TEXT_TOKENS, 1
        shift = few_step.empirical_shift(LONGCAT_SCHEDULER, tokens, TEACHER_STEPS)
    width = int(config["joint_attention_dim"])
    pooled = pooled or int(config["pooled_projection_dim"])
    return velocity, shift, shape, *_conditions(text, width, pooled, seed), tokens


def _conditions(text: int, width: int, pooled: int, seed: int) -> tuple[Condition, Condition]:
    gen = torch.Generator().manual_seed(seed)
    n = 8  # cached training prompts (the engine draws the batch from them)
    cond = Condition(
        torch.randn(n, text, width, generator=gen), torch.randn(n, pooled, generator=gen)
    )
    null = Condition(torch.zeros(1, text, width), torch.zeros(1, pooled))
    return cond, null


def plan_model(
    model: str, config: dict[str, Any], resolution: int, lora_cfg: P.Lora | None = None
) -> plan.Model:
    """cdm.plan.Model of the cut config, built as `cdm.plan.describe` builds it from a path."""
    backend = model
    adapter = plan.adapter_parameters(backend, config, lora_cfg) if lora_cfg is not None else 0
    params, block, blocks = plan.count_parameters(backend, config)
    factor = plan.PUBLISHED[HUB[model]]["vae_factor"]
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    size = resolution // factor
    if backend == "sd3":
        tokens, text, channels = (size // config["patch_size"]) ** 2, plan.SD3_TEXT_TOKENS, 16
    else:
        tokens, text = (size // 2) ** 2, plan.TEXT_TOKENS[backend]
        channels = int(config["in_channels"]) // 4
    return plan.Model(
        config["_class_name"], params, block, blocks, hidden, tokens, text,
        int(config["joint_attention_dim"]), channels * size * size, adapter,
    )  # fmt: skip


# --- timing and counting ---------------------------------------------------------------------


class Clock:
    """Exclusive phase timer: time goes to the innermost phase open; evaluation counts by
    network and gradient mode."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.evals: dict[str, int] = defaultdict(int)  # "<net>_<grad|nograd>" -> samples
        self.stack: list[str] = []
        self.mark = 0.0
        self.loop_start: float | None = None
        self.wrapped: list[str] = []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        t = self.now()
        if self.stack:
            self.seconds[self.stack[-1]] += t - self.mark
        self.stack.append(name)
        self.calls[name] += 1
        self.mark = t
        try:
            yield
        finally:
            t = self.now()
            self.seconds[self.stack.pop()] += t - self.mark
            self.mark = t

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn
        return timed


class Patches:
    """setattr on module / class objects, undone on exit."""

    def __init__(self):
        self.undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old in reversed(self.undo):
            setattr(obj, name, old)
        self.undo.clear()


def instrument(clock: Clock, velocity: torch.nn.Module) -> Patches:
    """Timing wrappers on everything `engine.train` calls by module-level name, and a
    per-network forward hook on the velocity class (the engine deep-copies the teacher into
    the student, fake score and EMA: the copies carry the `_bench_role` set here)."""
    p = Patches()
    # (object, attribute, phase): whichever of these this version of the engine has (the EMA
    # was engine._ema_update, then zero.PartitionedEMA.update; the checkpoint and the log row
    # were engine.save_checkpoint and engine._CsvLog.writerow); `wrapped` lists those found.
    targets = [
        (engine, "rollout", "rollout"),
        (engine, "fake_score_step_loss", "fake_forward"),
        (engine, "student_losses", "student_forward"),
        (engine, "_ema_update", "ema"),
        (getattr(zero, "PartitionedEMA", None), "update", "ema"),
        (getattr(zero, "PartitionedEMA", None), "module", "ema_export"),
        (engine, "save_checkpoint", "checkpoint"),
        (checkpoints, "save", "checkpoint"),
        (engine, "_grad_norm", "logging"),
        (getattr(engine, "_CsvLog", None), "writerow", "logging"),
        (getattr(engine, "RunLog", None), "write", "logging"),
        (zero, "blend_engines_", "blend"),
    ]
    for obj, name, phase in targets:
        if obj is not None and callable(getattr(obj, name, None)):
            p.set(obj, name, clock.wrap(getattr(obj, name), phase))
            clock.wrapped.append(f"{getattr(obj, '__name__', obj)}.{name} -> {phase}")

    generator = engine.generator

    def first_iteration(*args, **kwargs):  # the loop's first line: setup ends here
        if clock.loop_start is None:
            clock.loop_start = clock.now()
            if clock.cuda:  # the start-up peak: teacher, both engines, before any step
                clock.startup_peak = torch.cuda.max_memory_allocated()
        return generator(*args, **kwargs)

    p.set(engine, "generator", first_iteration)

    made: list[str] = []
    make_engine = zero.make_engine

    def tagged_engine(model, *args, **kwargs):
        role = ("student", "fake")[len(made)]
        made.append(role)
        model._bench_role = role
        eng = make_engine(model, *args, **kwargs)
        eng.backward = clock.wrap(eng.backward, f"{role}_backward")
        eng.step = clock.wrap(eng.step, f"{role}_optimizer")
        return eng

    p.set(zero, "make_engine", tagged_engine)

    cls = type(velocity)
    forward = cls.forward
    velocity._bench_role = "teacher"

    def counted(self, x, sigma, cond):
        role = _lora_role(self) or getattr(self, "_bench_role", "teacher")
        grad = torch.is_grad_enabled()
        clock.evals[f"{role}_{'grad' if grad else 'nograd'}"] += x.shape[0]
        if role == "teacher":
            with clock.phase("teacher"):
                return forward(self, x, sigma, cond)
        if role == "fake" and not grad:
            with clock.phase("fake_evals"):
                return forward(self, x, sigma, cond)
        return forward(self, x, sigma, cond)

    p.set(cls, "forward", counted)
    return p


def _lora_role(module: torch.nn.Module) -> str | None:
    """LoRA mode: teacher, student and fake score are one module; the adapter switched on
    (none: the teacher) says which network runs. None outside LoRA mode."""
    try:
        running = lora.running(module)  # one walk of the modules per forward
    except ValueError:  # not a LoRA module
        return None
    return {None: "teacher", lora.STUDENT: "student", lora.FAKE: "fake"}[running]


def forward_equivalents(evals: dict[str, int]) -> dict[str, float]:
    """Sample-evaluations in forward-equivalents: a forward with gradient + backward = 3."""
    out = {}
    for key, n in evals.items():
        out[key] = 3 * n if key.endswith("_grad") else n
    return out


def expected_per_student_step(k_min: int, k_max: int, method: P.Method, ratio: int) -> float:
    """E[forward-equivalents per sample per student step] under K ~ U{k_min..k_max} and
    anchor ~ U{0..K-1}: update_ratio x (rollout E[(K+1)/2] + fake fwd+bwd 3) + student
    3 x (1 + CDM) + teacher (2 CA + DM + CDM) + fake evaluations (DM + CDM)."""
    rollout = sum((k + 1) / 2 for k in range(k_min, k_max + 1)) / (k_max - k_min + 1)
    student = 3 * (1 + method.cdm)
    teacher = 2 * method.ca + method.dm + method.cdm
    fake = method.dm + method.cdm
    return ratio * (rollout + 3) + student + teacher + fake


def _estimate(m: plan.Model, *args: Any, **optional: Any) -> dict[str, float]:
    """cdm.plan.estimate, passing only the optional keywords this version of it accepts."""
    accepted = inspect.signature(plan.estimate).parameters
    return plan.estimate(m, *args, **{k: v for k, v in optional.items() if k in accepted})


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


# --- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(HUB), default="sd3")
    parser.add_argument("--layers", type=int, help="transformer blocks (LongCat: double blocks)")
    parser.add_argument("--single-layers", type=int, help="LongCat single blocks (2 x --layers)")
    parser.add_argument("--width", type=int, help="hidden size (heads x head dim)")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--resolution", type=int, default=1024, help="image px")
    parser.add_argument("--iterations", type=int, default=4, help="fake-score iterations")
    parser.add_argument("--batch", type=int, default=2, help="batch per process")
    parser.add_argument("--method", default="cdm", help="a preset under params.yaml `methods`")
    parser.add_argument("--k-max", type=int, help="dynamic schedule K ~ U{k_min..k_max}")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--lora", type=int, metavar="RANK",
        help="LoRA mode (distill.lora) at this rank, alpha 2 x rank as the authors' 64/128",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--workdir", help="checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--out", help="JSON (default: bench/results/scale-<model>.json)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", zero.local_rank()) if cuda else torch.device("cpu")
    params = P.load(args.params)
    method = params.methods[args.method]
    update = {
        "batch_size": args.batch, "iterations": args.iterations, "zero_stage": args.zero,
        "gradient_checkpointing": args.gradient_checkpointing, "warmup": 1,
        "preview_every": 10**9,
    }  # fmt: skip
    if args.lora is not None:
        update["lora"] = P.Lora(rank=args.lora, alpha=2.0 * args.lora)
    if args.k_max is not None:
        update["k_max"] = args.k_max
        update["k_min"] = min(params.distill.k_min, args.k_max)
    cfg = params.distill.model_copy(update=update)
    student_steps = args.iterations // cfg.update_ratio
    if student_steps < 1:
        raise SystemExit(f"--iterations must be >= update_ratio ({cfg.update_ratio})")
    cfg = cfg.model_copy(update={"checkpoint_every": student_steps})  # one checkpoint, at the end
    ds_base = json.loads((ROOT / "configs" / "deepspeed" / f"zero{args.zero}.json").read_text())

    rss_before = peak_rss_bytes()  # torch, DeepSpeed, diffusers loaded; no model yet
    config = teacher_config(args.model, args.layers, args.width, args.heads, args.single_layers)
    velocity, shift, shape, cond, null, tokens = build_teacher(
        args.model, config, args.resolution, args.seed
    )
    pm = plan_model(args.model, config, args.resolution, cfg.lora)
    weight_bytes = 2 if cuda else 4
    bucket = int(
        ds_base.get("zero_optimization", {}).get(
            "reduce_bucket_size", plan.DS_REDUCE_BUCKET_DEFAULT
        )
    )
    predicted = _estimate(
        pm, args.batch, 1, args.zero, cfg.gradient_checkpointing, method.cdm, weight_bytes,
        bucket, train_prompts=len(cond) - 1,
    )  # fmt: skip

    clock = Clock(cuda)
    patches = instrument(clock, velocity)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            paths = engine.RunPaths(Path(tmp) / "ckpt", Path(tmp) / "ckpt" / "train.csv")
            engine.train(
                velocity, cond, null, shift, shape, method, cfg, paths, args.seed, device, ds_base
            )
            t_end = clock.now()
            rows = paths.log_csv.read_text().splitlines()
    finally:
        patches.restore()
    peak = {
        "measured_bytes": torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes(),
        "kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (ru_maxrss)",
        "rss_before_model_bytes": None if cuda else rss_before,
        "note": None
        if cuda
        else "RSS counts touched pages only: DeepSpeed's reduce bucket (in the plan's gradients "
        "row) is allocated but barely touched on one rank; compare measured_minus_before with "
        "the plan's total_without_reduce_bucket",
    }
    if not cuda:
        peak["measured_minus_before_bytes"] = peak["measured_bytes"] - rss_before
    startup = "start-up peak per GPU (before the first step)"
    peak["startup_measured_bytes"] = getattr(clock, "startup_peak", None)  # CUDA only
    # The plan's start-up peak is full fine-tuning's (LoRA starts with the base and two adapters).
    peak["startup_plan_bytes"] = (
        plan.peaks(pm, 1, args.zero, weight_bytes)[startup] if cfg.lora is None else None
    )

    loop = t_end - clock.loop_start
    phases = dict(sorted(clock.seconds.items()))
    phases["other"] = max(0.0, loop - sum(phases.values()))
    fe = forward_equivalents(clock.evals)
    per_step = sum(fe.values()) / (student_steps * args.batch)
    csv_counts = _csv_counts(rows)
    result = {
        "what": "seconds per cdm.engine.train iteration by phase; peak memory vs cdm.plan; "
        "forward-equivalents per student step vs the authors' 50",
        "command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "model": args.model,
            "hub_config": HUB[args.model],
            "transformer": config,
            "resolution": args.resolution,
            "latent_shape": list(shape),
            "image_tokens": tokens,
            "text_tokens": int(cond.embeds.shape[1]),
            "text_width": int(cond.embeds.shape[2]),
            "pooled_width": int(cond.pooled.shape[1]),
            "parameters": pm.params,
            "batch": args.batch,
            "iterations": args.iterations,
            "student_steps": student_steps,
            "update_ratio": cfg.update_ratio,
            "method": args.method,
            "method_flags": method.model_dump(),
            "k_min": cfg.k_min,
            "k_max": cfg.k_max,
            "zero_stage": args.zero,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "dtype": "bf16" if cuda else "fp32",
            "shift": shift,
            "training": P.training_mode(cfg.lora),
            # per network (student, fake score): what its optimizer trains
            "trained_parameters": plan.trained_parameters(pm),
            "trained_fraction": round(plan.trained_parameters(pm) / pm.params, 5),
        },  # fmt: skip
        "device": _device(cuda),
        "setup_seconds": round(clock.loop_start - t_start, 4),
        "loop_seconds": round(loop, 4),
        "seconds_per_iteration": round(loop / args.iterations, 4),
        "it_per_s": round(args.iterations / loop, 4),
        "phases": {
            name: {
                "seconds_per_iteration": round(s / args.iterations, 5),
                "share": round(s / loop, 4),
                "calls": clock.calls.get(name, 0),
            }
            for name, s in phases.items()
        },
        "instrumented": clock.wrapped,
        "peak_memory": peak,
        "plan": {
            "model": pm.__dict__,
            "weight_bytes": weight_bytes,
            "gpus": 1,
            "zero": args.zero,
            "reduce_bucket": bucket,
            "rows_bytes": {k: int(v) for k, v in predicted.items()},
            "total_bytes": int(sum(predicted.values())),
            "total_without_reduce_bucket_bytes": int(
                sum(predicted.values()) - 2 * weight_bytes * plan.reduce_bucket_numel(pm, bucket)
            ),
        },  # fmt: skip
        "evaluations": {
            "sample_evaluations": dict(sorted(clock.evals.items())),
            "forward_equivalents": dict(sorted(fe.items())),
            "engine_csv_totals": csv_counts,
            "per_sample_per_student_step": round(per_step, 3),
            "ratio_to_authors_50": round(per_step / AUTHORS_EVALS, 4),
            "expected_per_student_step_this_k": round(
                expected_per_student_step(cfg.k_min, cfg.k_max, method, cfg.update_ratio), 3
            ),
            "expected_per_student_step_k_1_28": round(
                expected_per_student_step(1, 28, method, cfg.update_ratio), 3
            ),
            "limit": LIMIT_EVALS,
            "limit_ratio": round(LIMIT_EVALS / AUTHORS_EVALS, 4),
        },
    }
    result["evaluations"]["expected_ratio_k_1_28"] = round(
        result["evaluations"]["expected_per_student_step_k_1_28"] / AUTHORS_EVALS, 4
    )
    out = Path(args.out or ROOT / "bench" / "results" / f"scale-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    _print_table(result)
    return result


def _csv_counts(lines: list[str]) -> dict[str, int]:
    """The engine's own n_*_evals columns summed (its count, without the fwd+bwd weighting)."""
    import csv

    rows = list(csv.DictReader(lines))
    return {
        key: sum(int(r[key] or 0) for r in rows)
        for key in ("n_student_evals", "n_teacher_evals", "n_fake_evals")
    }


def _device(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name()} torch {torch.__version__}"
    return f"cpu {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"


def _print_table(r: dict[str, Any]) -> None:
    print(f"{'phase':<20}{'s/it':>10}{'share':>8}")
    for name, v in r["phases"].items():
        print(f"{name:<20}{v['seconds_per_iteration']:>10.4f}{v['share']:>8.3f}")
    ev = r["evaluations"]
    print(
        f"it/s {r['it_per_s']}; evals/student step {ev['per_sample_per_student_step']} "
        f"(ratio {ev['ratio_to_authors_50']} to 50; expected at K~U{{1..28}}: "
        f"{ev['expected_ratio_k_1_28']}); peak {r['peak_memory']['measured_bytes'] / 2**20:.0f} MiB "
        f"vs plan {r['plan']['total_bytes'] / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
