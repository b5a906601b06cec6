"""Hugging Face hub names: a hub id (owner/name), and what a hub-cache path says of its
origin (`…/models--owner--name/snapshots/<commit>/…`). Teachers, scorers and the exported
model card read them; nothing here touches the network."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as on the Hugging Face hub
CACHED_REPO = re.compile(r"models--(.+?)--(.+)")  # a hub-cache folder name: models--org--name


def hub_commit(path: str | Path | None) -> str | None:
    """The commit of a file in a hub cache snapshot (…/snapshots/<commit>/…), else None."""
    parts = Path(path).parts if path else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def cached_repo(path: str) -> str | None:
    """org/name of a hub-cache folder (.../models--org--name/snapshots/<revision>)."""
    for part in Path(path).parts:
        found = CACHED_REPO.fullmatch(part)
        if found:
            return f"{found[1]}/{found[2]}"
    return None
