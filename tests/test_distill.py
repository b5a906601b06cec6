"""Distillation end to end on tiny models: every preset, ZeRO-2/3, two processes, resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from cdm.runlog import LOG_COLUMNS
from tests.conftest import PYTHON, ROOT, clone

ACCELERATE = str(Path(PYTHON).parent / "accelerate")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _write_params(path: Path, **distill) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["teacher"].update(path="tiny_teacher", steps=2)
    data["judge"]["path"] = str(ROOT / data["judge"]["path"])
    data["prepare_teacher"].update(n_pairs=8, judge_renders=512)
    data["distill"].update(
        {
            "iterations": 20,
            "batch_size": 4,
            "k_min": 1,
            "k_max": 6,
            "checkpoint_every": 5,
            "warmup": 2,
            "preview_every": 5,
        }
        | distill
    )
    path.write_text(yaml.safe_dump(data))
    return path


def _run(cwd: Path, *args: str, launcher: list[str] | None = None, check: bool = True):
    cmd = (launcher or [PYTHON]) + [str(ROOT / "src" / args[0]), *args[1:]]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def project(distill_project) -> Path:
    """conftest's session-wide tiny distill project: teacher prepared, prompts cached."""
    return distill_project


def _clone(project: Path, dst: Path, **distill) -> Path:
    for part in ("models", "cache"):
        shutil.copytree(project / part, dst / part)
    shutil.copytree(
        ROOT / "configs", dst / "configs"
    )  # accelerate configs name paths from the root
    _write_params(dst / "params.yaml", **distill)
    return dst


def _reference(reference, project: Path, method: str, **distill) -> Path:
    """The uninterrupted run of `method` with these distill params (shared: read only)."""

    def build(path: Path) -> None:
        _clone(project, path, **distill)
        _run(path, "distill.py", "--method", method)

    return reference({"method": method, "distill": distill}, build)


# Two-process runs: small (they cost two processes' start and DeepSpeed's gloo start-up).
SMALL = {"iterations": 6, "batch_size": 2, "checkpoint_every": 1, "preview_every": 100}


def _two_processes(reference, project: Path, stage: int) -> Path:
    """The uninterrupted run of one launcher of 2 processes at ZeRO-`stage` (SMALL), as the
    distill rule starts it (cdm.launch): shared with test_multinode's one-node side."""
    distill = {"zero_stage": stage, "nodes": 1, "num_processes": 2, **SMALL}

    def build(path: Path) -> None:
        _clone(project, path, **distill)
        launcher = [
            PYTHON, "-m", "cdm.launch", "--config_file",
            str(ROOT / f"configs/accelerate/zero{stage}.yaml"),
            "--num_processes", "2", "--main_process_port", str(29610 + stage),
        ]  # fmt: skip
        _run(path, "distill.py", "--method", "cdm", launcher=launcher)

    return reference({"method": "cdm", "distill": distill, "launch": "cdm.launch x2"}, build)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two students' weights."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _student(path: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(
        path / "models/students" / method / "transformer/diffusion_pytorch_model.safetensors"
    )


@pytest.mark.parametrize("method", ["dmd2", "dynamic", "cdm", "dm_only"])
def test_every_preset_runs_20_iterations_under_zero2(project, reference, method):
    work = _reference(reference, project, method)  # dmd2's is also the truncation test's
    rows = (work / f"logs/{method}/train.csv").read_text().splitlines()
    assert rows[0].split(",") == LOG_COLUMNS and len(rows) == 21
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(","), strict=True))
    assert int(last["iteration"]) == 20 and int(last["student_step"]) == 10
    uses = yaml.safe_load((ROOT / "params.yaml").read_text())["methods"][method]
    for loss in ("ca", "dm", "cdm"):
        assert (last[f"loss_{loss}"] != "") == uses[loss], loss
    if uses["schedule"] == "fixed":
        assert {r.split(",")[header.index("K")] for r in rows[1:]} == {"4"}
    # The student moved away from the teacher, and it is a loadable diffusers model.
    student = _student(work, method)
    teacher = load_file(work / "models/teacher/transformer/diffusion_pytorch_model.safetensors")
    assert max((student[k] - teacher[k]).abs().max().item() for k in teacher) > 0
    assert (work / f"models/students/{method}/inference.json").is_file()


