"""One CDM distillation iteration and the training loop (accelerate + DeepSpeed ZeRO).

Three networks (docs/method.md): the student G and the fake score F, each in its own DeepSpeed
engine with its own AdamW, and the frozen teacher T outside ZeRO. Each iteration, in the
authors' order: one rollout of the student (no grad) -> a fake-score update on the
student's estimates at the anchors and the blend F <- keep F + (1 - keep) G -> every
`update_ratio` iterations a student update with L = CA + DM + CDM on the same rollout,
reading the just-updated fake score.

The loop's bookkeeping each lives in a module of its own, one call per concern here: the
checkpoint store (`cdm.checkpoints`), stopping for a signal or the SLURM time limit
(`cdm.preemption`) and the run log, train.csv (`cdm.runlog`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from cdm import checkpoints, lora, zero
from cdm.cli import StageFailure
from cdm.conditioning import Condition
from cdm.ema import ema_decay
from cdm.flow import add_noise, euler_step, x0_from_v
from cdm.guidance import guide_of
from cdm.losses import ca_loss, cdm_loss, dm_loss, fake_score_loss, renoise_tau
from cdm.params import Distill, Method
from cdm.preemption import Preempted, Preemption
from cdm.rollout import Rollout, evals_needed, rollout
from cdm.runlog import RunLog, loss_summary
from cdm.schedules import draw_anchor, draw_length, dynamic_sigmas, fixed_schedule

log = logging.getLogger("cdm.engine")
Velocity = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]
T = TypeVar("T")


class TrainingDiverged(StageFailure):
    """Too many consecutive iterations with a non-finite loss (distill.max_nonfinite)."""


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, rank, ...): runs are reproducible and resumable."""
    mixed = seed
    for k in keys:
        mixed = (mixed * 1_000_003 + k + 1) % (2**63 - 1)
    return torch.Generator(device).manual_seed(mixed)


def schedule_for(
    method: Method, cfg: Distill, shift: float, shared: torch.Generator, own: torch.Generator
) -> torch.Tensor:
    """The iteration's sigmas: the inference schedule (DMD2) or a fresh dynamic one (CDM).

    K comes from `shared` (seeded alike on every rank), the inner sigmas from this rank's
    `own` generator: a global batch mixes schedules of one length (docs/method.md, data parallel).
    """
    if method.schedule == "fixed":
        return fixed_schedule(cfg.inference_sigmas, shift)
    k = draw_length(cfg.k_min, cfg.k_max, shared)
    return dynamic_sigmas(k, cfg.u_min, cfg.u_max, shift, own)


@dataclass
class StudentLosses:
    total: torch.Tensor
    stats: dict[str, float]
    n_student: int
    n_teacher: int
    n_fake: int
    n_nonfinite: int  # non-finite entries of the teacher's outputs (replaced by nan_to_num)


