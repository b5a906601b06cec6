"""Probe one distillation setting in minutes: cache -> distill -> sample at N steps -> score.

    python bench/distill_probe.py --method cdm --set distill.lr_student=3.0e-5 \
        --set distill.guidance=0.5 --pairs 512 --out bench/results/probe-cdm.json

Runs in a scratch folder (the project's params.yaml with the `--set` overrides, its
teacher and judge), so the pipeline's own outputs are never touched. The teacher with its
CFG at the same step count is scored beside the student: the bar of the engine issue.
Writes JSON {setting, distill_seconds, metrics: {model: {steps: {...}}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cdm import safeyaml

ROOT = Path(__file__).resolve().parents[1]


def override(data: dict, assignment: str) -> None:
    """Apply `section.key=value` (value parsed as YAML) to the params mapping."""
    key, sep, value = assignment.partition("=")
    if not sep or "." not in key:
        raise SystemExit(f"--set needs section.key=value, got {assignment!r}")
    section, name = key.split(".", 1)
    if section not in data:
        raise SystemExit(f"--set: unknown section {section!r}; sections: {', '.join(data)}")
    data[section][name] = safeyaml.parse(value)  # YAML 1.2, plain data only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="cdm")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--pairs", type=int, default=512, help="evaluation prompt/seed pairs")
    ap.add_argument("--steps", type=int, nargs="+", default=[4], help="step counts sampled")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    data = safeyaml.read(ROOT / "params.yaml")
    for assignment in args.set:
        override(data, assignment)
    data["distill"]["methods"] = [args.method]
    data["prompts"]["eval_pairs"] = args.pairs
    for section in ("teacher", "judge"):
        data[section]["path"] = str(ROOT / data[section]["path"])

    with tempfile.TemporaryDirectory(prefix="cdm-probe-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        shutil.copytree(data["teacher"]["path"], work / "models" / "teacher")
        env = os.environ | {"PYTHONPATH": str(ROOT / "src")}

        def stage(script: str, *extra: str) -> float:
            start = time.time()
            done = subprocess.run(
                [sys.executable, str(ROOT / "src" / script), *extra],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(f"{script} failed: {done.stderr.strip().splitlines()[-1]}")
            return time.time() - start

        stage("cache_teacher.py")
        seconds = stage("distill.py", "--method", args.method)
        for steps in args.steps:
            stage("sample.py", "--model", args.method, "--steps", str(steps))
        # The reference: the teacher with CFG at the most steps asked for.
        stage("sample.py", "--model", "teacher_cfg", "--steps", str(max(args.steps)))
        stage("score.py")
        metrics = json.loads((work / "results" / "metrics.json").read_text())

    result = {
        "setting": {
            "method": args.method,
            "set": args.set,
            "pairs": args.pairs,
            "distill": data["distill"],  # the resolved values: the overrides and the defaults
            "methods": data["methods"][args.method],
        },
        "distill_seconds": round(seconds, 1),
        "metrics": metrics,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    row = {f"{m}@{n}": {k: round(v, 3) for k, v in r[str(n)].items() if k in ("alignment", "fd")}
           for m, r in metrics.items() for n in args.steps if str(n) in r}  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
