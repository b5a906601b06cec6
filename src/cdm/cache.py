"""Cached text conditioning: safetensors files the later stages read instead of a text encoder."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from cdm.conditioning import Condition

CACHE_DIR = Path("cache/prompts")
FILES = ("train", "eval", "null")


def save_condition(path: Path, cond: Condition, prompts: list[str]) -> None:
    tensors = {"embeds": cond.embeds.contiguous(), "pooled": cond.pooled.contiguous()}
    save_file(tensors, path, metadata={"prompts": json.dumps(prompts)})


def load_condition(path: str | Path) -> tuple[Condition, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing cache file {path}; run the cache_teacher stage first")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    tensors = load_file(path)
    return Condition(tensors["embeds"], tensors["pooled"]), prompts


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is an input error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts file {path} does not exist; set prompts.*_file to a text file"
        )
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} is empty; it needs one prompt per line")
    return prompts
