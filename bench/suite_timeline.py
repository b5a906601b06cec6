"""Where a `make test` run's two workers spent their time, from its CDM_TEST_TIMELINE file.

    CDM_TEST_TIMELINE=/tmp/timeline.jsonl make test
    python bench/suite_timeline.py /tmp/timeline.jsonl --out bench/results/suite-timeline.json

Per worker: its first start and last end, the seconds inside tests (setup, call, teardown)
and the gaps between them (collection, xdist's scheduling), the setups that took longest
(a shared fixture being built, or waited for while another worker builds it), the phases
whose CPU seconds (the worker's and its subprocesses', not a Slurm job's) fall furthest short
of their wall seconds, and when each worker finished: a worker that ends minutes before the
other left a core idle that long.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def summarise(lines: list[dict], top: int = 15) -> dict:
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        if line.get("start") is not None:
            by_worker[line["worker"]].append(line)
    if not by_worker:
        raise ValueError("no timed phases in the timeline; was CDM_TEST_TIMELINE set?")
    t0 = min(line["start"] for phases in by_worker.values() for line in phases)
    workers = {}
    for worker, phases in sorted(by_worker.items()):
        phases.sort(key=lambda line: line["start"])
        busy = sum(line["seconds"] for line in phases)
        cpu = sum(line.get("cpu", 0.0) for line in phases)
        first, last = phases[0]["start"], max(p["start"] + p["seconds"] for p in phases)
        workers[worker] = {
            "start_s": round(first - t0, 1),
            "end_s": round(last - t0, 1),
            "in_tests_s": round(busy, 1),
            "between_tests_s": round(last - first - busy, 1),
            "cpu_s": round(cpu, 1),
            "tests": len({p["test"] for p in phases}),
        }
    setups = sorted(
        (line for line in lines if line["when"] == "setup"), key=lambda line: -line["seconds"]
    )[:top]
    calls = sorted(lines, key=lambda line: -line["seconds"])[:top]
    # Phases that leave most of a core idle: wall seconds beyond their CPU seconds (waits on
    # a scheduler, a poll, a sleep, a lock), the longest first.
    waits = sorted(
        (line for line in lines if "cpu" in line),
        key=lambda line: -(line["seconds"] - line["cpu"]),
    )[:top]
    ends = [w["end_s"] for w in workers.values()]
    return {
        "wall_s": round(max(ends), 1),
        "idle_tail_s": round(max(ends) - min(ends), 1),
        "workers": workers,
        "longest_setups": [
            {"test": s["test"], "worker": s["worker"], "seconds": s["seconds"]} for s in setups
        ],
        "longest_phases": [
            {"test": c["test"], "when": c["when"], "worker": c["worker"], "seconds": c["seconds"]}
            for c in calls
        ],
        "longest_waits": [
            {"test": w["test"], "when": w["when"], "seconds": w["seconds"], "cpu": w["cpu"]}
            for w in waits
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = [json.loads(x) for x in args.timeline.read_text().splitlines() if x.strip()]
    summary = summarise(lines)
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
