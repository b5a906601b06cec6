"""The SLURM profile on a real Slurm: `snakemake --cores all --profile slurm` (and `dvc repro`
in an allocation) against slurmctld, slurmdbd and two slurmd, hosts node1 and node2, each in
its own UTS and mount namespace on this machine (workflow/scripts/local-slurm.sh, which the
session fixture starts and, if it started it, stops). Skipped in one line where it cannot run
(not root, no apt-get, a daemon that does not start).

The scratch projects run the profile as shipped, with what a user of a small machine sets:
CDM_SLURM_SCALE=small (every rule one CPU, so one thread: the local runs they are compared
with used one, and the thread count changes a student), one sample job per set (shards=1),
and the plugin's status checks every few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, clone, copy_project, edit_params, tiny_world_project
from tests.test_distill import SMALL, _max_diff, _student, _two_processes, _write_params
from tests.test_faults import digest

pytest.importorskip("snakemake_executor_plugin_slurm")
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("real_slurm")]

SCRIPT = ROOT / "workflow/scripts/local-slurm.sh"
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))} | {
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "DS_ACCELERATOR": "cpu",
    "CDM_SLURM_SCALE": "small",  # the profile's knob for a small node (docs/cluster.md)
    "CDM_SLURM_STATUS_EVERY": "2",  # no back-off between status checks (cdm.slurmstate)
}
RULES = ("prepare_teacher", "cache_teacher", "distill", "sample", "score", "report")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")
STUDENT = "models/students/cdm/transformer/diffusion_pytorch_model.safetensors"


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=ENV
    )


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A running local Slurm: started here unless it already ran, then stopped again."""
    if os.geteuid() != 0:
        pytest.skip("real Slurm: needs root to install and start its daemons")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("real Slurm: not installed, and no apt-get to install it")
    was_up = _script("status").returncode == 0
    proc = _script("up")
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"real Slurm did not start: {said}")
    yield
    if not was_up:
        _script("down")


def _profile(work: Path, **resources: dict) -> None:
    """The scratch project's copy of the profile: one sample job per set, the first status
    check after 2 s (the plugin waits 40 s by default; ENV's CDM_SLURM_STATUS_EVERY keeps
    the next ones 2 s apart), and `resources` merged into set-resources."""
    path = work / "workflow/profiles/slurm/config.yaml"
    profile = yaml.safe_load(path.read_text())
    config = [c for c in profile.get("config", []) if not c.startswith("shards=")]
    profile["config"] = [*config, "shards=1"]
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["seconds-between-status-checks"] = 2
    for rule, values in resources.items():
        profile.setdefault("set-resources", {}).setdefault(rule, {}).update(values)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


class Run:
    """`snakemake --cores all --profile slurm <args>` in `work`, its output in a file (read
    while it runs), the SLURM jobs it submitted cancelled if it is stopped by a timeout."""

    def __init__(self, work: Path, *args: str, name: str = "snakemake") -> None:
        self.work, self.log = work, work.parent / f"{name}.out"
        cmd = ["snakemake", "--cores", "all", "--profile", "slurm", *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=work, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True
            )

    @property
    def out(self) -> str:
        return self.log.read_text()

    @property
    def jobs(self) -> list[str]:
        return SUBMITTED.findall(self.out)

    def wait(self, timeout: float = 600, until: Callable[[], bool] | None = None) -> int | None:
        """Its exit code; with `until`, return None as soon as `until()` holds instead."""
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            if until is not None and until():
                return None
            if time.time() > deadline:
                self.stop()
                pytest.fail(f"snakemake still ran after {timeout} s:\n{self.out[-3000:]}")
            time.sleep(0.2)
        return self.proc.returncode

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # the plugin cancels its jobs on Ctrl-C
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True)


def _snakemake(work: Path, *args: str, name: str = "snakemake", timeout: float = 600) -> Run:
    run = Run(work, *args, name=name)
    run.wait(timeout)
    return run


def _hosts(jobs: list[str]) -> set[str]:
    """The nodes the jobs ran on (sacct's NodeList, expanded by scontrol)."""
    lists = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", ",".join(jobs)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", ",".join(lists)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return set(hosts.split())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(work: Path, iteration: int) -> bool:
    return bool(list(work.glob(f"checkpoints/cdm-*/it-{iteration:07d}/state.json")))


