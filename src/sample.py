"""Stage sample: images of the evaluation pairs from the teacher (with or without CFG) or a student.

`python src/sample.py --model MODEL --steps N [--shard i/n]` writes samples/<MODEL>/<N>/
(PNGs named <pair>.png and index.parquet); with --shard, only pairs j with j % n == i, to
samples/<MODEL>/<N>/part-<i>-of-<n>/. `python src/sample.py merge --model MODEL --steps N
--parts n` joins the parts into samples/<MODEL>/<N>/. Pair j uses eval prompt j % len(prompts)
and the initial noise of seed NOISE_SEED_BASE + j, the same for every model.
Conditioning comes from the prompt cache; no text encoder is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from cdm import params as P
from cdm.backends import backend_module
from cdm.cache import load_condition
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_dir
from cdm.sampling import inference_sigmas, sample_euler
from cdm.world.evaluate import EvalPairs

log = logging.getLogger("sample")
TEACHERS = ("teacher_cfg", "teacher_nocfg")
INDEX = "index.parquet"
COLUMNS = ["prompt", "pair", "seed", "model", "steps", "nfe", "seconds", "file"]


def positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' with 0 <= i < n -> (i, n); None -> None."""
    if text is None:
        return None
    parts = text.split("/")
    try:
        i, n = (int(p) for p in parts) if len(parts) == 2 else (-1, 0)
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard must be i/n with 0 <= i < n (e.g. 0/2), got {text!r}")
    return i, n


def part_name(i: int, n: int) -> str:
    return f"part-{i}-of-{n}"


def png_name(pair: int) -> str:
    return f"{pair:05d}.png"


