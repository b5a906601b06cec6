"""`python -m cdm.publish <method> [--out exports/<method>]`: a student ready to upload.

The distill stage's `models/students/<method>/` is a pipeline output the orchestrators track,
so the report never writes into it. Publishing links it (hard links: no second copy of the
weights) into its own folder and adds the run's results to that copy's model card: the
method's metrics at every step count, with their conventions, and the report's sample grid.
Run it after the report. It writes only into a new or empty folder, or one it made before
(its marker, cdm.places.PUBLISH_MARKER), which a rerun replaces; anything else is refused.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from cdm import manifest
from cdm.backends.export import add_results_to_card
from cdm.backends.pipelines import link_tree
from cdm.io import atomic_dir, read_json
from cdm.manifest import check_export
from cdm.places import PUBLISH_MARKER, check_publish_out

SKIPPED = ("conventions", "skipped")  # long per-metric records: the report holds them


def card_metrics(metrics: dict[str, Any], method: str) -> dict[str, Any]:
    """{steps: {metric: value}} of one method, for the card's table."""
    if method not in metrics:
        known = ", ".join(sorted(metrics))
        raise ValueError(f"results/metrics.json has no '{method}'; scored sets: {known}")
    return {
        f"{steps} steps": {k: v for k, v in entry.items() if k not in SKIPPED}
        for steps, entry in sorted(metrics[method].items(), key=lambda kv: float(kv[0]))
    }


def publish(method: str, students: Path, results: Path, out: Path) -> Path:
    check_publish_out(out)  # atomic_dir replaces `out` whole: never a folder we did not make
    student = students / method
    # The shapes world's export (cdm.backends.shapes.export) is a toy model: no pipeline.
    if not (student / "model_index.json").is_file() and (student / "inference.json").is_file():
        raise ValueError(
            f"{student} is a shapes-world student (teacher.backend: shapes), a toy model with "
            "no diffusers pipeline or model card; publish exports sd3, longcat, qwen-image and "
            "flux2-klein students only"
        )
    if not (student / "model_index.json").is_file():
        raise FileNotFoundError(f"{student} holds no exported student; run distill for {method}")
    check_export(student, f"delete it and rerun the pipeline (distill rebuilds {method})")
    table = card_metrics(read_json(results / "metrics.json", "rerun the score stage"), method)
    grid = results / "plots" / "samples.png"
    with atomic_dir(out) as tmp:
        link_tree(student, tmp, fallback="copy", skip=("README.md", manifest.MANIFEST))
        shutil.copyfile(student / "README.md", tmp / "README.md")  # edited: never a link
        add_results_to_card(tmp, table, grid if grid.is_file() else None)
        (tmp / PUBLISH_MARKER).write_text("written by python -m cdm.publish; rerun replaces\n")
        manifest.write(tmp)  # the card changed: the published folder checks against its own
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a distilled method (models/students/<method>)")
    parser.add_argument("--students", default="models/students")
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", help="default: exports/<method>")
    args = parser.parse_args(argv)
    out = Path(args.out or f"exports/{args.method}")
    try:
        publish(args.method, Path(args.students), Path(args.results), out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