def test_fake_score_and_teacher_counts_per_iteration(project, tmp_path):
    work = _clone(project, tmp_path, batch_size=3)
    _run(work, "distill.py", "--method", "cdm")
    import csv

    rows = list(csv.DictReader(open(work / "logs/cdm/train.csv")))
    for row in rows:
        student_step = int(row["iteration"]) % 2 == 0
        # Teacher: CA cond + uncond, DM, CDM; fake score: DM, CDM, and its own update.
        assert int(row["n_teacher_evals"]) == (4 * 3 if student_step else 0)
        assert int(row["n_fake_evals"]) == (2 * 3 + 3 if student_step else 3)
        assert int(row["n_student_evals"]) <= 3 * int(row["K"]) + (6 if student_step else 0)
    # One plot file per loss (what `dvc plots show` draws): a value at every update.
    tsv = (work / "logs/cdm/plots/loss_cdm.tsv").read_text().splitlines()
    assert tsv[0] == "iteration\tloss_cdm" and len(tsv) == 1 + 10
    assert len((work / "logs/cdm/plots/loss_fake.tsv").read_text().splitlines()) == 1 + 20
    # Previews every 5 student steps: fixed prompts and noise, one image per prompt.
    previews = sorted(p.name for p in (work / "logs/cdm/previews").iterdir())
    assert previews == ["step-000005.png", "step-000010.png"]
    grid = [np.asarray(Image.open(work / "logs/cdm/previews" / p)) for p in previews]
    assert grid[0].shape == (32, 32 * 8, 3) and not np.array_equal(grid[0], grid[1])


@pytest.mark.parametrize("stage", [2, 3])
def test_cdm_with_two_processes(project, reference, stage):
    work = _two_processes(reference, project, stage)
    assert len((work / "logs/cdm/train.csv").read_text().splitlines()) == 1 + SMALL["iterations"]
    shards = list(work.glob("checkpoints/cdm-*/it-*/student/state/*optim_states.pt"))
    assert {p.name.split("_")[3] for p in shards} == {"0", "1"}  # both ranks hold a shard
    student = _student(work, "cdm")
    assert all(torch.isfinite(v).all() for v in student.values())
    # Negative controls: the student moved away from the teacher (a run whose ranks skipped
    # every update would not), and rank 1's draws count: one process of the same params and
    # seed (rank 0's draws alone) trains another student.
    teacher = load_file(work / "models/teacher/transformer/diffusion_pytorch_model.safetensors")
    moved = max((student[k] - teacher[k]).abs().max().item() for k in teacher)
    alone = _student(_reference(reference, project, "cdm", zero_stage=stage, **SMALL), "cdm")
    print(f"ZeRO-{stage}: moved {moved:.3g}, vs one process {_max_diff(student, alone):.3g}")
    assert moved > 1e-5 and _max_diff(student, alone) > 0.01 * moved


