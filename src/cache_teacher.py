"""Stage cache_teacher: encode the training, evaluation and null prompts once.

Distillation and sampling read only these files and never load a text encoder. The training
set goes to cache/prompts/train/ in shards of `cache_teacher.shard_prompts` prompts (plus
index.json), which distillation reads batch by batch; eval and null are one file each.

The shards are written into cache/prompts.partial/ and kept there until the whole cache is
done, then it becomes cache/prompts: a run that was stopped resumes, encoding only the shards
not yet written. `--processes N` encodes the shards on N GPUs at once (one process per GPU;
default: every GPU the job sees); `--part i/n` encodes only shards k with k % n == i (one of
n jobs), and a plain run after the n jobs finishes the cache. The cache's size is printed
before any encoding.

`--dpg FILE` (stage cache_dpg) encodes only DPG-Bench's prompts (prompts.dpg_file), one per
item in CSV order, into FILE: the DPG sample sets read it as the others read eval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from cdm import params as P
from cdm.backends import load_backend
from cdm.cache import encode_shards, index_shards, row_bytes, save_condition
from cdm.cli import parse_shard, run_stage, stage_parser
from cdm.conditioning import Condition
from cdm.io import atomic_file, atomic_write_json
from cdm.metrics.dpg import load_items
from cdm.promptsfile import read_prompts_file
from cdm.world.prompts import all_prompts, check_renderable

log = logging.getLogger("cache_teacher")
SPEC = "inputs.json"  # what the partial cache was encoded from: a resume needs the same


def prompt_sets(params: P.Params) -> dict[str, list[str]]:
    """Unique prompts of each set; the world's own prompts where no file is given."""
    cfg = params.prompts
    train = read_prompts_file(cfg.train_file) if cfg.train_file else all_prompts()
    evals = read_prompts_file(cfg.eval_file) if cfg.eval_file else all_prompts()
    if params.teacher.backend == "shapes":  # caught here, not at score after all sampling
        for name, prompts in (("train", train), ("eval", evals)):
            check_renderable(prompts, getattr(cfg, f"{name}_file") or name)
    return {"train": list(dict.fromkeys(train)), "eval": list(dict.fromkeys(evals)), "null": [""]}


@torch.no_grad()
def encode_batches(
    backend, prompts: list[str], batch_size: int, name: str
) -> Iterator[tuple[Condition, list[str]]]:
    """Each batch's embeddings (on CPU) with its prompts, encoded as they are asked for."""
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"encode {name}", mininterval=5):
        batch = prompts[i : i + batch_size]
        yield backend.encode(batch).to("cpu"), batch


def encode_all(backend, prompts: list[str], batch_size: int, name: str) -> Condition:
    return Condition.cat([c for c, _ in encode_batches(backend, prompts, batch_size, name)])


def inputs(params: P.Params, teacher: Path, train: list[str]) -> dict:
    """What the shards depend on: the teacher's files (size, mtime), the backend and
    resolution, the shard and batch sizes and the training prompts."""
    root = teacher.resolve()
    files = sorted(
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in root.rglob("*")
        if f.is_file()
    )
    digest = hashlib.sha256(json.dumps([files, train]).encode()).hexdigest()
    cfg = params.cache_teacher
    return {
        "backend": params.teacher.backend,
        "resolution": params.teacher.resolution,
        "shard_prompts": cfg.shard_prompts,
        "batch_size": cfg.batch_size,
        "teacher_and_prompts_sha256": digest,
    }


def claim_partial(work: Path, spec: dict, part: bool) -> None:
    """Keep `work` if it was started from the same inputs; otherwise start over (a part job
    refuses instead: other parts may be writing there)."""
    path = work / SPEC
    if path.is_file() and json.loads(path.read_text()) != spec:
        if part:
            raise ValueError(
                f"{work} was started from other inputs (teacher, prompts or cache_teacher "
                "params); remove it, or run cache_teacher without --part"
            )
        log.info("%s was started from other inputs: starting over", work)
        shutil.rmtree(work)
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, spec)


