"""Crafted inputs (issue 35): nothing a user types deletes their files, nothing they read runs
code. Each case asserts one `error:` line, that nothing ran, and that nothing outside changed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cdm import params as P
from cdm.places import PUBLISH_MARKER
from tests.conftest import PYTHON, ROOT, copy_project

ENV = os.environ | {"PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: a before/after snapshot."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    return lines[0]


# --- publish --------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, monkeypatch) -> Path:
    """A project folder holding an exported sd3-style student and its scores (cwd)."""
    project = tmp_path / "project"
    student = project / "models/students/cdm"
    (student / "transformer").mkdir(parents=True)
    (student / "model_index.json").write_text("{}")
    (student / "transformer/weights.safetensors").write_bytes(b"w" * 64)
    (student / "README.md").write_text("---\nlicense: other\n---\n# a student\n")
    (project / "results").mkdir()
    (project / "results/metrics.json").write_text(json.dumps({"cdm": {"4": {"clip": 0.3}}}))
    (project / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(project)
    return project


def publish(out: str, capsys) -> tuple[int, str]:
    from cdm.publish import main

    rc = main(["cdm", "--out", out])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("out", ["mine", ".", "models", "models/students/mine", "..", "results"])
def test_publish_refuses_a_folder_it_did_not_make(finished, capsys, out):
    (finished / "mine").mkdir()
    (finished / "mine/thesis.tex").write_text("my own work")
    before = tree(finished.parent)
    rc, err = publish(out, capsys)
    assert rc == 2 and "--out" in one_error_line(err)
    assert tree(finished.parent) == before  # nothing removed, nothing written


def test_publish_writes_a_new_folder_and_replaces_only_its_own(finished, capsys):
    assert publish("exports/cdm", capsys)[0] == 0
    assert (finished / "exports/cdm" / PUBLISH_MARKER).is_file()
    assert (finished / "exports/cdm/transformer/weights.safetensors").is_file()
    assert publish("exports/cdm", capsys)[0] == 0  # its own folder: replaced
    (finished / "empty").mkdir()
    assert publish("empty", capsys)[0] == 0


# --- YAML -----------------------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """Billion laughs inside a known key: 9**levels seeds from a few hundred bytes."""
    rows = ["    - &l0 [0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    rows += [f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "ablation:\n  seeds:\n" + "\n".join(rows) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(alias_bomb())
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.validate", "--no-lock", str(params)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "alias" in one_error_line(proc.stderr)
    start = time.monotonic()
    with pytest.raises(P.ParamsError, match="anchor or alias"):
        P.load(params)
    assert time.monotonic() - start < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_an_overlay_with_aliases_or_object_tags_is_refused(tmp_path):
    from cdm.overlay import main

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    marker = tmp_path / "ran"
    tagged = f'seed: !!python/object/apply:builtins.open ["{marker}", "w"]\n'
    for name, text in {"bomb.yaml": alias_bomb(), "tag.yaml": tagged}.items():
        (tmp_path / name).write_text(text)
        before, start = params.read_bytes(), time.monotonic()
        assert main([str(tmp_path / name), "--params", str(params)]) == 2
        assert time.monotonic() - start < 2  # refused, not expanded (minutes before the fix)
        assert params.read_bytes() == before and not marker.exists()


def test_object_tags_and_oversized_files_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    params = tmp_path / "params.yaml"
    params.write_text(f'seed: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    with pytest.raises(P.ParamsError, match="tags that construct objects are refused"):
        P.load(params)
    params.write_text("seed: 0\n" + "# padding\n" * 200_000)
    with pytest.raises(P.ParamsError, match="over the 1,000,000"):
        P.load(params)
    assert not marker.exists()


# --- output paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["outside", "root", "models"])
def test_an_overlay_pointing_an_output_outside_the_project_is_refused(tmp_path, where):
    from cdm.overlay import main

    project, outside = tmp_path / "project", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's")
    project.mkdir()
    params = project / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    out = {"outside": str(outside), "root": ".", "models": "models"}[where]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"world_judge:\n  out: {out}\n")
    before = tree(tmp_path)
    assert main([str(overlay), "--params", str(params)]) == 2
    assert tree(tmp_path) == before
    text = params.read_text().replace("out: src/cdm/world/pretrained/judge", f"out: {out}")
    params.write_text(text)
    with pytest.raises(P.ParamsError, match="world_judge.out"):
        P.load(params)


# --- Snakemake never templates params.yaml --------------------------------------------------


def snakemake_dry_run(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "-n", "--cores", "1"],
        cwd=work, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_snakemake_never_evaluates_yte_in_params(tmp_path):
    work = copy_project(tmp_path / "work")
    marker = tmp_path / "ran"
    code = f'__import__("pathlib").Path("{marker}").touch()'
    text = (work / "params.yaml").read_text()
    (work / "params.yaml").write_text(f"__use_yte__: true\n?{code}: 1\nyte_value: ?{code}\n{text}")
    proc = snakemake_dry_run(work)
    assert proc.returncode != 0
    assert not marker.exists()


def test_snakemake_plans_the_unmodified_params(tmp_path):
    work = copy_project(tmp_path / "work")
    proc = snakemake_dry_run(work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rule distill" in proc.stdout


# --- checkpoints ----------------------------------------------------------------------------


class Planted:
    """Unpickling this creates `marker`: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class StubEngine:
    """What load_latest asks of a DeepSpeed engine: its checkpoint engine's load, as DeepSpeed
    calls it for the model states file."""

    def __init__(self) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        self.checkpoint_engine = TorchCheckpointEngine()

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        self.checkpoint_engine.load(f"{load_dir}/{tag}/mp_rank_00_model_states.pt", "cpu")


def test_a_planted_pickle_in_a_checkpoint_is_refused(tmp_path):
    import torch

    from cdm import checkpoints
    from cdm.cli import StageFailure

    marker = tmp_path / "ran"
    folder = tmp_path / "run/it-0000001"
    for model in ("student", "fake"):
        (folder / model / "state").mkdir(parents=True)
        torch.save({"module": Planted(marker)}, folder / model / "state/mp_rank_00_model_states.pt")
    (folder / "state.json").write_text(json.dumps({"iteration": 1, "world_size": 1}))
    checkpoints.write_manifest(folder)  # the writer writes the manifest too: it proves nothing
    before = tree(tmp_path)
    with pytest.raises(StageFailure) as refused:
        checkpoints.load_latest(tmp_path / "run", StubEngine(), StubEngine(), ema=None)
    assert "refused" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists() and tree(tmp_path) == before
