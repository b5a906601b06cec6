"""Scheduler configs under which stock diffusers samples an exported student on our sigmas.

Our few-step sampler uses `inference_sigmas(n, S, raw)` = time_shift(raw, S) + [0]. Stock
pipelines build their sigmas inside FlowMatchEulerDiscreteScheduler.set_timesteps, so the
exported scheduler config must make that code produce the same numbers:

- LongCatImagePipeline passes raw = linspace(1, 1/n, n) and mu = calculate_shift(seq_len, ...)
  itself. With use_dynamic_shifting, base_shift = max_shift = ln S, mu = ln S at every
  resolution, and the exponential time shift e^mu t / (e^mu t + 1 - t) is our shift by S.
- StableDiffusion3Pipeline passes no sigmas: the scheduler spaces raw = linspace(1, m, n)
  with m = 1 / num_train_timesteps (use_dynamic_shifting leaves its training sigmas
  unshifted), shifts them by s = e^mu and, with shift_terminal T, stretches 1 - sigma so
  the last sigma is T. Every step is a Möbius map of the step index k, and so is our target
  1 - sigma_k = k delta / (S - (S - 1) k delta) for raw_k = 1 - k delta; matching the pole
  of the two gives s = S d / (S d - (S - 1) delta) with d = (1 - m) / (n - 1), and T fixes
  the scale. Exact for evenly spaced raw sigmas from 1 (the recipe's [1, .75, .5, .25]).

Pure functions: configs in, configs and tensors out; `pipeline_sigmas` replays what the
pipeline does with a scheduler built from the config, which is how export checks its work.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cdm.sampling import inference_sigmas

# Keys set on top of the teacher's scheduler config; every other key is the teacher's.
FLOW_KEYS = (
    "shift", "use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal",
    "time_shift_type", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "stochastic_sampling",
)  # fmt: skip


def evenly_spaced(raw: list[float]) -> bool:
    """raw = linspace(1, raw[-1], n): the only schedules a stock default call can reproduce."""
    n = len(raw)
    grid = np.linspace(1.0, raw[-1], n) if n > 1 else np.ones(1)
    return raw[0] == 1.0 and bool(np.allclose(raw, grid, rtol=0, atol=1e-9))


def plain(shift: float) -> dict[str, Any]:
    return {
        "shift": shift, "use_dynamic_shifting": False, "shift_terminal": None,
        "time_shift_type": "exponential", "invert_sigmas": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
    }  # fmt: skip


def constant_mu(shift: float) -> dict[str, Any]:
    """Dynamic shifting pinned to mu = ln(shift) at every image size (Flux-style pipelines)."""
    mu = math.log(shift)
    return plain(shift) | {"use_dynamic_shifting": True, "base_shift": mu, "max_shift": mu}


def sd3_default_call(raw: list[float], shift: float, num_train_timesteps: int) -> dict | None:
    """Config under which `StableDiffusion3Pipeline(..., num_inference_steps=len(raw))` uses
    time_shift(raw, shift) + [0]; None when no FlowMatchEulerDiscreteScheduler config can."""
    n = len(raw)
    if n == 1:
        return plain(shift) if raw == [1.0] else None
    if not evenly_spaced(raw):
        return None
    delta = (1.0 - raw[-1]) / (n - 1)
    d = (1.0 - 1.0 / num_train_timesteps) / (n - 1)
    denominator = shift * d - (shift - 1.0) * delta
    if denominator <= 0:
        return None
    s = shift * d / denominator
    terminal = shift * raw[-1] / (1 + (shift - 1) * raw[-1])
    return constant_mu(s) | {"shift": shift, "shift_terminal": terminal}


def longcat_default_call(raw: list[float], shift: float) -> dict | None:
    """Config under which `LongCatImagePipeline(..., num_inference_steps=len(raw))` uses
    time_shift(raw, shift) + [0] (the pipeline itself passes linspace(1, 1/n, n))."""
    n = len(raw)
    grid = np.linspace(1.0, 1.0 / n, n)
    if not np.allclose(raw, grid, rtol=0, atol=1e-9):
        return None
    return constant_mu(shift)


def calculate_shift(seq_len: int, config: dict[str, Any]) -> float:
    """mu of a dynamic-shifting pipeline (diffusers' calculate_shift, same defaults)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return seq_len * m + (base - m * base_len)


def effective_shift(config: dict[str, Any], seq_len: int) -> float:
    """The SD3 time shift S a scheduler config applies at `seq_len` image tokens."""
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = calculate_shift(seq_len, config)
    return float(mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu))


def pipeline_sigmas(
    config: dict[str, Any], steps: int, seq_len: int, pipeline_raw: list[float] | None = None
) -> torch.Tensor:
    """The sigmas (with the final 0) a stock pipeline runs with a scheduler of `config`.

    `pipeline_raw`: the sigmas the pipeline itself passes (LongCat passes linspace(1, 1/n, n);
    SD3 passes none). mu comes from calculate_shift like in both pipelines.
    """
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {}
    if scheduler.config.use_dynamic_shifting:
        kwargs["mu"] = calculate_shift(seq_len, dict(scheduler.config))
    if pipeline_raw is not None:
        scheduler.set_timesteps(steps, sigmas=pipeline_raw, **kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)
    return scheduler.sigmas.float()


def matches(
    config: dict[str, Any],
    raw: list[float],
    shift: float,
    seq_len: int,
    pipeline_raw: list[float] | None = None,
    atol: float = 1e-6,
) -> bool:
    """Whether a stock pipeline with this scheduler config samples on our sigmas."""
    ours = inference_sigmas(len(raw), shift, raw)
    theirs = pipeline_sigmas(config, len(raw), seq_len, pipeline_raw)
    return theirs.shape == ours.shape and bool(torch.allclose(theirs, ours, rtol=0, atol=atol))
