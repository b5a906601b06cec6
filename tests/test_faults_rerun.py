"""Reruns after a fault (issue 21, cases 1, 2 and 5) on a copy of one tiny project that
Snakemake has finished: a deleted or interrupted student is rebuilt (resumed from its newest
checkpoint) with the results of the current params, and a second distill of the same run
stops in one line instead of sharing the first one's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cdm import params as P
from cdm.checkpoints import completed, damage, run_name
from tests.conftest import PYTHON, edit_params
from tests.test_faults import ENV, LAUNCH, _run

STUDENT = Path("models/students/cdm")


@pytest.fixture
def done(snakemade, tmp_path) -> Path:
    path = tmp_path / "p"
    shutil.copytree(snakemade, path, symlinks=True)
    return path


def weights(student: Path) -> dict[str, str]:
    """sha256 of every weights file of an exported student."""
    files = sorted(student.rglob("*.safetensors"))
    assert files, f"no weights under {student}"
    return {str(f.relative_to(student)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def newest_run(work: Path) -> Path:
    params = P.load(work / "params.yaml")
    return work / "checkpoints" / run_name("cdm", P.student_inputs(params, "cdm"))


# ------------------------------------------------------------- case 2: a deleted student


def test_snakemake_rebuilds_a_deleted_student(done):
    before = weights(done / STUDENT)
    shutil.rmtree(done / STUDENT)
    proc = _run(done, "snakemake", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" not in proc.stdout + proc.stderr
    assert weights(done / STUDENT) == before  # resumed from its final checkpoint: same bits


def test_dvc_rebuilds_a_deleted_student(done):
    """No `dvc commit` first: DVC has no copy of the student in its cache, so it must run
    distill again, which resumes from the run's final checkpoint: the same bits."""
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q", "--force")):
        assert _run(done, *cmd).returncode == 0
    before = weights(done / STUDENT)
    final = max(int(p.parent.name[3:]) for p in newest_run(done).glob("it-*/state.json"))
    shutil.rmtree(done / STUDENT)
    proc = _run(done, "dvc", "repro", "--single-item", "distill@cdm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Running stage 'distill@cdm'" in proc.stdout, proc.stdout[-2000:]
    assert f"resuming from iteration {final}" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert weights(done / STUDENT) == before


# ------------------------------------------------------------- case 1: Ctrl-C, then rerun


def _as_from_a_terminal() -> None:
    """A child's SIGINT as a terminal's job has it. A shell starting a job in the background
    (`make test &`, nohup) sets SIGINT to ignored, inherited by every child, so a Ctrl-C
    case would otherwise test nothing there."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 600) -> None:
    deadline = time.time() + limit
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {limit} s"
        time.sleep(0.2)


def test_a_ctrl_c_then_a_rerun_resumes_and_finishes_the_new_params(done, tmp_path):
    """A params change starts a new run; Ctrl-C of `snakemake` (its whole process group, as
    a terminal sends it) after its first checkpoint: one `error:` line, then the rerun
    resumes that checkpoint and ends with the student and results of the new params,
    bitwise the student of an uninterrupted run."""
    edit_params(done / "params.yaml", distill={"iterations": 120, "checkpoint_every": 4})
    run = newest_run(done)
    smk = subprocess.Popen(["snakemake", "--cores", "1"], cwd=done, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True, preexec_fn=_as_from_a_terminal)  # fmt: skip
    _wait_for(lambda: run.is_dir() and completed(run), smk, "first checkpoint of the new run")
    os.killpg(smk.pid, signal.SIGINT)
    out, err = smk.communicate(timeout=300)
    assert smk.returncode != 0
    said = out + err
    assert "Traceback" not in said and "[rank0]" not in said, said[-3000:]
    assert [x for x in said.splitlines() if x.startswith("error: ")] == [
        "error: distill interrupted (Ctrl-C); its checkpoints stay: rerun to resume from the "
        "newest one"
    ], said[-3000:]
    reached = int(completed(run)[-1].name[3:])
    assert 0 < reached < 120  # the interrupted run left checkpoints of the new params

    proc = _run(done, "snakemake", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from iteration {reached}" in proc.stdout + proc.stderr
    student = json.loads((done / STUDENT / "params.json").read_text())
    assert student["distill"]["iterations"] == 120
    csv = (done / "logs/cdm/train.csv").read_text().splitlines()
    assert csv[-1].split(",")[0] == "120"  # the whole new run's log, published again
    for result in ("metrics.json", "report.md", "provenance.json"):  # rebuilt after the student
        assert (done / "results" / result).stat().st_mtime > (done / STUDENT).stat().st_mtime

    # The same params, uninterrupted, in fresh folders: the same bits.
    ref = _run(done, *LAUNCH, "src/distill.py", "--method", "cdm", "--out", "ref",
               "--checkpoints", "ref_checkpoints", "--logs", "ref_logs")  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert weights(done / STUDENT) == weights(done / "ref/cdm")


# ------------------------------------------------------------- case 5: two distills by hand


def test_a_second_distill_of_the_same_run_stops_in_one_line(done):
    """Two `python src/distill.py --method cdm` by hand on one checkpoints folder: the
    second stops at once, naming the first, and writes nothing; the first goes on."""
    # Far more iterations than the first can finish while the second starts (a fast CPU ran
    # 5,000 in the two minutes the second took to start beside it).
    edit_params(done / "params.yaml", distill={"iterations": 10**7, "checkpoint_every": 2})
    run = newest_run(done)
    cmd = [PYTHON, "src/distill.py", "--method", "cdm", "--out", "fresh"]
    first = subprocess.Popen(cmd, cwd=done, env=ENV, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=_as_from_a_terminal)  # fmt: skip
    try:
        _check_second_distill(done, run, cmd, first)
    finally:
        first.kill()  # never left running (10^7 iterations) when a check fails


def _check_second_distill(done: Path, run: Path, cmd: list[str], first: subprocess.Popen):
    _wait_for(lambda: (run / ".writer.lock").is_file(), first, "the first writer's claim")
    second = _run(done, *cmd)
    assert first.poll() is None, "the first run ended before the second started"
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert lines[-1] == (
        f"error: another distill (pid {first.pid}) is writing checkpoints/{run.name}; wait for "
        "it to finish (two runs of the same params would share its checkpoints)"
    ), second.stderr[-3000:]
    # The first's checkpoints go on (the second, quick to start now, may be refused before
    # the first has written one): Ctrl-C once it has, and they stay intact.
    _wait_for(lambda: completed(run), first, "a checkpoint of the first run")
    first.send_signal(signal.SIGINT)  # Ctrl-C by hand: one line too, checkpoints intact
    assert first.wait(timeout=300) == 128 + signal.SIGINT
    assert first.stderr.read().splitlines()[-1].startswith("error: distill interrupted (Ctrl-C)")
    assert completed(run) and all(damage(c) is None for c in completed(run))
    assert not list(run.glob(".tmp-*"))  # the first cleans its own; the second wrote none
