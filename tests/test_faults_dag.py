"""Faults of the DAG (issue 21, cases 3, 4, 6, 7 and 9) on a copy of one finished tiny
project: each ends in one `error:` line naming the file or key, a non-zero exit, and the
hashes of every finished output unchanged (the `work` fixture checks them after each test).
"""

# ruff: noqa: F811 (the fixtures of test_faults, imported, are this module's arguments)
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from cdm import params as P
from cdm.lock import LOCK, ProjectBusy, claim
from tests.conftest import PYTHON, call_stage, edit_params
from tests.test_faults import _run, _stage, digest, one_line, work  # noqa: F401


class Proc:
    """call_stage's (code, stderr) shaped like a CompletedProcess for one_line."""

    def __init__(self, code: int, stderr: str) -> None:
        self.returncode, self.stderr = code, stderr


def _validate(cwd: Path) -> subprocess.CompletedProcess:
    return _run(cwd, PYTHON, "-m", "cdm.validate", "--no-lock")


# ------------------------------------------------------------- case 3: refused before removal

FAULTS = {  # what each fault does to the project, the rule it would fail, and the line
    "teacher_file": ("prepare_teacher", "teacher.path 'teacher.txt' is a file"),
    "pairs_not_above_k": ("score", "prompts.eval_pairs (3) must be above score.k (3)"),
    "corrupt_metrics": ("report", "results/metrics.json is not valid JSON"),
}


def _break(work: Path, fault: str) -> None:
    if fault == "teacher_file":
        (work / "teacher.txt").write_text("not a model\n")
        edit_params(work / "params.yaml", teacher={"path": "teacher.txt"})
    elif fault == "pairs_not_above_k":
        edit_params(work / "params.yaml", prompts={"eval_pairs": 3}, score={"k": 3})
    else:
        (work / "results/metrics.json").write_text('{"cdm": ')


@pytest.mark.parametrize("orchestrator", ["snakemake", "dvc"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_knowable_fault_is_refused_before_any_output_is_removed(work, fault, orchestrator):
    metrics = (work / "results/metrics.json").read_bytes()
    rule, line = FAULTS[fault]
    _break(work, fault)
    if orchestrator == "snakemake":
        proc = _run(work, "snakemake", "--cores", "1", "--forcerun", rule)
    else:
        assert _run(work, "git", "init", "-q").returncode == 0
        assert _run(work, "dvc", "init", "-q", "--force").returncode == 0
        proc = _run(work, "dvc", "repro")
        assert "Running stage 'validate'" in proc.stdout
        assert "Running stage 'prepare_teacher'" not in proc.stdout
    assert proc.returncode != 0
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if line in x]
    assert said and "Traceback" not in said[0], (proc.stdout + proc.stderr)[-3000:]
    (work / "results/metrics.json").write_bytes(metrics)  # the fixture hashes the rest


@pytest.mark.parametrize("orchestrator", ["snakemake", "dvc"])
def test_an_unforeseeable_fault_leaves_the_previous_result(work, orchestrator):
    """The judge's weights go bad where no check looks: score fails, and metrics.json and
    scores.parquet (removed when score started) are the previous ones (the fixture hashes
    every finished output). Snakemake: cdm.keep puts them back; DVC: persist: true."""
    weights = work / "src/cdm/world/pretrained/judge/judge.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    try:
        if orchestrator == "snakemake":
            proc = _run(
                work, "snakemake", "--cores", "1", "--forcerun", "score", "--until", "score"
            )
            out = proc.stdout + proc.stderr
            assert "rule score:" in out and "kept: the previous" in out, out[-3000:]
            assert "results/metrics.json" in out.split("kept: the previous", 1)[1]
            assert not (work / ".cdm-kept").exists()
        else:
            assert _run(work, "git", "init", "-q").returncode == 0
            assert _run(work, "dvc", "init", "-q", "--force").returncode == 0
            proc = _run(work, "dvc", "repro", "--single-item", "--force", "score")
            assert "Running stage 'score'" in proc.stdout, proc.stdout[-2000:]
        assert proc.returncode != 0
        # ... because of the judge's weights, named in the stage's one line (not any failure).
        said = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("error: ")]
        assert any("judge.safetensors is truncated or not a safetensors file" in x for x in said), (
            proc.stdout + proc.stderr
        )[-3000:]
    finally:
        weights.write_bytes(saved)


