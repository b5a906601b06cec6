"""A folder's manifest: every file's size and sha256, written by whoever completes the folder
and checked before the folder is used, so a truncated, missing or altered file is refused
in one line instead of being read (or, never read, passed on).

Checkpoints (cdm.checkpoints) hash their small files only; an exported student
(models/students/<method>, written by the distill stage) hashes every file, the text encoders
the sampler never reads included: an export is whole or refused. A manifest proves only that
nothing changed since its writer wrote it, not who that writer was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(folder: Path, hashed_bytes: int | None = None) -> None:
    """Record every file's size, and the sha256 of those up to `hashed_bytes` (None: all)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        hashed = hashed_bytes is None or size <= hashed_bytes
        files[path.relative_to(folder).as_posix()] = {
            "size": size, "sha256": sha256(path) if hashed else None,
        }  # fmt: skip
    # A new file, never written through: in a hard-linked copy (publish) the old name is
    # shared with the original folder, whose manifest must stay its own.
    (folder / MANIFEST).unlink(missing_ok=True)
    (folder / MANIFEST).write_text(json.dumps(files, indent=0))


def damage(folder: Path) -> str | None:
    """Why `folder` disagrees with its manifest (no manifest, a missing, truncated or altered
    file), or None when every recorded file is as written."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST}"
    try:
        recorded = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid JSON"
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} is truncated or altered ({path.stat().st_size} of {want['size']} bytes)"
        if want["sha256"] is not None and sha256(path) != want["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def check_export(folder: Path, fix: str) -> None:
    """Raise ValueError (one line) unless the exported student at `folder` is whole."""
    problem = damage(folder)
    if problem is not None:
        raise ValueError(f"{folder} is not a whole exported student ({problem}); {fix}")
