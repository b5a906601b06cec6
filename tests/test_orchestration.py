"""Both orchestrators over the whole DAG on a tiny config, in a scratch copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, edit_params, tiny_world_project

BIN = str(Path(PYTHON).parent)
ENV = os.environ | {
    "PATH": f"{BIN}:{os.environ['PATH']}",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


def _sh(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_teacher_dir) -> Path:
    """The project's files (tracked and new) with a tiny teacher and tiny params."""
    return tiny_world_project(
        tmp_path_factory.mktemp("orchestrated"), tiny_teacher_dir,
        score={"k": 2},
        ablation={"methods": ["dmd2", "cdm"], "seeds": [0, 1], "steps": [1]},
    )  # fmt: skip


def _check_results(path: Path, students: tuple[str, ...] = ("dmd2", "cdm")) -> None:
    metrics = json.loads((path / "results/metrics.json").read_text())
    assert set(metrics) == {"teacher_cfg", "teacher_nocfg", *students}
    assert set(metrics["cdm"]) == {"1"} and set(metrics["teacher_cfg"]) == {"2"}
    html = (path / "results/report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3


def test_snakemake_runs_the_whole_dag(scratch, tmp_path):
    work = tmp_path / "smk"
    shutil.copytree(scratch, work, symlinks=True)
    _sh(work, "snakemake", "--cores", "2")
    _check_results(work)
    assert "Nothing to be done" in _sh(work, "snakemake", "--cores", "2", "-n")
    _check_code_reruns(work)

    # The ablation overlay adds two methods: only their students are planned.
    saved = (work / "params.yaml").read_text()
    _sh(work, PYTHON, "-m", "cdm.overlay", "configs/ablation.yaml")
    plan = _sh(work, "snakemake", "--cores", "2", "-n")
    planned = set(re.findall(r"rule distill:\n(?:.*\n)*?\s+wildcards: method=(\w+)", plan))
    assert planned == {"dynamic", "dm_only"}, planned
    (work / "params.yaml").write_text(saved)

    # The ablation target plans each preset x seed; one preset's two seeds are distilled,
    # sampled, scored and summarised (the summary over several presets: tests/test_ablation.py),
    # and the report, asked again, reads the summary.
    plan = _sh(work, "snakemake", "--cores", "2", "-n", "ablation")
    planned = re.findall(
        r"rule ablation_distill:\n(?:.*\n)*?\s+wildcards: seed=(\d+), method=(\w+)", plan
    )
    assert sorted(planned) == [("0", "cdm"), ("0", "dmd2"), ("1", "cdm"), ("1", "dmd2")], plan
    edit_params(work / "params.yaml", ablation={"methods": ["cdm"]})
    _sh(work, "snakemake", "--cores", "2", "ablation")
    _check_ablation(work, ("cdm",))
    out = _sh(work, "snakemake", "--cores", "2", "--forcerun", "report", "results/report.html")
    assert "rule report" in out
    md = (work / "results/report.md").read_text()
    assert "## Findings over distillation seeds" in md and "| cdm | 1 | 2 |" in md


def _planned(work: Path, edited: str) -> set[str]:
    """The rules `snakemake -n` plans once `edited` has new content. Snakemake 9 compares an
    input newer than the outputs with the checksum it recorded, so a touch alone reruns
    nothing (as in DVC): the file gets a comment, then its bytes and time are put back."""
    path = work / edited
    before, stat = path.read_bytes(), path.stat()
    path.write_bytes(before + b"\n# edited\n")
    try:
        plan = _sh(work, "snakemake", "--cores", "2", "-n")
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return set(re.findall(r"^rule (\w+):", plan, re.M))


def _check_code_reruns(work: Path) -> None:
    """A change to code a stage names in dvc.yaml (cdm.stagecode) reruns it and what follows;
    a touch, or a change to code it does not use, reruns nothing of it."""
    assert _planned(work, "src/cdm/ema.py") == {"distill", "sample", "score", "report", "all"}
    assert _planned(work, "src/cdm/sampler.py") == {"sample", "score", "report", "all"}
    assert _planned(work, "src/cdm/report/html.py") == {"report", "all"}
    os.utime(work / "src/cdm/ema.py")
    assert "Nothing to be done" in _sh(work, "snakemake", "--cores", "2", "-n")


def _check_ablation(path: Path, methods: tuple[str, ...]) -> None:
    summary = json.loads((path / "results/ablation.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["steps"] == ["1"]
    assert set(summary["students"]) == set(methods)
    cdm = summary["students"]["cdm"]["1"]["alignment"]
    assert cdm["n"] == 2 and len(cdm["values"]) == 2
    assert set(summary["teacher"]) == {"teacher_cfg", "teacher_nocfg"}
    # Two seeds give two students: the seed reaches the engine.
    a, b = (
        (
            path / f"ablation/models/seed{s}/cdm/transformer/diffusion_pytorch_model.safetensors"
        ).read_bytes()
        for s in (0, 1)
    )
    assert a != b


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_reruns_only_what_a_param_change_affects(scratch, tmp_path):
    """One student (cdm): the Snakemake test above runs two, and DVC's foreach stage is
    proved by one item."""
    work = tmp_path / "dvc"
    shutil.copytree(scratch, work, symlinks=True)
    edit_params(work / "params.yaml", distill={"methods": ["cdm"]})
    _sh(work, "git", "init", "-q")
    _sh(work, "dvc", "init", "-q", "--force")
    first = _ran(_sh(work, "dvc", "repro"))
    assert {"prepare_teacher", "cache_teacher", "distill@cdm", "score", "report"} <= first
    _check_results(work, ("cdm",))
    assert "up to date" in _sh(work, "dvc", "status", "dvc.yaml")  # the root pipeline

    # The ablation overlay adds three methods: DVC finds only their students missing.
    saved = (work / "params.yaml").read_text()
    _sh(work, PYTHON, "-m", "cdm.overlay", "configs/ablation.yaml")
    status = _sh(work, "dvc", "status", "dvc.yaml")
    assert all(f"distill@{m}:" in status for m in ("dynamic", "dm_only", "dmd2")), status
    assert "distill@cdm:" not in status, status
    (work / "params.yaml").write_text(saved)

    edit_params(work / "params.yaml", report={"grid_prompts": 1})
    assert _ran(_sh(work, "dvc", "repro")) - {"validate"} == {"report"}

    # Code: the same record as Snakemake's (dvc.yaml's deps): the EMA's module retrains.
    ema = work / "src/cdm/ema.py"
    saved_ema = ema.read_text()
    ema.write_text(saved_ema + "# a change\n")
    status = _sh(work, "dvc", "status", "dvc.yaml")
    assert "distill@cdm:" in status and "cache_teacher:" not in status, status
    ema.write_text(saved_ema)
    assert "up to date" in _sh(work, "dvc", "status", "dvc.yaml")

    # A bookkeeping change must not retrain.
    edit_params(work / "params.yaml", distill={"checkpoint_every": 2, "keep_checkpoints": 3})
    assert "distill@cdm" not in _ran(_sh(work, "dvc", "repro"))

    # The ablation's own dvc.yaml, on top of the root pipeline's outputs (one preset's two
    # seeds: its foreach stages and summary; both presets are planned under Snakemake above).
    edit_params(work / "params.yaml", ablation={"methods": ["cdm"]})
    ran = _ran(_sh(work, "dvc", "repro", "workflow/ablation/dvc.yaml"))
    assert {
        "workflow/ablation/dvc.yaml:ablation_distill@cdm-1",
        "workflow/ablation/dvc.yaml:ablation",
    } <= ran
    _check_ablation(work, ("cdm",))

    # A DVC experiment with a setting written the way DVC writes it (2e-05: YAML 1.2 float):
    # the student retrains, and what does not depend on it does not rerun.
    _sh(work, "git", "add", "-A")
    _sh(work, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    rerun = _ran(_sh(work, "dvc", "exp", "run", "-n", "slow", "-S", "distill.lr_student=2e-5"))
    assert {"distill@cdm", "score", "report"} <= rerun
    assert not rerun & {
        "prepare_teacher", "cache_teacher",
        "sample_teacher@teacher_cfg-2", "sample_teacher@teacher_nocfg-2",
    }, rerun  # fmt: skip
    assert "[slow]" in _sh(work, "dvc", "exp", "list")
    assert "teacher_cfg" in _sh(work, "dvc", "metrics", "show")
    shown = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=work, env=ENV, capture_output=True, text=True
    )
    drawn = " ".join(json.loads(shown.stdout)["data"])
    assert "logs/cdm/plots/loss_cdm.tsv" in drawn and "logs/cdm/plots/loss_fake.tsv" in drawn
