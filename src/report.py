"""Stage report: the paper's findings checked on the measured metrics, as Markdown and HTML.

Reads results/metrics.json (score), results/teacher.json (prepare_teacher),
results/ablation.json (the ablation target, when present), logs/*/train.csv
(distill), logs/timings/*.json (prepare_teacher, score) and samples/<model>/<steps>/
(sample); writes results/report.md, results/report.html (self-contained),
results/provenance.json (with the timings) and results/plots/*.png.

Each finding gets one verdict per step count: from results/ablation.json when it ran on this
run's teacher and params (cdm.report.ablation.mismatch), else from the single run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_write_json, read_json
from cdm.metrics import timings as T
from cdm.report import table1 as T1
from cdm.report.ablation import measured_on, mismatch
from cdm.report.findings import findings
from cdm.report.grid import grid_rows
from cdm.report.html import real_report, write_report
from cdm.report.plots import WORLD_PANELS, image_grid, quality_vs_nfe, training_curves
from cdm.report.preference import LABELS, scored
from cdm.report.preference import findings as real_findings
from cdm.report.provenance import committed_metrics, provenance, since_committed

log = logging.getLogger("report")
WORLD_KEYS = ["alignment", "fd", "fd_to_teacher_nocfg", "precision", "recall"]
GRID_SCALE = 3  # 32 px images -> 96 px cells


def read_path(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; run the {stage} stage first")
    return path


def real_panels(metrics: dict) -> tuple[tuple[str, str], ...]:
    """Each preference metric present, then the FD to the teacher with CFG."""
    shown = tuple((m, f"{LABELS[m]} (higher is better)") for m in scored(metrics))
    return (*shown, ("fd_to_teacher_cfg", "FD to teacher_cfg, CLIP features (lower is better)"))


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--samples", default="samples")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--benchmarks", default="benchmarks", help="Snakemake's stage timings")
    args = parser.parse_args()
    params = P.load(args.params)
    results = Path(args.results)
    metrics = read_json(results / "metrics.json", "run the score stage first")
    teacher_path = results / "teacher.json"
    teacher = read_json(teacher_path, "rerun prepare_teacher") if teacher_path.exists() else None
    if teacher is None:
        log.warning("no %s; the report has no teacher section", teacher_path)
    # Only the sets and training curves of the methods the params name: an old method's
    # folders may still lie on disk.
    wanted = P.sample_sets(params)
    rows, captions, pairs = grid_rows(Path(args.samples), params.report.grid_prompts, wanted)
    world = params.teacher.backend == "shapes"
    timings = T.read(args.logs)
    shown = T.merge(metrics, timings.get("score", {}))  # the tables' speed column

    plots = results / "plots"
    panels = WORLD_PANELS if world else real_panels(metrics)
    images = {"Quality vs NFE": quality_vs_nfe(shown, plots / "quality_vs_nfe.png", panels)}
    curves = {m: Path(args.logs) / m / "train.csv" for m in sorted(params.distill.methods)}
    logs = {m: p for m, p in curves.items() if p.is_file()}
    images["Training losses"] = training_curves(logs, plots / "training_curves.png")
    if rows:
        label = (
            f"Samples: pairs {', '.join(map(str, pairs))} (prompt under each column), "
            "the same noise in every row"
        )
        scale = GRID_SCALE if world else 1
        images[label] = image_grid(rows, plots / "samples.png", scale=scale, captions=captions)
    else:
        log.warning("no sample sets under %s; the report has no image grid", args.samples)
    prov = provenance(args.params, params, Path(args.benchmarks), timings)
    atomic_write_json(results / "provenance.json", prov)
    keys = WORLD_KEYS if world else [k for k, _ in real_panels(metrics)]
    moved = since_committed(
        metrics, committed_metrics(results / "metrics.json"), keys, params.prompts.eval_pairs
    )
    context = {"provenance": prov, "since": moved}
    if not world:
        per_image = pd.read_parquet(read_path(results / "scores.parquet", "score"))
        found = real_findings(per_image, metrics, params.report.steps, params.score.n_boot)
        with_dpg = T1.with_dpg(metrics, results / "dpg.json")  # stage score_dpg, if it ran
        table1 = (T1.table(with_dpg, params), T1.protocol(with_dpg, params, Path(args.samples)))
        md, page = real_report(results, shown, found, images, teacher, context, table1)
        log.info("wrote %s and %s", md, page)
        return
    found = findings(metrics, steps=params.report.steps)
    ablation = seeded(results / "ablation.json", params, teacher, context)
    md, page = write_report(results, shown, found, images, teacher, ablation, context)
    for f in ablation["findings"] if ablation else []:
        verdicts = ", ".join(f"{s} steps: {v['verdict']}" for s, v in f["by_steps"].items())
        log.info("finding %d over seeds: %s", f["id"], verdicts)
    for f in [] if ablation else found:
        log.info(
            "finding %d: %s",
            f["id"],
            {True: "held", False: "did not hold"}.get(f["held"], "not measured"),
        )
    log.info("wrote %s and %s", md, page)


def seeded(path: Path, params: P.Params, teacher: dict | None, context: dict) -> dict | None:
    """results/ablation.json (`make ablation`) when it ran on this run's teacher and params;
    otherwise None, and context["ablation_skipped"] says why (the report says it once)."""
    if not path.exists():
        return None
    ablation = read_json(path, "rerun `make ablation`")
    if teacher is None:
        reason = "there is no results/teacher.json to compare its teacher with"
    else:
        reason = mismatch(ablation, measured_on(params, teacher))
    if reason:
        log.warning("%s is not shown: %s", path, reason)
        context["ablation_skipped"] = reason
        return None
    return ablation


if __name__ == "__main__":
    run_stage(main)
