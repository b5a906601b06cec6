"""Checkpoint folders of distillation runs: their names, and pruning them on request.

`checkpoints/<method>-<fingerprint>/` holds one run's `it-*` checkpoints; the fingerprint
hashes the params its student depends on (`cdm.params.student_inputs`). Nothing removes a
run automatically: `python -m cdm.checkpoints prune` deletes the runs that no method of
the current params.yaml would resume (add --dry-run to list them first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from cdm import params as P


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]


def current_runs(params: P.Params) -> set[str]:
    """Folder names of the runs the current params resume: every preset, the params' seed."""
    return {f"{m}-{fingerprint(P.student_inputs(params, m))}" for m in params.methods}


def stale_runs(root: Path, params: P.Params) -> list[Path]:
    keep = current_runs(params)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Remove checkpoints of other params.")
    parser.add_argument("command", choices=["prune"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default="checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list, do not delete")
    args = parser.parse_args(argv)
    try:
        params = P.load(args.params)
    except P.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.root)
    stale = stale_runs(root, params) if root.is_dir() else []
    for run in stale:
        print(("would remove " if args.dry_run else "removing ") + str(run))
        if not args.dry_run:
            shutil.rmtree(run)
    if not stale:
        print(f"nothing to prune under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
