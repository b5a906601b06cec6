"""Keep a Snakemake run's finished outputs until it succeeds.

Snakemake removes a job's old outputs when it starts the job, so a failure no check can
foresee (a weight file gone bad, a full disk, a job killed for memory) would cost the
previous result. The Snakefile's onstart links every finished output into `.cdm-kept/`
(hard links: nothing is copied, no space is taken); onerror puts back what a failed job
removed; onsuccess drops the links. What a job replaced with a complete new output stays
new: a folder is entered only if it is the folder that was there at the start (same inode),
so old files never mix into a new set. DVC needs none of this: its outputs are
`persist: true` and every stage replaces an output only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STORE = ".cdm-kept"
MANIFEST = "folders.json"  # folder -> its inode at the start
# Where the DAG's outputs live (both pipelines' and the ablation's).
ROOTS = ("results", "models", "samples", "samples_dpg", "cache", "logs", "ablation")


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
        (store / MANIFEST).write_text(json.dumps(folders))
    return files


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
    """Put back every kept output missing now, then drop the store; returns what came back."""
    root = Path(root)
    store = root / STORE
    if not (store / MANIFEST).is_file():
        return []
    folders = json.loads((store / MANIFEST).read_text())
    back: list[str] = []
    for top in sorted(p.name for p in store.iterdir() if p.name != MANIFEST):
        _put_back(store, root, top, folders, back)
    discard(root)
    return back


def discard(root: Path = Path(".")) -> None:
    shutil.rmtree(Path(root) / STORE, ignore_errors=True)