# ------------------------------------------------------------- case 4: no orphan, no free lock


@pytest.mark.parametrize("shell", ["/bin/bash", None])  # bash execs the stage, dash forks it
def test_a_stage_dies_with_dvc_repro_on_sigterm(finished, tmp_path, shell):
    """SIGTERM of `dvc repro` (not of its group) during a stage: the stage ends with it and
    writes nothing more. (DVC itself removes the stage's outs when it starts it.) DVC runs
    the command in $SHELL, or in /bin/sh where SHELL is unset (as under CI): dash forks the
    stage instead of exec'ing it, so the stage is the process that claimed the lock."""
    work = tmp_path / "p"
    shutil.copytree(finished, work, symlinks=True)
    assert _run(work, "git", "init", "-q").returncode == 0
    assert _run(work, "dvc", "init", "-q", "--force").returncode == 0
    edit_params(work / "params.yaml", prepare_teacher={"n_pairs": 100000})  # a long stage
    env = {k: v for k, v in _env().items() if k != "SHELL"} | ({"SHELL": shell} if shell else {})
    dvc = subprocess.Popen(["dvc", "repro", "prepare_teacher"], cwd=work, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, stage = time.time() + 300, []
    while not stage:  # it has claimed the lock: main() runs
        assert dvc.poll() is None and time.time() < deadline, "the stage never claimed the lock"
        claimed = _stage_pids(work)
        stage = [p for p in psutil.Process(dvc.pid).children(recursive=True) if _runs(p)]
        stage = [p for p in stage if p.pid in claimed]
        time.sleep(0.2)
    tree = psutil.Process(dvc.pid).children(recursive=True)
    dvc.send_signal(signal.SIGTERM)
    dvc.wait(timeout=120)
    _, alive = psutil.wait_procs(tree, timeout=30)  # the watch polls twice a second
    assert not alive, [p.cmdline() for p in alive]
    snapshot = digest(work)
    time.sleep(2)
    assert digest(work) == snapshot


def _stage_pids(work: Path) -> list[int]:
    try:
        return [s["pid"] for s in json.loads((work / LOCK).read_text()).get("stages", [])]
    except (OSError, ValueError):
        return []


def _runs(process: psutil.Process, script: str = "src/prepare_teacher.py") -> bool:
    try:
        return script in " ".join(process.cmdline())
    except psutil.Error:  # a short-lived process of DVC's that has ended
        return False


def _env() -> dict[str, str]:
    from tests.test_faults import ENV

    return ENV


def test_the_lock_is_not_free_while_a_stage_of_a_dead_run_still_runs(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stage = subprocess.Popen(["sleep", "60"])  # the orphan stage, still writing
    try:
        import socket

        (tmp_path / LOCK).write_text(json.dumps({
            "pid": gone.pid, "started": 1.0, "host": socket.gethostname(), "what": "dvc repro",
            "stages": [{"pid": stage.pid, "started": psutil.Process(stage.pid).create_time()}],
        }))  # fmt: skip
        with pytest.raises(ProjectBusy, match="a stage it started still runs"):
            claim(tmp_path)
    finally:
        stage.kill()
        stage.wait()
    assert claim(tmp_path) is None  # the stage ended: the project is free


def test_a_stage_records_itself_and_dies_with_its_orchestrator(tmp_path):
    """A stand-in orchestrator named `dvc` starts a stage script; killing the orchestrator
    alone (its child is not signalled) ends the stage within a second."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "dvc"
    fake.write_text(f'#!/bin/sh\n{PYTHON} -c "$1"\nsleep 60\n')
    fake.chmod(0o755)
    code = (
        "import time; from cdm.lock import claim, watch; claim(); watch(); "
        "open('started', 'w').close(); time.sleep(60)"
    )
    orchestrator = subprocess.Popen([str(fake), code], cwd=tmp_path, env=_env())
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and orchestrator.poll() is None
        time.sleep(0.1)
    child = psutil.Process(orchestrator.pid).children()[0]
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == orchestrator.pid and held["stages"][0]["pid"] == child.pid
    orchestrator.kill()
    orchestrator.wait()
    _, alive = psutil.wait_procs([child], timeout=5)
    assert not alive


# ------------------------------------------------------------- case 6: the params' sets only


def test_an_empty_method_list_is_refused(work):
    edit_params(work / "params.yaml", distill={"methods": []})
    one_line(_validate(work), "distill.methods is empty")


def test_score_and_report_read_only_the_sets_the_params_name(work):
    """A set of a method the params no longer name (dmd2) lies on disk: not scored, not
    reported."""
    samples = work / "samples"
    for stand_in in ("teacher_nocfg/2", "cdm/1", "dmd2/1"):  # copies of a real set
        shutil.copytree(samples / "teacher_cfg/2", samples / stand_in)
    (work / "logs/dmd2").mkdir(parents=True)
    shutil.copy(work / "logs/cdm/train.csv", work / "logs/dmd2/train.csv")
    code, stderr = call_stage(work, "score.py", "--out", "fresh")
    assert code == 0, stderr[-2000:]
    assert set(json.loads((work / "fresh/metrics.json").read_text())) == {
        "teacher_cfg", "teacher_nocfg", "cdm",
    }  # fmt: skip
    shutil.copy(work / "results/teacher.json", work / "fresh/teacher.json")
    code, stderr = call_stage(work, "report.py", "--results", "fresh")
    assert code == 0, stderr[-2000:]
    assert "| dmd2 |" not in (work / "fresh/report.md").read_text()  # no row of the old method


# ------------------------------------------------------------- case 7: publish on the world


def test_publish_refuses_the_shapes_world_in_one_line(work):
    proc = _run(work, PYTHON, "-m", "cdm.publish", "cdm")
    one_line(proc, "models/students/cdm is a shapes-world student", "qwen-image and flux2-klein")
    assert not (work / "exports").exists()


# ------------------------------------------------------------- case 9: one line each


def test_an_infinite_learning_rate_is_refused(work):
    (work / "params.yaml").write_text(
        (work / "params.yaml").read_text().replace("lr_student: 1.0e-05", "lr_student: .inf")
    )
    assert "lr_student: .inf" in (work / "params.yaml").read_text()
    one_line(_validate(work), "distill.lr_student", "finite")


def test_a_prompts_file_in_another_encoding_is_named(work):
    (work / "latin1.txt").write_bytes(
        "a red circle in the center on a dark caf\xe9\n".encode("latin-1")
    )
    edit_params(work / "params.yaml", prompts={"train_file": "latin1.txt"})
    one_line(_validate(work), "prompts.train_file", "latin1.txt", "is not UTF-8 text")


def test_a_folder_where_a_file_is_expected_is_called_a_folder(work):
    (work / "prompts_dir").mkdir()
    edit_params(work / "params.yaml", prompts={"train_file": "prompts_dir"})
    one_line(_validate(work), "prompts.train_file", "prompts_dir is a folder")
    one_line(_run(work, PYTHON, "-m", "cdm.params", "results"), "results is a folder")


@pytest.mark.parametrize("broken", ["overlay", "params"])
def test_overlay_names_a_yaml_syntax_error(work, broken):
    overlay = work / "configs/ablation.yaml"
    target = overlay if broken == "overlay" else work / "params.yaml"
    target.write_text(target.read_text() + "\nbad: [unclosed\n")
    proc = _run(work, PYTHON, "-m", "cdm.overlay", "configs/ablation.yaml")
    one_line(proc, f"{target.relative_to(work)}: not valid YAML at line")


def test_report_names_a_corrupt_json(work):
    metrics = work / "results/metrics.json"
    saved = metrics.read_bytes()
    metrics.write_text('{"cdm": ')
    one_line(Proc(*call_stage(work, "report.py")), "results/metrics.json is not valid JSON")
    metrics.write_bytes(saved)


def test_provenance_counts_code_and_params_not_the_runs_own_outputs(tmp_path, monkeypatch):
    from cdm.report.provenance import provenance

    shutil.copy(Path(__file__).parents[1] / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "results").mkdir()
    for name in ("results/metrics.json", "dvc.lock", "code.py"):
        (tmp_path / name).write_text("1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "run"]):
        subprocess.run([*git, *cmd], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    params = P.load("params.yaml")
    for name in ("results/metrics.json", "dvc.lock"):  # what the run itself rewrote
        (tmp_path / name).write_text("2\n")
    assert provenance("params.yaml", params, tmp_path / "none", {})["dirty"] is False
    (tmp_path / "code.py").write_text("2\n")
    assert provenance("params.yaml", params, tmp_path / "none", {})["dirty"] is True
