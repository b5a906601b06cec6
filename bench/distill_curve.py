"""Quality of the student along one distillation run: alignment and FD at several step counts.

    python bench/distill_curve.py --set distill.guidance=2.0 --stops 200,400,600 \
        --steps 1,2,4 --sigmas 1,0.5,0.375,0.25 --out bench/results/distill_curve/g2.json

One run of the engine in a scratch folder (the project's params.yaml with the `--set`
overrides, its teacher and judge), paused at each stop: the student EMA is sampled on the
same prompt/seed pairs at every step count (its recipe's raw sigmas at the recipe's step
count, evenly spaced ones otherwise) and at each extra `--sigmas` schedule, and judged
in memory, without PNGs. The teacher with its CFG at 4 steps is scored once beside it.
Pausing and resuming is the engine's own checkpoint resume, so the stops do not change
the run. Writes JSON {setting, teacher_cfg, curve: [{iteration, <schedule>: {...}}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from distill_probe import override  # noqa: E402

from cdm import params as P  # noqa: E402
from cdm import safeyaml  # noqa: E402
from cdm.backends import backend_module  # noqa: E402
from cdm.cache import load_condition, open_condition  # noqa: E402
from cdm.conditioning import Condition  # noqa: E402
from cdm.engine import RunPaths, train  # noqa: E402
from cdm.metrics.frechet import frechet_distance  # noqa: E402
from cdm.sampler import Sampler  # noqa: E402
from cdm.sampling import sample_euler  # noqa: E402
from cdm.world.evaluate import EvalPairs, judge_scores  # noqa: E402
from cdm.world.judge import Judge  # noqa: E402
from cdm.world.prompts import ATTRIBUTES  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


class Scorer:
    """Samples a Sampler on fixed pairs and judges the images."""

    def __init__(
        self, judge: Judge, pairs: EvalPairs, cond: Condition, null: Condition, shape, decode
    ):
        self.judge, self.cond, self.null, self.decode = judge, cond, null, decode
        self.noise, self.attrs = pairs.noise(shape), pairs.attributes
        self.real = judge_scores(judge, pairs.real_images(), self.attrs)["features"]

    @torch.no_grad()
    def __call__(self, sampler: Sampler, steps: int) -> dict:
        velocity, sigmas, cfg_scale = sampler.velocity, sampler.sigmas(steps), sampler.guidance
        chunks = [
            sample_euler(
                velocity,
                noise,
                sigmas,
                self.cond.take(slice(lo, lo + len(noise))),
                self.null,
                cfg_scale,
            )
            for lo, noise in zip(range(0, len(self.noise), 256), self.noise.split(256), strict=True)
        ]
        # The sample stage's PNG round trip: the backend's 8-bit decode, read back as score does.
        images = self.decode(torch.cat(chunks)).permute(0, 3, 1, 2).float() / 127.5 - 1
        scores = judge_scores(self.judge, images, self.attrs)
        out = {"alignment": round(float(scores["all"].float().mean()), 4)}
        out["fd"] = round(frechet_distance(scores["features"], self.real), 1)
        return out | {k: round(float(scores[k].float().mean()), 4) for k in ATTRIBUTES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="cdm")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--stops", type=ints, default=[200, 400, 600, 800], help="iterations")
    ap.add_argument("--steps", type=ints, default=[1, 2, 4], help="student step counts")
    ap.add_argument("--sigmas", action="append", default=[], help="extra raw schedule, e.g. 1,0.5")
    ap.add_argument("--pairs", type=int, default=1024, help="evaluation prompt/seed pairs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    data = safeyaml.read(ROOT / "params.yaml")
    for assignment in args.set:
        override(data, assignment)
    data["distill"]["iterations"] = max(args.stops)
    for section in ("teacher", "judge"):
        data[section]["path"] = str(ROOT / data[section]["path"])
    extra = {s: [float(x) for x in s.split(",")] for s in args.sigmas}

    with tempfile.TemporaryDirectory(prefix="cdm-curve-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
        params_teacher = data["teacher"]["path"]  # the committed teacher, read in place
        subprocess.run(
            [sys.executable, str(ROOT / "src" / "cache_teacher.py"), "--teacher", params_teacher],
            cwd=work, env=env, check=True, capture_output=True,
        )  # fmt: skip
        params = P.load(work / "params.yaml")
        cfg, method = params.distill, params.methods[args.method]
        cache = work / "cache" / "prompts"
        train_cond, _ = open_condition(cache, "train")  # sharded: read batch by batch
        null, _ = load_condition(cache / "null.safetensors")
        evals, prompts = load_condition(cache / "eval.safetensors")
        backend = backend_module(params.teacher.backend)
        teacher, shift, shape = backend.load_velocity(params.teacher.path)
        pairs = EvalPairs.of(prompts, range(args.pairs))
        cond = evals.take(torch.tensor([j % len(prompts) for j in pairs.pairs]))
        judge = Judge.from_pretrained(params.judge.path)
        score = Scorer(judge, pairs, cond, null, shape, backend.load_decoder(params.teacher.path))
        teacher_cfg = Sampler(teacher, shift, shape, params.teacher.cfg_scale)

        result = {
            "setting": {"method": args.method, "set": args.set, "pairs": args.pairs,
                        "distill": data["distill"], "methods": data["methods"][args.method]},
            "teacher_cfg": {"4": score(teacher_cfg, 4)},
            "curve": [],
        }  # fmt: skip
        ds = json.loads((ROOT / "configs" / "deepspeed" / f"zero{cfg.zero_stage}.json").read_text())
        paths = RunPaths(work / "checkpoints", work / "checkpoints" / "train.csv")
        device = torch.device("cpu")
        for stop in sorted(args.stops):
            start = time.time()
            ema = train(
                teacher, train_cond, null, shift, shape, method, cfg, paths, params.seed,
                device, ds, stop,
            )  # fmt: skip
            row: dict = {"iteration": stop, "seconds": round(time.time() - start, 1)}
            # As the sample stage runs an exported student: its recipe sigmas at their count.
            student = Sampler(ema, shift, shape, 1.0, cfg.inference_sigmas)
            for n in args.steps:
                row[str(n)] = score(student, n)
            for name, raw in extra.items():
                row[name] = score(Sampler(ema, shift, shape, 1.0, raw), len(raw))
            result["curve"].append(row)
            print(json.dumps({k: v.get("alignment", v) if isinstance(v, dict) else v
                              for k, v in row.items()}), flush=True)  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
