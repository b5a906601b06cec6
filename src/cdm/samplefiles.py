"""A sample set's files, below both samplers (`cdm.sampler`, `cdm.baselines`) and the report:
the PNG of each pair, the index's columns and the names in the set's folder.

Pair j of every set starts from the noise of seed NOISE_SEED_BASE + j, so sets compare image
by image. No torch here: the report and the scorers read sets without it.
"""

from __future__ import annotations

from typing import Any

NOISE_SEED_BASE = 1_000_000
INDEX = "index.parquet"
RECIPE = "recipe.json"  # written beside a compare set's images: what was loaded, with hashes
COLUMNS = ["prompt", "pair", "seed", "model", "steps", "nfe", "seconds", "file", "dtype"]


def part_name(i: int, n: int) -> str:
    return f"part-{i}-of-{n}"


def png_name(pair: int) -> str:
    return f"{pair:05d}.png"


def dtype_name(dtype: Any) -> str:
    """'float32' of torch.float32 (the index's dtype column)."""
    return str(dtype).removeprefix("torch.")


def save_png(image, target) -> None:
    """One uint8 (H, W, 3) image as PNG, to a path or a file object (bench/sampling.py)."""
    from PIL import Image

    Image.fromarray(image).save(target, format="PNG")
