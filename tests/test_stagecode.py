"""cdm.stagecode: each stage's code, one record (dvc.yaml's deps) for both orchestrators."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cdm import checkpoints, stagecode
from cdm.stagecode import stage_code
from tests.conftest import PYTHON, ROOT, copy_project

ABLATION = ROOT / "workflow/ablation/dvc.yaml"


def _stages(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["stages"]


def test_a_stage_code_is_its_dvc_deps_under_src_with_directories_as_python_files():
    got = stage_code("score", ROOT / "dvc.yaml")
    named = [d for d in _stages(ROOT / "dvc.yaml")["score"]["deps"] if d.startswith("src/")]
    files = [f for d in named if (ROOT / d).is_file() for f in [d]]
    folder = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "src/cdm/metrics").rglob("*.py")
    )
    assert got[0] == "src/score.py" and set(got) == set(files) | set(folder)
    assert all(f.endswith(".py") and (ROOT / f).is_file() for f in got)


def test_committed_weights_are_not_code():
    """prepare_teacher names src/cdm/world, where the world_* rules write their weights."""
    got = stage_code("prepare_teacher", ROOT / "dvc.yaml")
    assert "src/cdm/world/teacher.py" in got
    assert not [f for f in got if "pretrained" in f]


def test_the_ablation_file_resolves_its_wdir_to_the_project_root():
    got = stage_code("ablation_distill", ABLATION)
    assert got == stage_code("distill", ROOT / "dvc.yaml")  # the same training code


def test_every_stage_of_both_files_names_code_that_exists():
    for path in (ROOT / "dvc.yaml", ABLATION):
        for stage in _stages(path):
            files = stage_code(stage, path)
            assert files and all((ROOT / f).is_file() for f in files), (path, stage)


def test_an_unknown_stage_is_named(tmp_path):
    with pytest.raises(KeyError, match="no stage 'distil'"):
        stage_code("distil", ROOT / "dvc.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: x\n    deps: [data.csv]\n")
    with pytest.raises(ValueError, match="names no code under src/"):
        stage_code("s", tmp_path / "dvc.yaml")


def test_the_code_digest_follows_the_stage_code_only(tmp_path):
    (tmp_path / "src/cdm").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  distill:\n    cmd: x\n    deps: [src/distill.py, src/cdm/losses.py, cache]\n"
    )
    for name in ("src/distill.py", "src/cdm/losses.py", "src/cdm/report.py"):
        (tmp_path / name).write_text("x = 1\n")
    first = stagecode.digest("distill", tmp_path)
    (tmp_path / "src/cdm/report.py").write_text("x = 2\n")  # no stage code of distill
    assert stagecode.digest("distill", tmp_path) == first
    (tmp_path / "src/cdm/losses.py").write_text("x = 2\n")
    assert stagecode.digest("distill", tmp_path) not in ("", first)
    (tmp_path / "dvc.yaml").unlink()  # an installed package: the version pins the code
    assert stagecode.digest("distill", tmp_path) == ""


def test_a_run_folder_is_keyed_by_distills_code(monkeypatch):
    """A code change reruns distill; that rerun must not finish from the old code's run."""
    inputs = {"distill": {"iterations": 4}}
    now = checkpoints.run_name("cdm", inputs)
    monkeypatch.setattr(stagecode, "digest", lambda stage, root=None: "0123456789")
    assert checkpoints.run_name("cdm", inputs) != now
    monkeypatch.setattr(stagecode, "digest", lambda stage, root=None: "")
    assert checkpoints.run_name("cdm", inputs) == f"cdm-{checkpoints.fingerprint(inputs)}"


def test_dvc_lists_every_stage_of_both_pipelines(tmp_path):
    """DVC's own reading of dvc.yaml and the ablation's (params interpolated, `foreach` and
    `matrix` expanded): `dvc stage list` names every plain stage, and the others once per item
    of the params (none for an empty list). The light DVC test of `make test-min` (the
    installed dvc, at its lower bound there)."""
    work = copy_project(tmp_path / "work")
    for cmd in (["git", "init", "-q"], [str(Path(PYTHON).parent / "dvc"), "init", "-q", "--force"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    for path in (ROOT / "dvc.yaml", ABLATION):
        proc = subprocess.run(
            [str(Path(PYTHON).parent / "dvc"), "stage", "list"],
            cwd=work / path.parent.relative_to(ROOT), capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
        stages = _stages(path)
        plain = {n for n, stage in stages.items() if not {"foreach", "matrix"} & set(stage)}
        assert plain <= set(listed) and {n.split("@")[0] for n in listed} <= set(stages), (
            proc.stdout
        )
        assert any("@" in name for name in listed), proc.stdout  # a foreach stage, expanded
