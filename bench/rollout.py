"""Benchmark: the shrinking rollout against a full K-step rollout (student sample-evaluations
and wall time per iteration) on the dynamic schedule; each sample needs min(anchor + 1, K)
evaluations (checked). Writes JSON.

    python bench/rollout.py [--teacher src/cdm/world/pretrained/teacher] [--out bench/results/rollout.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cdm.backends.shapes import load_velocity
from cdm.conditioning import Condition
from cdm.rollout import evals_needed, full_rollout, rollout
from cdm.schedules import draw_anchor, dynamic_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="src/cdm/world/pretrained/teacher")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", default="bench/results/rollout.json")
    args = parser.parse_args()
    velocity, shift, shape = load_velocity(args.teacher)
    velocity.eval()
    gen = torch.Generator().manual_seed(0)
    width = velocity.transformer.config.joint_attention_dim
    cond = Condition(torch.randn(args.batch, 10, width), torch.randn(args.batch, width))
    totals = {"shrinking": [0, 0.0], "full": [0, 0.0]}
    for _ in range(args.iterations):
        sigmas = dynamic_schedule(1, 28, 0.25, 0.95, shift, gen)
        k = len(sigmas) - 1
        anchor = draw_anchor(k, args.batch, gen)
        noise = torch.randn(args.batch, *shape, generator=gen)
        t0 = time.perf_counter()
        roll = rollout(velocity, noise, sigmas, cond, anchor)
        assert roll.n_evals == int(evals_needed(anchor, k).sum())  # sum of min(anchor + 1, K)
        totals["shrinking"][0] += roll.n_evals
        totals["shrinking"][1] += time.perf_counter() - t0
        t0 = time.perf_counter()
        full_rollout(velocity, noise, sigmas, cond)
        totals["full"][0] += args.batch * k
        totals["full"][1] += time.perf_counter() - t0
    result = {
        "what": "student sample-evaluations and seconds per iteration of the rollout, K ~ U{1..28}",
        "rule": "shrinking: each sample evaluated min(anchor + 1, K) times; full: K times",
        "batch": args.batch,
        "iterations": args.iterations,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        **{
            f"{name}_{key}": round(v / args.iterations, 4)
            for name, (evals, secs) in totals.items()
            for key, v in (("evals_per_iter", evals), ("seconds_per_iter", secs))
        },
    }
    result["evals_saved"] = round(1 - totals["shrinking"][0] / totals["full"][0], 4)
    result["speedup"] = round(totals["full"][1] / totals["shrinking"][1], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