def student_losses(
    student: Velocity,
    teacher: Velocity,
    fake: Velocity,
    roll: Rollout,
    cond: Condition,
    null: Condition,
    method: Method,
    cfg: Distill,
    gen: torch.Generator,
) -> StudentLosses:
    """L = CA + DM + CDM at the rollout's anchors (paper §3.1-3.3), each switchable."""
    b, s_i = len(cond), roll.sigma_anchor
    randn = lambda: torch.randn(roll.x_anchor.shape, generator=gen, device=gen.device)  # noqa: E731
    tau = lambda: renoise_tau(b, gen, cfg.tau_min, cfg.tau_max)  # noqa: E731

    # One student forward with gradient: the anchor (CA and DM) and the off-trajectory point (CDM).
    xs, sigmas = [roll.x_anchor], [s_i]
    if method.cdm:
        s_off = tau()
        xs.append(euler_step(roll.x_anchor, roll.v_anchor, s_i, s_off))
        sigmas.append(s_off)
    x_in, s_in = torch.cat(xs), torch.cat(sigmas)
    x0_all = x0_from_v(x_in, student(x_in, s_in, Condition.cat([cond] * len(xs))).float(), s_in)
    x0_s, x0_off = x0_all[:b], x0_all[b:]

    # Re-noise the detached estimates; batch every teacher call, then every fake-score call.
    t_in: list[tuple[torch.Tensor, torch.Tensor, Condition]] = []
    f_in: list[tuple[torch.Tensor, torch.Tensor, Condition]] = []
    if method.ca:
        t_ca = renoise_tau(b, gen, cfg.tau_min, cfg.tau_max, upper=s_i)
        z_ca = add_noise(x0_s.detach(), randn(), t_ca)
        t_in += [(z_ca, t_ca, cond), (z_ca, t_ca, null.expand(b))]
    if method.dm:
        t_dm = tau()
        z_dm = add_noise(x0_s.detach(), randn(), t_dm)
        t_in.append((z_dm, t_dm, cond))
        f_in.append((z_dm, t_dm, cond))
    if method.cdm:
        t_cdm = tau()
        z_cdm = add_noise(x0_off.detach(), randn(), t_cdm)
        t_in.append((z_cdm, t_cdm, cond))
        f_in.append((z_cdm, t_cdm, cond))
    v_t, nonfinite = _batched_v(teacher, t_in, sanitize=True)
    x0_t = [x0_from_v(z, v, t) for (z, t, _), v in zip(t_in, v_t, strict=True)]
    x0_f = [
        x0_from_v(z, v, t) for (z, t, _), v in zip(f_in, _batched_v(fake, f_in)[0], strict=True)
    ]

    total = x0_s.new_zeros(())
    stats: dict[str, float] = {}
    if method.ca:
        guided = _guided_x0(teacher, z_ca, t_ca, v_t[0], v_t[1], cfg.guidance)
        x0_c, x0_u = x0_t.pop(0), x0_t.pop(0)
        ca = ca_loss(x0_s, x0_c, x0_u, cfg.guidance, cfg.normaliser_floor, guided=guided)
        total, stats["loss_ca"], stats["w_ca"] = total + ca.loss, ca.loss.item(), ca.weight.item()
    if method.dm:
        dm = dm_loss(x0_s, x0_t.pop(0), x0_f.pop(0), cfg.normaliser_floor)
        total, stats["loss_dm"], stats["w_dm"] = total + dm.loss, dm.loss.item(), dm.weight.item()
    if method.cdm:
        cd = cdm_loss(x0_off, x0_t.pop(0), x0_f.pop(0), cfg.normaliser_floor)
        total, stats["loss_cdm"], stats["w_cdm"] = total + cd.loss, cd.loss.item(), cd.weight.item()
    return StudentLosses(
        total,
        stats,
        len(x_in),
        sum(len(c) for _, _, c in t_in),
        sum(len(c) for _, _, c in f_in),
        nonfinite,
    )


@torch.no_grad()
def _batched_v(
    velocity: Velocity,
    inputs: list[tuple[torch.Tensor, torch.Tensor, Condition]],
    sanitize: bool = False,
) -> tuple[list[torch.Tensor], int]:
    """Velocities (float32) of several (z, tau, cond) groups from one forward call.

    `sanitize` (the teacher): outputs pass through nan_to_num before any loss direction is
    formed, as in the authors' code; returns how many entries were not finite.
    """
    if not inputs:
        return [], 0
    z = torch.cat([i[0] for i in inputs])
    tau = torch.cat([i[1] for i in inputs])
    v = velocity(z, tau, Condition.cat([i[2] for i in inputs])).float()
    nonfinite = 0
    if sanitize:
        nonfinite = int((~torch.isfinite(v)).sum())
        v = torch.nan_to_num(v)
    return list(v.split([len(i[0]) for i in inputs])), nonfinite


def _guided_x0(
    teacher: Velocity,
    z: torch.Tensor,
    tau: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    g: float,
) -> torch.Tensor | None:
    """The CFG teacher's clean estimate where the family's pipeline combines velocities
    non-linearly (guidance.guide_of; Qwen-Image's norm rescale) at its scale g + 1 (g is
    Decoupled DMD's alpha - 1); None where the combination is linear and the CA loss forms
    g (x0_c - x0_u) itself."""
    guide = guide_of(teacher)
    return None if guide is None else x0_from_v(z, guide(v_cond, v_uncond, g + 1.0), tau)


def fake_score_step_loss(
    fake: Velocity, roll: Rollout, cond: Condition, cfg: Distill, gen: torch.Generator
) -> torch.Tensor:
    """Flow matching of F on the student's clean estimate at the anchor: the distribution
    that DM and CDM re-noise (docs/method.md, fake-score update)."""
    x0 = roll.x0_anchor
    tau = renoise_tau(len(x0), gen, cfg.tau_min, cfg.tau_max)
    eps = torch.randn(x0.shape, generator=gen, device=gen.device)
    return fake_score_loss(fake(add_noise(x0, eps, tau), tau, cond), x0, eps)


