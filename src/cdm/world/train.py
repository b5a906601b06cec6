"""Training loops of the world's own models: the judge and the teacher.

Both are pretrained inputs of the pipeline (like SD3-Medium for the real backend):
`make world-judge` / `make world-teacher` run these once and the weights are committed.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cdm.ema import blend_
from cdm.flow import add_noise, time_shift, velocity_target
from cdm.velocity import TransformerVelocity
from cdm.world.judge import Judge
from cdm.world.prompts import ATTRIBUTES, Attributes, all_prompts
from cdm.world.render import random_batch

if TYPE_CHECKING:  # diffusers loads when a teacher is built, not for the judge
    from cdm.world.teacher import WorldTeacher


def _attr_labels(index: torch.Tensor) -> torch.Tensor:
    return torch.tensor([Attributes.from_index(int(i)).as_tuple() for i in index])


def judge_accuracy(judge: Judge, n: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy of the judge on n fresh renders it never saw."""
    images, index = random_batch(n, torch.Generator().manual_seed(seed))
    pred, _ = judge.predict(images)
    right = pred == _attr_labels(index)
    return {k: float(right[:, i].float().mean()) for i, k in enumerate(ATTRIBUTES)}


def train_judge(
    out_dir: Path,
    steps: int = 1500,  # optimiser steps, each on a fresh batch of renders
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    eval_renders: int = 4096,  # fresh renders for the final accuracy check
) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="judge", mininterval=5)
    for step in bar:
        images, index = random_batch(batch_size, gen)
        labels = _attr_labels(index)
        logits = judge(images)
        loss = sum(F.cross_entropy(logits[k], labels[:, i]) for i, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    judge.eval()
    accuracy = judge_accuracy(judge, eval_renders, seed + 10_000)
    judge.save_pretrained(out_dir)
    (Path(out_dir) / "train.json").write_text(
        json.dumps(
            {
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "accuracy": accuracy,
            },
            indent=1,
        )
    )
    return accuracy


def captions(
    index: torch.Tensor, prompts: list[str], p_uncond: float, noise: float, gen: torch.Generator
) -> list[str]:
    """Training captions of rendered prompts: a fraction `noise` names one attribute wrongly
    (so the teacher's CFG-free samples sometimes follow the wrong word, and guidance helps),
    and a fraction `p_uncond` is the null prompt."""
    u = torch.rand(len(index), 4, generator=gen)
    out = []
    for i, (drop, corrupt, kind, value) in zip(index.tolist(), u.tolist(), strict=True):
        if drop < p_uncond:
            out.append("")
            continue
        attrs = list(Attributes.from_index(i).as_tuple())
        if corrupt < noise:
            k = int(kind * len(attrs))
            n_values = len(list(ATTRIBUTES.values())[k])
            attrs[k] = (attrs[k] + 1 + int(value * (n_values - 1))) % n_values  # another value
        out.append(prompts[Attributes(*attrs).index])
    return out


def train_teacher(
    out_dir: Path,
    steps: int = 20_000,  # optimiser steps, each on a fresh batch of renders
    batch_size: int = 64,
    lr: float = 1e-3,  # peak AdamW learning rate (cosine decay after warm-up)
    warmup: int = 500,
    ema_decay: float = 0.999,  # the saved weights are the EMA (warm-up min(., (1+n)/(10+n)))
    p_uncond: float = 0.1,  # prompts dropped to the null prompt, for CFG
    caption_noise: float = 0.0,  # captions with one attribute wrong, as on the web
    shift: float = 2.0,  # SD3 time shift of the training and inference sigmas
    seed: int = 0,
    arch: dict[str, int] | None = None,
    log_every: int = 100,
    evaluate: Callable[[WorldTeacher, int], dict[str, float]] | None = None,
    eval_every: int = 2000,
) -> WorldTeacher:
    """Rectified-flow training of the tiny SD3 transformer and its text encoder."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from cdm.world.teacher import WorldTeacher

    teacher = WorldTeacher.new(shift=shift, **(arch or {}))
    ema = copy.deepcopy(teacher).requires_grad_(False)
    velocity = TransformerVelocity(teacher.transformer)
    params = [*teacher.transformer.parameters(), *teacher.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_at = lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    prompts = all_prompts()
    log = open(out_dir / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "loss", "lr", "seconds"])
    running, since, t0 = 0.0, 0, time.time()
    bar = tqdm(range(steps), desc="teacher", mininterval=5)
    for step in bar:
        x0, index = random_batch(batch_size, gen)
        text = captions(index, prompts, p_uncond, caption_noise, gen)
        eps = torch.randn(x0.shape, generator=gen)
        # Uniform sigmas, shifted like the inference schedule. (SD3's logit-normal almost never
        # draws sigma < 0.05 after the shift: the last sampling steps then leave speckle noise.)
        sigma = time_shift(torch.rand(batch_size, generator=gen), shift)
        v = velocity(add_noise(x0, eps, sigma), sigma, teacher.condition(text))
        loss = F.mse_loss(v, velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # EMA with warm-up, so that evaluations during training mean something.
        decay = min(ema_decay, (1 + step) / (10 + step))
        blend_(ema.transformer, teacher.transformer, decay)
        blend_(ema.text_encoder, teacher.text_encoder, decay)
        running, since = running + loss.item(), since + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = running / since
            lr_now = sched.get_last_lr()[0]
            writer.writerow([step + 1, f"{mean:.5f}", f"{lr_now:.3e}", f"{time.time() - t0:.1f}"])
            log.flush()
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            running, since = 0.0, 0
        if evaluate is not None and (step + 1) % eval_every == 0:
            ema.save_pretrained(out_dir)
            tqdm.write(f"step {step + 1}: {json.dumps(evaluate(ema, step + 1))}")
    log.close()
    ema.save_pretrained(out_dir)
    return ema
