"""Multi-node distillation for real, on localhost: `cdm.launch --nodes 2` inside a (fake)
SLURM allocation builds its srun step; a fake `srun` runs that step's per-node command twice,
as SLURM would on two nodes (SLURM_NODEID 0 and 1), so two accelerate launchers meet over
gloo as machines 0 and 1 of one process each. The student must equal one launcher of two
processes; checkpoints cross between the two layouts; a dead node ends the other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import PYTHON, ROOT
from tests.test_distill import (
    ENV,
    SMALL,
    _clone,
    _max_diff,
    _reference,
    _student,
    _two_processes,
)

# srun: run the command after the options once per node, SLURM_NODEID set in each task's
# environment (the batch shell's never is); the launchers' pids go to $FAKE_SRUN_PIDS.
SRUN = f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(repr(args) + "\\n")
nodes = int(next(a for a in args if a.startswith("--nodes=")).split("=")[1])
cmd = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
tasks = [
    subprocess.Popen(cmd, env=os.environ | {{"SLURM_NODEID": str(n), "SLURM_JOB_NODELIST": "n[0-1]"}})
    for n in range(nodes)
]
with open(os.environ["FAKE_SRUN_PIDS"], "w") as f:
    f.write("\\n".join(str(t.pid) for t in tasks))
codes = [t.wait() for t in tasks]
print("fake srun: task exit codes", codes, file=sys.stderr)
sys.exit(next((c for c in codes if c), 0))
"""
# scontrol show hostnames <list>: both "nodes" are this machine.
SCONTROL = "#!/bin/sh\necho 127.0.0.1\necho 127.0.0.1\n"


@pytest.fixture
def project(distill_project) -> Path:
    """conftest's session-wide tiny distill project: teacher prepared, prompts cached."""
    return distill_project


@pytest.fixture
def cluster(tmp_path: Path) -> dict[str, str]:
    """The environment of a job's batch shell with the fake srun and scontrol on PATH."""
    bin_ = tmp_path / "fake-slurm"
    bin_.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    return env | {
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "FAKE_SRUN_PIDS": str(tmp_path / "srun.pids"),
        "PYTHONPATH": str(ROOT / "src"),
    }


