"""Faults and bad input on a finished tiny project: each ends in one line on stderr that names
the problem, a non-zero exit, and the finished results, students and valid checkpoints
unchanged (hashed before and after).

Cases also covered elsewhere: a truncated newest checkpoint (test_distill), an empty or
partial params file and a method name the rules cannot match (test_params), a missing
scorer weight, a corrupt PNG and a prompts file of the wrong sha256 (test_preference,
test_fetch), SciPy without sqrtm(disp=) (test_frechet).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cdm.lock import LOCK
from tests.conftest import PYTHON, ROOT, clone, edit_params

BIN = str(Path(PYTHON).parent)
ENV = os.environ | {
    "PATH": f"{BIN}:{os.environ['PATH']}",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "DS_ACCELERATOR": "cpu",  # no "no GPU found" warning on stderr
}
LAUNCH = [PYTHON, "-m", "cdm.launch", "--config_file", "configs/accelerate/zero2.yaml"]
KEPT = ("results", "models", "checkpoints", "samples", "cache", "logs")


def _run(cwd: Path, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _stage(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return _run(cwd, PYTHON, f"src/{script}", *args)


def _distill(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(cwd, *LAUNCH, "src/distill.py", "--method", "cdm", *args)


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under the finished outputs (symlinks by their target path; not
    the locks, which name their holder)."""
    out = {}
    for part in KEPT:
        for path in sorted((root / part).rglob("*")):
            if path.is_symlink():
                out[str(path.relative_to(root))] = os.readlink(path)
            elif path.is_file() and path.name not in (".snakemake_timestamp", ".writer.lock"):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The failure ends stderr in one `error:` line holding `words` (before it only what ran
    until then: progress, library warnings), no traceback, exit non-zero."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def work(finished, tmp_path) -> Iterator[Path]:
    """A copy of the finished project; its finished outputs are checked unchanged after."""
    path = tmp_path / "p"
    clone(finished, path)
    before = digest(path)
    yield path
    after = digest(path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert before.keys() <= after.keys()


@contextlib.contextmanager
def mounted(folder: Path, options: str) -> Iterator[None]:
    """A small tmpfs over `folder` (root only: skipped where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:80]})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ------------------------------------------------------------------ files that went bad


def test_full_disk_is_named_and_leaves_no_partial_checkpoint(work):
    (work / "checkpoints").rename(work / "checkpoints.done")
    try:
        with mounted(work / "checkpoints", "size=200k"):
            # A new checkpoint will not fit. Its student and live log go to folders of their
            # own: a distill's live log replaces logs/<m>/train.csv as it runs (by design).
            proc = _distill(work, "--out", "fresh", "--logs", "fresh_logs")
            one_line(proc, "no space left on the device holding", "checkpoints")
            left = [p for p in (work / "checkpoints").rglob("*") if p.name.startswith(".tmp")]
            assert left == []
    finally:
        (work / "checkpoints").rmdir()
        (work / "checkpoints.done").rename(work / "checkpoints")


def test_read_only_output_is_named(work):
    with mounted(work / "readonly", "size=1m,ro"):
        proc = _stage(work, "sample.py", "--model", "teacher_cfg", "--steps", "2",
                      "--out", "readonly")  # fmt: skip
        one_line(proc, "readonly", "is not writable", "Read-only file system")


def test_corrupt_teacher_weights_are_named(work):
    weights = work / "models/teacher/transformer/diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:3000])
    proc = _stage(work, "sample.py", "--model", "teacher_cfg", "--steps", "1")
    one_line(proc, str(weights.relative_to(work)), "is truncated or not a safetensors file")
    weights.write_bytes(data)


def test_corrupt_prompt_cache_is_named_without_the_launchers_traceback(work):
    cache = work / "cache/prompts/train/shard-00000.safetensors"
    data = cache.read_bytes()
    cache.write_bytes(data[:500])
    proc = _distill(work)
    one_line(
        proc,
        "cache/prompts/train/shard-00000.safetensors",
        "is truncated or not a safetensors file",
    )
    assert (work / "logs/tracebacks/distill.txt").read_text().startswith("Traceback")
    verbose = _run(work, *LAUNCH, "src/distill.py", "--method", "cdm", "--verbose")
    assert "Traceback" in verbose.stderr and verbose.returncode != 0
    cache.write_bytes(data)


# ------------------------------------------------------------------ bad input, refused first


def test_snakemake_validates_before_it_removes_any_output(work):
    edit_params(work / "params.yaml", teacher={"path": "no_such_teacher"})
    proc = _run(work, "snakemake", "--cores", "1", "--forcerun", "prepare_teacher")
    assert proc.returncode != 0
    assert "error: teacher.path 'no_such_teacher' does not exist" in proc.stdout + proc.stderr


def test_dvc_validates_before_it_removes_any_output(work):
    assert _run(work, "git", "init", "-q").returncode == 0
    assert _run(work, "dvc", "init", "-q", "--force").returncode == 0
    edit_params(work / "params.yaml", teacher={"path": "no_such_teacher"})
    proc = _run(work, "dvc", "repro")
    assert proc.returncode != 0
    assert "error: teacher.path 'no_such_teacher' does not exist" in proc.stdout + proc.stderr
    assert "Running stage 'prepare_teacher'" not in proc.stdout


def test_make_run_validates_first(work):
    (work / "stamp").touch()  # the venv counts as installed: make must not reinstall it
    edit_params(work / "params.yaml", judge={"path": "no_such_judge"})
    proc = _run(work, "make", "run", f"VENV={Path(BIN).parent}", "STAMP=stamp")
    assert proc.returncode != 0
    assert "error: judge.path 'no_such_judge' does not exist" in proc.stderr
    assert "snakemake" not in proc.stdout


def test_prompts_the_world_cannot_render_are_refused_at_cache_teacher(work):
    (work / "odd.txt").write_text("a red circle in the center on a dark background\na dragon\n")
    edit_params(work / "params.yaml", prompts={"eval_file": "odd.txt"})
    err = one_line(_stage(work, "cache_teacher.py"), "odd.txt", "cannot render", "a dragon")
    assert "1 prompt(s)" in err
    assert one_line(_run(work, PYTHON, "-m", "cdm.validate"), "a dragon")


def test_truncated_prompts_are_counted_once(tiny_dirs, tmp_path):
    """A prompt longer than a text encoder takes is cut; cache_teacher says how many, once."""
    from tests.test_pipeline_backends import _params

    (tmp_path / "tiny_sd3").symlink_to(tiny_dirs["sd3"])
    long = "a lighthouse " + "in a storm " * 300
    (tmp_path / "prompts.txt").write_text(f"a cat\n{long}\nan apple\n")
    _params(tmp_path / "params.yaml", "sd3")
    assert _stage_at(tmp_path, "prepare_teacher.py").returncode == 0
    proc = _stage_at(tmp_path, "cache_teacher.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "prompts are longer than" in line]
    assert len(said) == 2, said  # train and eval (the same file here), once each
    assert "1 of 3 train prompts are longer than the text encoder takes" in said[0]


def _stage_at(cwd: Path, script: str) -> subprocess.CompletedProcess:
    return _run(cwd, PYTHON, str(ROOT / "src" / script))


# ------------------------------------------------------------------ processes


def test_the_worker_dies_with_its_launcher(work):
    """SIGKILL of `cdm.launch` takes its worker with it: nothing is written afterwards."""
    edit_params(work / "params.yaml", distill={"iterations": 100000, "checkpoint_every": 1})
    runs_before = set((work / "checkpoints").iterdir())
    launcher = subprocess.Popen(
        [*LAUNCH, "src/distill.py", "--method", "cdm", "--out", "fresh", "--logs", "fresh_logs"],
        cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        # A checkpoint past the first two (older ones are pruned as the run goes: at tiny
        # sizes it-0000002 can come and go between two looks).
        while not [
            it for run in set((work / "checkpoints").iterdir()) - runs_before
            for it in run.glob("it-*") if int(it.name[3:]) >= 2
        ]:  # fmt: skip
            assert launcher.poll() is None and time.time() < deadline, "no checkpoint came"
            time.sleep(0.1)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        assert workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # a failed wait leaves no run behind
        for proc in (
            psutil.Process(launcher.pid).children(recursive=True) if launcher.poll() is None else []
        ):
            proc.kill()
        launcher.kill()
    snapshot = digest(work)
    time.sleep(2)
    assert digest(work) == snapshot and not (work / "fresh").exists()


def test_a_second_orchestrator_is_refused_while_one_runs(work):
    """A live `dvc repro` holds the project: Snakemake and DVC's stage scripts refuse."""
    holder = subprocess.Popen(["sleep", "60"])  # stands in for the running orchestrator
    try:
        info = psutil.Process(holder.pid)
        (work / LOCK).write_text(json.dumps({
            "pid": holder.pid, "started": info.create_time(), "host": socket.gethostname(),
            "what": "dvc repro",
        }))  # fmt: skip
        proc = _run(work, "snakemake", "--cores", "1", "--forcerun", "report")
        assert proc.returncode != 0
        assert "another run holds this project (dvc repro" in proc.stdout + proc.stderr
        one_line(_stage(work, "report.py"), "another run holds this project")
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the lock is stale, and the next run goes ahead.
    assert _run(work, PYTHON, "-m", "cdm.validate").returncode == 0


def test_stale_temporaries_of_a_killed_writer_are_cleared(work):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = work / f"again/teacher_cfg/.2.{dead.pid}.abcd1234"
    stale.mkdir(parents=True)
    (stale / "00000.png").write_bytes(b"partial")
    live = work / f"again/teacher_cfg/.2.{os.getpid()}.live"  # a writer still running
    live.mkdir()
    proc = _stage(work, "sample.py", "--model", "teacher_cfg", "--steps", "2", "--out", "again")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and live.exists()
    assert (work / "again/teacher_cfg/2/index.parquet").is_file()


def test_no_snakemake_timestamp_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    assert ".snakemake_timestamp" not in tracked.stdout
