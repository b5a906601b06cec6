"""The evaluation stages end to end on a tiny project: sample (sharded too), score, report.

The CLIs run as subprocesses once each; the many other calls run the same scripts in this
process (runpy), which saves the ~8 s start of a Python with torch per call.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cdm import manifest
from cdm.cache import load_condition
from cdm.samplefiles import NOISE_SEED_BASE
from cdm.sampling import inference_sigmas
from cdm.world.evaluate import EvalPairs
from cdm.world.prompts import ATTRIBUTES, all_prompts
from tests.conftest import PYTHON, ROOT, call_stage

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
N_PAIRS = 16
SETS = [("teacher_cfg", 2), ("teacher_nocfg", 1), ("teacher_nocfg", 2), ("cdm", 1), ("cdm", 2)]
INDEX_COLUMNS = ["prompt", "pair", "seed", "model", "steps", "nfe", "seconds", "file", "dtype"]
METRIC_KEYS = {
    "alignment", "fd", "precision", "recall", "fd_to_teacher_nocfg", "nfe", *ATTRIBUTES,
}  # fmt: skip


def _params(path: Path, **sections: dict) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["teacher"].update(path="tiny_teacher", steps=2)
    data["judge"]["path"] = str(ROOT / data["judge"]["path"])
    data["prepare_teacher"].update(n_pairs=8, judge_renders=512)
    data["prompts"]["eval_pairs"] = N_PAIRS
    data["sample"].update(student_steps=[1, 2], teacher_steps=[1, 2], batch_size=4)
    data["score"].update(batch_size=8)
    data["report"].update(grid_prompts=4, steps="2")
    for name, values in sections.items():
        data[name] = data[name] | values
    path.write_text(yaml.safe_dump(data))
    return path


def _run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, str(ROOT / "src" / script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)


def _ok(cwd: Path, script: str, *args: str) -> None:
    code, err = call_stage(cwd, script, *args)
    assert code == 0, err[-3000:]


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher_dir) -> Path:
    """Tiny teacher prepared and cached; a `cdm` student that is a copy of the teacher."""
    path = tmp_path_factory.mktemp("eval_project")
    shutil.copytree(tiny_teacher_dir, path / "tiny_teacher")
    _params(path / "params.yaml")
    for script in ("prepare_teacher.py", "cache_teacher.py"):
        proc = _run(path, script)
        assert proc.returncode == 0, proc.stderr[-3000:]
    student = path / "models/students/cdm"
    shutil.copytree(path / "models/teacher", student)
    recipe = {"sigmas_raw": [1.0, 0.75, 0.5, 0.25], "shift": 2.0, "steps": 4, "guidance": 1.0}
    (student / "inference.json").write_text(json.dumps(recipe | {"method": "cdm"}))
    manifest.write(student)  # as the distill stage completes an export
    (path / "logs/cdm").mkdir(parents=True)
    rows = "\n".join(f"{i},{1 / i:.4f},{2 / i:.4f}" for i in range(1, 21))
    (path / "logs/cdm/train.csv").write_text("step,loss_dm,loss_fake\n" + rows + "\n")
    return path


@pytest.fixture(scope="module")
def sampled(project) -> Path:
    (model, steps), *rest = SETS
    proc = _run(project, "sample.py", "--model", model, "--steps", str(steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model, steps in rest:
        _ok(project, "sample.py", "--model", model, "--steps", str(steps))
    return project


@pytest.fixture(scope="module")
def scored(sampled) -> Path:
    proc = _run(sampled, "score.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sampled


def test_every_sample_set_has_its_images_and_index(sampled):
    _, prompts = load_condition(sampled / "cache/prompts/eval.safetensors")
    assert prompts == all_prompts()  # the unique world prompts, fewer pairs than prompts here
    for model, steps in SETS:
        folder = sampled / "samples" / model / str(steps)
        index = pd.read_parquet(folder / "index.parquet")
        assert list(index.columns) == INDEX_COLUMNS
        assert index["pair"].tolist() == list(range(N_PAIRS))
        assert index["seed"].tolist() == [NOISE_SEED_BASE + j for j in range(N_PAIRS)]
        assert index["prompt"].tolist() == [prompts[j % len(prompts)] for j in range(N_PAIRS)]
        assert set(index["model"]) == {model} and set(index["steps"]) == {steps}
        assert set(index["nfe"]) == {2 * steps if model == "teacher_cfg" else steps}
        assert (index["seconds"] > 0).all()
        assert set(index["dtype"]) == {"float32"}  # the CPU samples in fp32
        assert (
            sorted(index["file"])
            == sorted(_pngs(folder))
            == [f"{j:05d}.png" for j in range(N_PAIRS)]
        )
        image = np.asarray(Image.open(folder / "00000.png"))
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    # Nothing half-written or temporary is left beside the sets.
    assert sorted(p.name for p in (sampled / "samples").iterdir()) == [
        "cdm",
        "teacher_cfg",
        "teacher_nocfg",
    ]
    assert sorted(p.name for p in (sampled / "samples/cdm").iterdir()) == ["1", "2"]


def test_shards_then_merge_equal_the_unsharded_run(sampled, tmp_path):
    out = tmp_path / "sharded"
    for i in (1, 0):
        _ok(
            sampled,
            "sample.py",
            "--model",
            "cdm",
            "--steps",
            "2",
            "--shard",
            f"{i}/2",
            "--out",
            str(out),
        )
    part = out / "cdm/2/part-1-of-2"
    assert sorted(_pngs(part)) == [f"{j:05d}.png" for j in range(1, N_PAIRS, 2)]
    assert pd.read_parquet(part / "index.parquet")["pair"].tolist() == list(range(1, N_PAIRS, 2))
    assert not (out / "cdm/2/index.parquet").exists()  # no complete set before the merge

    _ok(
        sampled,
        "sample.py",
        "merge",
        "--model",
        "cdm",
        "--steps",
        "2",
        "--parts",
        "2",
        "--out",
        str(out),
    )
    merged, straight = out / "cdm/2", sampled / "samples/cdm/2"
    assert sorted(p.name for p in merged.iterdir() if not p.name.endswith(".png")) == [
        "index.parquet"
    ]
    assert _pngs(merged) == _pngs(straight)
    a = pd.read_parquet(merged / "index.parquet").drop(columns="seconds")
    b = pd.read_parquet(straight / "index.parquet").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


def test_a_pair_gets_the_same_noise_for_every_model(sampled):
    # The student is a copy of the teacher: at one step without guidance they must agree.
    student, teacher = (_pngs(sampled / f"samples/{m}/1") for m in ("cdm", "teacher_nocfg"))
    assert student == teacher
    # CFG changes the images, and different pairs get different noise.
    assert _pngs(sampled / "samples/teacher_cfg/2") != _pngs(sampled / "samples/teacher_nocfg/2")
    pairs = EvalPairs.of(["a", "b", "c"], range(6))
    noise = pairs.noise((3, 4, 4))
    assert pairs.prompts == ["a", "b", "c", "a", "b", "c"] and pairs.pairs == list(range(6))
    assert torch.equal(EvalPairs.of(["x"], [4, 1]).noise((3, 4, 4)), noise[[4, 1]])
    assert not torch.equal(noise[0], noise[3])


def test_score_writes_metrics_of_every_set(scored):
    metrics = json.loads((scored / "results/metrics.json").read_text())
    assert set(metrics) == {"teacher_cfg", "teacher_nocfg", "cdm"}
    for model, steps in SETS:
        m = metrics[model][str(steps)]
        assert set(m) == METRIC_KEYS
        for key in ("alignment", "precision", "recall", *ATTRIBUTES):
            assert 0 <= m[key] <= 1, (model, steps, key)
        assert m["fd"] > 0 and m["fd_to_teacher_nocfg"] >= 0
        assert m["nfe"] == (2 * steps if model == "teacher_cfg" else steps)
        assert all(v == round(v, 4) for v in m.values())
    # The reference is teacher_nocfg at its largest step count; the student copies it.
    assert metrics["teacher_nocfg"]["2"]["fd_to_teacher_nocfg"] == 0
    assert metrics["cdm"]["2"]["fd_to_teacher_nocfg"] == 0
    assert metrics["cdm"]["1"] == metrics["teacher_nocfg"]["1"]
    # The speed of every set is a timing: beside the metrics, not in them.
    timings = json.loads((scored / "logs/timings/score.json").read_text())
    assert {(m, int(s)) for m in timings for s in timings[m]} == set(SETS)
    assert all(t["images_per_s"] > 0 for by in timings.values() for t in by.values())
    scores = pd.read_parquet(scored / "results/scores.parquet")
    assert list(scores.columns) == ["model", "steps", "pair", "prompt", "correct", *ATTRIBUTES]
    assert len(scores) == len(SETS) * N_PAIRS
    ours = scores[(scores["model"] == "cdm") & (scores["steps"] == 2)]
    assert ours["correct"].mean() == pytest.approx(metrics["cdm"]["2"]["alignment"])
    assert (ours["correct"] == ours[list(ATTRIBUTES)].all(axis=1)).all()


def test_score_without_the_reference_set_gives_nan(sampled, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(sampled / "samples/cdm", samples / "cdm")
    _ok(sampled, "score.py", "--samples", str(samples), "--out", str(tmp_path / "results"))
    metrics = json.loads((tmp_path / "results/metrics.json").read_text())
    assert set(metrics) == {"cdm"} and set(metrics["cdm"]) == {"1", "2"}
    assert math.isnan(metrics["cdm"]["1"]["fd_to_teacher_nocfg"])


def test_report_is_written_with_embedded_figures(scored):
    cmd = [PYTHON, "-X", "importtime", str(ROOT / "src/report.py")]
    proc = subprocess.run(cmd, cwd=scored, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The whole stage, figures included, runs without torch or diffusers (light imports).
    loaded = set(re.findall(r"^import time:.*\| +([A-Za-z_]\w*)$", proc.stderr, re.M))
    assert "matplotlib" in loaded and not loaded & {"torch", "diffusers"}, sorted(loaded)
    results = scored / "results"
    assert sorted(p.name for p in (results / "plots").iterdir()) == [
        "quality_vs_nfe.png", "samples.png", "training_curves.png",
    ]  # fmt: skip
    for png in (results / "plots").iterdir():
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size < 500_000
    md = (results / "report.md").read_text()
    assert "## Findings" in md and "| cdm | 2 | 2 |" in md and "| teacher_cfg | 2 | 4 |" in md
    assert "## Teacher" in md and "without CFG" in md  # results/teacher.json
    assert "](plots/samples.png)" in md
    # The speed column reads the timings, which the provenance record keeps.
    provenance = json.loads((results / "provenance.json").read_text())
    speed = provenance["timings"]["score"]["cdm"]["2"]["images_per_s"]
    assert "| cdm | 2 | 2 |" in md and f"| {speed:.4g} |" in md
    page = (results / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "plots/" not in page and "<h2>Teacher</h2>" in page
    grid = Image.open(results / "plots/samples.png")
    assert grid.height >= len(SETS) * 32 * 3  # one row per sample set


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "cdm", "--steps", "1", "--shard", "3/2"], "--shard must be i/n"),
        (["--model", "cdm", "--steps", "1", "--shard", "a/b"], "got 'a/b'"),
        (["--model", "cdm", "--steps", "1", "--shard", "0/0"], "got '0/0'"),
        (["--model", "cdm", "--steps", "0"], "--steps must be a positive integer"),
        (["--model", "sdxl", "--steps", "1"], "unknown model 'sdxl'"),
        (["--model", "dmd2", "--steps", "1"], "run distill for method dmd2 first"),
        (["--model", "cdm", "--steps", "1", "--cache", "nowhere"], "missing cache file nowhere/"),
    ],
)
def test_bad_sample_input_is_one_line_and_writes_nothing(project, tmp_path, args, message):
    code, err = call_stage(project, "sample.py", *args, "--out", str(tmp_path / "samples"))
    _one_line_error(code, err, message)
    assert not (tmp_path / "samples").exists()


def test_bad_sample_input_from_the_command_line(project, tmp_path):
    proc = _run(project, "sample.py", "--model", "cdm", "--steps", "1", "--shard", "3/2",
                "--out", str(tmp_path / "samples"))  # fmt: skip
    _one_line_error(proc.returncode, proc.stderr, "--shard must be i/n with 0 <= i < n")
    assert not (tmp_path / "samples").exists()


def test_zero_step_count_in_params_is_named(project, tmp_path):
    params = _params(tmp_path / "params.yaml", sample={"student_steps": [1, 0]})
    code, err = call_stage(project, "sample.py", "--params", str(params), "--model", "cdm",
                      "--steps", "1", "--out", str(tmp_path / "samples"))  # fmt: skip
    _one_line_error(code, err, "sample.student_steps.1: input should be greater than 0")
    assert not (tmp_path / "samples").exists()


def test_merge_needs_every_part(project, tmp_path):
    code, err = call_stage(project, "sample.py", "merge", "--model", "cdm", "--steps", "2",
                      "--parts", "3", "--out", str(tmp_path / "samples"))  # fmt: skip
    _one_line_error(code, err, "missing shard")
    assert not (tmp_path / "samples").exists()


def test_empty_eval_prompts_file_fails_in_cache_teacher(project, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    params = _params(tmp_path / "params.yaml", prompts={"eval_file": str(tmp_path / "empty.txt")})
    code, err = call_stage(project, "cache_teacher.py", "--params", str(params),
                      "--out", str(tmp_path / "cache"))  # fmt: skip
    _one_line_error(code, err, "is empty; it needs one prompt per line")
    assert not (tmp_path / "cache").exists()


def test_score_and_report_input_errors(sampled, project, tmp_path, monkeypatch):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a photo of a cat\n")
    params = _params(
        tmp_path / "params.yaml",
        teacher={"backend": "sd3"},
        prompts={"train_file": str(prompts_file), "eval_file": str(prompts_file)},
    )
    # A real run's scorers whose weights were never fetched: one line naming the fetch.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    code, err = call_stage(
        sampled, "score.py", "--params", str(params), "--out", str(tmp_path / "r")
    )
    _one_line_error(code, err, "python -m cdm.fetch weights")
    assert not (tmp_path / "r").exists()
    code, err = call_stage(project, "score.py", "--samples", str(tmp_path / "none"),
                      "--out", str(tmp_path / "r"))  # fmt: skip
    _one_line_error(code, err, "no sample sets under")
    code, err = call_stage(project, "report.py", "--results", str(tmp_path / "r"))
    _one_line_error(code, err, "run the score stage first")
    assert not (tmp_path / "r").exists()


def test_student_is_sampled_with_its_recipe_sigmas():
    """At its recipe's step count a student runs the raw sigmas its exported scheduler runs."""
    from cdm import sampler as stage

    raw = [1.0, 0.9, 0.6]
    student = stage.Sampler(torch.nn.Identity(), 2.0, (3, 4, 4), 1.0, raw)
    torch.testing.assert_close(student.sigmas(3), inference_sigmas(3, 2.0, raw))
    assert not torch.equal(student.sigmas(3), inference_sigmas(3, 2.0))
    torch.testing.assert_close(student.sigmas(2), inference_sigmas(2, 2.0))  # other counts
    teacher = stage.Sampler(torch.nn.Identity(), 2.0, (3, 4, 4), 3.0)
    torch.testing.assert_close(teacher.sigmas(3), inference_sigmas(3, 2.0))


