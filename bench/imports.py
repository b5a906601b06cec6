"""Benchmark: each stage script's import time at start (its module body, not its main()), in a
fresh interpreter with `-X importtime`, beside `import torch` measured the same way; the heavy
packages each loads. Writes JSON.

    python bench/imports.py --repeats 3 --out bench/results/imports-cpu.json

tests/test_imports.py holds the same measure to its budgets (a multiple of torch's time, so
that a loaded machine moves both). Run it on a quiet machine for figures to report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_imports import HEAVY, LOAD, STAGES, imports  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of n per script")
    parser.add_argument("--out", type=Path, help="JSON file (default: print only)")
    args = parser.parse_args()
    torch_s = min(imports("import torch")[0] for _ in range(args.repeats))
    rows = {}
    for script in STAGES:
        runs = [imports(LOAD.format(path=str(ROOT / "src" / script))) for _ in range(args.repeats)]
        seconds = min(s for s, _ in runs)
        heavy = sorted(p for p in HEAVY if p in runs[0][1])
        rows[script] = {"seconds": round(seconds, 3), "x_torch": round(seconds / torch_s, 2),
                        "heavy": heavy}  # fmt: skip
        print(f"{script:20s} {seconds:5.2f} s  {seconds / torch_s:4.2f}x torch  {heavy}")
    result = {
        "torch_seconds": round(torch_s, 3),
        "scripts": rows,
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "python": platform.python_version(),
        "command": "python bench/imports.py " + " ".join(sys.argv[1:]),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
