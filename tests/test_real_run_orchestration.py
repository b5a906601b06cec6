"""Both orchestrators over the real-run backends: tiny offline SD3, LongCat-Image,
Qwen-Image and FLUX.2 [klein] pipelines and tiny scorers of the real classes (weights in local
files). Snakemake runs each to results/report.html (conftest.real_runs, shared with
tests/test_pipeline_backends.py). DVC runs Qwen-Image and FLUX.2 [klein] from the start to
theirs, with the very stage calls Snakemake ran, and takes the SD3 and LongCat-Image runs
over (its plan is exactly the stage calls Snakemake ran, its declared deps and outs are all
there; on SD3 with a stand-in of one published baseline and DPG-Bench too). The report's
Table 1 has every row and column of the paper's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cdm.metrics import dpg
from cdm.report import published as PUB
from cdm.report import table1 as T1
from tests import tiny_pipelines as T
from tests.conftest import REAL_BACKENDS, copy_project
from tests.test_dpg import ITEMS, rows
from tests.test_hpsv3 import tiny_hpsv3_config
from tests.test_orchestration import ENV
from tests.test_pipeline_backends import PROMPTS, SMK_GUARD, _params
from tests.test_scorers import TINY_CLIP, tiny_scorer_configs

METRIC_HEADER = "| model | steps | nfe | CLIP score | PickScore | aesthetic | HPSv3 |"


def _sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-4000:])
    return proc.stdout + proc.stderr


def real_project(path: Path, backend: str, tiny_dirs, tiny_clip, tiny_pick, tiny) -> Path:
    """A scratch copy of the project at `path` whose params name a tiny local pipeline and
    tiny scorers.

    The open_clip scorers name their architecture by a config file (an open_clip model the
    package does not ship), so the scripts Snakemake and DVC start find it too.
    """
    path.mkdir(parents=True)
    copy_project(path, skip=("dvc.lock",))
    shutil.copytree(tiny_dirs[backend], path / f"tiny_{backend}")
    (path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _params(path / "params.yaml", backend)
    data = yaml.safe_load((path / "params.yaml").read_text())
    (path / "heads").mkdir()
    models = tiny_scorer_configs(tiny_clip, tiny_pick, path / "heads")
    config = str(tiny_clip.parent / f"{TINY_CLIP}.json")
    models["clip"]["model"] = models["aesthetic"]["clip_model"] = config
    models["hpsv3"] = tiny_hpsv3_config(tiny)
    data["score"].update(models=models, n_boot=100)
    data["report"].update(grid_prompts=2)
    if backend == "sd3":  # one of the paper's SD3 baselines, on a stand-in of its recipe
        # (each recipe's loading and sampling: tests/test_compare.py; one proves the DAG's)
        stand_ins = T.compare_stand_ins(path / "tiny_sd3", path / "compare")
        name, make = next(iter(T.COMPARE_RECIPES.items()))
        data["compare"] = {name: make(stand_ins)}
    (path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def real_run(path: Path, backend: str, *fixtures) -> None:
    """`snakemake --cores 2` over `real_project` in `path`/p, to the report, its output in
    `path`/snakemake.out; distill and sample under the text-encoder guard (the chain of
    tests/test_pipeline_backends.py reads this run). conftest.real_runs shares it."""
    work = real_project(path / "p", backend, *fixtures)
    (path / "snakemake.out").write_text(_sh(work, "snakemake", "--cores", "2", "-p", env=SMK_GUARD))


def _check_report(path: Path) -> None:
    metrics = json.loads((path / "results/metrics.json").read_text())
    assert set(metrics) >= {"teacher_cfg", "teacher_nocfg", "cdm"}
    entry = metrics["cdm"]["4"]
    for m in ("clip", "pickscore", "aesthetic", "hpsv3"):
        low, high = entry[f"{m}_ci"]
        assert low <= entry[m] <= high, m
    assert entry["conventions"]["clip"]["model"] == TINY_CLIP and not entry["skipped"]
    assert entry["fd_to_teacher_cfg"] >= 0
    assert metrics["teacher_cfg"]["2"]["fd_to_teacher_cfg"] < 1e-6
    md = (path / "results/report.md").read_text()
    assert METRIC_HEADER in md and "Hessel" in md and "## Conventions" in md
    assert re.search(r"\| cdm \| 4 \| 4 \| [-\d.e]+ \[[-\d.e]+, [-\d.e]+\]", md), md[:3000]
    _check_table1(path, metrics, md)
    page = (path / "results/report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # loss panels, quality plots, the grid
    assert re.search(r"Samples: pairs \d+, \d+ \(prompt under each column\)", page)


def _check_table1(path: Path, metrics: dict, md: str) -> None:
    """Table 1 comes first, with every published row and column, ours measured where run."""
    params = yaml.safe_load((path / "params.yaml").read_text())
    backend, compare = params["teacher"]["backend"], params.get("compare") or {}
    assert md.index("## Table 1") < md.index("## Findings") < md.index("## Metrics")
    table = md.split("## Table 1", 1)[1].split("Protocol:", 1)[0]
    head = next(line for line in table.splitlines() if line.startswith("| Method"))
    labels = [label for _, label in T1.metric_keys(metrics).values()]
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "Method", "NFE", "NFE (paper)", *(c for label in labels for c in (label, T1.paper_label(label)))
    ]  # fmt: skip
    rows = table.splitlines()
    if backend not in PUB.TABLE1:  # no published row: ours measured, the paper's columns empty
        line = next(x for x in rows if x.startswith("| cdm"))
        assert re.search(
            r"\| [-\d.e]+ \[[-\d.e]+, [-\d.e]+\] \| " + re.escape(T1.UNPUBLISHED), line
        )
        assert "Published values: none" in md
        return
    lines = {
        r.method: next(x for x in rows if x.startswith(f"| {r.method}"))
        for r in PUB.TABLE1[backend]
    }
    for name in ("teacher_cfg", "cdm", *compare):  # run here: measured, with an interval
        row = next(r for r in PUB.TABLE1[backend] if r.model == name)
        assert re.search(r"\| [-\d.e]+ \[[-\d.e]+, [-\d.e]+\] \| " + re.escape(
            f"{row.value('aesthetic'):.4g}"), lines[row.method]), lines[row.method]  # fmt: skip
        assert metrics[name]  # a sample set of its own was scored
    assert T1.NOT_RUN in lines["D-DMD"]  # no D-DMD preset here
    if not any(T1.KEYS["dpg"] in e for by in metrics.values() for e in by.values()):
        assert T1.NOT_MEASURED in lines["CDM"]  # DPG not scored: said, never a number
    for name, recipe in compare.items():  # each published model's images and what loaded
        loaded = json.loads((path / f"samples/{name}/{recipe['steps']}/recipe.json").read_text())
        assert loaded["recipe"]["steps"] == recipe["steps"] and f"- `{name}`:" in md


@pytest.fixture(params=REAL_BACKENDS)
def finished_real(request, real_runs) -> Path:
    """The backend's finished Snakemake run (shared, read only): conftest.real_runs."""
    return real_runs(request.param)