def _launch(work: Path, env: dict, nodes: int, stage: int, port: int, *extra: str) -> list[str]:
    """`cdm.launch` of distill as the rule runs it: `nodes` launchers of 2 // nodes processes."""
    return [
        PYTHON, "-m", "cdm.launch", *(["--nodes", str(nodes)] if nodes > 1 else []),
        "--config_file", str(ROOT / f"configs/accelerate/zero{stage}.yaml"),
        "--num_processes", str(2 // nodes), "--main_process_port", str(port),
        str(ROOT / "src/distill.py"), "--method", "cdm", *extra,
    ]  # fmt: skip


def _run(work: Path, env: dict, *launch) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _launch(work, env, *launch), cwd=work, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _layout(project: Path, dst: Path, nodes: int, stage: int) -> Path:
    """A scratch project whose params say `nodes` nodes of 2 // nodes processes."""
    return _clone(project, dst, zero_stage=stage, nodes=nodes, num_processes=2 // nodes, **SMALL)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_nodes_equal_one_node_of_two_processes(project, reference, tmp_path, cluster, stage):
    one = _two_processes(reference, project, stage)
    two = _layout(project, tmp_path / "two", 2, stage)
    _run(two, cluster, 2, stage, 29620 + stage)
    step = eval(Path(cluster["FAKE_SRUN_LOG"]).read_text().splitlines()[-1])
    assert step[:5] == [
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "bash",
    ]
    assert '--machine_rank "$SLURM_NODEID"' in step[6] and "--num_processes 2 " in step[6]
    diff = _max_diff(_student(one, "cdm"), _student(two, "cdm"))
    print(f"ZeRO-{stage}: 2 nodes x 1 process vs 1 node x 2 processes, max abs diff {diff:.3g}")
    assert diff <= 1e-6
    shards = list(two.glob("checkpoints/cdm-*/it-*/student/state/*optim_states.pt"))
    assert {p.name.split("_")[3] for p in shards} == {"0", "1"}  # one shard per node's rank
    # Negative controls: the student moved (nodes that skipped every update would still
    # agree), and node 1's draws count (one process alone, rank 0's draws, differs).
    student = _student(two, "cdm")
    teacher = load_file(two / "models/teacher/transformer/diffusion_pytorch_model.safetensors")
    moved = max((student[k] - teacher[k]).abs().max().item() for k in teacher)
    alone = _student(_reference(reference, project, "cdm", zero_stage=stage, **SMALL), "cdm")
    assert moved > 1e-5 and _max_diff(student, alone) > 0.01 * moved
    assert diff <= 1e-3 * moved


def test_checkpoints_cross_between_one_and_two_nodes(project, reference, tmp_path, cluster):
    """Two nodes to iteration 2, one node to iteration 4, two nodes to the end (6): both
    crossings in one run, which must give the straight student."""
    straight = _student(_two_processes(reference, project, 2), "cdm")
    work = _layout(project, tmp_path / "work", 2, 2)
    _run(work, cluster, 2, 2, 29630, "--stop-after", "2")
    for nodes, start, stop in ((1, 2, ("--stop-after", "4")), (2, 4, ())):
        assert not (work / "models/students/cdm").exists()
        (work / "params.yaml").write_text(
            _layout(project, tmp_path / f"params-{start}", nodes, 2)
            .joinpath("params.yaml")
            .read_text()
        )
        proc = _run(work, cluster, nodes, 2, 29631 + start, *stop)
        assert f"resuming from iteration {start}" in proc.stderr, proc.stderr[-2000:]
    diff = _max_diff(straight, _student(work, "cdm"))
    print(f"ZeRO-2: 2 nodes to iteration 2, 1 node to 4, 2 nodes to 6: max abs diff {diff:.3g}")
    assert diff <= 1e-6


def test_a_dead_node_ends_the_other_and_the_rerun_resumes(project, reference, tmp_path, cluster):
    straight = _student(_two_processes(reference, project, 2), "cdm")
    work = _layout(project, tmp_path / "work", 2, 2)
    proc = subprocess.Popen(
        _launch(work, cluster, 2, 2, 29640), cwd=work, env=cluster,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while not list(work.glob("checkpoints/cdm-*/it-0000002/state.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.05)
    node1 = int(Path(cluster["FAKE_SRUN_PIDS"]).read_text().split()[1])
    os.kill(node1, signal.SIGKILL)  # node 1's launcher: its worker dies with it (lifeline)
    killed = time.time()
    _, err = proc.communicate(timeout=300)  # no srun --kill-on-bad-exit here: gloo ends it
    ended = time.time() - killed
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    print(f"node 0 ended {ended:.1f} s after node 1 died: {lines}")
    assert proc.returncode != 0 and len(lines) == 1, err[-3000:]
    # Ended by the broken connection, not by the collective's timeout (30 min by default).
    assert ended < 120, f"node 0 took {ended:.0f} s to end"
    assert not (work / "models/students/cdm").exists()
    newest = max(int(p.parent.name[3:]) for p in work.glob("checkpoints/cdm-*/it-*/state.json"))
    rerun = _run(work, cluster, 2, 2, 29641)
    assert newest >= 2 and f"resuming from iteration {newest}" in rerun.stderr, rerun.stderr
    assert _max_diff(straight, _student(work, "cdm")) <= 1e-6


def test_the_dvc_stage_refuses_two_nodes_outside_an_allocation(tmp_path):
    """dvc.yaml's distill command, rendered with distill.nodes: 2 as DVC renders it, run
    outside SLURM: one line naming the fix, exit 2, nothing written."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill"]["do"]
    values = {"${distill.nodes}": "2", "${distill.zero_stage}": "2"}
    values |= {"${distill.num_processes}": "8", "${item}": "cdm"}
    cmd = stage["cmd"]
    for key, value in values.items():
        cmd = cmd.replace(key, value)
    assert "distill.nodes" in stage["params"] and "${" not in cmd
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        cmd, shell=True, cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT / "src")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: distill.nodes is 2, which needs a SLURM allocation")
    assert "salloc -N 2" in proc.stderr and "distill.nodes: 1" in proc.stderr
    assert list(tmp_path.iterdir()) == []
