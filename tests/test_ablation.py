"""Findings over distillation seeds: the summaries, the 2-se rule, and the report section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cdm.report import ablation as A
from cdm.report.findings import findings
from cdm.report.html import write_report


def _set(alignment: float, fd: float, to_nocfg: float) -> dict:
    return {
        "alignment": alignment, "fd": fd, "fd_to_teacher_nocfg": to_nocfg, "precision": 0.7,
        "recall": 0.6, "nfe": 4,
    }  # fmt: skip


def _runs(per_method: dict[str, list[tuple[float, float, float]]]) -> dict[int, dict]:
    """{seed: {method: {"4": set}}} from one (alignment, fd, fd_to_nocfg) per seed."""
    seeds = range(len(next(iter(per_method.values()))))
    return {s: {m: {"4": _set(*v[s])} for m, v in per_method.items()} for s in seeds}


def test_summary_is_mean_and_sample_std() -> None:
    s = A.summarise([0.8, 0.9, 1.0, math.nan])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9)
    assert s["std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert A.summarise([0.5])["std"] == 0.0


def test_compare_is_the_welch_standard_error() -> None:
    a = {"mean": 1.0, "std": 0.3, "n": 3}
    b = {"mean": 0.5, "std": 0.4, "n": 4}
    c = A.compare(a, b)
    se = math.sqrt(0.09 / 3 + 0.16 / 4)
    assert c["diff"] == pytest.approx(0.5) and c["se"] == pytest.approx(se, abs=1e-6)
    assert c["beyond"] == (0.5 > 2 * se)


@pytest.mark.parametrize(
    ("dynamic", "verdict"),
    [
        ([(0.90, 100, 50), (0.91, 101, 50), (0.92, 99, 50)], "held"),  # alignment up, FD equal
        ([(0.70, 100, 50), (0.71, 101, 50), (0.72, 99, 50)], "did not hold"),
        ([(0.90, 300, 50), (0.91, 301, 50), (0.92, 299, 50)], "mixed"),  # better and worse
        ([(0.79, 100, 50), (0.82, 101, 50), (0.80, 99, 50)], "within noise"),
    ],
)
def test_a_difference_counts_only_beyond_two_standard_errors(dynamic, verdict) -> None:
    dmd2 = [(0.80, 100, 50), (0.81, 100.5, 50), (0.79, 99.5, 50)]
    table = A.per_seed_table(_runs({"dmd2": dmd2, "dynamic": dynamic}))
    out = A.beats(table, "dynamic", "dmd2", "4")
    assert out["verdict"] == verdict
    assert "`dynamic`" in out["text"] and "2 se" in out["text"]


def test_dm_only_near_the_cfg_free_teacher_needs_every_student_beyond_the_margin() -> None:
    base = {
        "dmd2": [(0.8, 100, 400), (0.8, 100, 420), (0.8, 100, 410)],
        "cdm": [(0.8, 100, 300), (0.8, 100, 310), (0.8, 100, 305)],
        "dynamic": [(0.8, 100, 350), (0.8, 100, 340), (0.8, 100, 360)],
    }
    near = base | {"dm_only": [(0.6, 200, 100), (0.6, 200, 120), (0.6, 200, 110)]}
    summary = A.ablation_summary(_runs(near), {}, ["4"], {})
    by_id = {f["id"]: f["by_steps"]["4"] for f in summary["findings"]}
    assert by_id[2]["verdict"] == "held" and set(by_id[2]["better"]) == {"dmd2", "cdm", "dynamic"}
    # One student within the noise of dm_only: not held; one closer beyond it: did not hold.
    far = base | {"dm_only": [(0.6, 200, 500), (0.6, 200, 510), (0.6, 200, 505)]}
    by_id = {f["id"]: f for f in A.ablation_summary(_runs(far), {}, ["4"], {})["findings"]}
    assert by_id[2]["by_steps"]["4"]["verdict"] == "did not hold"
    wide = base | {"dm_only": [(0.6, 200, 100), (0.6, 200, 500), (0.6, 200, 150)]}
    by_id = {f["id"]: f for f in A.ablation_summary(_runs(wide), {}, ["4"], {})["findings"]}
    assert by_id[2]["by_steps"]["4"]["verdict"] == "within noise"


def test_missing_presets_are_not_measured() -> None:
    summary = A.ablation_summary(_runs({"cdm": [(0.8, 1, 1), (0.8, 1, 1)]}), {}, ["4"], {})
    assert {f["by_steps"]["4"]["verdict"] for f in summary["findings"]} == {"not measured"}


def test_report_states_findings_over_seeds_and_students_against_the_teacher(tmp_path) -> None:
    runs = _runs(
        {
            "dmd2": [(0.80, 100, 50), (0.81, 100.5, 50), (0.79, 99.5, 50)],
            "dynamic": [(0.90, 100, 50), (0.91, 101, 50), (0.92, 99, 50)],
        }
    )
    teacher = {"teacher_cfg": {"4": _set(0.87, 4000, 900), "28": _set(0.86, 2000, 800)}}
    summary = A.ablation_summary(runs, teacher, ["4"], {})
    json.dumps(summary)  # what the stage writes
    metrics = {"dmd2": {"4": _set(0.8, 100, 50)}, **teacher}
    md_path, html_path = write_report(tmp_path, metrics, findings(metrics), {}, None, summary)
    md, page = md_path.read_text(), html_path.read_text()
    assert "## Findings over distillation seeds" in md and A.RULE in md
    assert "| dynamic | 4 | 3 | 0.91 +- 0.01 |" in md
    assert "- 4 steps, held:" in md and "teacher_cfg (one sampling run)" in md
    # The students against the teacher: the same step count and the teacher's own.
    assert "| dmd2 | 4 | 0.8 | 0.87 | 0.86 | 100 | 4000 | 2000 |" in md
    assert "Findings over distillation seeds" in page and 'class="finding held"' in page


def test_the_teacher_check_names_a_teacher_not_a_cpu() -> None:
    """results/teacher.json of one teacher and code on two CPUs: FDs 2018.059557 / 2018.060598
    and 782.272596 / 782.272818 (float rounding). Both are the same teacher; an FD 1% off,
    or one judge decision more, is another."""
    from cdm import params as P
    from tests.conftest import ROOT

    params = P.load(ROOT / "params.yaml")
    check = {"fd_cfg": 2018.059557348679, "fd_nocfg": 782.2725963102857,
             "alignment_cfg": 0.8515625, "judge_accuracy": {"shape": 1.0}, "steps": 28}  # fmt: skip
    here = A.measured_on(params, check)
    other_cpu = check | {"fd_cfg": 2018.060598289041, "fd_nocfg": 782.2728183693835}
    assert A.measured_on(params, other_cpu) == here
    assert A.mismatch({"measured_on": here}, A.measured_on(params, other_cpu)) is None
    for other_teacher in ({"fd_cfg": 2018.06 * 1.01}, {"alignment_cfg": 437 / 512}):
        moved = A.measured_on(params, check | other_teacher)
        assert moved["teacher_check_sha256"] != here["teacher_check_sha256"]
        assert "teacher_check_sha256" in A.mismatch({"measured_on": here}, moved)
