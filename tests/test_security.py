"""Crafted inputs (issue 35): nothing a user types deletes their files, nothing they read runs
code. Each case asserts one `error:` line, that nothing ran, and that nothing outside changed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cdm import manifest
from cdm import params as P
from cdm.places import PUBLISH_MARKER
from tests.conftest import PYTHON, ROOT, clone, copy_project

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
def exported(tmp_path, monkeypatch) -> Path:
    """A project folder holding an exported sd3-style student and its scores (cwd)."""
    project = tmp_path / "project"
    student = project / "models/students/cdm"
    (student / "transformer").mkdir(parents=True)
    (student / "model_index.json").write_text("{}")
    (student / "transformer/weights.safetensors").write_bytes(b"w" * 64)
    (student / "README.md").write_text("---\nlicense: other\n---\n# a student\n")
    manifest.write(student)  # as the distill stage completes an export
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
def test_publish_refuses_a_folder_it_did_not_make(exported, capsys, out):
    (exported / "mine").mkdir()
    (exported / "mine/thesis.tex").write_text("my own work")
    before = tree(exported.parent)
    rc, err = publish(out, capsys)
    assert rc == 2 and "--out" in one_error_line(err)
    assert tree(exported.parent) == before  # nothing removed, nothing written


def test_publish_writes_a_new_folder_and_replaces_only_its_own(exported, capsys):
    assert publish("exports/cdm", capsys)[0] == 0
    assert (exported / "exports/cdm" / PUBLISH_MARKER).is_file()
    assert (exported / "exports/cdm/transformer/weights.safetensors").is_file()
    assert publish("exports/cdm", capsys)[0] == 0  # its own folder: replaced
    (exported / "empty").mkdir()
    assert publish("empty", capsys)[0] == 0
    assert manifest.damage(exported / "empty") is None  # its own card, its own manifest
    assert manifest.damage(exported / "models/students/cdm") is None  # the original's intact


def test_publish_refuses_an_export_that_is_not_whole(exported, capsys):
    weights = exported / "models/students/cdm/transformer/weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    rc, err = publish("exports/cdm", capsys)
    line = one_error_line(err)
    assert rc == 2 and "transformer/weights.safetensors is truncated" in line, line
    assert not (exported / "exports").exists()


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


class StubEMA:
    """What load_latest asks of the EMA: its partitions, after both engines have loaded."""

    def load_partitions(self, tensors: dict) -> None:
        self.loaded = sorted(tensors)


def test_a_planted_pickle_in_a_checkpoint_is_refused(tmp_path):
    """Through the real DeepSpeed engines' load path (ZeRO-2, one CPU process): the files
    DeepSpeed itself wrote resume as data; a pickle planted in their place is refused."""
    import torch
    from safetensors.torch import save_file

    from cdm import checkpoints, zero
    from cdm.cli import StageFailure

    zero.init_distributed(torch.device("cpu"))
    conf = zero.ds_config(1, 2, False, 1.0, {}, 1)
    opt = {"warmup": 2, "betas": (0.9, 0.999), "weight_decay": 0.0, "eps": 1e-8}
    engines = [zero.make_engine(torch.nn.Linear(3, 2), 0.1, config=conf, **opt) for _ in "sf"]
    marker = tmp_path / "ran"
    folder = tmp_path / "run/it-0000001"
    for model, engine in zip(("student", "fake"), engines, strict=True):
        engine.save_checkpoint(str(folder / model), tag="state")
    (folder / "ema").mkdir()
    save_file({"w": torch.zeros(2)}, folder / "ema/rank-00000.safetensors")
    (folder / "state.json").write_text(json.dumps({"iteration": 1, "world_size": 1}))
    checkpoints.write_manifest(folder)
    assert checkpoints.load_latest(tmp_path / "run", *engines, ema=StubEMA()) == 1
    for model in ("student", "fake"):
        planted = folder / model / "state/mp_rank_00_model_states.pt"
        torch.save({"module": Planted(marker)}, planted)
    checkpoints.write_manifest(folder)  # the writer writes the manifest too: it proves nothing
    before = tree(tmp_path)
    with pytest.raises(StageFailure) as refused:
        checkpoints.load_latest(tmp_path / "run", *engines, ema=StubEMA())
    assert "refused" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists() and tree(tmp_path) == before


# --- the DAG's blind spots ------------------------------------------------------------------


def test_a_deleted_sample_index_is_rebuilt(snakemade, tmp_path):
    """Every output the report reads is a target of `all`: a set whose index.parquet is gone
    is planned again (Snakemake alone said "Nothing to be done", its consumers being up to
    date), and a finished project plans nothing."""
    work = clone(snakemade, tmp_path / "p")
    proc = snakemake_dry_run(work)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout, proc.stdout[-2000:]
    (work / "samples/teacher_cfg/2/index.parquet").unlink()
    proc = snakemake_dry_run(work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "output: samples/teacher_cfg/2/index.parquet" in proc.stdout, proc.stdout[-3000:]


# --- messages that send the user the right way ----------------------------------------------


def test_a_bare_snakemake_unlock_works(tmp_path):
    """What Snakemake advises after a SIGKILL left its lock: `snakemake --unlock`, no --cores
    (the rules that take every core read it only when a job is planned)."""
    work = copy_project(tmp_path / "work")
    locks = work / ".snakemake/locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(str(work / "results/metrics.json") + "\n")
    proc = subprocess.run(
        ["snakemake", "--unlock"], cwd=work, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert not locks.exists() or not any(locks.iterdir())


def test_a_truncated_image_is_named(tmp_path):
    import numpy as np
    from PIL import Image

    from cdm.cli import fault_line
    from cdm.world.metrics import load_images

    png = tmp_path / "samples/cdm/1/000007.png"
    png.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(png)
    png.write_bytes(png.read_bytes()[:6000])  # of 12 kB
    with pytest.raises(OSError) as failed:
        load_images(png.parent, [png.name])
    line = fault_line(failed.value)
    assert line.startswith(f"{png}: image file is truncated") and "rerun" in line, line


def test_a_full_disk_is_named_by_its_filesystem(tmp_path, monkeypatch):
    """A write through an open file (Pillow's save) carries no file name: the line names the
    file and the full filesystem's mount, not the project's root."""
    import numpy as np
    from PIL import Image

    from cdm.cli import fault_line
    from tests.test_faults import mounted

    monkeypatch.chdir(tmp_path)
    full = tmp_path / "samples"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with mounted(full, "size=64k"):
        with pytest.raises(OSError) as failed:
            for i in range(64):
                Image.fromarray(noise).save(full / f"{i:06d}.png")
        line = fault_line(failed.value)  # while the disk is still full
    assert f"mounted at {full}," in line and str(full / "0000") in line, line


def test_a_worker_killed_by_a_signal_is_named(tmp_path):
    """SIGKILL leaves a worker no time to say anything: the launcher says which rank died of
    which signal, in one line, with the shell's exit code."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.launch", "--config_file", "configs/accelerate/zero2.yaml",
         "--num_processes", "2", str(script)],
        cwd=ROOT, env=ENV | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 137
    line = one_error_line(proc.stderr)
    assert "worker rank 1 was killed by SIGKILL (signal 9)" in line, line