def _dvc(repo: Path, *args: str) -> str:
    dvc = str(Path(PYTHON).parent / "dvc")
    proc = subprocess.run([dvc, *args], cwd=repo, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_a_second_scoring_leaves_the_metrics_files_and_dvc_metrics_unchanged(scored, tmp_path):
    """Timings vary with the load; metrics.json and teacher.json hold none, so a rerun of
    prepare_teacher and score on the same samples writes them byte for byte again."""
    again = tmp_path / "again"
    _ok(scored, "prepare_teacher.py", "--models", str(again / "models"),
        "--out", str(again / "teacher.json"), "--timings", str(again / "teacher_timings.json"))  # fmt: skip
    _ok(scored, "score.py", "--out", str(again), "--timings", str(again / "timings.json"))
    for first, second in (("metrics.json", "metrics.json"), ("teacher.json", "teacher.json")):
        assert (scored / "results" / first).read_bytes() == (again / second).read_bytes()
    assert json.loads((again / "timings.json").read_text())["cdm"]["1"]["images_per_s"] > 0

    # DVC sees no move between the two runs; it would see one in a metric.
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("metrics:\n  - results/metrics.json\n  - results/teacher.json\n")
    for name in ("metrics.json", "teacher.json"):
        shutil.copy(scored / "results" / name, repo / "results" / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "first run"], cwd=repo, check=True)
    for name in ("metrics.json", "teacher.json"):
        shutil.copy(again / name, repo / "results" / name)
    assert _dvc(repo, "metrics", "diff", "--json") in ("", "{}")
    moved = json.loads((again / "metrics.json").read_text())
    moved["cdm"]["1"]["alignment"] += 0.25
    (repo / "results/metrics.json").write_text(json.dumps(moved))
    assert "cdm.1.alignment" in _dvc(repo, "metrics", "diff", "--json")


