"""Scheduler configs under which stock diffusers samples an exported student on our sigmas.

Our sampler uses `inference_sigmas(n, S, raw)` = time_shift(raw, S) + [0], with the recipe's raw
sigmas at its step count and raw = linspace(1, 1/n, n) at any other n. Stock pipelines build
their sigmas inside the scheduler's set_timesteps; the exported config must make that code
produce our numbers at every n a user may ask for:

- LongCatImagePipeline passes raw = linspace(1, 1/n, n) and mu = calculate_shift(seq_len, ...)
  itself. FlowMatchEulerDiscreteScheduler with use_dynamic_shifting and base_shift = max_shift
  = ln S pins mu = ln S at every resolution, and e^mu t / (e^mu t + 1 - t) is our shift by S:
  exact at every n (computed in float32, so up to one float32 ulp from ours).
- Flux2KleinPipeline passes raw = linspace(1, 1/n, n) too, but its own mu =
  compute_empirical_mu(seq_len, n), which moves with n (no config pins it): the export turns
  dynamic shifting off, so the scheduler ignores mu and shifts by its static `shift` = S,
  our shift at every n and resolution (computed in float32 as S t / (1 + (S - 1) t), which
  may put t = 1 one ulp low; sample.py runs the stock sigmas, so both sample alike).
- StableDiffusion3Pipeline passes no sigmas. FlowMatchEulerDiscreteScheduler then shifts
  linspace(1, m, n) with m = 1 / num_train_timesteps (shifted too without dynamic shifting),
  a constant of the config, while ours is linspace(1, 1/n, n): without shift_terminal they
  agree only where m = 1/n, and num_train_timesteps is also the transformer's timestep scale
  (1000). shift_terminal T rescales 1 - sigma so that the last sigma is T: matching the pole
  of the two Moebius maps of the step index makes the recipe's n exact, but then every n ends
  at T (8 steps end at .5 for S = 3) and n = 1 divides 0 by 0 (sigmas [nan, 0]). No
  FlowMatchEulerDiscreteScheduler config is both exact at the recipe's n and finite at n = 1,
  so the export uses diffusers' FlowMapEulerDiscreteScheduler (diffusers >= 0.39), an Euler
  stepper whose default schedule is time_shift(linspace(1, 0, n + 1)[:-1], shift) + [0] in
  float64: ours at every n; with sigmas= it shifts the sigmas passed.
  Its float32 rounding equals our float32 sigmas bit for bit at every n <= 128 tried (the two
  float64 linspaces may differ in the last bit, so this is checked, not guaranteed).

Pure functions: configs in, configs and tensors out. `pipeline_sigmas` replays what a pipeline
does with a scheduler built from a config, which is how export checks its work, and
`exported_sigmas` gives the sampler the stock sigmas of an exported folder bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdm.sampling import inference_sigmas

FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
FLOW_MAP = "FlowMapEulerDiscreteScheduler"
FLOW_MAP_DIFFUSERS = "0.39"  # the first diffusers release with FlowMapEulerDiscreteScheduler
SCHEDULERS = (FLOW_MATCH, FLOW_MAP)  # diffusers' classes, imported when a student is read
# Stock pipelines whose call passes sigmas = linspace(1, 1/n, n) to set_timesteps itself.
PASS_DEFAULT_SIGMAS = ("LongCatImagePipeline", "QwenImagePipeline", "Flux2KleinPipeline")
# The key export writes into inference.json: how to replay the stock call (see exported_sigmas).
STOCK = "stock_call"


def default_raw(steps: int) -> list[float]:
    """linspace(1, 1/n, n): our raw sigmas at a step count other than the recipe's."""
    return np.linspace(1.0, 1.0 / steps, steps).tolist()


def is_default_raw(raw: list[float]) -> bool:
    return bool(np.allclose(raw, default_raw(len(raw)), rtol=0, atol=1e-9))


def pipeline_raw(pipeline: str, steps: int) -> list[float] | None:
    """The raw sigmas a stock `pipeline` passes itself on a default call (None: none)."""
    return default_raw(steps) if pipeline in PASS_DEFAULT_SIGMAS else None


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


def flow_map(shift: float, num_train_timesteps: int = 1000) -> dict[str, Any]:
    """A FlowMapEulerDiscreteScheduler config: time_shift(linspace(1, 1/n, n), shift) + [0] at
    every n on a default call, time_shift(sigmas, shift) + [0] when sigmas are passed."""
    return {"_class_name": FLOW_MAP, "num_train_timesteps": num_train_timesteps, "shift": shift}


