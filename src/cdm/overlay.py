"""Apply a params overlay: `python -m cdm.overlay configs/ablation.yaml`.

An overlay is a partial params file (configs/*.yaml). Its keys are merged into params.yaml
(mappings recursively, everything else replaced), the result is validated, and params.yaml
is rewritten with its comments kept. Both orchestrators then see the change like any edit,
and `git diff params.yaml` shows exactly what the overlay did.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from cdm import params as P
from cdm.io import atomic_write_text
from cdm.safeyaml import YAMLRefused, check_plain, check_size


def merge(base: Any, overlay: Any) -> Any:
    """Overlay onto base: mappings merge key by key, any other value replaces."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        for key, value in overlay.items():
            base[key] = merge(base[key], value) if key in base else value
        return base
    return overlay


def apply(
    overlay_path: str | Path, params_path: str | Path = "params.yaml", write: bool = True
) -> str:
    """Merge the overlay into params.yaml; returns the new text (written only if valid)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    # No rewrapping: at ruamel's default width (80) every longer line of params.yaml, the
    # overlay's or not, came back folded, and the diff showed far more than the overlay.
    yaml.width = 2**20
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    overlay_path, params_path = Path(overlay_path), Path(params_path)
    if not overlay_path.is_file():
        raise P.ParamsError(f"{overlay_path}: no such overlay; see configs/ for the available ones")
    base = _load(yaml, params_path) or CommentedMap()
    overlay = _load(yaml, overlay_path) or {}
    if not isinstance(overlay, dict):
        raise P.ParamsError(f"{overlay_path}: an overlay must be a mapping of params sections")
    merged = merge(base, overlay)
    P.parse(_plain(merged), f"{params_path} + {overlay_path}")
    out = io.StringIO()
    yaml.dump(merged, out)
    if write:
        atomic_write_text(params_path, out.getvalue())
    return out.getvalue()


def _load(yaml: YAML, path: Path) -> Any:
    """One YAML file; a syntax error or another encoding is one line naming it."""
    if not path.is_file():
        raise P.ParamsError(f"{path}: no such file")
    try:
        check_size(path.stat().st_size)
        text = path.read_text(encoding="utf-8")
        check_plain(text)  # before the round-trip loader builds anything from it
        return yaml.load(text)
    except YAMLRefused as exc:
        raise P.ParamsError(f"{path}: {exc}") from None
    except YAMLError as exc:
        raise P.ParamsError(P.yaml_problem(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise P.ParamsError(P.not_utf8(path, exc)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the result, write nothing")
    args = parser.parse_args(argv)
    try:
        text = apply(args.overlay, args.params, write=not args.dry_run)
    except P.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
