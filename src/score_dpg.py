"""Stage score_dpg: DPG-Bench scores of every DPG sample set, to results/dpg.json.

Reads samples_dpg/<model>/<steps>/ of each set of `cdm.params.dpg_sets` (Table 1's sets) and
prompts.dpg_file's question graphs, and asks the VQA runner (`dpg.vqa`; by default mPLUG in
.venv-dpg, `python -m cdm.metrics.dpg_env` creates it) every question through
`cdm.metrics.dpg_vqa.SubprocessVQA`. results/dpg.json holds {model: {steps: {dpg_score,
dpg_score_ci, conventions}}}, the entries the report merges into Table 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_write_json
from cdm.metrics import dpg
from cdm.metrics.dpg_env import ENV, python_of
from cdm.metrics.dpg_vqa import SubprocessVQA

log = logging.getLogger("score_dpg")
INDEX = "index.parquet"


def vqa_command(params: P.Params) -> list[str]:
    """`dpg.vqa`, or the mPLUG runner in its own environment."""
    if params.dpg.vqa:
        return list(params.dpg.vqa)
    python = python_of(ENV)
    if not python.exists():
        raise FileNotFoundError(
            f"no DPG VQA environment at {ENV}; run `python -m cdm.metrics.dpg_env` on a login node"
        )
    return [str(python), "-m", "cdm.metrics.dpg_vqa", "--model", dpg.MODEL_ID]


def read_sets(samples: Path, wanted: list[tuple[str, int]]) -> list[tuple]:
    """(model, steps, folder, pairs, files) of every DPG set, as dpg.score_sets takes them."""
    sets = []
    for model, steps in wanted:
        folder = samples / model / str(steps)
        if not (folder / INDEX).is_file():
            raise FileNotFoundError(
                f"no DPG sample set at {folder}; run `python src/sample.py --prompts dpg "
                f"--model {model} --steps {steps}` (stage sample_dpg) first"
            )
        index = pd.read_parquet(folder / INDEX)
        sets.append((model, steps, folder, index["pair"].tolist(), index["file"].tolist()))
    return sets


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", default="samples_dpg")
    parser.add_argument("--out", default="results/dpg.json")
    args = parser.parse_args()
    params = P.load(args.params)
    wanted = P.dpg_sets(params)
    if not wanted:
        raise ValueError(
            "no DPG-Bench sets: set prompts.dpg_file on a real run (docs/real-runs.md)"
        )
    items = dpg.load_items(Path(params.prompts.dpg_file))
    sets = read_sets(Path(args.samples), wanted)  # all checked before the VQA model loads
    with SubprocessVQA(vqa_command(params)) as vqa:
        metrics = dpg.score_sets(sets, items, vqa, params.score.n_boot, seed=params.seed)
    for by_steps in metrics.values():  # the conventions beside every number
        for entry in by_steps.values():
            entry["conventions"] = dpg.conventions()
    atomic_write_json(Path(args.out), metrics)
    log.info("DPG-Bench: %d sets -> %s", len(sets), args.out)


if __name__ == "__main__":
    run_stage(main)