def _newest(work: Path) -> int:
    """The newest complete checkpoint's iteration (0: none yet)."""
    done = work.glob("checkpoints/cdm-*/it-*/state.json")
    return max((int(p.parent.name[3:]) for p in done), default=0)


def test_the_tiny_world_dag_runs_to_the_report_and_equals_a_local_run(
    slurm, snakemade, tiny_teacher_dir, tmp_path
):
    """Every stage a SLURM job on node1/node2, to results/report.html; metrics.json and
    teacher.json equal `snakemade`'s (snakemake --cores 1: one thread, the same params)."""
    work = tiny_world_project(
        tmp_path / "p", tiny_teacher_dir, distill={"methods": ["cdm"], "checkpoint_every": 2}
    )
    _profile(work)
    run = _snakemake(work)
    assert run.proc.returncode == 0, run.out[-4000:]
    ran = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", run.out)
    assert sorted(r for r in ran if r != "all") == sorted([*RULES, "sample", "sample"]), ran
    assert len(run.jobs) == 8 and _hosts(run.jobs) <= {"node1", "node2"}
    threads = set(re.findall(r"OMP_NUM_THREADS=(\d+)", run.out))
    assert threads == {"1"}, threads
    assert (work / "results/report.html").is_file()
    for name in ("results/metrics.json", "results/teacher.json"):
        assert json.loads((work / name).read_text()) == json.loads((snakemade / name).read_text())


def test_a_distill_job_at_its_time_limit_checkpoints_is_requeued_and_resumes(
    slurm, finished, tmp_path
):
    """A 5-minute job whose distill stops 10 minutes before its end (distill.stop_before_limit,
    from scontrol's EndTime): it checkpoints after its first iteration and exits, cdm.launch
    requeues the job (the same SLURM job comes back: Slurm's requeue, not Snakemake's retry),
    and distill resumes from that checkpoint to the uninterrupted run's student.

    Once the checkpoint is there the test gives the job 30 minutes: with one limit for every
    attempt each would stop after one iteration, as the first did, and the test would pay a
    requeue per iteration. A limit shorter than the 10 minutes makes the stop deterministic;
    Slurm's shortest (1 minute) could end a job still starting on a loaded machine."""
    work = clone(finished, tmp_path / "p")  # its student: 4 uninterrupted iterations
    for part in ("models/students/cdm", "checkpoints"):
        shutil.rmtree(work / part)
    edit_params(work / "params.yaml", distill={"stop_before_limit": 600})  # bookkeeping key
    _profile(work, distill={"runtime": 5})
    run = Run(work, "models/students/cdm")
    assert run.wait(420, until=lambda: _checkpoint(work, 1) and run.jobs) is None, run.out
    [job] = run.jobs
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], check=True)
    assert run.wait(600) == 0, run.out[-4000:]
    assert run.jobs == [job]  # requeued, not submitted again
    states = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert states == ["REQUEUED", "COMPLETED"], states
    log = (work / "logs/distill_cdm.log").read_text()  # the second attempt's
    assert "resuming from iteration 1" in log, log[-2000:]
    assert _sha256(work / STUDENT) == _sha256(finished / STUDENT)


def test_scancel_of_a_running_distill_job_is_named_and_the_rerun_resumes(slurm, finished, tmp_path):
    work = clone(finished, tmp_path / "p")
    for part in ("models/students/cdm", "checkpoints"):
        shutil.rmtree(work / part)
    # A checkpoint every 2 iterations (about 0.1 s each); cancelled halfway, so that the
    # rerun is short but the job does not end before the scancel reaches it.
    edit_params(work / "params.yaml", distill={"iterations": 200, "checkpoint_every": 1})
    _profile(work)
    before = digest(work)
    run = Run(work, "models/students/cdm")
    assert run.wait(420, until=lambda: _newest(work) >= 100 and run.jobs) is None, run.out
    [job] = run.jobs
    subprocess.run(["scancel", job], check=True)
    # Snakemake must notice: sacct says "CANCELLED by <uid>", which the plugin (2.8) alone
    # takes for a job still running, and would wait on forever.
    assert run.wait(120) != 0, run.out[-4000:]
    named = [
        line for line in run.out.splitlines()
        if re.search(rf"\bdistill\b.*\b{job}\b|\b{job}\b.*\bdistill\b", line)
        and re.search(r"\bcancel", line, re.IGNORECASE)
    ]  # fmt: skip
    assert len(named) == 1, run.out[-4000:]
    after = digest(work)
    kept = {k: v for k, v in before.items() if not k.startswith(("checkpoints/", "logs/"))}
    assert {k: after.get(k) for k in kept} == kept
    assert not (work / "models/students/cdm").exists()
    newest = _newest(work)
    assert 100 <= newest < 200
    rerun = _snakemake(work, "models/students/cdm", name="rerun")
    assert rerun.proc.returncode == 0, rerun.out[-4000:]
    log = (work / "logs/distill_cdm.log").read_text()
    assert f"resuming from iteration {newest}" in log, log[-2000:]


