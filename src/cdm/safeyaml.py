"""What a params or overlay file may use of YAML, checked before anything is built from it.

Params need plain mappings, lists and scalars only. Anchors and aliases let a few lines expand
to billions of values (a "billion laughs" file hangs every reader), and tags such as
`!!python/object` ask a loader to construct objects: both are refused from the event stream,
which costs time linear in the file and expands nothing; so is a file over MAX_BYTES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.events import AliasEvent, NodeEvent

MAX_BYTES = 1_000_000  # params.yaml is a few KB; the largest overlay well under 100 KB
# Tags of plain data (YAML 1.2's core schema, plus the collections); any other is refused.
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")} | {
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


class YAMLRefused(ValueError):
    """A YAML file that uses more than plain data; the message is one line."""


def check_size(size: int) -> None:
    if size > MAX_BYTES:
        raise YAMLRefused(
            f"is {size:,} bytes, over the {MAX_BYTES:,} a params file may hold; "
            "params and overlays are a few KB"
        )


def check_plain(text: str) -> None:
    """Raise YAMLRefused (one line) for a document over MAX_BYTES, with an anchor or alias,
    or with a tag that is not plain data. Syntax errors are left to the loader."""
    check_size(len(text.encode("utf-8", errors="replace")))
    for event in YAML(typ="safe", pure=True).parse(text):
        line = f"line {event.start_mark.line + 1}" if event.start_mark else "a line"
        if isinstance(event, AliasEvent) or (isinstance(event, NodeEvent) and event.anchor):
            raise YAMLRefused(
                f"{line} uses a YAML anchor or alias (&, *); params take no aliases: "
                "write each value out"
            )
        tag = getattr(event, "tag", None)
        if tag is not None and str(tag) not in PLAIN_TAGS:
            raise YAMLRefused(
                f"{line} has the tag {tag}: tags that construct objects are refused; "
                "params hold plain values only"
            )


def parse(text: str) -> Any:
    """YAML 1.2 text as plain Python (2e-5 is a number, as DVC reads it, where PyYAML's 1.1
    reads text); refused first (YAMLRefused) if it holds more than plain data."""
    check_plain(text)
    return YAML(typ="safe", pure=True).load(text)


def read(path: str | Path) -> Any:
    """A YAML file as plain Python (see parse); one over MAX_BYTES is refused unread."""
    check_size(Path(path).stat().st_size)
    return parse(Path(path).read_text(encoding="utf-8"))
