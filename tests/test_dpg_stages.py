"""The DPG-Bench stages: score_dpg on a few tiny images and items with a stand-in VQA runner
(the real client and stage code), and Table 1's DPGBench column read from its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from cdm import params as P
from cdm.report import table1 as T1
from tests.conftest import ROOT, call_stage
from tests.test_dpg import COLOURS, ITEMS, RUNNER, rows

# By hand (tests/test_dpg.py's rule, the CSV's first row dropped): the teacher's images have
# their items' colours (50, 50, 50, 0 -> 37.5); the student's are all red: red1 1/2, green1
# (square yes, green no, red dot yes, its child no) 2/4, blue1 0/2, red2 0/3 -> 25.
EXPECTED = {"teacher_cfg": 37.5, "cdm": 25.0}


def write_set(folder: Path, colours: list[str]) -> None:
    """A DPG sample set as sample.py writes it: one PNG per pair and index.parquet."""
    folder.mkdir(parents=True)
    files = [f"{j:05d}.png" for j in range(len(colours))]
    for name, colour in zip(files, colours, strict=True):
        Image.new("RGB", (8, 8), COLOURS[colour]).save(folder / name)
    pd.DataFrame({"pair": range(len(files)), "file": files}).to_parquet(folder / "index.parquet")


def dpg_params(path: Path, vqa: list[str]) -> P.Params:
    """Real-run params naming the DPG CSV: the teacher's base row and one student."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["teacher"].update(backend="sd3", path="tiny_sd3", steps=28)
    data["prompts"].update(train_file="p.txt", eval_file="p.txt", dpg_file="dpg.csv")
    data["distill"]["methods"] = ["cdm"]
    data["score"]["n_boot"] = 100
    data["dpg"] = {"sets": {"teacher_cfg": 28, "cdm": 4}, "bench": ["dpg_bench"], "vqa": vqa}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return P.load(path)


def test_score_dpg_stage_gives_the_benchmark_rule_by_hand(tmp_path: Path) -> None:
    runner = RUNNER.format(tests=str(Path(__file__).parent))
    params = dpg_params(tmp_path / "params.yaml", [sys.executable, "-c", runner])
    assert P.dpg_sets(params) == [("teacher_cfg", 28), ("cdm", 4)]
    (tmp_path / "dpg.csv").write_text(rows(ITEMS))
    write_set(tmp_path / "samples_dpg/teacher_cfg/28", ["red", "green", "blue", "red"])
    write_set(tmp_path / "samples_dpg/cdm/4", ["red"] * 4)
    code, err = call_stage(tmp_path, "score_dpg.py", "--params", "params.yaml")
    assert code == 0, err
    got = json.loads((tmp_path / "results/dpg.json").read_text())
    for model, value in EXPECTED.items():
        entry = got[model]["28" if model == "teacher_cfg" else "4"]
        assert entry["dpg_score"] == pytest.approx(value)
        low, high = entry["dpg_score_ci"]
        assert low <= value <= high
        assert entry["conventions"]["images_per_prompt"] == 1


def test_score_dpg_names_a_missing_set(tmp_path: Path) -> None:
    dpg_params(tmp_path / "params.yaml", [sys.executable, "-c", "pass"])
    (tmp_path / "dpg.csv").write_text(rows(ITEMS))
    code, err = call_stage(tmp_path, "score_dpg.py", "--params", "params.yaml")
    assert code != 0 and "sample_dpg" in err and "samples_dpg/teacher_cfg/28" in err


def test_dpg_sets_must_match_table1_sets(tmp_path: Path) -> None:
    with pytest.raises(P.ParamsError, match=r"dpg: sets must be \{'teacher_cfg': 28, 'cdm': 4\}"):
        data = yaml.safe_load((ROOT / "params.yaml").read_text())
        data["teacher"].update(backend="sd3", steps=28)
        data["prompts"].update(train_file="p.txt", eval_file="p.txt", dpg_file="dpg.csv")
        data["distill"]["methods"] = ["cdm"]
        P.parse(data)
    assert P.dpg_sets(P.load(ROOT / "params.yaml")) == []  # the shapes world: none


def test_table1_shows_the_dpg_score_from_its_results(tmp_path: Path) -> None:
    params = dpg_params(tmp_path / "params.yaml", ["x"])
    metrics = {"cdm": {"4": {"nfe": 4, "aesthetic": 5.0, "aesthetic_ci": [4.9, 5.1]}}}
    dpg = {"cdm": {"4": {"dpg_score": 81.25, "dpg_score_ci": [80.5, 82.0], "conventions": {}}}}
    (tmp_path / "dpg.json").write_text(json.dumps(dpg))
    before = T1.table(metrics, params).set_index("Method")
    assert before.loc["CDM (`cdm`)", "DPGBench"] == T1.NOT_MEASURED
    merged = T1.with_dpg(metrics, tmp_path / "dpg.json")
    after = T1.table(merged, params).set_index("Method")
    assert after.loc["CDM (`cdm`)", "DPGBench"] == "81.25 [80.5, 82]"
    assert after.loc["CDM (`cdm`)", "Aesthetic"] == before.loc["CDM (`cdm`)", "Aesthetic"]
    assert "conventions" not in merged["cdm"]["4"] and metrics["cdm"]["4"].get("dpg_score") is None
    said = f"`dpg_score` ({T1.NOT_MEASURED}"
    assert said in " ".join(T1.protocol(metrics, params, tmp_path))
    assert said not in " ".join(T1.protocol(merged, params, tmp_path))
    assert T1.with_dpg(metrics, tmp_path / "missing.json") is metrics


def test_validate_checks_a_dpg_csv_in_place(tmp_path: Path, monkeypatch) -> None:
    from cdm.validate import check_dpg

    monkeypatch.chdir(tmp_path)
    params = dpg_params(tmp_path / "params.yaml", ["x"])
    check_dpg(params)  # not fetched yet: fetch_dpg makes it
    (tmp_path / "dpg.csv").write_text("item_id,text\nx,y\n")
    with pytest.raises(
        ValueError, match=r"prompts.dpg_file dpg.csv: .*lacks column.*cdm.fetch dpg"
    ):
        check_dpg(params)
    (tmp_path / "dpg.csv").write_text(rows(ITEMS))
    check_dpg(params)