def sd3_default_call(raw: list[float], shift: float, num_train_timesteps: int) -> dict | None:
    """Config under which `StableDiffusion3Pipeline(..., num_inference_steps=len(raw))` uses
    time_shift(raw, shift) + [0], and every other step count n our linspace(1, 1/n, n); None
    when raw is not linspace(1, 1/n, n) (the call must then pass sigmas=raw)."""
    return flow_map(shift, num_train_timesteps) if is_default_raw(raw) else None


def passing_default_call(raw: list[float], shift: float, base: dict) -> dict | None:
    """The teacher's scheduler config `base` with longcat_default_call's overrides, for the
    pipelines that pass linspace(1, 1/n, n) themselves (PASS_DEFAULT_SIGMAS); None when raw
    is not that grid."""
    return on_base(longcat_default_call(raw, shift), base)


def longcat_default_call(raw: list[float], shift: float) -> dict | None:
    """Overrides under which `LongCatImagePipeline(..., num_inference_steps=len(raw))` uses
    time_shift(raw, shift) + [0] (the pipeline itself passes linspace(1, 1/n, n)); the same
    for QwenImagePipeline, which passes them too."""
    return constant_mu(shift) if is_default_raw(raw) else None


def static_default_call(raw: list[float], shift: float) -> dict | None:
    """Overrides under which a pipeline that passes linspace(1, 1/n, n) and its own mu
    (Flux2KleinPipeline) uses time_shift(raw, shift) + [0] at n = len(raw): dynamic shifting
    off, so mu is ignored; None when raw is not that grid (the call passes sigmas=raw)."""
    return plain(shift) if is_default_raw(raw) else None


def on_base(overrides: dict | None, base: dict) -> dict | None:
    """The teacher's scheduler config with a default call's overrides (None stays None)."""
    return None if overrides is None else base | overrides


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
    return shift_of_mu(config, calculate_shift(seq_len, config))


def shift_of_mu(config: dict[str, Any], mu: float) -> float:
    """The SD3 time shift S that a dynamic-shifting scheduler applies for `mu`."""
    return float(mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu))


def empirical_shift(config: dict[str, Any], seq_len: int, steps: int) -> float:
    """The time shift Flux2KleinPipeline's default call at `steps` applies: it passes its
    scheduler mu = compute_empirical_mu(seq_len, steps) (a fit of BFL's, not calculate_shift);
    a scheduler without dynamic shifting keeps its own shift."""
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return shift_of_mu(config, compute_empirical_mu(seq_len, steps))


def scheduler_from(config: dict[str, Any]):
    """The stock scheduler a config names (`_class_name`; FlowMatchEuler when absent)."""
    name = config.get("_class_name", FLOW_MATCH)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name} is not one of {', '.join(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, name).from_config(config)


def pipeline_sigmas(
    config: dict[str, Any], steps: int, seq_len: int, pipeline_raw: list[float] | None = None
) -> torch.Tensor:
    """The sigmas (float32, with the final 0) a stock pipeline runs with a scheduler of `config`.

    `pipeline_raw`: the sigmas the pipeline passes (LongCat passes linspace(1, 1/n, n), a caller
    may pass sigmas=); mu comes from calculate_shift like in both pipelines.
    """
    scheduler = scheduler_from(config)
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(seq_len, dict(scheduler.config))
    if pipeline_raw is None:
        scheduler.set_timesteps(steps, **kwargs)
    else:
        scheduler.set_timesteps(sigmas=pipeline_raw, **kwargs)
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


def stock_call(pipeline: str, seq_len: int) -> dict[str, Any]:
    """What export records (inference.json[STOCK]) for exported_sigmas to replay."""
    return {"pipeline": pipeline, "image_tokens": seq_len}


def exported_sigmas(folder: str | Path, steps: int) -> torch.Tensor | None:
    """The sigmas (float32, final 0) stock diffusers runs on an exported pipeline folder at
    `steps`: the call its model card shows at the recipe's step count (sigmas=raw when the
    default call is not exact there), `num_inference_steps=steps` otherwise.

    None for a folder without a recorded stock call (another backend, an older export).
    """
    folder = Path(folder)
    recipe_file = folder / "inference.json"
    if not recipe_file.is_file():
        return None
    recipe = json.loads(recipe_file.read_text())
    stock = recipe.get(STOCK)
    if stock is None:
        return None
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    raw = [float(s) for s in recipe["sigmas_raw"]]
    if steps == len(raw) and not recipe.get("default_call_exact", False):
        passed = raw
    else:
        passed = pipeline_raw(stock["pipeline"], steps)
    sigmas = pipeline_sigmas(config, steps, int(stock["image_tokens"]), passed)
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"the scheduler of {folder} gives non-finite sigmas at {steps} steps")
    return sigmas
