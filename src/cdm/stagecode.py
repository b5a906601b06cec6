"""The code each stage depends on: one record, dvc.yaml's deps, for both orchestrators.

DVC reruns a stage when a dependency's content changes; Snakemake reruns a rule when an
input is newer than its outputs. Both must rerun a stage when the code that computes its
numbers changes (its script and the library modules it names), and neither when an
unrelated module does (a model card's wording must not retrain a student). dvc.yaml names
that code per stage; the Snakemake rules take the same list from here, a directory as the
files in it, so the two DAGs cannot disagree on what a code change reruns.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cdm import safeyaml

SOURCE = "src/"  # deps under it are code; the rest (data, models) each rule names itself


def _files(dep: Path) -> list[str]:
    """A file, or a directory's Python files: its committed weights (the world's pretrained
    teacher and judge) are outputs of the world_* rules, which Snakemake must not tie to."""
    if not dep.is_dir():
        return [dep.as_posix()]
    return sorted(f.as_posix() for f in dep.rglob("*.py") if "__pycache__" not in f.parts)


def stage_code(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The files of `stage`'s code deps in `dvc_file` (a foreach/matrix stage: its `do` or
    body), paths relative to the project root as the file's `wdir` makes them."""
    path = Path(dvc_file)
    stages = safeyaml.read(path)["stages"]  # plain data only: no tags, aliases or bombs
    if stage not in stages:
        raise KeyError(f"no stage {stage!r} in {dvc_file}; the Snakemake rule names a DVC twin")
    body = stages[stage].get("do", stages[stage])
    root = path.parent / body.get("wdir", ".")
    deps = [d for d in body.get("deps", []) if isinstance(d, str) and d.startswith(SOURCE)]
    if not deps:
        raise ValueError(f"stage {stage!r} of {dvc_file} names no code under {SOURCE}")
    return [Path(f).relative_to(root).as_posix() for dep in deps for f in _files(root / dep)]


def digest(stage: str, root: Path | None = None) -> str:
    """sha256 (10 hex digits) of `stage`'s code, names and bytes, in the project at `root`
    (default: the one this package runs from); "" where that project has no dvc.yaml (an
    installed package, whose code a version pins)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    if not (root / "dvc.yaml").is_file():
        return ""
    h = hashlib.sha256()
    for name in stage_code(stage, root / "dvc.yaml"):
        h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()[:10]