# --- virtual ranks and one optimizer step over them ------------------------------------


def virtual_ranks(rank: int, accumulation: int) -> range:
    """The ranks whose draws this process makes (distill.accumulation micro-batches).

    Micro-batch m of rank r draws as rank r * A + m of a run without accumulation would, so
    one process with A = 2 trains what two processes do (the same global batch, the same
    schedules and samples), to float rounding."""
    return range(rank * accumulation, (rank + 1) * accumulation)


@dataclass
class Micro:
    """One virtual rank's part of an iteration: its generator (drawn from in the authors'
    order: schedule, prompts, anchors, noise, then the fake-score and student losses), its
    prompts and its rollout."""

    gen: torch.Generator
    cond: Condition
    roll: Rollout
    k: int


def _draw(
    it: int,
    vrank: int,
    train_cond: Condition,
    student: torch.nn.Module,
    method: Method,
    cfg: Distill,
    shift: float,
    latent_shape: tuple[int, ...],
    seed: int,
    device: torch.device,
    zero3: bool,
) -> Micro:
    shared = generator(seed, it, device=device)  # K: the same on every (virtual) rank
    gen = generator(seed, it, vrank + 1, device=device)  # its schedule and samples
    sigmas = schedule_for(method, cfg, shift, shared, gen).to(device)
    k = len(sigmas) - 1
    idx = torch.randint(len(train_cond), (cfg.batch_size,), generator=gen, device=device)
    cond = train_cond.take(idx.cpu()).to(device)
    anchor = draw_anchor(k, cfg.batch_size, gen)
    noise = torch.randn((cfg.batch_size, *latent_shape), generator=gen, device=device)
    # ZeRO-3 gathers parameters in every forward: all ranks run the same number of them.
    steps = zero.all_reduce_max(int(evals_needed(anchor, k).max()), device) if zero3 else None
    return Micro(gen, cond, rollout(student, noise, sigmas, cond, anchor, steps), k)


def update(
    engine,
    micros: list[Micro],
    loss_of: Callable[[Micro], T],
    total: Callable[[T], torch.Tensor] = lambda out: out,  # the loss in `loss_of`'s output
) -> tuple[list[T], bool]:
    """One optimizer step of `engine` on the mean loss over every rank's micro-batches.

    Returns `loss_of`'s outputs and whether the step was taken: a non-finite loss on
    any rank skips it on all, and the weights stay the last good ones. One micro-batch: the
    check comes before the backward, as in the authors' code. Several (DeepSpeed gradient
    accumulation): the earlier ones are already accumulated when the last is known, so a
    non-finite iteration makes the last gradient non-finite and DeepSpeed discards the whole
    accumulated step (its overflow check), clearing the gradients and the step count with it.
    """
    outs: list[T] = []
    for i, m in enumerate(micros):
        outs.append(loss_of(m))
        loss = total(outs[-1])
        if i == len(micros) - 1:
            break
        with lora.engine_adapter(engine):  # LoRA: a recomputed checkpoint runs its adapter
            engine.backward(loss)
        engine.step()  # counts a micro-step: no update before the last
    finite = zero.all_finite(torch.stack([total(o).detach() for o in outs]))
    if len(micros) == 1 and not finite:
        return outs, False
    with lora.engine_adapter(engine):
        engine.backward(loss if finite else loss * math.nan)
    engine.step()
    taken = engine.was_step_applied()
    if taken and not finite:  # this DeepSpeed took a step on non-finite gradients
        raise StageFailure(
            "DeepSpeed applied an accumulated step with non-finite gradients (its overflow "
            "check is off); set distill.accumulation: 1 or upgrade deepspeed, then rerun (it "
            "resumes from the last good checkpoint)"
        )
    return outs, taken


# --- the loop ---------------------------------------------------------------------------


@dataclass
class RunPaths:
    checkpoints: Path  # checkpoints/<method>-<fingerprint>/ (not a stage output: survives)
    log_csv: Path  # the working log, beside the checkpoints
    live_csv: Path | None = None  # logs/<method>/train.csv: the same rows, as they come


Preview = Callable[[int, torch.nn.Module], None]  # (student step, EMA) -> writes a grid