@dataclass
class Sampler:
    """A velocity network with its few-step recipe."""

    velocity: torch.nn.Module
    shift: float
    latent_shape: tuple[int, int, int]
    guidance: float
    recipe_sigmas: list[float] | None = None  # a student's raw inference sigmas (its export)

    def nfe(self, steps: int) -> int:
        return steps * (2 if self.guidance != 1.0 else 1)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The student's own schedule at its recipe's step count (what its exported
        scheduler runs), evenly spaced raw sigmas otherwise; shifted, a final 0."""
        raw = (
            self.recipe_sigmas if self.recipe_sigmas and len(self.recipe_sigmas) == steps else None
        )
        return inference_sigmas(steps, self.shift, raw)


def load_sampler(model: str, params: P.Params, teacher: Path, students: Path) -> Sampler:
    """The teacher (teacher_cfg / teacher_nocfg) or the student of method `model`."""
    backend = backend_module(params.teacher.backend)
    if model in TEACHERS:
        velocity, shift, shape = backend.load_velocity(teacher, params.teacher.resolution)
        guidance = params.teacher.cfg_scale if model == "teacher_cfg" else 1.0
        return Sampler(velocity, shift, shape, guidance)
    if model not in params.methods:
        raise ValueError(
            f"unknown model '{model}'; choose {', '.join(TEACHERS)} or a method of "
            f"params.yaml ({', '.join(params.methods)})"
        )
    folder = students / model
    if not (folder / "inference.json").is_file():
        raise FileNotFoundError(f"no student at {folder}; run distill for method {model} first")
    recipe = json.loads((folder / "inference.json").read_text())
    velocity, shift, shape = backend.load_velocity(folder, params.teacher.resolution)
    return Sampler(
        velocity,
        float(recipe.get("shift", shift)),
        shape,
        recipe.get("guidance", 1.0),
        recipe.get("sigmas_raw"),
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
) -> pd.DataFrame:
    """Write one PNG per pair into `out`; return the index rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    velocity = sampler.velocity.to(device).eval().requires_grad_(False)
    sigmas = sampler.sigmas(steps).to(device)
    null = null.to(device)
    noise = pairs.noise(sampler.latent_shape)
    index = torch.tensor(cond_index)
    rows = []
    ids = pairs.pairs
    bar = tqdm(
        range(0, len(ids), batch_size), desc=f"sample {model}@{steps}", mininterval=5, unit="batch"
    )
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
        for k, pair in enumerate(ids[lo:hi]):
            Image.fromarray(images[k]).save(out / png_name(pair), format="PNG")
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
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def sample(argv: list[str]) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="teacher_cfg, teacher_nocfg or a method")
    parser.add_argument("--steps", required=True, help="Euler steps (a positive integer)")
    parser.add_argument("--shard", help="i/n: only pairs j with j %% n == i (0-based i < n)")
    parser.add_argument("--out", default="samples")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--students", default="models/students")
    parser.add_argument("--cache", default="cache/prompts")
    args = parser.parse_args(argv)
    steps = positive_int(args.steps, "--steps")
    shard = parse_shard(args.shard)
    params = P.load(args.params)
    # Every input is read before anything is written: an error leaves no folder behind.
    cond, prompts = load_condition(Path(args.cache) / "eval.safetensors")
    null, _ = load_condition(Path(args.cache) / "null.safetensors")
    sampler = load_sampler(args.model, params, Path(args.teacher), Path(args.students))
    decode = backend_module(params.teacher.backend).load_decoder(args.teacher)

    ids = range(params.prompts.eval_pairs)
    out = Path(args.out) / args.model / str(steps)
    if shard is not None:
        ids = [j for j in ids if j % shard[1] == shard[0]]
        out = out / part_name(*shard)
    pairs = EvalPairs.of(prompts, ids)
    cond_index = [j % len(prompts) for j in pairs.pairs]
    with atomic_dir(out) as tmp:
        index = sample_pairs(
            sampler, decode, pairs, cond_index, cond, null, steps,
            params.sample.batch_size, tmp, args.model,
        )  # fmt: skip
        index.to_parquet(tmp / INDEX, index=False)
    log.info(
        "%s @ %d steps: %d images (%.1f images/s) -> %s",
        args.model, steps, len(index), 1 / index["seconds"].mean(), out,
    )  # fmt: skip


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge(argv: list[str]) -> None:
    parser = stage_parser("Join the shards of one sample set into samples/<model>/<steps>/.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--parts", required=True, help="n of the shards i/n")
    parser.add_argument("--out", default="samples")
    args = parser.parse_args(argv)
    steps = positive_int(args.steps, "--steps")
    n = positive_int(args.parts, "--parts")
    params = P.load(args.params)
    final = Path(args.out) / args.model / str(steps)
    parts = [final / part_name(i, n) for i in range(n)]
    for i, part in enumerate(parts):
        if not (part / INDEX).is_file():
            raise FileNotFoundError(
                f"missing shard {part}; run sample.py --model {args.model} --steps {steps} "
                f"--shard {i}/{n} first"
            )
    frames = [pd.read_parquet(part / INDEX) for part in parts]
    index = pd.concat(frames, ignore_index=True).sort_values("pair", kind="stable")
    index = index.reset_index(drop=True)
    if index["pair"].tolist() != list(range(params.prompts.eval_pairs)):
        raise ValueError(
            f"the {n} shards of {final} do not hold pairs 0..{params.prompts.eval_pairs - 1} "
            "once each (prompts.eval_pairs); rerun the shards"
        )
    # The parts are hard-linked, not moved: a crash before the swap leaves them intact;
    # the swap replaces the folder, parts included.
    with atomic_dir(final) as tmp:
        for part, frame in zip(parts, frames, strict=True):
            for name in frame["file"]:
                _link_or_copy(part / name, tmp / name)
        index.to_parquet(tmp / INDEX, index=False)
    log.info("merged %d shards into %s (%d images)", n, final, len(index))


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["merge"]:
        merge(argv[1:])
    else:
        sample(argv)


if __name__ == "__main__":
    run_stage(main)
