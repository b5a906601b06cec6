"""Stage sample: images of the evaluation pairs from the teacher (with or without CFG), a student
or a published model of params `compare:` (cdm.baselines).

`python src/sample.py --model MODEL --steps N [--shard i/n]` writes samples/<MODEL>/<N>/
(PNGs named <pair>.png and index.parquet); with --shard, only pairs j with j % n == i, to
samples/<MODEL>/<N>/part-<i>-of-<n>/. `python src/sample.py merge --model MODEL --steps N
--parts n` joins the parts into samples/<MODEL>/<N>/. The sampler is `cdm.sampler`.

`--prompts dpg` samples DPG-Bench's prompts instead (cache/dpg.safetensors, stage cache_dpg):
one pair per prompt, seeded as the evaluation pairs, into samples_dpg/<MODEL>/<N>/.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cdm import params as P
from cdm.cache import cached_prompts
from cdm.cli import parse_shard, run_stage, stage_parser
from cdm.io import atomic_dir
from cdm.samplefiles import INDEX, part_name
from cdm.sampler import join_parts, prepare_set, read_parts

log = logging.getLogger("sample")


def positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


# --prompts: the default output folder of each prompt set.
PROMPT_SETS = {"eval": "samples", "dpg": "samples_dpg"}


def require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no DPG prompt cache at {path}; run the cache_dpg stage first")
    return path


def sample(argv: list[str]) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="teacher_cfg, teacher_nocfg, a method or a compare entry"
    )
    parser.add_argument("--steps", required=True, help="Euler steps (a positive integer)")
    parser.add_argument("--shard", help="i/n: only pairs j with j %% n == i (0-based i < n)")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="eval", help="which prompts")
    parser.add_argument("--out", help="default: samples (eval), samples_dpg (dpg)")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--students", default="models/students")
    parser.add_argument("--cache", default="cache/prompts")
    parser.add_argument("--dpg-cache", default="cache/dpg.safetensors", help="stage cache_dpg's")
    args = parser.parse_args(argv)
    steps = positive_int(args.steps, "--steps")
    shard = parse_shard(args.shard)
    params = P.load(args.params)
    prompts_file = None  # the cache's eval set
    pairs = list(range(params.prompts.eval_pairs))
    if args.prompts == "dpg":  # one image per DPG prompt: pair j is item j (dpg.item_ids_of)
        prompts_file = require(Path(args.dpg_cache))
        pairs = list(range(len(cached_prompts(prompts_file))))
    out = Path(args.out or PROMPT_SETS[args.prompts]) / args.model / str(steps)
    if shard is not None:
        pairs = [j for j in pairs if j % shard[1] == shard[0]]
        out = out / part_name(*shard)
    # Every input is read before the folder is made: an error leaves nothing behind.
    job = prepare_set(
        args.model, steps, params, pairs, Path(args.teacher), Path(args.students),
        Path(args.cache), prompts_file=prompts_file,
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        index = job.run(tmp)
        index.to_parquet(tmp / INDEX, index=False)
    log.info(
        "%s @ %d steps: %d images (%.1f images/s) -> %s",
        args.model, steps, len(index), 1 / index["seconds"].mean(), out,
    )  # fmt: skip


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
    parts = read_parts(final, args.model, steps, n, params.prompts.eval_pairs)
    with atomic_dir(final) as tmp:  # the swap replaces the folder, parts included
        join_parts(parts, tmp).to_parquet(tmp / INDEX, index=False)
    log.info("merged %d shards into %s", n, final)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["merge"]:
        merge(argv[1:])
    else:
        sample(argv)


if __name__ == "__main__":
    run_stage(main)
