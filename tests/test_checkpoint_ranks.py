"""The checkpoint store across ranks: rank 0's directory listing decides (a stale listing on
another rank changes nothing, and nothing hangs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, ROOT

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}


def run_worker(mode: str, stage: int, out: Path, port: int, timeout: int = 30) -> dict:
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
