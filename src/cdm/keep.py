"""Keep a Snakemake run's finished outputs until it succeeds.

Snakemake removes a job's old outputs when it starts the job, so a failure no check can
foresee (a weight file gone bad, a full disk, a job killed for memory) would cost the
previous result. The Snakefile's onstart links every finished output into `.cdm-kept/`
(hard links: nothing is copied, no space is taken); onerror puts back what a failed job
removed; onsuccess drops the links. What a job replaced with a complete new output stays
new: a folder is entered only if it is the folder that was there at the start (same inode),
so old files never mix into a new set. Snakemake's record of an output comes back with it,
so a rerun still sees what changed since it was made. DVC needs none of this: its outputs are
`persist: true` and every stage replaces an output only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from base64 import urlsafe_b64decode
from pathlib import Path

STORE = ".cdm-kept"
MANIFEST = "folders.json"  # folder -> its inode at the start
# Where the DAG's outputs live (both pipelines' and the ablation's).
ROOTS = ("results", "models", "samples", "samples_dpg", "cache", "logs", "ablation")
# Snakemake's record of each output (the params and code it was made with). A failed job
# leaves the record of the run that failed (its params), so an output put back without its
# own record looks up to date to the next run, which then would not rerun a job whose params
# changed. Copied, not linked: Snakemake rewrites a record in place.
RECORDS = Path(".snakemake/metadata")
KEPT_RECORDS = "snakemake-records"  # beside the outputs in the store


def _link(src: Path, dst: Path, folders: dict[str, int], rel: str) -> int:
    """Hard-link `src` (a file, a link or a folder tree) to `dst`; record folder inodes."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir(parents=True, exist_ok=True)
        folders[rel] = src.stat().st_ino
        return sum(_link(c, dst / c.name, folders, f"{rel}/{c.name}") for c in src.iterdir())
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    else:
        os.link(src, dst)
    return 1


def snapshot(root: Path = Path("."), roots: tuple[str, ...] = ROOTS) -> int:
    """Link the outputs under `roots` into `root/.cdm-kept` (the previous one dropped first);
    returns how many files it holds. A filesystem without hard links keeps nothing."""
    store = Path(root) / STORE
    discard(root)
    folders: dict[str, int] = {}
    files = 0
    try:
        for name in roots:
            src = Path(root) / name
            if src.exists() and not src.is_symlink():
                files += _link(src, store / name, folders, name)
    except OSError:  # no hard links here (another filesystem): keep nothing, as before
        discard(root)
        return 0
    if store.is_dir():
        if (Path(root) / RECORDS).is_dir():
            shutil.copytree(Path(root) / RECORDS, store / KEPT_RECORDS, symlinks=True)
        (store / MANIFEST).write_text(json.dumps(folders))
    return files


def _record_of(rel: Path) -> str | None:
    """The output a Snakemake record names: its file name is the path in urlsafe base64,
    split into '@'-prefixed folders where longer than a file name may be."""
    try:
        return urlsafe_b64decode("".join(p.removeprefix("@") for p in rel.parts)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def _put_back_records(store: Path, root: Path, back: list[str]) -> None:
    """The kept record of every output put back (or of one inside a folder put back)."""
    kept = store / KEPT_RECORDS
    for record in (p for p in kept.rglob("*") if p.is_file()):
        output = _record_of(record.relative_to(kept))
        if output and any(output == b or output.startswith(b + "/") for b in back):
            live = root / RECORDS / record.relative_to(kept)
            live.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(record, live)


def _put_back(store: Path, root: Path, rel: str, folders: dict[str, int], back: list[str]):
    kept, live = store / rel, root / rel
    if not live.exists() and not live.is_symlink():
        live.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, live)  # a rename: the file (and its time) as it was
        back.append(rel)
    elif kept.is_dir() and not kept.is_symlink() and live.is_dir():
        if live.stat().st_ino == folders.get(rel):  # the same folder, some files removed
            for child in sorted(kept.iterdir()):
                _put_back(store, root, f"{rel}/{child.name}", folders, back)


def restore(root: Path = Path(".")) -> list[str]:
    """Put back every kept output missing now, with Snakemake's record of it, then drop the
    store; returns what came back."""
    root = Path(root)
    store = root / STORE
    if not (store / MANIFEST).is_file():
        return []
    folders = json.loads((store / MANIFEST).read_text())
    back: list[str] = []
    for top in sorted(p.name for p in store.iterdir() if p.name not in (MANIFEST, KEPT_RECORDS)):
        _put_back(store, root, top, folders, back)
    _put_back_records(store, root, back)
    discard(root)
    return back


def discard(root: Path = Path(".")) -> None:
    shutil.rmtree(Path(root) / STORE, ignore_errors=True)
