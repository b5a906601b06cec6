"""Sample sets: one image per evaluation pair from the teacher (with or without CFG) or a
student, and the join of a set's shards. The `sample` stage script calls these.

Pair j uses eval prompt j % len(prompts) and the initial noise of seed NOISE_SEED_BASE + j,
the same for every model; conditioning comes from the prompt cache (no text encoder). The
transformer runs in bf16 on a GPU and in fp32 on the CPU (`sampling_dtype`); the latents
between steps and the VAE decode stay fp32. Each image's row in index.parquet names the
transformer's dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm import tqdm

from cdm import params as P
from cdm.backends import backend_module
from cdm.backends.few_step import exported_sigmas
from cdm.cache import cached_prompts, load_condition
from cdm.conditioning import Condition
from cdm.manifest import check_export
from cdm.samplefiles import COLUMNS, INDEX, dtype_name, part_name, png_name, save_png
from cdm.sampling import inference_sigmas, sample_euler
from cdm.world.evaluate import EvalPairs

if TYPE_CHECKING:
    from cdm.baselines import CompareJob

TEACHERS = P.TEACHER_SETS


def sampling_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The transformer's precision when sampling: bf16 on a GPU (the published models' own
    precision; fp32 there would run at a fraction of the tensor cores' speed), fp32 on the
    CPU (no bf16 speed-up there; the embedded run's numbers)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Sampler:
    """A velocity network with its few-step recipe."""

    velocity: torch.nn.Module
    shift: float
    latent_shape: tuple[int, int, int]
    guidance: float
    recipe_sigmas: list[float] | None = None  # a student's raw inference sigmas (its export)
    folder: Path | None = None  # an exported student: sample as its stock pipeline call does

    def nfe(self, steps: int) -> int:
        return steps * (2 if self.guidance != 1.0 else 1)

    def sigmas(self, steps: int) -> torch.Tensor:
        """What the exported student's stock pipeline runs at `steps` (sd3 / longcat / flux2-klein), else
        the student's own schedule at its recipe's step count and evenly spaced raw sigmas
        otherwise; shifted, a final 0."""
        stock = exported_sigmas(self.folder, steps) if self.folder is not None else None
        if stock is not None:
            return stock
        raw = (
            self.recipe_sigmas if self.recipe_sigmas and len(self.recipe_sigmas) == steps else None
        )
        return inference_sigmas(steps, self.shift, raw)


def load_sampler(
    model: str, params: P.Params, teacher: Path, students: Path, dtype: torch.dtype
) -> Sampler:
    """The teacher (teacher_cfg / teacher_nocfg) or the student of method `model`, its
    weights read in `dtype`."""
    backend = backend_module(params.teacher.backend)
    if model in TEACHERS:
        velocity, shift, shape = backend.load_velocity(teacher, params.teacher.resolution, dtype)
        guidance = params.teacher.cfg_scale if model == "teacher_cfg" else 1.0
        return Sampler(velocity, shift, shape, guidance)
    if model not in params.methods:
        raise ValueError(
            f"unknown model '{model}'; choose {', '.join(TEACHERS)}, a method of "
            f"params.yaml ({', '.join(params.methods)}) or a compare entry"
        )
    folder = students / model
    if not (folder / "inference.json").is_file():
        raise FileNotFoundError(f"no student at {folder}; run distill for method {model} first")
    # Whole or refused: a truncated file the sampler never reads (a text encoder) would
    # otherwise go on into the published student.
    check_export(folder, f"delete it and rerun the pipeline (distill rebuilds {model})")
    recipe = json.loads((folder / "inference.json").read_text())
    velocity, shift, shape = backend.load_velocity(folder, params.teacher.resolution, dtype)
    return Sampler(
        velocity,
        float(recipe.get("shift", shift)),
        shape,
        recipe.get("guidance", 1.0),
        recipe.get("sigmas_raw"),
        folder,
    )


@torch.no_grad()
def sample_pairs(
    sampler: Sampler,
    decode,
    pairs: EvalPairs,
    cond_index: list[int],
    cond,
    null,
    steps: int,
    batch_size: int,
    out: Path,
    model: str,
    device: torch.device,
    dtype: torch.dtype,
) -> pd.DataFrame:
    """Write one PNG per pair into `out`, the transformer in `dtype` on `device`; return the
    index rows."""
    velocity = sampler.velocity.to(device, dtype).eval().requires_grad_(False)
    sigmas = sampler.sigmas(steps).to(device)
    null = null.to(device)
    noise = pairs.noise(sampler.latent_shape)
    index = torch.tensor(cond_index)
    rows = []
    ids = pairs.pairs
    bar = tqdm(
        range(0, len(ids), batch_size), desc=f"sample {model}@{steps}", mininterval=5, unit="batch"
    )
    # PNGs are encoded on a writer thread while the next batch samples (zlib releases the
    # GIL); at most the previous batch waits there, so memory holds two batches of images.
    with ThreadPoolExecutor(max_workers=1) as writer:
        previous: list[Future] = []
        for lo in bar:
            hi = min(lo + batch_size, len(ids))
            start = time.perf_counter()
            x = sample_euler(
                velocity,
                noise[lo:hi].to(device),
                sigmas,
                cond.take(index[lo:hi]).to(device),
                null,
                sampler.guidance,
            )
            images = decode(x).cpu().numpy()
            share = (time.perf_counter() - start) / (hi - lo)
            for done in previous:  # a failed write fails the set
                done.result()
            previous = []
            for k, pair in enumerate(ids[lo:hi]):
                previous.append(writer.submit(save_png, images[k], out / png_name(pair)))
                rows.append(
                    {
                        "prompt": pairs.prompts[lo + k],
                        "pair": pair,
                        "seed": pairs.seeds[lo + k],
                        "model": model,
                        "steps": steps,
                        "nfe": sampler.nfe(steps),
                        "seconds": share,
                        "file": png_name(pair),
                        "dtype": dtype_name(dtype),
                    }
                )
        for done in previous:
            done.result()
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass
class SampleJob:
    """One sample set with every input already loaded: running it only writes images."""

    sampler: Sampler
    decode: Callable[[torch.Tensor], torch.Tensor]
    pairs: EvalPairs
    cond_index: list[int]
    cond: Condition
    null: Condition
    steps: int
    batch_size: int
    model: str
    device: torch.device
    dtype: torch.dtype

    def run(self, out: Path) -> pd.DataFrame:
        """The images into `out` (a fresh folder); the index rows."""
        return sample_pairs(
            self.sampler, self.decode, self.pairs, self.cond_index, self.cond, self.null,
            self.steps, self.batch_size, out, self.model, self.device, self.dtype,
        )  # fmt: skip


def prepare_set(
    model: str,
    steps: int,
    params: P.Params,
    pairs: list[int],
    teacher: Path,
    students: Path,
    cache: Path,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    prompts_file: Path | None = None,
) -> SampleJob | CompareJob:
    """Read every input of a set (prompt cache, model, decoder) before anything is written.
    `device` defaults to a GPU when there is one, `dtype` to `sampling_dtype(device)`;
    `prompts_file` (the encoded prompts pair j cycles through) to the cache's eval set."""
    prompts_file = cache / "eval.safetensors" if prompts_file is None else prompts_file
    device = sampling_device() if device is None else device
    dtype = sampling_dtype(device) if dtype is None else dtype
    if model in params.compare:  # a published model, sampled by its own pipeline call
        from cdm import baselines as compare

        prompts = cached_prompts(prompts_file)
        return compare.prepare(model, steps, params, prompts, pairs, teacher, device, dtype)
    cond, prompts = load_condition(prompts_file)
    null, _ = load_condition(cache / "null.safetensors")
    sampler = load_sampler(model, params, teacher, students, dtype)
    decode = backend_module(params.teacher.backend).load_decoder(teacher)
    eval_pairs = EvalPairs.of(prompts, pairs)
    cond_index = [j % len(prompts) for j in eval_pairs.pairs]
    return SampleJob(
        sampler, decode, eval_pairs, cond_index, cond, null, steps, params.sample.batch_size,
        model, device, dtype,
    )  # fmt: skip


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_parts(
    final: Path, model: str, steps: int, n: int, pairs: int
) -> list[tuple[Path, pd.DataFrame]]:
    """The n shards of a set, checked to hold pairs 0..pairs-1 once each."""
    parts = [final / part_name(i, n) for i in range(n)]
    for i, part in enumerate(parts):
        if not (part / INDEX).is_file():
            raise FileNotFoundError(
                f"missing shard {part}; run sample.py --model {model} --steps {steps} "
                f"--shard {i}/{n} first"
            )
    frames = [pd.read_parquet(part / INDEX) for part in parts]
    pairs_seen = pd.concat(frames)["pair"].sort_values().tolist()
    if pairs_seen != list(range(pairs)):
        raise ValueError(
            f"the {n} shards of {final} do not hold pairs 0..{pairs - 1} "
            "once each (prompts.eval_pairs); rerun the shards"
        )
    return list(zip(parts, frames, strict=True))


def join_parts(parts: list[tuple[Path, pd.DataFrame]], out: Path) -> pd.DataFrame:
    """Hard-link (or copy) the shards' images into `out`; the joined index, by pair.

    Linked, not moved: a crash before the caller's swap leaves the parts intact."""
    for part, frame in parts:
        for name in frame["file"]:
            _link_or_copy(part / name, out / name)
    index = pd.concat([f for _, f in parts], ignore_index=True).sort_values("pair", kind="stable")
    return index.reset_index(drop=True)