# --- one verdict per finding and step count ---------------------------------------------

VERDICT = r"(held|did not hold|within noise|mixed|not measured)"


def _verdicts(md: str, single_steps: str) -> dict[tuple[int, str], list[str]]:
    """Every verdict the report states, by (finding, steps): the seeded table and its
    details, and the single run's list (at `single_steps`)."""
    import re

    found: dict[tuple[int, str], list[str]] = {}
    columns: list[str] = []
    fid = 0
    for line in md.splitlines():
        if line.startswith("| finding |"):
            columns = [c.strip().removesuffix(" steps") for c in line.strip("|").split("|")[1:]]
        elif columns and (row := re.match(r"\| \((\d)\) [^|]*\|(.*)\|$", line)):
            cells = [c.strip() for c in row.group(2).split("|")]
            for steps, v in zip(columns, cells, strict=True):
                found.setdefault((int(row.group(1)), steps), []).append(v)
        elif single := re.match(rf"- \*\*\((\d)\) {VERDICT}\*\*", line):
            found.setdefault((int(single.group(1)), single_steps), []).append(single.group(2))
        elif head := re.match(r"- \*\*\((\d)\)\*\*", line):
            fid = int(head.group(1))
        elif detail := re.match(rf"  - (\d+) steps, {VERDICT}: ", line):
            found.setdefault((fid, detail.group(1)), []).append(detail.group(2))
        if line.startswith("## ") and not line.startswith("## Findings over"):
            columns = []
    return found


