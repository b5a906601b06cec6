"""Stage cache_teacher: encode the training, evaluation and null prompts once.

Distillation and sampling read only these files and never load a text encoder.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from cdm import params as P
from cdm.backends import load_backend
from cdm.cache import FILES, read_prompts_file, save_condition
from cdm.cli import run_stage, stage_parser
from cdm.conditioning import Condition
from cdm.io import atomic_dir
from cdm.world.prompts import all_prompts

log = logging.getLogger("cache_teacher")


def prompt_sets(params: P.Params) -> dict[str, list[str]]:
    """Unique prompts of each set; the world's own prompts where no file is given."""
    cfg = params.prompts
    train = read_prompts_file(cfg.train_file) if cfg.train_file else all_prompts()
    evals = read_prompts_file(cfg.eval_file) if cfg.eval_file else all_prompts()
    return {"train": list(dict.fromkeys(train)), "eval": list(dict.fromkeys(evals)), "null": [""]}


@torch.no_grad()
def encode_all(backend, prompts: list[str], batch_size: int, name: str) -> Condition:
    parts = [
        backend.encode(prompts[i : i + batch_size])
        for i in tqdm(range(0, len(prompts), batch_size), desc=f"encode {name}", mininterval=5)
    ]
    return Condition.cat(parts)


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
    with atomic_dir(args.out) as tmp:
        for name in FILES:
            cond = encode_all(backend, sets[name], params.cache_teacher.batch_size, name)
            save_condition(tmp / f"{name}.safetensors", cond, sets[name])
            log.info("%s: %d prompts, embeds %s", name, len(cond), tuple(cond.embeds.shape))


if __name__ == "__main__":
    run_stage(main)
