"""Report: findings logic, table layout, PNG plots, Markdown and self-contained HTML."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cdm.report.findings import findings
from cdm.report.html import write_report
from cdm.report.plots import image_grid, quality_vs_nfe, training_curves
from cdm.report.tables import metrics_table, to_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _m(alignment: float, fd: float, to_nocfg: float, nfe: int) -> dict:
    return {
        "alignment": alignment,
        "fd": fd,
        "precision": 0.7,
        "recall": 0.6,
        "fd_to_teacher_nocfg": to_nocfg,
        "nfe": nfe,
        "images_per_s": 123.4,
    }


def _metrics() -> dict:
    """All three findings hold at 4 steps."""
    return {
        "cdm": {"4": _m(0.90, 5.0, 9.0, 4), "1": _m(0.80, 9.0, 12.0, 1)},
        "dm_only": {"4": _m(0.52, 20.0, 3.0, 4)},
        "dmd2": {"4": _m(0.85, 12.0, 10.0, 4), "2": _m(0.80, 15.0, 11.0, 2)},
        "dynamic": {"4": _m(0.86, 8.0, 9.5, 4)},
        "teacher_cfg": {"8": _m(0.70, 30.0, 6.0, 16), "50": _m(0.88, 6.0, 8.0, 100)},
        "teacher_nocfg": {"50": _m(0.50, 15.0, 0.5, 50)},
    }


def _by_id(metrics: dict) -> dict[int, dict]:
    return {f["id"]: f for f in findings(metrics)}


def test_findings_hold() -> None:
    out = findings(_metrics())
    assert [f["id"] for f in out] == [1, 2, 3]
    assert all(f["held"] is True for f in out)
    assert all(set(f) == {"id", "claim", "held", "text", "numbers"} for f in out)
    assert "8" in out[0]["text"] and "12" in out[0]["text"]  # measured FDs are stated
    assert "0.01" in out[0]["text"]  # the rule is stated


def test_findings_do_not_hold() -> None:
    m = _metrics()
    m["dynamic"]["4"]["alignment"] = 0.835  # lower FD but alignment drops by 0.015 > 0.01
    m["dm_only"]["4"]["alignment"] = 0.75  # closer to the CFG teacher (0.88) than to 0.50
    f = _by_id(m)
    assert f[1]["held"] is False
    assert f[2]["held"] is False
    assert f[3]["held"] is True  # cdm (0.90, FD 5) still beats dynamic


def test_alignment_tolerance_is_inclusive_of_small_drops() -> None:
    m = _metrics()
    m["dynamic"]["4"]["alignment"] = 0.845  # drop of 0.005 is tolerated
    assert _by_id(m)[1]["held"] is True


def test_fd_not_lower_fails() -> None:
    m = _metrics()
    m["cdm"]["4"]["fd"] = 8.0  # equal FD is not lower
    assert _by_id(m)[3]["held"] is False


def test_missing_models_give_none() -> None:
    m = _metrics()
    del m["dm_only"], m["dmd2"]
    f = _by_id(m)
    assert f[1]["held"] is None and "`dmd2`" in f[1]["text"]
    assert f[2]["held"] is None and "`dm_only` preset (`make ablation`" in f[2]["text"]
    assert f[3]["held"] is True  # cdm vs dynamic needs neither


def test_missing_dynamic_falls_back_to_cdm_vs_dmd2() -> None:
    m = _metrics()
    del m["dynamic"]
    f = _by_id(m)
    for i in (1, 3):
        assert f[i]["held"] is True
        assert f[i]["text"].startswith("fallback:")
        assert "needs the `dynamic` preset (`make ablation`" in f[i]["text"]
    del m["cdm"]
    assert _by_id(m)[1]["held"] is None and _by_id(m)[3]["held"] is None


def test_missing_steps_and_nan_values_give_none() -> None:
    m = _metrics()
    assert all(f["held"] is None for f in findings(m, steps="3"))
    m["dmd2"]["4"]["fd"] = math.nan
    f = _by_id(m)
    assert f[1]["held"] is None and "`fd` of `dmd2`" in f[1]["text"]


def test_teacher_steps_default_to_largest() -> None:
    m = _metrics()
    # 0.62 is nearer teacher_nocfg@50 (0.50) than teacher_cfg@50 (0.88), not than cfg@8 (0.70).
    m["dm_only"]["4"]["alignment"] = 0.62
    assert _by_id(m)[2]["held"] is True
    assert findings(m, teacher_steps="8")[1]["held"] is None  # teacher_nocfg has no 8


def test_table_order_and_markdown_shape() -> None:
    m = _metrics()
    m["zzz"] = {"4": {"fd": 1.0}}
    df = metrics_table(m)
    assert list(df.columns) == [
        "model",
        "steps",
        "nfe",
        "alignment",
        "fd",
        "precision",
        "recall",
        "fd_to_teacher_nocfg",
        "images_per_s",
    ]
    pairs = list(zip(df["model"], df["steps"], strict=True))
    assert pairs == [
        ("teacher_cfg", 8),
        ("teacher_cfg", 50),
        ("teacher_nocfg", 50),
        ("dmd2", 2),
        ("dmd2", 4),
        ("dynamic", 4),
        ("dm_only", 4),
        ("cdm", 1),
        ("cdm", 4),
        ("zzz", 4),
    ]
    md = to_markdown(df).strip().splitlines()
    assert len(md) == 2 + len(df)
    assert all(line.startswith("|") and line.endswith("|") for line in md)
    assert {line.count("|") for line in md} == {len(df.columns) + 1}
    assert md[1] == "|:---|" + "|".join(["---:"] * 8) + "|"
    assert "| zzz | 4 | n/a | n/a | 1 |" in md[-1]


def _assert_png_not_uniform(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        extrema = img.convert("L").getextrema()
    assert extrema[0] < extrema[1]


def _csvs(tmp_path: Path) -> dict[str, Path]:
    steps = np.arange(0, 200, 10)
    full = pd.DataFrame(
        {"step": steps, "loss_ca": 1 / (1 + steps), "loss_dm": np.nan, "loss_cdm": steps * 0.01}
    )
    partial = pd.DataFrame({"step": steps, "loss_ca": 2 / (1 + steps), "loss_fake": 0.5})
    paths = {"cdm": tmp_path / "cdm.csv", "dmd2": tmp_path / "dmd2.csv"}
    full.to_csv(paths["cdm"], index=False)
    partial.to_csv(paths["dmd2"], index=False)
    (tmp_path / "empty.csv").write_text("")
    paths["dynamic"] = tmp_path / "empty.csv"
    paths["dm_only"] = tmp_path / "missing.csv"
    return paths


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        name: rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for name in ("teacher_cfg", "cdm")
    }


@pytest.fixture()
def plots(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "report" / "plots"
    return {
        "quality vs NFE": quality_vs_nfe(_metrics(), out / "quality_vs_nfe.png"),
        "training curves": training_curves(_csvs(tmp_path), out / "training_curves.png"),
        "samples": image_grid(_images(), out / "samples.png", scale=4),
    }


def test_plots_are_valid_pngs(plots: dict[str, Path]) -> None:
    for path in plots.values():
        _assert_png_not_uniform(path)
    assert not list(path.parent.glob(".*"))  # no temporaries left behind


def test_image_grid_upscales_nearest(tmp_path: Path) -> None:
    images = _images()
    path = image_grid(images, tmp_path / "grid.png", scale=4)
    with Image.open(path) as img:
        grid = np.asarray(img.convert("RGB"))
    assert grid.shape[0] == 2 * (8 * 4 + 2) + 2
    # The first tile of the last row, upscaled 4x, sits flush right of the label column.
    tile = np.repeat(np.repeat(images["cdm"][0], 4, 0), 4, 1)
    row = grid[2 + 34 : 2 + 34 + 32]
    left = grid.shape[1] - 3 * (32 + 2)
    assert np.array_equal(row[:, left : left + 32], tile)


def test_image_grid_rejects_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        image_grid({"a": np.zeros((2, 4, 4, 3), dtype=np.float32)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one row"):
        image_grid({}, tmp_path / "x.png")


def test_training_curves_without_logs(tmp_path: Path) -> None:
    path = training_curves({"cdm": tmp_path / "missing.csv"}, tmp_path / "t.png")
    _assert_png_not_uniform(path)


def test_write_report(plots: dict[str, Path]) -> None:
    out_dir = next(iter(plots.values())).parent.parent
    m = _metrics()
    del m["dynamic"]
    md_path, html_path = write_report(out_dir, m, findings(m), plots)
    assert (md_path, html_path) == (out_dir / "report.md", out_dir / "report.html")

    md = md_path.read_text()
    for path in plots.values():
        assert f"](plots/{path.name})" in md
    assert "fallback:" in md and "| teacher_cfg | 8 |" in md

    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert re.findall(r'src="(?!data:image/png;base64,)', page) == []
    assert "href=" not in page and "<table" in page and "<style>" in page
    assert "<code>dynamic</code>" in page
    assert sorted(p.name for p in out_dir.iterdir()) == ["plots", "report.html", "report.md"]


def test_training_curves_read_the_engine_log(tmp_path):
    """The engine writes `iteration`, not `step`: its train.csv must still be plotted."""
    from cdm.report.plots import _read_losses
    from cdm.runlog import LOG_COLUMNS

    rows = [",".join(LOG_COLUMNS)] + [
        ",".join(
            str(i + 1) if c == "iteration" else ("0.5" if c.startswith("loss") else "")
            for c in LOG_COLUMNS
        )
        for i in range(5)
    ]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    df = _read_losses(path)
    assert df is not None and list(df["step"]) == [1, 2, 3, 4, 5]
    assert df["loss_cdm"].eq(0.5).all()


def test_changed_params_list_every_leaf_that_differs(tmp_path):
    from cdm.report.provenance import changed_params

    committed = (Path(__file__).parents[1] / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(committed.replace("guidance: 1.0", "guidance: 2.0"))
    assert changed_params(path, committed) == {"distill.guidance": [1.0, 2.0]}
    assert changed_params(path, None)["distill.guidance"] == [None, 2.0]


def test_since_committed_flags_moves_beyond_the_margin():
    from cdm.report.provenance import since_committed

    then = {"cdm": {"4": {"alignment": 0.80, "fd": 200.0}}}
    # 2,048 pairs: one standard error of 0.8 is ~0.0088
    small = since_committed(
        {"cdm": {"4": {"alignment": 0.805, "fd": 900.0}}}, then, ["alignment", "fd"], 2048
    )
    big = since_committed(
        {"cdm": {"4": {"alignment": 0.83, "fd": 200.0}}}, then, ["alignment", "fd"], 2048
    )
    assert small.set_index("metric")["moved"].to_dict() == {"alignment": "", "fd": ""}
    assert big.set_index("metric").loc["alignment", "moved"] == "yes"
    assert big.set_index("metric").loc["alignment", "change"] == pytest.approx(0.03)
    # Real runs: the interval's half-width is the margin.
    ci = {"cdm": {"4": {"pickscore": 21.5, "pickscore_ci": [21.3, 21.7]}}}
    moved = since_committed(ci, {"cdm": {"4": {"pickscore": 21.0}}}, ["pickscore"], 2048)
    assert moved["moved"].tolist() == ["yes"]


def test_grid_pairs_span_every_world_attribute() -> None:
    """The first eight evaluation pairs show few colours; the chosen eight show every shape,
    colour, position and background."""
    from cdm.report.grid import spanning_pairs
    from cdm.world.evaluate import EvalPairs
    from cdm.world.prompts import ATTRIBUTES, all_prompts, parse_prompt

    pairs = EvalPairs.of(all_prompts(), range(512))
    prompts = dict(enumerate(pairs.prompts))

    def shown(chosen: list[int]) -> dict[str, set[int]]:
        attrs = [parse_prompt(prompts[p]) for p in chosen]
        return {name: {getattr(a, name) for a in attrs} for name in ATTRIBUTES}

    first = shown(list(range(8)))
    assert any(len(first[n]) < len(v) for n, v in ATTRIBUTES.items())  # the old grid
    chosen = spanning_pairs(prompts, 8)
    assert len(set(chosen)) == 8 and chosen == sorted(chosen)
    assert all(len(shown(chosen)[n]) == len(v) for n, v in ATTRIBUTES.items())
    assert spanning_pairs(prompts, 8) == chosen  # deterministic


def test_grid_pairs_of_real_prompts_are_evenly_spaced() -> None:
    from cdm.report.grid import spanning_pairs

    prompts = {i: f"a photo number {i}" for i in range(2048)}
    assert spanning_pairs(prompts, 4) == [0, 512, 1024, 1536]
    assert spanning_pairs({0: "x", 5: "y"}, 8) == [0, 5]


def test_one_colour_per_model_in_every_figure() -> None:
    from cdm.report.plots import model_colour
    from cdm.report.tables import MODEL_ORDER

    colours = [model_colour(m) for m in MODEL_ORDER]
    assert len(set(colours)) == len(MODEL_ORDER)
    assert model_colour("my_method") == model_colour("my_method")
    assert model_colour("my_method") not in colours


@pytest.mark.parametrize(
    "lora, said",
    [
        (None, "students trained by full fine-tuning"),
        ({"rank": 4, "alpha": 8.0, "include_ff": False}, "by LoRA adapters (rank 4, alpha 8, "
         "attention linears)"),
    ],
)  # fmt: skip
def test_the_provenance_block_names_the_training_mode(tmp_path, lora, said):
    from cdm import params as P
    from cdm.report.html import provenance_lines
    from cdm.report.provenance import provenance, since_committed
    from tests.conftest import ROOT

    params = P.parse({"distill": {"lora": lora}})
    record = provenance(ROOT / "params.yaml", params, tmp_path, {})
    context = {"provenance": record, "since": since_committed({}, None, [], 512)}
    assert said in provenance_lines(context)[0]
