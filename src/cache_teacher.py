"""Stage cache_teacher: encode the training, evaluation and null prompts once.

Distillation and sampling read only these files and never load a text encoder. The training
set goes to cache/prompts/train/ in shards of `cache_teacher.shard_prompts` prompts (plus
index.json), which distillation reads batch by batch; eval and null are one file each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tqdm import tqdm

from cdm import params as P
from cdm.backends import load_backend
from cdm.cache import FILES, SHARDED, read_prompts_file, save_condition, save_sharded
from cdm.cli import run_stage, stage_parser
from cdm.conditioning import Condition
from cdm.io import atomic_dir
from cdm.world.prompts import all_prompts, check_renderable

log = logging.getLogger("cache_teacher")


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


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", default="models/teacher", help="resolved teacher (prepare_teacher)"
    )
    parser.add_argument("--out", default="cache/prompts")
    args = parser.parse_args()
    params = P.load(args.params)
    sets = prompt_sets(params)
    backend = load_backend(params.teacher.backend, args.teacher, params.teacher.resolution)
    for name in ("train", "eval"):  # said once per run: the encoders see these prompts cut
        cut = backend.truncated(sets[name])
        if cut:
            log.warning(
                "%d of %d %s prompts are longer than the text encoder takes and are truncated",
                cut, len(sets[name]), name,
            )  # fmt: skip
    with atomic_dir(args.out) as tmp:
        for name in FILES:
            batch_size = params.cache_teacher.batch_size
            if name in SHARDED:  # encoded and written shard by shard: memory stays flat
                batches = encode_batches(backend, sets[name], batch_size, name)
                index = save_sharded(tmp / name, batches, params.cache_teacher.shard_prompts)
                log.info(
                    "%s: %d prompts in %d shards, embeds %s", name, index["count"],
                    len(index["shards"]), tuple(index["embeds_shape"]),
                )  # fmt: skip
                continue
            cond = encode_all(backend, sets[name], batch_size, name)
            save_condition(tmp / f"{name}.safetensors", cond, sets[name])
            log.info("%s: %d prompts, embeds %s", name, len(cond), tuple(cond.embeds.shape))


if __name__ == "__main__":
    run_stage(main)