def _seeded(path: Path, ran_on: dict) -> dict:
    """A seeded measurement at 1 and 2 steps where finding 1 held at 1 step and did not at 2
    (the single run, below, says it held at 2)."""
    from cdm.report.ablation import ablation_summary

    def run(shift: float) -> dict:
        def s(alignment: float, fd: float) -> dict:
            return {"alignment": alignment + shift, "fd": fd, "fd_to_teacher_nocfg": fd,
                    "precision": 0.7, "recall": 0.6, "nfe": 1}  # fmt: skip

        return {
            "dmd2": {"1": s(0.70, 300), "2": s(0.90, 100)},
            "dynamic": {"1": s(0.80, 200), "2": s(0.70, 300)},
            "cdm": {"1": s(0.80, 200), "2": s(0.90, 100)},
            "dm_only": {"1": s(0.60, 50), "2": s(0.60, 50)},
        }

    summary = ablation_summary({0: run(0.0), 1: run(0.01), 2: run(-0.01)}, {}, ["1", "2"], ran_on)
    path.write_text(json.dumps(summary))
    return summary


@pytest.fixture()
def single_run(scored, tmp_path) -> Path:
    """results/ of the scored project, plus presets whose single run holds finding 1 at 2 steps."""
    results = tmp_path / "results"
    shutil.copytree(scored / "results", results, ignore=shutil.ignore_patterns("plots", "report*"))
    metrics = json.loads((results / "metrics.json").read_text())
    base = metrics["cdm"]["2"]
    metrics["dmd2"] = {"2": base | {"fd": base["fd"] + 50}}
    metrics["dynamic"] = {"2": base | {"fd": base["fd"] + 10}}
    (results / "metrics.json").write_text(json.dumps(metrics))
    return results


