"""The project lock (cdm.lock) for the processes of one run that do not descend from its
orchestrator: SLURM jobs started by slurmstepd on the orchestrator's own host, and the tasks
of cdm.launch's srun step (issue 34). They carry the run's token (CDM_RUN); nothing else
changes: another run is refused, a wrapper is not taken for the orchestrator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from cdm.lock import LOCK, RUN, claim, program, run_token
from tests.conftest import PYTHON

ENV = {k: v for k, v in os.environ.items() if k not in (RUN, "DVC_STAGE")}
CLAIM = "from cdm.lock import claim; print(claim())"


def _python(cwd: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a process with no orchestrator ancestor (as under slurmstepd)."""
    return subprocess.run(
        [PYTHON, "-c", code], cwd=cwd, env=ENV | env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def held(tmp_path):
    """A live orchestrator of this host holds the lock with run token 'tok'."""
    holder = subprocess.Popen(["sleep", "60"])
    (tmp_path / LOCK).write_text(json.dumps({
        "pid": holder.pid, "started": psutil.Process(holder.pid).create_time(),
        "host": socket.gethostname(), "what": "snakemake --cores all", "run": "tok",
    }))  # fmt: skip
    yield tmp_path
    holder.kill()
    holder.wait()


def test_a_job_of_the_run_on_the_orchestrators_host_passes(held):
    """A process started by slurmstepd on the orchestrator's host: the token lets it in, and
    it is recorded as a stage (the project is not free while it runs)."""
    proc = _python(held, CLAIM, **{RUN: "tok"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads((held / LOCK).read_text())["stages"]
    assert len(stages) == 1 and stages[0]["pid"] != os.getpid()


@pytest.mark.parametrize("token", [None, "another"])
def test_a_process_of_another_run_is_still_refused(held, token):
    proc = _python(held, CLAIM, **({RUN: token} if token else {}))
    assert proc.returncode != 0
    assert "another run holds this project (snakemake --cores all" in proc.stderr


def _fake(tmp_path: Path, name: str) -> Path:
    """A stand-in orchestrator `name` that runs the Python code given to it, then waits."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    fake = tmp_path / "bin" / name
    fake.write_text(f'#!/bin/sh\n{PYTHON} -c "$1"\n')
    fake.chmod(0o755)
    return fake


def test_the_orchestrator_records_its_token_and_its_jobs_share_it(tmp_path):
    fake = _fake(tmp_path, "snakemake")
    code = "from cdm.lock import claim, run_token; claim(); print(run_token())"
    proc = subprocess.run(
        [str(fake), code], cwd=tmp_path, env=ENV | {RUN: "abc"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "abc"  # a stage finds its run's token, to pass it to srun
    assert json.loads((tmp_path / LOCK).read_text())["run"] == "abc"


def test_dvc_draws_a_token_its_stages_keep(tmp_path):
    fake = _fake(tmp_path, "dvc")
    code = "from cdm.lock import claim, run_token; claim(); claim(); print(run_token())"
    proc = subprocess.run([str(fake), code], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    token = json.loads((tmp_path / LOCK).read_text())["run"]
    assert len(token) == 16 and proc.stdout.strip() == token
    assert run_token(tmp_path) is None  # this test's process is of no run


def test_a_wrapper_is_not_named_as_the_holder(tmp_path):
    """`timeout 60 snakemake ...`: the lock names snakemake, not timeout."""
    fake = _fake(tmp_path, "snakemake")
    code = "from cdm.lock import claim; claim()"
    proc = subprocess.run(
        ["timeout", "60", str(fake), code], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["what"].split()[0].endswith("bin/sh") and str(fake) in held["what"], held


@pytest.mark.parametrize(
    "argv, name",
    [
        (["timeout", "180", "snakemake", "--cores", "all"], "timeout"),
        (["/v/bin/python3", "/v/bin/snakemake", "--cores", "all"], "snakemake"),
        (["python", "-m", "snakemake", "--target-jobs", "x"], "snakemake"),
        (["/usr/bin/dvc", "repro"], "dvc"),
        (["python", "-u", "-m", "dvc", "repro"], "dvc"),
        (["bash", "-c", "snakemake"], "bash"),
    ],
)
def test_program_is_what_runs_not_its_arguments(argv, name):
    assert program(argv) == name


def test_a_task_of_a_runs_srun_step_under_dvc_is_not_killed(tmp_path):
    """srun passes DVC_STAGE on to its tasks, which have no dvc ancestor: with the run's token
    they are tasks of the run, not orphans of a dead `dvc repro`."""
    code = "from cdm.lock import watch; watch(); print('alive')"
    task = _python(tmp_path, code, DVC_STAGE="distill@cdm", **{RUN: "tok"})
    assert task.returncode == 0 and task.stdout.strip() == "alive", task.stderr
    orphan = _python(tmp_path, code, DVC_STAGE="distill@cdm")  # dvc has ended: still killed
    assert orphan.returncode == -9


def test_a_job_of_the_run_is_let_through_in_process(held):
    """The same, through claim's arguments: the token comes from the environment given."""
    me = psutil.Process()
    assert claim(held, me, {RUN: "tok"})["run"] == "tok"
    with pytest.raises(Exception, match="another run holds this project"):
        claim(held, me, {})


def test_the_srun_step_of_a_dvc_runs_first_stage_carries_a_token(tmp_path):
    """distill as the first stage `dvc repro` runs (a rerun after a stop): no stage has drawn
    the token yet when cdm.launch starts the step; it claims first, so its tasks carry it."""
    fake = _fake(tmp_path, "dvc")
    step = [PYTHON, "-c", "import os; print(os.environ.get('CDM_RUN'))"]
    code = f"from cdm.launch import run_step; run_step({step!r})"
    proc = subprocess.run([str(fake), code], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    token = json.loads((tmp_path / LOCK).read_text())["run"]
    assert proc.stdout.strip() == token and len(token) == 16