def test_sigkill_then_rerun_equals_an_uninterrupted_run(project, reference, tmp_path):
    straight = _reference(reference, project, "cdm", iterations=40)
    crashed = _clone(project, tmp_path / "crashed", iterations=40)
    cmd = [PYTHON, str(ROOT / "src/distill.py"), "--method", "cdm"]
    proc = subprocess.Popen(
        cmd, cwd=crashed, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not list(crashed.glob("checkpoints/cdm-*/it-0000020/state.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "models/students/cdm").exists()
    newest = max(int(p.parent.name[3:]) for p in crashed.glob("checkpoints/cdm-*/it-*/state.json"))
    rerun = _run(crashed, "distill.py", "--method", "cdm")
    # Resumed (a rerun that ignored the checkpoints and retrained would also end equal).
    assert newest >= 20 and f"resuming from iteration {newest}" in rerun.stderr, rerun.stderr
    a, b = _student(straight, "cdm"), _student(crashed, "cdm")
    assert _max_diff(a, b) <= 1e-6
    log = (crashed / "logs/cdm/train.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1, 41))


def test_sigusr1_checkpoints_exits_and_the_rerun_equals_an_uninterrupted_run(
    project, reference, tmp_path
):
    """SLURM's warning signal before the time limit: checkpoint now, exit non-zero (so the
    job is retried), resume to the same student. train.csv is read while the run goes on."""
    straight = _reference(reference, project, "dmd2", iterations=30, checkpoint_every=100)
    warned = _clone(project, tmp_path / "warned", iterations=30, checkpoint_every=100)
    cmd = [PYTHON, str(ROOT / "src/distill.py"), "--method", "dmd2"]
    proc = subprocess.Popen(
        cmd, cwd=warned, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    live = warned / "logs/dmd2/train.csv"
    deadline = time.time() + 600
    while not live.is_file() or len(live.read_text().splitlines()) < 8:  # header + 7 rows
        assert proc.poll() is None and time.time() < deadline, "run ended too soon"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=600)
    last = err.strip().splitlines()[-1]  # one line after the progress bar
    assert proc.returncode == 75 and last.startswith("error: SIGUSR1 at iteration "), err[-2000:]
    stopped = int(last.split("iteration ")[1].split(":")[0])
    assert 7 <= stopped < 30
    assert list(warned.glob(f"checkpoints/dmd2-*/it-{stopped:07d}/state.json"))
    assert not (warned / "models/students/dmd2").exists()
    rerun = _run(warned, "distill.py", "--method", "dmd2")
    assert f"resuming from iteration {stopped}" in rerun.stderr, rerun.stderr[-2000:]
    a, b = _student(straight, "dmd2"), _student(warned, "dmd2")
    assert _max_diff(a, b) <= 1e-6


def test_a_truncated_newest_checkpoint_is_skipped_for_the_last_intact_one(
    project, reference, tmp_path
):
    work = clone(_reference(reference, project, "dmd2"), tmp_path / "work")  # preset test's run
    first = _student(work, "dmd2")
    newest = sorted(work.glob("checkpoints/dmd2-*/it-*"))[-1]
    assert newest.name == "it-0000020"
    ema = newest / "ema/rank-00000.safetensors"
    with open(ema, "r+b") as f:
        f.truncate(ema.stat().st_size // 2)
    intact = int(sorted(work.glob("checkpoints/dmd2-*/it-*"))[-2].name[3:])
    shutil.rmtree(work / "models/students/dmd2")
    proc = _run(work, "distill.py", "--method", "dmd2")
    warnings = [line for line in proc.stderr.splitlines() if "damaged checkpoint" in line]
    assert len(warnings) == 1 and str(newest.name) in warnings[0] and "truncated" in warnings[0]
    assert intact < 20 and f"resuming from iteration {intact}" in proc.stderr, proc.stderr
    again = _student(work, "dmd2")  # resumed from the last intact one, replayed the rest
    assert _max_diff(first, again) <= 1e-6


@pytest.mark.parametrize(
    ("distill", "args", "message"),
    [
        ({}, ["--method", "sdxl_turbo"], "unknown method 'sdxl_turbo'"),
        ({"k_min": 9, "k_max": 3}, ["--method", "cdm"], "k_min (9) must be <= k_max (3)"),
        ({"u_max": 1.2}, ["--method", "cdm"], "distill.u_max: input should be less than 1"),
        (
            {"inference_sigmas": [1.0, 0.5, -0.5]},
            ["--method", "dmd2"],
            "must start at 1.0 and lie in (0, 1]",
        ),
        (
            {},
            ["--method", "cdm", "--cache", "nowhere"],
            "missing cache file nowhere/train.safetensors",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(project, tmp_path, distill, args, message):
    work = _clone(project, tmp_path, **distill)
    proc = _run(work, "distill.py", *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    for out in ("models/students", "checkpoints", "logs"):
        assert not (work / out).exists()


def test_gradient_checkpointing_gives_the_same_student(project, reference, tmp_path):
    plain = _reference(reference, project, "cdm", zero_stage=2, **SMALL)  # two-process test's
    ckpt = _clone(project, tmp_path / "ckpt", zero_stage=2, **SMALL, gradient_checkpointing=True)
    _run(ckpt, "distill.py", "--method", "cdm")
    a, b = _student(plain, "cdm"), _student(ckpt, "cdm")
    assert _max_diff(a, b) <= 1e-6


def test_changed_params_start_afresh_and_keep_the_other_runs(project, reference, tmp_path):
    work = clone(_reference(reference, project, "dmd2", iterations=4), tmp_path / "work")
    first = {p.name for p in (work / "checkpoints").iterdir()}
    _write_params(work / "params.yaml", iterations=4, lr_student=3e-4)
    _run(work, "distill.py", "--method", "dmd2")
    second = {p.name for p in (work / "checkpoints").iterdir()}
    assert len(first) == 1 and len(second) == 2 and first < second  # the earlier run stays
    # Only an explicit prune removes runs of other params.
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.checkpoints", "prune"], cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0 and {p.name for p in (work / "checkpoints").iterdir()} == (
        second - first
    )


def test_params_a_method_does_not_read_keep_its_run(project, reference, tmp_path):
    """k_max (dmd2's fixed schedule ignores it) and bookkeeping keys leave dmd2's run as is:
    the rerun finds its finished checkpoint and trains nothing."""
    work = clone(_reference(reference, project, "dmd2", iterations=4), tmp_path / "work")
    run = next((work / "checkpoints").iterdir())
    log = (work / "logs/dmd2/train.csv").read_text()
    _write_params(
        work / "params.yaml", iterations=4, k_max=9, checkpoint_every=2, keep_checkpoints=3,
        methods=["dmd2"], max_nonfinite=5,
    )  # fmt: skip
    _run(work, "distill.py", "--method", "dmd2")
    assert [p.name for p in (work / "checkpoints").iterdir()] == [run.name]
    assert (work / "logs/dmd2/train.csv").read_text() == log
