"""A prompts file (`prompts.*_file`): one prompt per non-empty line, UTF-8. Read by the
validator and the prompt cache; no torch here, so `cdm.validate` starts in a moment."""

from __future__ import annotations

from pathlib import Path

from cdm.params import not_utf8


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a missing or empty file is an input error."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f"prompts file {path} is a folder; set prompts.*_file to a text file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts file {path} does not exist; set prompts.*_file to a text file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompts file {not_utf8(path, exc)}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} is empty; it needs one prompt per line")
    return prompts
