"""`python -m cdm.validate [params.yaml]`: the params and the inputs they name, checked before
any stage runs (and so before an orchestrator removes any output).

Snakemake calls it at start (onstart), DVC as the `validate` stage every other stage is
downstream of, `make run` first. It checks the schema (cdm.params), the files the params
name that no stage produces (the teacher and judge folders, the prompt files, every
prompt renderable by the shapes world), that every finished result a later stage reads
still parses (a corrupt one would fail that stage after its old outputs were removed), and
takes the project lock (cdm.lock) for the orchestrator that started it. A problem is one
line and exit 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cdm import params as P
from cdm.hub import HUB_ID
from cdm.io import read_json
from cdm.lock import ProjectBusy, claim
from cdm.metrics.dpg import load_items
from cdm.promptsfile import read_prompts_file
from cdm.world.prompts import check_renderable


def check_inputs(params: P.Params) -> None:
    """Raise ValueError / FileNotFoundError (one line) for an input no stage can make."""
    teacher, prompts = params.teacher, params.prompts
    world = teacher.backend == "shapes"
    if not Path(teacher.path).exists() and (world or not HUB_ID.match(teacher.path)):
        kind = (
            "the world teacher folder (`make world-teacher`)"
            if world
            else "a local pipeline folder or a hub id (owner/name)"
        )
        raise FileNotFoundError(f"teacher.path '{teacher.path}' does not exist; expected {kind}")
    if Path(teacher.path).exists() and not Path(teacher.path).is_dir():
        raise FileNotFoundError(
            f"teacher.path '{teacher.path}' is a file; expected a model folder "
            "(the world teacher's, or a diffusers pipeline's with model_index.json)"
        )
    if teacher.lora is not None and not Path(teacher.lora.path).is_file():
        state = "is a folder" if Path(teacher.lora.path).is_dir() else "does not exist"
        raise FileNotFoundError(
            f"teacher.lora.path '{teacher.lora.path}' {state}; expected your LoRA's "
            "diffusers/peft .safetensors file"
        )
    if world and not Path(params.judge.path).is_dir():
        state = "is a file" if Path(params.judge.path).exists() else "does not exist"
        raise FileNotFoundError(
            f"judge.path '{params.judge.path}' {state}; expected the judge folder: restore it "
            "from git or run `make world-judge`"
        )
    # The real runs' eval_file is fetched (fetch_prompts); every other named file must exist.
    files = {"train_file": prompts.train_file, "eval_file": prompts.eval_file if world else None}
    for key, name in files.items():
        if name is None:
            continue
        if not Path(name).exists():
            what = "training" if key == "train_file" else "evaluation"
            raise FileNotFoundError(
                f"prompts.{key} {name} does not exist; put the {what} prompts there, one per line"
            )
        try:
            lines = read_prompts_file(name)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"prompts.{key}: {exc}") from None
        if world:
            check_renderable(lines, f"prompts.{key} {name}")

    check_dpg(params)


def check_dpg(params: P.Params) -> None:
    """A DPG-Bench CSV already in place must parse: cache_dpg and score_dpg read it only after
    every set was sampled. A missing one is fetched (Snakemake's fetch_dpg, `cdm.fetch dpg`)."""
    if not P.dpg_sets(params) or not Path(params.prompts.dpg_file).exists():
        return
    try:
        load_items(Path(params.prompts.dpg_file))
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0]
        raise ValueError(
            f"prompts.dpg_file {params.prompts.dpg_file}: {reason}; fetch it again with "
            "`python -m cdm.fetch dpg`"
        ) from None


# Finished results a later stage reads, and the stage that writes each.
RESULTS = {"metrics.json": "score", "teacher.json": "prepare_teacher", "ablation.json": "ablation"}
PARQUET_MAGIC = b"PAR1"


def check_results(results: Path) -> None:
    """Raise ValueError (one line) for a finished result that no longer parses: the stage
    reading it would fail only after its orchestrator removed that stage's old outputs."""
    for name, stage in RESULTS.items():
        if (results / name).exists():
            read_json(results / name, f"delete it so that the {stage} stage writes it again")
    scores = results / "scores.parquet"
    if scores.is_file():
        data = scores.read_bytes()
        if len(data) < 8 or data[:4] != PARQUET_MAGIC or data[-4:] != PARQUET_MAGIC:
            raise ValueError(
                f"{scores} is not a parquet file (truncated?); delete it so that the score "
                "stage writes it again"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=P.DEFAULT_PATH)
    parser.add_argument(
        "--record", help="write 'valid' here on success (DVC's stage output, always the same)"
    )
    parser.add_argument("--no-lock", action="store_true", help="check only; take no lock")
    args = parser.parse_args(argv)
    try:
        params = P.load(args.params)
        check_inputs(params)
        check_results(Path(args.params).parent / "results")
        if not args.no_lock:
            claim(Path(args.params).resolve().parent)
    except (P.ParamsError, ValueError, FileNotFoundError, ProjectBusy) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text("valid\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
