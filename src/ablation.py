"""Stage ablation: mean +- std over distillation seeds of every preset, and the paper's three
findings judged against that spread (cdm.report.ablation.RULE).

Reads ablation/scores/seed<s>/metrics.json (the score stage run on each seed's sample sets
with the pipeline's teacher sets) and results/teacher.json (the teacher check: with the
params, the record of what the ablation ran on); writes results/ablation.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cdm import params as P
from cdm.cli import run_stage, stage_parser
from cdm.io import atomic_write_json
from cdm.report.ablation import ablation_summary, measured_on

log = logging.getLogger("ablation")


def main() -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--scores", default="ablation/scores")
    parser.add_argument("--teacher", default="results/teacher.json")
    parser.add_argument("--out", default="results/ablation.json")
    args = parser.parse_args()
    params = P.load(args.params)
    cfg = params.ablation
    check = Path(args.teacher)
    if not check.is_file():
        raise FileNotFoundError(f"missing {check}; run the prepare_teacher stage first")
    ran_on = measured_on(params, json.loads(check.read_text()))
    runs, teacher = {}, {}
    for seed in cfg.seeds:
        path = Path(args.scores) / f"seed{seed}" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; run `make ablation` (its score step)")
        metrics = json.loads(path.read_text())
        absent = [m for m in cfg.methods if m not in metrics]
        if absent:
            raise ValueError(f"{path} has no sets of method '{absent[0]}'; rerun `make ablation`")
        runs[seed] = {m: metrics[m] for m in cfg.methods}
        teacher = {m: v for m, v in metrics.items() if m.startswith("teacher")}
    summary = ablation_summary(runs, teacher, [str(s) for s in cfg.steps], ran_on)
    atomic_write_json(Path(args.out), summary)
    for f in summary["findings"]:
        verdicts = ", ".join(f"{s} steps: {v['verdict']}" for s, v in f["by_steps"].items())
        log.info("finding %d: %s", f["id"], verdicts)


if __name__ == "__main__":
    run_stage(main)