def test_snakemake_runs_a_real_backend_to_the_report(finished_real, tmp_path):
    out = (finished_real.parent / "snakemake.out").read_text()
    for rule in ("fetch_weights", "prepare_teacher", "cache_teacher", "distill", "score"):
        assert f"rule {rule}:" in out, rule
    assert "rule world_judge" not in out and not (finished_real / "models/judge").exists()
    _check_report(finished_real)
    assert json.loads((finished_real / "models/weights.json").read_text())["fetched"] == []
    work = shutil.copytree(finished_real, tmp_path / "smk", symlinks=True)
    assert "Nothing to be done" in _sh(work, "snakemake", "--cores", "2", "-n")
    if (work / "tiny_sd3").is_dir():
        _, sets, out = _check_dpg_run(work)
        # DVC takes the run over with its DPG sets too (dvc.yaml's foreach stages for them).
        ran = _calls((finished_real.parent / "snakemake.out").read_text()) | _calls(out)
        assert {("src/score_dpg.py",), ("src/sample.py", "--prompts", "dpg", "--model", "cdm",
                "--steps", str(sets["cdm"]))} <= ran  # fmt: skip
        _dvc_takes_over(work, ran)


# A stage call in an orchestrator's plan: the script (or `-m cdm.fetch`) and its arguments
# but the params file's and the launcher's (Snakemake and DVC spell those differently).
# Shell lines: Snakemake's `-p` prints "Shell command: ...", DVC's "> ...".
SHELL = re.compile(r"^(?:Shell command: |> )(.*)$", re.M)
CALL = re.compile(r"(src/\w+\.py|-m cdm\.fetch)((?: +[^\s|>]+(?=\s|$))*)")
LAUNCHER_ARGS = {"--params", "--record"}