def run_parts(n: int, argv: list[str]) -> None:
    """`--part i/n` in n processes, one per GPU (CUDA_VISIBLE_DEVICES=i); all must finish."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--part", f"{i}/{n}"],
            env=os.environ | {"CUDA_VISIBLE_DEVICES": str(i)},
        )
        for i in range(n)
    ]
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"cache_teacher parts {failed} of {n} failed; rerun to resume")


def announce_size(backend, sets: dict[str, list[str]], out: Path, work: Path) -> None:
    """The cache's size, and a one-line error if its disk cannot hold what is left to write."""
    per_prompt = row_bytes(backend.encode([""]))
    total = per_prompt * sum(len(p) for p in sets.values())
    written = sum(f.stat().st_size for f in work.rglob("*.safetensors"))
    log.info(
        "prompt cache: %d prompts x %d bytes = %d bytes (%.1f GB) at %s; %.1f GB already written",
        sum(len(p) for p in sets.values()), per_prompt, total, total / 1e9, out, written / 1e9,
    )  # fmt: skip
    free = shutil.disk_usage(work).free
    if total - written > free:
        raise OSError(
            f"the prompt cache needs {(total - written) / 1e9:.1f} GB more but "
            f"{work} has {free / 1e9:.1f} GB free; free space, or see the README on "
            "encoding without a prompt cache"
        )


def cache_dpg(params: P.Params, teacher: str, out: Path) -> None:
    """DPG-Bench's prompts, item by item in CSV order (pair j of a DPG set is item j mod n)."""
    if not params.prompts.dpg_file:
        raise ValueError("prompts.dpg_file is null: no DPG-Bench prompts to encode; set it first")
    prompts = [item.prompt for item in load_items(Path(params.prompts.dpg_file)).values()]
    backend = load_backend(params.teacher.backend, teacher, params.teacher.resolution)
    cond = encode_all(backend, prompts, params.cache_teacher.batch_size, "dpg")
    with atomic_file(out) as tmp:
        save_condition(tmp, cond, prompts)
    log.info("dpg: %d prompts, embeds %s -> %s", len(cond), tuple(cond.embeds.shape), out)


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", default="models/teacher", help="resolved teacher (prepare_teacher)"
    )
    parser.add_argument("--out", default="cache/prompts")
    parser.add_argument("--part", help="i/n: encode only training shards k with k %% n == i")
    parser.add_argument("--dpg", help="encode only the DPG-Bench prompts, into this file")
    parser.add_argument(
        "--processes",
        type=int,
        default=max(1, torch.cuda.device_count()),
        help="encode the training shards on N GPUs at once (default: every visible GPU)",
    )
    args = parser.parse_args()
    part = parse_shard(args.part, "--part")
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    params = P.load(args.params)
    if args.dpg:
        cache_dpg(params, args.teacher, Path(args.dpg))
        return
    sets = prompt_sets(params)
    out = Path(args.out)
    work = out.with_name(out.name + ".partial")
    claim_partial(work, inputs(params, Path(args.teacher), sets["train"]), part is not None)
    cfg = params.cache_teacher
    backend = load_backend(params.teacher.backend, args.teacher, params.teacher.resolution)
    if part is None:
        announce_size(backend, sets, out, work)
        for name in ("train", "eval"):  # said once per run: the encoders see these prompts cut
            cut = backend.truncated(sets[name])
            if cut:
                log.warning(
                    "%d of %d %s prompts are longer than the text encoder takes and are truncated",
                    cut, len(sets[name]), name,
                )  # fmt: skip
        if args.processes > 1:
            run_parts(args.processes, ["--params", args.params, "--teacher", args.teacher,
                                       "--out", args.out])  # fmt: skip
    encoded = encode_shards(
        work / "train", sets["train"], cfg.shard_prompts, backend.encode, cfg.batch_size,
        part or (0, 1),
    )  # fmt: skip
    log.info("train: encoded shards %s", encoded or "none (all were written)")
    if part is not None:
        return
    index = index_shards(work / "train", sets["train"], cfg.shard_prompts)
    log.info(
        "train: %d prompts in %d shards, embeds %s", index["count"], len(index["shards"]),
        tuple(index["embeds_shape"]),
    )  # fmt: skip
    for name in ("eval", "null"):
        cond = encode_all(backend, sets[name], cfg.batch_size, name)
        save_condition(work / f"{name}.safetensors", cond, sets[name])
        log.info("%s: %d prompts, embeds %s", name, len(cond), tuple(cond.embeds.shape))
    (work / SPEC).unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)


if __name__ == "__main__":
    run_stage(main)