def weights_dtype(device: torch.device) -> torch.dtype:
    """The networks' weights: bf16 on GPUs (fp32 masters in the optimizers), fp32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def train(
    teacher_model: torch.nn.Module,  # velocity(x, sigma, cond) of the frozen teacher
    train_cond: Condition,  # cached prompt embeddings (N, ...) on CPU
    null: Condition,  # cached null-prompt embedding (1, ...)
    shift: float,
    latent_shape: tuple[int, ...],
    method: Method,
    cfg: Distill,
    paths: RunPaths,
    seed: int,
    device: torch.device,
    ds_base: dict | None = None,  # DeepSpeed settings when accelerate did not launch with any
    stop_after: int | None = None,  # stop early (tests); the run resumes from its checkpoint
    preview: Preview | None = None,  # called every cfg.preview_every student steps
    export_dtype: torch.dtype = torch.float32,  # LoRA: the merged student's (the teacher's on disk)
) -> torch.nn.Module | None:
    """Distil `teacher_model` into a few-step student; returns the student EMA (a module on
    the CPU: fp32, or in LoRA mode the base in `export_dtype` with the fp32 adapter) on rank
    0, None on the other ranks."""
    rank, _, launched = zero.init_distributed(device, cfg.process_group_timeout)
    dtype = weights_dtype(device)
    bf16 = dtype == torch.bfloat16
    teacher = teacher_model.to(device, dtype).eval().requires_grad_(False)
    if cfg.lora is not None:  # LoRA: G and F are two adapters on the teacher's own module
        teacher, student_model, fake_model = lora.networks(
            teacher, cfg.lora, seed, cfg.gradient_checkpointing
        )
    conf = zero.ds_config(
        cfg.batch_size, cfg.zero_stage, bf16, cfg.grad_clip, launched or ds_base, cfg.accumulation
    )
    opt = dict(
        warmup=cfg.warmup, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.adam_eps
    )

    def trainee(lr: float):
        """Student and fake score start from the teacher: one copy at a time, built on the
        CPU (ZeRO-3: partitioned as built), on the device only once in its engine."""
        model = zero.trainable_copy(teacher, dtype, conf)
        if cfg.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        return zero.make_engine(model, lr, config=conf, **opt)

    if cfg.lora is None:
        student = trainee(cfg.lr_student)
        fake = trainee(cfg.lr_fake)
    else:  # only the adapters' weights are in the engines (sharded, blended, checkpointed)
        student = zero.make_engine(student_model, cfg.lr_student, config=conf, **opt)
        fake = zero.make_engine(fake_model, cfg.lr_fake, config=conf, **opt)
    # The student EMA, sharded like the optimizer state (the student starts at the teacher).
    ema = zero.PartitionedEMA(student)

    def ema_student() -> torch.nn.Module | None:
        """The student EMA as a module on rank 0's CPU (fp32; LoRA: the base in the export
        dtype), None on the other ranks; collective."""
        if cfg.lora is None:
            return ema.module(teacher_model)
        state = ema.state_dict()  # the adapter's weights only: small
        if rank != 0:
            return None
        return lora.student_module(teacher_model, state, student.module, export_dtype)

    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    start = checkpoints.load_latest(paths.checkpoints, student, fake, ema)
    if start:
        log.info("resuming from iteration %d", start)

    def checkpoint(iteration: int, once: bool = False) -> None:
        save = checkpoints.save_once if once else checkpoints.save
        save(paths.checkpoints, iteration, student, fake, ema, cfg.keep_checkpoints, rank)

    runlog = RunLog(paths.log_csv, start, paths.live_csv) if rank == 0 else None
    null = null.to(device)  # train_cond stays put (a streamed cache): only batches move
    zero3 = cfg.zero_stage == 3
    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    bar = tqdm(
        range(start, end),
        desc="distill",
        initial=start,
        total=cfg.iterations,
        disable=rank != 0,
        mininterval=5,
    )
    streak = 0  # consecutive iterations with a non-finite loss
    with Preemption(cfg.stop_before_limit) as preemption:
        for it in bar:
            t0 = time.time()
            # Backward simulation for each virtual rank: the student's own trajectory, only as
            # far as each anchor needs.
            micros = [
                _draw(it, v, train_cond, student.module, method, cfg, shift, latent_shape, seed,
                      device, zero3)
                for v in virtual_ranks(rank, cfg.accumulation)
            ]  # fmt: skip
            row: dict[str, float] = {
                "iteration": it + 1,
                "K": micros[0].k,
                "anchor_sigma": torch.cat([m.roll.sigma_anchor for m in micros]).mean().item(),
            }
            n_student = sum(m.roll.n_evals for m in micros)
            n_teacher, n_fake, n_nonfinite = 0, cfg.batch_size * len(micros), 0

            # The fake score first: flow matching on the estimates at the anchors, then the blend.
            losses_f, finite = update(
                fake, micros, lambda m: fake_score_step_loss(fake, m.roll, m.cond, cfg, m.gen)
            )
            if finite:  # a non-finite loss skips the update: the weights stay the last good ones
                zero.blend_engines_(fake, student, cfg.fake_blend)
            row |= {
                "loss_fake": torch.stack(losses_f).mean().item(),
                "grad_norm_fake": _grad_norm(fake) if finite else "",
            }

            # Every update_ratio iterations the student, on the same rollout, against the
            # fake score just updated.
            student_step = (it + 1) // cfg.update_ratio
            updated = (it + 1) % cfg.update_ratio == 0
            if updated:
                outs, taken = update(
                    student,
                    micros,
                    lambda m: student_losses(
                        student, teacher, fake.module, m.roll, m.cond, null, method, cfg, m.gen
                    ),
                    lambda out: out.total,
                )
                row |= {k: sum(o.stats[k] for o in outs) / len(outs) for k in outs[0].stats}
                if taken:
                    ema.update(ema_decay(student_step, cfg.ema_max))
                    row["grad_norm_student"] = _grad_norm(student)
                else:
                    finite = False
                n_student += sum(o.n_student for o in outs)
                n_teacher = sum(o.n_teacher for o in outs)
                n_fake += sum(o.n_fake for o in outs)
                n_nonfinite = sum(o.n_nonfinite for o in outs)

            row |= {
                "student_step": student_step, "n_student_evals": n_student,
                "n_teacher_evals": n_teacher, "n_fake_evals": n_fake, "n_nonfinite": n_nonfinite,
                "seconds": round(time.time() - t0, 4),
                "lr_student": student.get_lr()[0], "lr_fake": fake.get_lr()[0],
            }  # fmt: skip

            # Bookkeeping: log the row, stop a diverged run, maybe preview, checkpoint or stop.
            if runlog is not None:
                runlog.write(row)
                bar.set_postfix(loss_summary(row), refresh=False)
            streak = 0 if finite else streak + 1
            if streak >= cfg.max_nonfinite:
                raise _diverged(streak, it + 1, cfg.max_nonfinite, paths.checkpoints)
            if updated and preview is not None and student_step % cfg.preview_every == 0:
                _preview(preview, student_step, ema_student, device)
            # No checkpoint during a non-finite streak: the kept ones stay the last good states.
            if streak == 0 and updated and student_step % cfg.checkpoint_every == 0:
                checkpoint(it + 1)
            if zero.any_rank(preemption.reason() is not None, device):
                if streak == 0:
                    checkpoint(it + 1, once=True)
                raise Preempted(
                    f"{preemption.received or 'a signal'} at iteration {it + 1}: checkpointed "
                    f"to {paths.checkpoints}; rerun (or requeue) to resume"
                )
    if end > start:
        checkpoint(end, once=True)
    return ema_student()  # rank 0: for the export; the other ranks hold none


def _diverged(streak: int, iteration: int, limit: int, root: Path) -> TrainingDiverged:
    good = checkpoints.completed(root)
    kept = f"the last good checkpoint {good[-1]} is kept" if good else "no checkpoint yet"
    return TrainingDiverged(
        f"{streak} consecutive iterations with a non-finite loss (up to iteration "
        f"{iteration}, distill.max_nonfinite = {limit}); stopped, {kept}; "
        "lower distill.lr_student / lr_fake or check the teacher"
    )


def _preview(
    preview: Preview,
    student_step: int,
    ema_student: Callable[[], torch.nn.Module | None],
    device: torch.device,
) -> None:
    """Draw a preview grid of the student EMA; the full EMA is freed when this returns."""
    full = ema_student()  # gathered to rank 0's CPU (collective), drawn there
    if full is not None:
        # On a GPU in bf16 (2 P bytes on rank 0 alone), as the student samples; fp32 on CPU.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        preview(student_step, full.to(device, dtype))


def _grad_norm(engine) -> float:
    value = engine.get_global_grad_norm()
    return float(value) if value is not None else math.nan
