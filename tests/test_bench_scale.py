"""bench/scale.py and bench/sampling.py at tiny size on CPU, as subprocesses: their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--resolution", "64"]


def _run(script: str, *args: str) -> None:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("model", ["sd3", "longcat", "flux2-klein"])
def test_scale_reports_phases_memory_and_evaluations(tmp_path, model):
    out = tmp_path / f"scale-{model}.json"
    _run(
        "scale.py", "--model", model, *TINY, "--iterations", "2", "--batch", "2",
        "--k-max", "3", "--workdir", str(tmp_path), "--out", str(out),
    )  # fmt: skip
    r = json.loads(out.read_text())
    phases = r["phases"]
    for name in [
        "rollout", "teacher", "student_forward", "student_backward", "student_optimizer",
        "fake_forward", "fake_backward", "fake_optimizer", "fake_evals", "blend", "ema",
        "logging", "checkpoint",
    ]:  # fmt: skip
        assert phases[name]["seconds_per_iteration"] > 0, name
        assert phases[name]["calls"] > 0, name
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0, abs=0.01)
    assert r["it_per_s"] > 0 and r["seconds_per_iteration"] > 0

    ev = r["evaluations"]
    assert ev["ratio_to_authors_50"] <= 0.67 + 0.01
    assert ev["expected_ratio_k_1_28"] <= 0.67 + 0.01
    # Every engine-side count seen by the wrappers: rollout + student forward, teacher, fake.
    seen = ev["sample_evaluations"]
    csv = ev["engine_csv_totals"]
    assert seen["student_nograd"] + seen["student_grad"] == csv["n_student_evals"]
    assert seen["teacher_nograd"] == csv["n_teacher_evals"]
    assert seen["fake_grad"] + seen["fake_nograd"] == csv["n_fake_evals"]

    assert r["plan"]["total_bytes"] > 0 and r["plan"]["model"]["params"] > 0
    assert r["peak_memory"]["measured_bytes"] > 0


def test_scale_in_lora_mode_counts_each_network_and_the_trained_fraction(tmp_path):
    """One shared module in LoRA mode: the adapter switched on names the network, so the
    wrappers' counts still match the engine's own per network."""
    out = tmp_path / "scale-lora.json"
    _run(
        "scale.py", "--model", "sd3", *TINY, "--iterations", "2", "--batch", "2",
        "--k-max", "3", "--lora", "2", "--workdir", str(tmp_path), "--out", str(out),
    )  # fmt: skip
    r = json.loads(out.read_text())
    settings = r["settings"]
    assert settings["training"].startswith("LoRA adapters (rank 2, alpha 4")
    assert 0 < settings["trained_parameters"] < settings["parameters"]
    assert settings["trained_fraction"] == round(
        settings["trained_parameters"] / settings["parameters"], 5
    )
    seen, csv = r["evaluations"]["sample_evaluations"], r["evaluations"]["engine_csv_totals"]
    assert seen["student_nograd"] + seen["student_grad"] == csv["n_student_evals"] > 0
    assert seen["teacher_nograd"] == csv["n_teacher_evals"] > 0
    assert seen["fake_grad"] + seen["fake_nograd"] == csv["n_fake_evals"] > 0
    assert "base (frozen; teacher, student and fake score share it)" in r["plan"]["rows_bytes"]
    assert r["peak_memory"]["startup_plan_bytes"] is None
    plan = r["plan"]  # the bucket is the adapter's size, not DeepSpeed's 5e8 elements
    assert 0 < plan["total_without_reduce_bucket_bytes"] < plan["total_bytes"]


def test_sampling_student_is_faster_than_the_teacher(tmp_path):
    out = tmp_path / "sampling-sd3.json"
    _run(
        "sampling.py", "--model", "sd3", *TINY, "--vae-div", "16", "--images", "1",
        "--repeats", "1", "--teacher-steps", "8", "--compare-decode", "--out", str(out),
    )  # fmt: skip
    r = json.loads(out.read_text())
    s, t = r["student"], r["teacher"]
    # The stage's precision on this device (the CPU: fp32), the decode always fp32.
    assert (r["settings"]["dtype"], r["settings"]["decode_dtype"]) == ("float32", "float32")
    assert s["sample_evaluations_per_image"] == 4 and t["sample_evaluations_per_image"] == 16
    assert s["transformer_calls_per_batch"] == 4 and t["transformer_calls_per_batch"] == 8
    for side in (s, t):
        assert side["seconds_per_image"]["transformer"] > 0
        assert side["seconds_per_image"]["decode"] > 0
        assert side["seconds_per_image"]["png"] > 0
    assert r["speedup"] > 1
    d = r["decode_fp32_vs_bf16"]
    assert d["seconds_per_image_float32"] > 0 and d["seconds_per_image_bfloat16"] > 0
    assert 0 <= d["bf16_levels_moved_fraction"] <= 1 and 0 <= d["bf16_levels_moved_max"] <= 255
    assert (d["bf16_levels_moved_max"] > 0) == (d["bf16_levels_moved_fraction"] > 0)
