"""End-to-end runs of the stage scripts on tiny configs, in a scratch working folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from cdm.world.teacher import WorldTeacher
from tests.conftest import PYTHON, ROOT


def _params(tmp: Path, **sections: dict) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["judge"]["path"] = str(ROOT / data["judge"]["path"])
    data["teacher"]["path"] = str(ROOT / data["teacher"]["path"])
    for name, values in sections.items():
        data[name] = data.get(name, {}) | values
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(script: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "src" / script), *args],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_prepare_teacher_writes_the_report(tmp_path, tiny_teacher_dir):
    params = _params(
        tmp_path,
        teacher={"path": str(tiny_teacher_dir), "steps": 2, "cfg_scale": 3.0},
        prepare_teacher={"n_pairs": 24, "batch_size": 16, "judge_renders": 512},
    )
    proc = _run("prepare_teacher.py", tmp_path, "--params", str(params))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "results/teacher.json").read_text())
    for key in ("alignment_cfg", "alignment_nocfg", "fd_cfg", "fd_nocfg"):
        assert key in report
    assert 0 <= report["alignment_cfg"] <= 1 and report["fd_nocfg"] > 0
    assert (report["n_pairs"], report["cfg_scale"], report["steps"]) == (24, 3.0, 2)
    # Its wall time is a timing, not a metric of the teacher: kept out of teacher.json.
    assert "eval_seconds" not in report
    timings = json.loads((tmp_path / "logs/timings/prepare_teacher.json").read_text())
    assert set(timings) == {"eval_seconds"} and timings["eval_seconds"] > 0
    # The resolved teacher is written where the later stages read it, and loads.
    WorldTeacher.from_pretrained(tmp_path / "models/teacher")


def test_broken_params_stop_before_any_output(tmp_path):
    params = _params(tmp_path, prepare_teacher={"n_pairs": -4})
    proc = _run("prepare_teacher.py", tmp_path, "--params", str(params))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "prepare_teacher.n_pairs" in proc.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "results").exists()


def test_missing_teacher_folder_is_one_line(tmp_path):
    params = _params(tmp_path, teacher={"path": str(tmp_path / "nowhere")})
    proc = _run("prepare_teacher.py", tmp_path, "--params", str(params))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "teacher folder" in proc.stderr
    assert not (tmp_path / "models").exists()


def test_world_teacher_target_trains_a_few_steps(tmp_path):
    out = tmp_path / "teacher"
    params = _params(
        tmp_path, world_teacher={"num_layers": 1, "heads": 2, "head_dim": 8, "text_width": 16}
    )
    proc = _run(
        "train_world.py",
        tmp_path,
        "teacher",
        "--params",
        str(params),
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and rows[-1].startswith("3,")
    assert json.loads((out / "params.json").read_text())["steps"] == 3
    assert WorldTeacher.from_pretrained(out).num_parameters > 0


def test_make_run_with_broken_params_writes_nothing(tmp_path):
    """`make run` on a copy of the project whose params.yaml is broken."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if not files:  # not a git checkout: copy the essentials
        files = ["Makefile", "Snakefile", "params.yaml", "pyproject.toml"]
    for name in files:
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    text = (tmp_path / "params.yaml").read_text().replace("steps: 28", "steps: -28")
    (tmp_path / "params.yaml").write_text(text)
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    venv = Path(PYTHON).parent.parent
    (tmp_path / "stamp").touch()  # installed already: make must not pip install from here
    proc = subprocess.run(
        ["make", "run", f"VENV={venv}", "STAMP=stamp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: params.yaml: teacher.steps: input should be greater than 0 (got -28); fix it in params.yaml"
    ]
    assert not (tmp_path / "models").exists()
    after = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert after == before  # the committed results are untouched and nothing was added
