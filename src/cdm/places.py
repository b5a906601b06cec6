"""Where the project may write: its own outputs, and folders a user names that it owns.

The stages replace their outputs whole (cdm.io.atomic_dir), so a path a user types (publish's
--out, a world model's `out` param) must never name a folder the project did not make: the
project's root, one of its outputs (or an ancestor of them), or a place outside it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

# Folders the pipeline writes and replaces: a user-named output may not be one, hold one, or
# lie in one.
OUTPUTS = ("models", "results", "samples", "samples_dpg", "cache", "checkpoints", "logs")
# publish's mark on a folder it made: only such a folder (or a new or empty one) is replaced.
PUBLISH_MARKER = ".cdm-published"
# train_world's mark on a folder it made for --out (the configured `out` params need none:
# they are checked to lie inside the project, inside_project).
TRAINED_MARKER = ".cdm-trained"
# The project's own folders, which a configured output may not be nor hold.
SOURCES = ("src/cdm/world/render.py", "workflow", "configs", "docs", "tests", "bench", "data")


def project_roots() -> set[Path]:
    """The working folder (stages run from the project's root) and the checkout holding this
    package, when it is one."""
    roots = {Path.cwd().resolve()}
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "params.yaml").is_file():
        roots.add(checkout)
    return roots


def _clash(out: Path, root: Path) -> str | None:
    """What `out` (resolved) would overwrite of the project at `root`, if anything."""
    if root.is_relative_to(out):
        return "the project's root" if out == root else "an ancestor of the project"
    for name in OUTPUTS:
        output = root / name
        if output.is_relative_to(out) or out.is_relative_to(output):
            return f"the project's output folder {name}/"
    return None


def check_publish_out(out: Path) -> None:
    """Raise ValueError (one line) unless `out` is a new or empty folder, or one publish made
    (its marker inside), away from the project's root and outputs."""
    check_owned_out(out, "publish", PUBLISH_MARKER)


def check_owned_out(out: Path, writer: str, marker: str) -> None:
    """Raise ValueError (one line) unless `out`, a folder `writer` replaces whole, is new or
    empty, or one `writer` made (its `marker` inside), away from the project's root and
    outputs."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a link; name a real folder (a new one, e.g. exports/M)")
    real = out.resolve()
    for root in project_roots():
        clash = _clash(real, root)
        if clash:
            raise ValueError(
                f"--out {out} is {clash}; {writer} writes into a folder of its own "
                "(e.g. exports/<name>)"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ValueError(
            f"--out {out} holds files {writer} did not write; name a new or empty folder "
            f"({writer} replaces only a folder it made, marked by {marker})"
        )


def inside_project(value: str) -> str:
    """`value` as a configured output folder: relative, below the project's root, and neither
    the root nor one of its outputs (Snakemake removes a rule's output before the job)."""
    path = PurePosixPath(value)
    fix = "use a new folder inside the project (the defaults are in src/cdm/world/pretrained/)"
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == ".":
        raise ValueError(f"'{value}' is not a folder inside the project; {fix}")
    first = path.parts[0]
    if (
        first in OUTPUTS
        or first.startswith(".")
        or any(PurePosixPath(s).is_relative_to(path) for s in SOURCES)
    ):
        raise ValueError(f"'{value}' would replace a folder the project needs; {fix}")
    return value