def _calls(output: str) -> set[tuple[str, ...]]:
    calls = set()
    for line in SHELL.findall(output):
        match = CALL.search(line)
        if not match:  # DVC's validate stage: Snakemake validates at parse time
            continue
        script, args = match.groups()
        words = args.split()
        kept = [w for i, w in enumerate(words) if w not in LAUNCHER_ARGS
                and (i == 0 or words[i - 1] not in LAUNCHER_ARGS)]  # fmt: skip
        calls.add((script.removeprefix("-m "), *kept))
    return calls


def _dvc_takes_over(work: Path, ran: set[tuple[str, ...]]) -> None:
    """DVC on a finished Snakemake run of the same params: dvc.yaml plans exactly the stage
    calls Snakemake ran (`ran`), every dep and out it declares is there (`dvc commit`
    refuses a missing one), and then it has nothing to do."""
    _sh(work, "git", "init", "-q")
    _sh(work, "dvc", "init", "-q", "--force")
    planned = _calls(_sh(work, "dvc", "repro", "--dry", "--force"))
    assert ran == planned, (ran - planned, planned - ran)
    _sh(work, "dvc", "repro", "--single-item", "validate")  # Snakemake keeps no record of it
    _sh(work, "dvc", "commit", "--force", "dvc.yaml")  # the root pipeline (not the ablation's)
    assert "up to date" in _sh(work, "dvc", "status", "dvc.yaml")


# Backends whose Snakemake run DVC takes over; DVC runs the other two from the start (below).
TAKEN_OVER = ["sd3", "longcat"]


@pytest.mark.parametrize("backend", TAKEN_OVER)
def test_dvc_takes_over_the_snakemake_run(backend, real_runs, tmp_path):
    """dvc.yaml, on each backend's params, calls the stage scripts Snakemake ran, with the
    same arguments, and declares the files they wrote: the stages are the same code, and
    DVC's own running of them is proved on the shapes world (tests/test_orchestration.py)
    and on Qwen-Image and FLUX.2 [klein] (`test_dvc_runs_a_new_family_to_the_report`)."""
    finished = real_runs(backend)
    work = shutil.copytree(finished, tmp_path / "dvc", symlinks=True)
    ran = _calls((finished.parent / "snakemake.out").read_text())
    want = {("src/distill.py", "--method", "cdm"), ("src/score.py",), ("src/report.py",),
            ("src/sample.py", "--model", "cdm", "--steps", "4")}  # fmt: skip
    assert want <= ran, ran
    _dvc_takes_over(work, ran)


# The families of issue 37, which no other test runs under DVC from the start.
NEW_FAMILIES = ["qwen-image", "flux2-klein"]


@pytest.mark.parametrize("backend", NEW_FAMILIES)
def test_dvc_runs_a_new_family_to_the_report(
    backend, real_runs, tiny_dirs, tiny_clip, tiny_pick, tiny, tmp_path
):
    """`dvc repro` on a fresh scratch project of the backend, distill and sample under the
    text-encoder guard: every stage runs under DVC, the report has what Snakemake's has, the
    stage calls are the ones Snakemake ran on the same params, and DVC is then up to date."""
    work = real_project(tmp_path / "p", backend, tiny_dirs, tiny_clip, tiny_pick, tiny)
    _sh(work, "git", "init", "-q")
    _sh(work, "dvc", "init", "-q", "--force")
    out = _sh(work, "dvc", "repro", env=SMK_GUARD)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {"prepare_teacher", "cache_teacher", "distill@cdm", "score", "report"} <= ran, ran
    _check_report(work)
    smk = real_runs(backend)
    assert _calls(out) == _calls((smk.parent / "snakemake.out").read_text())
    assert "up to date" in _sh(work, "dvc", "status", "dvc.yaml")