def test_the_unrenderable_prompt_example_renders():
    import re

    from cdm.world.prompts import check_renderable, parse_prompt
    from cdm.world.render import render

    with pytest.raises(ValueError) as refused:
        check_renderable(["a red triangle on the left"], "prompts.txt")
    example = re.search(r"prompts like '([^']+)'", str(refused.value))[1]
    image = render([parse_prompt(example)], [0])
    assert image.shape[0] == 1 and image.std() > 0  # a shape on a background


@pytest.mark.parametrize("overlay", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_an_overlay_changes_only_its_own_lines(tmp_path, overlay):
    """`git diff params.yaml` after an overlay shows the overlay's keys only: no other line
    of params.yaml rewrapped (ruamel folded every line over 80 characters)."""
    import difflib

    from cdm.overlay import apply

    def keys(tree: dict) -> set[str]:
        return {str(k) for k, v in tree.items()} | {
            k for v in tree.values() if isinstance(v, dict) for k in keys(v)
        }

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    path = ROOT / "configs" / overlay
    if overlay == "ablation.yaml":  # also a one-key overlay far from the long lines
        (tmp_path / "seed.yaml").write_text("seed: 7\n")
        seed = apply(tmp_path / "seed.yaml", params, write=False).splitlines()
        assert [d for d in difflib.unified_diff(params.read_text().splitlines(), seed, n=0)
                if d[:1] in "+-" and d[:3] not in ("+++", "---")] == ["-seed: 0", "+seed: 7"]  # fmt: skip
    changed = [
        line[1:]
        for line in difflib.unified_diff(
            params.read_text().splitlines(), apply(path, params, write=False).splitlines(), n=0
        )
        if line[:1] == "+" and not line.startswith("+++") and line[1:].strip()[:1] not in "#"
    ]  # blank and comment lines: the overlay's own
    names = keys(P.read_yaml(path))
    assert changed and all(line.split(":")[0].strip(" -") in names for line in changed), changed


# --- train_world --out ----------------------------------------------------------------------


@pytest.mark.parametrize("out", ["mine", ".", "models", "new"])
def test_train_world_writes_only_a_folder_of_its_own(tmp_path, monkeypatch, out):
    """`python src/train_world.py judge --out DIR` replaces DIR whole, so, as publish, it
    takes only a new or empty folder or one it made (its marker), never the project's root
    or outputs. The training itself is a stand-in: only where it writes is under test."""
    from cdm.places import TRAINED_MARKER
    from tests.conftest import call_stage

    def trained(out: Path, *_) -> float:
        (out / "judge.safetensors").write_bytes(b"weights")
        return 1.0

    monkeypatch.setattr("cdm.world.train.train_judge", trained)

    project = tmp_path / "project"
    (project / "mine").mkdir(parents=True)
    (project / "mine/thesis.tex").write_text("my own work")
    (project / "models").mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = tree(tmp_path)
    code, err = call_stage(project, "train_world.py", "judge", "--steps", "1", "--out", out)
    after = {k: v for k, v in tree(tmp_path).items() if not k.endswith(".cdm-run.lock")}
    if out == "new":  # made, marked, and its own to replace on a rerun
        assert code == 0, err[-2000:]
        assert (project / "new" / TRAINED_MARKER).is_file()
        assert call_stage(project, "train_world.py", "judge", "--steps", "1", "--out", out)[0] == 0
        return
    assert code == 2 and "--out" in one_error_line(err), err
    assert after == before


# --- every YAML reader of ours --------------------------------------------------------------


def test_stage_code_and_the_bench_scripts_read_yaml_safely(tmp_path, monkeypatch):
    """cdm.stagecode (dvc.yaml, at every Snakemake parse) and bench/distill_* read through
    cdm.safeyaml: aliases are refused (a small bomb here, which PyYAML expanded), and a
    --set value is YAML 1.2 (PyYAML read 1e-5 as the text '1e-5')."""
    from cdm.safeyaml import YAMLRefused
    from cdm.stagecode import stage_code

    dvc = tmp_path / "dvc.yaml"
    dvc.write_text("stages:\n  score:\n    deps: [src/score.py]\n" + alias_bomb(3))
    with pytest.raises(YAMLRefused, match="anchor or alias"):
        stage_code("score", dvc)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from distill_probe import override

    data = {"distill": {"lr_student": 0.1}}
    override(data, "distill.lr_student=1e-5")
    assert data["distill"]["lr_student"] == 1e-5


# --- an export is whole or refused ----------------------------------------------------------


def test_a_truncated_file_in_an_exported_student_is_refused(finished, tmp_path):
    """distill writes the export's manifest last; the sampler checks it before sampling, so a
    text encoder it never reads cannot go on truncated (it did: the set was sampled)."""
    from tests.conftest import call_stage

    work = clone(finished, tmp_path / "p")
    student = work / "models/students/cdm"
    assert manifest.damage(student) is None  # as distill wrote it
    weights = student / "text_encoder/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = call_stage(work, "sample.py", "--model", "cdm", "--steps", "1")
    lines = [line for line in err.splitlines() if line.strip()]  # progress logs, then one
    line = lines[-1] if lines else ""
    assert [x for x in lines if x.startswith("error: ")] == [line], err[-2000:]
    assert code == 2 and "text_encoder/model.safetensors is truncated" in line, err[-2000:]
    assert "delete it and rerun" in line and not (work / "samples/cdm").exists()
