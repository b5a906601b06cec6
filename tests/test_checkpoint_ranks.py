"""The checkpoint store across ranks: rank 0's directory listing decides (a stale listing on
another rank changes nothing, and nothing hangs); each rank saves its own EMA partitions and
a resume with the same number of processes is bitwise, with another is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}


def run_worker(mode: str, stage: int, out: Path, port: int, timeout: int = 120) -> dict:
    cmd = [
        PYTHON, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / f"configs/accelerate/zero{stage}.yaml"),
        "--num_processes", "2", "--main_process_port", str(port),
        str(ROOT / "tests/workers/checkpoint_ranks.py"), mode, str(stage), str(out), str(timeout),
    ]  # fmt: skip
    # Bounded: a rank left waiting in a collective fails after `timeout` s (the process
    # group's), and the whole run after 300 s.
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_stale_listing_on_one_rank_follows_rank_0(tmp_path):
    d = run_worker("stale", 2, tmp_path / "out.json", 29671)
    assert d["world"] == 2
    assert d["starts"] == [10, 10]  # both resume rank 0's newest, not rank 1's stale one
    assert d["folders"] == ["it-0000005", "it-0000010"]  # save_once: no rank saved it again


def test_a_two_process_checkpoint_resumes_bitwise_with_per_rank_ema(tmp_path):
    out = tmp_path / "out.json"
    d = run_worker("resume", 2, out, 29672)
    assert d["world"] == 2 and d["start"] == 3
    assert d["bitwise"] == [True, True]  # student, fake score and EMA as if never stopped
    assert d["gathers_in_save"] == [0, 0]  # no rank gathered the full EMA to save it
    assert d["ema_files"] == ["rank-00000.safetensors", "rank-00001.safetensors"]
    assert d["partition_floats"] < 0.6 * d["model_floats"]  # each file about half the EMA
    # One process cannot take over two ranks' partitions: one line says what to do.
    cmd = [PYTHON, str(ROOT / "tests/workers/checkpoint_ranks.py"), "refuse", "2", str(out), "30"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(out.read_text())["error"]
    assert "written by 2 processes and this run has 1" in error and "\n" not in error
    assert "distill.num_processes = 2" in error


@pytest.mark.parametrize("stage", [2, 3])
def test_the_ema_for_previews_and_export_is_gathered_to_rank_0_only(tmp_path, stage):
    d = run_worker("gather", stage, tmp_path / "out.json", 29673 + stage)
    assert d["has_module"] == [True, False]  # rank 1 never builds the full EMA module
    assert d["equal_on_rank0"] is True and d["cpu_fp32"] is True  # unchanged values, on CPU
    # Gathered parameter by parameter: no rank ever holds more than one full tensor.
    assert max(d["largest_seen"]) <= d["largest_param"]
