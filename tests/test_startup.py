"""Start-up memory of distillation: what a rank holds before its first step, measured on a
tiny model with the GPU's bf16 weights (on the CPU here), against the plan's formula."""

from __future__ import annotations

import json
import os
import subprocess

from cdm import plan
from tests.conftest import PYTHON, ROOT
from tests.test_plan import TINY

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# In a fresh process (DeepSpeed's process group stays out of pytest's). Each engine's start
# records the weights then held: the teacher's, the engines' so far and the model handed in.
MEASURE = f"""
import json, tempfile, torch
from pathlib import Path
from diffusers import SD3Transformer2DModel
from cdm import engine, zero
from cdm import params as P
from cdm.conditioning import Condition
from cdm.velocity import TransformerVelocity

torch.manual_seed(0)
teacher = TransformerVelocity(SD3Transformer2DModel(**{TINY!r}))
engine.weights_dtype = lambda device: torch.bfloat16  # the GPU's weights, on the CPU
size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
built, held = [], []
make = zero.make_engine

def measured(model, *args, **kwargs):
    held.append(size(teacher) + sum(size(e.module) for e in built) + size(model))
    built.append(make(model, *args, **kwargs))
    return built[-1]

zero.make_engine = measured
cfg = P.load("params.yaml").distill.model_copy(update=dict(batch_size=2, zero_stage=2))
cond = Condition(torch.randn(4, 5, 16), torch.randn(4, 16))
root = Path(tempfile.mkdtemp())
engine.train(teacher, cond, cond.take(torch.tensor([0])), 3.0, (16, 8, 8),
             P.load("params.yaml").methods["cdm"], cfg, engine.RunPaths(root, root / "log.csv"),
             0, torch.device("cpu"), {{}}, 0)
masters = sum(t.numel() * t.element_size() for e in built for t in zero.local_partitions(e))
print(json.dumps({{"held": held, "masters": masters,
                   "params": sum(p.numel() for p in teacher.parameters())}}))
"""


def test_startup_holds_no_more_than_the_plan_says():
    proc = subprocess.run(
        [PYTHON, "-c", MEASURE], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    p = d["params"]
    tiny = plan.Model("tiny", p, 0, 1, 0, 0, 0, 0, 0)  # one GPU, ZeRO-2: no block terms
    want = plan.peaks(tiny, 1, 2)["start-up peak per GPU (before the first step)"]
    got = max(d["held"]) + d["masters"]
    # The plan adds w P for DeepSpeed flattening one engine's weights (not measured here).
    assert got <= want * 1.02, (got / p, want / p)
    assert got >= (want - 2 * p) * 0.98, (got / p, want / p)
    # Each copy reaches its engine in bf16: never an fp32 copy beside the teacher.
    assert d["held"][0] <= 2 * 2 * p * 1.02, d["held"][0] / p


def test_every_rank_reads_the_teacher_in_the_dtype_it_trains_in():
    """distill.load_teacher: bf16 on a GPU (2 P bytes of host memory per process, not fp32's
    4 P), fp32 on the CPU; the plan's host rows count w P per process and per node."""
    import runpy

    import torch

    load_teacher = runpy.run_path(str(ROOT / "src" / "distill.py"), run_name="distill")[
        "load_teacher"
    ]

    class Backend:
        @staticmethod
        def load_velocity(path, resolution, dtype=None):
            return dtype

    assert load_teacher(Backend, "t", None, torch.device("cuda", 0)) is torch.bfloat16
    assert load_teacher(Backend, "t", None, torch.device("cpu")) is torch.float32
    m = plan.Model("m", 1000, 10, 4, 8, 4, 2, 8, 64)
    rows = plan.peaks(m, 16, 3, per_node=8)
    assert rows["start-up host RAM per process (teacher read in bf16)"] == 2 * 1000
    assert rows["start-up host RAM per node (8 processes)"] == 8 * 2 * 1000