# A stand-in VQA that answers any image: "yes" when the image's mean grey level plus the
# question's length is even. The runner serves it over cdm.metrics.dpg_vqa's protocol.
BRIGHT = """
from PIL import Image, ImageStat

class Bright:
    def answer(self, images, questions):
        out = []
        for path, question in zip(images, questions):
            with Image.open(path) as image:
                grey = int(ImageStat.Stat(image.convert("L")).mean[0])
            out.append("yes" if (grey + len(question)) % 2 == 0 else "no")
        return out
"""
BRIGHT_RUNNER = (
    BRIGHT
    + """
import json, sys
from cdm.metrics.dpg_vqa import serve
print(json.dumps({"ready": "bright"}), flush=True)
serve(Bright(), sys.stdin, sys.stdout)
"""
)


def _set_dpg(work: Path) -> tuple[dict, dict]:
    """prompts.dpg_file set on a finished run, three DPG items, the stand-in VQA runner:
    returns the params and the DPG sets (Table 1's)."""
    (work / "dpg.csv").write_text(rows(ITEMS[:3]))
    data = yaml.safe_load((work / "params.yaml").read_text())
    data["prompts"]["dpg_file"] = "dpg.csv"
    sets = {"teacher_cfg": data["teacher"]["steps"], "cdm": int(data["report"]["steps"])}
    sets |= {name: c["steps"] for name, c in (data.get("compare") or {}).items()}
    vqa = [sys.executable, "-c", BRIGHT_RUNNER]
    data["dpg"] = {"sets": sets, "bench": ["dpg_bench"], "vqa": vqa}
    (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return data, sets


def _check_dpg_results(work: Path, data: dict, sets: dict) -> None:
    """score_dpg gives what the benchmark's rule gives on the stand-in's answers (the real
    client, a runner process), and Table 1's DPGBench column shows it."""
    got = json.loads((work / "results/dpg.json").read_text())
    items = dpg.parse_csv(rows(ITEMS[:3]))
    stand_in: dict = {}
    exec(BRIGHT, stand_in)  # the runner's VQA, in this process
    for model, steps in sets.items():
        folder = work / "samples_dpg" / model / str(steps)
        index = pd.read_parquet(folder / "index.parquet")
        assert index["pair"].tolist() == [0, 1, 2], model
        want = dpg.score_sets(
            [(model, steps, folder, index["pair"], index["file"])], items, stand_in["Bright"](),
            data["score"]["n_boot"], seed=data["seed"],
        )[model][str(steps)]  # fmt: skip
        assert got[model][str(steps)]["dpg_score"] == pytest.approx(want["dpg_score"]), model
        assert got[model][str(steps)]["dpg_score_ci"] == pytest.approx(want["dpg_score_ci"])
    cdm = got["cdm"][str(sets["cdm"])]
    md = (work / "results/report.md").read_text()
    table = md.split("## Table 1", 1)[1].split("Protocol:", 1)[0]
    line = next(x for x in table.splitlines() if x.startswith("| CDM"))
    assert f"{cdm['dpg_score']:.4g} [" in line, line


def _check_dpg_run(work: Path) -> tuple[dict, dict, str]:
    """The DPG stages run under Snakemake (cache_teacher too, whose params hold the prompts
    section), then the report, which depends on results/dpg.json."""
    data, sets = _set_dpg(work)
    out = _sh(work, "snakemake", "--cores", "2", "-p")
    for rule in ("cache_dpg", "sample_dpg", "score_dpg", "report"):
        assert f"rule {rule}:" in out, rule
    _check_dpg_results(work, data, sets)
    assert "Nothing to be done" in _sh(work, "snakemake", "--cores", "2", "-n")
    return data, sets, out