def test_a_failing_job_shows_its_own_error_line(slurm, finished, tmp_path):
    """Not only "SLURM status is: 'FAILED'. Reason: Unknown": the stage's `error:` line, once
    (a deterministic failure is not resubmitted)."""
    work = clone(finished, tmp_path / "p")
    shutil.rmtree(work / "models/students/cdm")
    shard = work / "cache/prompts/train/shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:500])
    _profile(work)
    run = _snakemake(work, "models/students/cdm")
    assert run.proc.returncode != 0
    said = "error: cache/prompts/train/shard-00000.safetensors is truncated"
    assert said in run.out, run.out[-4000:]
    assert len(run.jobs) == 1, run.out[-4000:]


def _two_node_project(distill_project: Path, dst: Path) -> Path:
    """The project's files over a copy of the tiny distill project (teacher prepared, prompts
    cached), its params distill.nodes: 2 of one process each (test_multinode's layout)."""
    shutil.copytree(distill_project, dst, symlinks=True)
    copy_project(dst, skip=("dvc.lock", "params.yaml"))
    _write_params(dst / "params.yaml", zero_stage=2, nodes=2, num_processes=1, **SMALL)
    return dst


@pytest.mark.multiproc
@pytest.mark.parametrize("orchestrator", ["snakemake", "dvc"])
def test_two_nodes_through_real_srun_equal_one_node_of_two_processes(
    slurm, distill_project, reference, tmp_path, orchestrator
):
    """distill.nodes: 2 as one SLURM job of two nodes: its srun step starts one launcher on
    node1 and one on node2 (two slurmd, each its own host), which meet over gloo; the student
    equals one node of two processes to test_multinode's tolerance."""
    one = _two_processes(reference, distill_project, 2)
    work = _two_node_project(distill_project, tmp_path / "p")
    if orchestrator == "snakemake":
        _profile(work)
        run = _snakemake(work, "models/students/cdm")
        assert run.proc.returncode == 0, run.out[-4000:]
        [job] = run.jobs
        out = run.out
    else:  # docs/cluster.md: `dvc repro` inside `salloc -N 2` (-t above stop_before_limit)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q", "--force"]):
            subprocess.run(cmd, cwd=work, env=ENV, check=True, capture_output=True)
        salloc = ["salloc", "-N", "2", "-p", "gpu", "-A", "my-account", "-c", "1", "--mem",
                  "2000", "-t", "30", "dvc", "repro"]  # fmt: skip
        # The whole chain (validate first, which takes the project lock), then distill alone
        # again, as a rerun after a stop is (its finished checkpoint: nothing to train).
        for args in (["distill@cdm"], ["--force", "--single-item", "distill@cdm"]):
            proc = subprocess.run(
                [*salloc, *args], cwd=work, env=ENV, capture_output=True, text=True, timeout=600
            )
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out[-4000:]
            _same_student(one, work, f"dvc repro {' '.join(args)}")
        job = re.search(r"Granted job allocation (\d+)", out).group(1)
    assert _hosts([job]) == {"node1", "node2"}, out[-2000:]
    _same_student(one, work, orchestrator)


def _same_student(one: Path, work: Path, label: str) -> None:
    diff = _max_diff(_student(one, "cdm"), _student(work, "cdm"))
    print(f"{label}: 2 nodes x 1 process (real srun) vs 1 node x 2, max abs diff {diff:.3g}")
    assert diff <= 1e-6