def _report(scored: Path, results: Path) -> tuple[str, str]:
    _ok(scored, "report.py", "--results", str(results))
    return (results / "report.md").read_text(), (results / "report.html").read_text()


def test_a_matching_ablation_gives_every_verdict(scored, single_run):
    from cdm import params as P
    from cdm.report.ablation import measured_on
    from cdm.report.findings import findings

    params = P.load(scored / "params.yaml")
    teacher = json.loads((single_run / "teacher.json").read_text())
    summary = _seeded(single_run / "ablation.json", measured_on(params, teacher))
    assert findings(json.loads((single_run / "metrics.json").read_text()), "2")[0]["held"]
    md, page = _report(scored, single_run)

    stated = _verdicts(md, "2")
    seeded = {
        (f["id"], s): v["verdict"] for f in summary["findings"] for s, v in f["by_steps"].items()
    }
    assert seeded[(1, "2")] == "did not hold"
    # Lists, not sets, so a verdict stated once too often or too few fails: each is stated
    # twice, in its cell of the findings table and in its detail line, in the summary's order.
    assert list(stated.items()) == [(k, [v, v]) for k, v in seeded.items()]
    assert "## The single-seed run's numbers" in md and "measured at 2 steps" in md
    assert page.count('class="finding numbers"') == 3
    assert "is not shown" not in md


