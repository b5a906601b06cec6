"""The fake-score blend and the student EMA on each rank's fp32 partitions (no full gathers)
equal the full-gather formulas, at ZeRO-2 and ZeRO-3 with two processes; in bf16 the module
then holds the blended masters."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}


def run_worker(stage: int, out: Path, *extra: str) -> dict:
    cmd = [
        PYTHON, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / f"configs/accelerate/zero{stage}.yaml"),
        "--num_processes", "2", "--main_process_port", str(29650 + stage + 10 * len(extra)),
        str(ROOT / "tests/workers/zero_partitions.py"), str(stage), str(out), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_partition_blend_and_ema_equal_the_full_gather_results(stage, tmp_path):
    d = run_worker(stage, tmp_path / "diffs.json")
    assert d["world"] == 2
    for key in ("blend", "blend_module", "ema", "ema_reload", "student_untouched"):
        assert d[key] <= 1e-6, (key, d[key])
    # Each rank holds about half the EMA (DeepSpeed pads partitions for alignment).
    assert d["partition_floats"] < 0.6 * d["model_floats"]


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_module_holds_the_blended_masters(stage, tmp_path):
    """The recipe's blend (0.001 of the student) is below bf16's rounding: after it the bf16
    module must equal the blended fp32 masters cast to bf16, as after an optimizer step."""
    d = run_worker(stage, tmp_path / "diffs.json", "bf16")
    assert d["world"] == 2
    assert d["blend_module"] == 0.0, d["blend_module"]
    for key in ("blend", "ema", "ema_reload", "student_untouched"):
        assert d[key] <= 1e-6, (key, d[key])
