"""The report's sample grid: which pairs it shows, and their images from every sample set.

Columns are pairs every set holds, chosen to teach: for the shapes world, pairs whose
prompts together show every shape, colour, position and background (greedy cover); for
real runs, pairs spread evenly over the evaluation prompts. Rows are sample sets, so a
column is one prompt and one noise across every model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cdm.report.tables import model_key
from cdm.world.prompts import ATTRIBUTES, parse_prompt

INDEX = "index.parquet"


def sample_sets(
    samples: Path, wanted: list[tuple[str, int]] | None = None
) -> list[tuple[str, int, Path]]:
    """(model, steps, folder) of every complete sample set, teachers first, then by steps;
    only the (model, steps) in `wanted` (the params' sets) when given: a set the params no
    longer name may still lie on disk."""
    sets = []
    for index in Path(samples).glob(f"*/*/{INDEX}"):
        folder = index.parent
        if folder.parent.name.startswith(".") or not folder.name.isdigit():
            continue
        if wanted is None or (folder.parent.name, int(folder.name)) in wanted:
            sets.append((folder.parent.name, int(folder.name), folder))
    return sorted(sets, key=lambda s: (model_key(s[0]), s[1]))


def _attribute_values(prompt: str) -> set[tuple[str, int]] | None:
    try:
        attrs = parse_prompt(prompt)
    except ValueError:
        return None
    return {(name, getattr(attrs, name)) for name in ATTRIBUTES}


def spanning_pairs(prompts: dict[int, str], n: int) -> list[int]:
    """`n` pairs (ascending) whose prompts span the world's attribute values, each pick the
    lowest pair that shows the most values not yet shown; prompts of real runs (not world
    prompts) give pairs evenly spaced over the list."""
    pairs = sorted(prompts)
    n = min(n, len(pairs))
    values = {p: _attribute_values(prompts[p]) for p in pairs}
    if any(v is None for v in values.values()):
        step = len(pairs) / n if n else 1
        return [pairs[int(i * step)] for i in range(n)]
    chosen: list[int] = []
    seen: set[tuple[str, int]] = set()
    for _ in range(n):
        best = max(
            (p for p in pairs if p not in chosen),
            key=lambda p: (len(values[p] - seen), -p),
        )
        chosen.append(best)
        seen |= values[best]
    return sorted(chosen)


def grid_rows(
    samples: Path, n: int, wanted: list[tuple[str, int]] | None = None
) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """({"model @ N": uint8 (n, H, W, 3)}, the columns' prompts, the columns' pairs) of `n`
    pairs every set holds (of `wanted` when given), chosen by spanning_pairs."""
    sets = sample_sets(samples, wanted)
    files = {}
    for model, steps, folder in sets:
        index = pd.read_parquet(folder / INDEX)
        files[(model, steps, folder)] = dict(
            zip(index["pair"].tolist(), index["file"], strict=True)
        )
    if not files:
        return {}, [], []
    common = set.intersection(*(set(f) for f in files.values()))
    if not common:
        return {}, [], []
    first = pd.read_parquet(sets[0][2] / INDEX).set_index("pair")
    pairs = spanning_pairs({p: str(first.loc[p, "prompt"]) for p in common}, n)
    captions = [str(first.loc[p, "prompt"]) for p in pairs]
    rows = {
        f"{model} @ {steps}": np.stack(
            [np.asarray(Image.open(folder / by_pair[p]).convert("RGB")) for p in pairs]
        )
        for (model, steps, folder), by_pair in files.items()
    }
    return rows, captions, pairs