@pytest.mark.parametrize("record", ["other params", "none"])
def test_without_a_matching_ablation_the_single_run_gives_the_verdicts(scored, single_run, record):
    from cdm import params as P
    from cdm.report.ablation import measured_on
    from cdm.report.findings import findings

    params = P.load(scored / "params.yaml")
    teacher = json.loads((single_run / "teacher.json").read_text())
    ran_on = measured_on(params, teacher) if record != "none" else {}
    if ran_on:
        ran_on["params"]["students"]["cdm"]["distill"]["iterations"] += 1
    _seeded(single_run / "ablation.json", ran_on)
    md, page = _report(scored, single_run)

    single = findings(json.loads((single_run / "metrics.json").read_text()), "2")
    status = {True: "held", False: "did not hold", None: "not measured"}
    assert _verdicts(md, "2") == {(f["id"], "2"): [status[f["held"]]] for f in single}
    assert md.count("`results/ablation.json` is not shown") == 1
    reason = "students.cdm.distill.iterations" if ran_on else "records no teacher or params"
    assert reason in md and "Findings over distillation seeds" not in md
    assert 'class="finding numbers"' not in page and "is not shown" in page


def test_a_dpg_set_is_seeded_like_the_evaluation_pairs(sampled, tmp_path):
    """cache_teacher --dpg encodes the DPG prompts in CSV order; sample.py --prompts dpg gives
    pair j item j with the evaluation pairs' noise: on the eval set's first prompts, in the
    same order, the images are the eval set's byte for byte."""
    from tests.test_dpg import rows

    _, prompts = load_condition(sampled / "cache/prompts/eval.safetensors")
    items = [(f"i{k}", p, [(1, "0", "q?"), (2, "1", "r?")]) for k, p in enumerate(prompts[:3])]
    (tmp_path / "dpg.csv").write_text(rows(items))
    params = tmp_path / "params.yaml"
    data = yaml.safe_load((sampled / "params.yaml").read_text())
    data["prompts"]["dpg_file"] = str(tmp_path / "dpg.csv")
    params.write_text(yaml.safe_dump(data))
    cache = tmp_path / "dpg.safetensors"
    _ok(sampled, "cache_teacher.py", "--params", str(params), "--dpg", str(cache))
    assert load_condition(cache)[1] == prompts[:3]
    out = tmp_path / "samples_dpg"
    args = ["--prompts", "dpg", "--dpg-cache", str(cache), "--out", str(out)]
    _ok(sampled, "sample.py", "--model", "teacher_nocfg", "--steps", "1", *args)
    index = pd.read_parquet(out / "teacher_nocfg/1/index.parquet")
    assert index["pair"].tolist() == [0, 1, 2] and index["prompt"].tolist() == prompts[:3]
    assert index["seed"].tolist() == [NOISE_SEED_BASE + j for j in range(3)]
    eval_images = _pngs(sampled / "samples/teacher_nocfg/1")
    assert _pngs(out / "teacher_nocfg/1") == {k: eval_images[k] for k in sorted(eval_images)[:3]}
    code, err = call_stage(sampled, "sample.py", "--model", "cdm", "--steps", "1",
                           "--prompts", "dpg", "--dpg-cache", str(tmp_path / "none"))  # fmt: skip
    assert code == 2 and "run the cache_dpg stage first" in err
