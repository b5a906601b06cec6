"""DPG-Bench: the scoring rule against hand-computed graphs, the CSV loader's quirks, the VQA
runner's JSON-lines protocol (in process and as a subprocess) with a stand-in VQA that answers
from image colour, the pinned fetch of dpg_bench.csv and the runner's environment marker."""

from __future__ import annotations

import csv
import io
import json
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cdm import fetch
from cdm.metrics import dpg, dpg_env, dpg_vqa
from cdm.metrics.bootstrap import bootstrap_ci

# ---------------------------------------------------------------- the rule, by hand


def test_a_no_parent_zeroes_its_child_only() -> None:
    parents = {1: [0], 2: [1], 3: [1], 4: [2], 5: [0]}
    answers = {1: "yes", 2: "no", 3: "yes", 4: "yes", 5: "yes"}
    # raw 1,0,1,1,1; q4's parent q2 is 0 -> 0: final 1,0,1,0,1
    assert dpg.score_answers(answers, parents) == {1: 1, 2: 0, 3: 1, 4: 0, 5: 1}
    assert dpg.image_score(answers, parents) == pytest.approx(3 / 5)


def test_zeroing_cascades_down_the_graph() -> None:
    parents = {1: [0], 2: [1], 3: [2], 4: [0]}
    answers = {1: "no", 2: "yes", 3: "yes", 4: "yes"}
    # q1 no -> q2 zeroed -> q3 zeroed in turn; only q4 stands: 1/4
    assert dpg.image_score(answers, parents) == pytest.approx(1 / 4)


def test_any_failed_parent_of_several() -> None:
    parents = {1: [0], 2: [0], 3: [1, 2]}
    assert dpg.image_score({1: "yes", 2: "no", 3: "yes"}, parents) == pytest.approx(1 / 3)
    assert dpg.image_score({1: "yes", 2: "yes", 3: "yes"}, parents) == 1.0


def test_only_an_exact_yes_counts_and_absent_parents_pass() -> None:
    parents = {2: [1], 3: [0]}  # parent 1 absent (the dropped first row): counts as passed
    assert dpg.image_score({2: "yes", 3: "Yes"}, parents) == pytest.approx(1 / 2)
    assert dpg.image_score({2: "yes ", 3: "no"}, parents) == 0.0


def rows(items: Sequence[tuple[str, str, Sequence[tuple[int, str, str]]]]) -> str:
    """A dpg_bench.csv: (item_id, prompt, [(proposition_id, dependency, question)])."""
    out = io.StringIO()
    fields = ["item_id", "text", "keywords", "proposition_id", "dependency",
              "category_broad", "category_detailed", "tuple", "question_natural_language"]  # fmt: skip
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for item_id, prompt, questions in items:
        for qid, dep, question in questions:
            writer.writerow({"item_id": item_id, "text": prompt, "keywords": "", "proposition_id": qid,
                             "dependency": dep, "category_broad": "entity",
                             "category_detailed": "whole", "tuple": f"entity - whole ({qid})",
                             "question_natural_language": question})  # fmt: skip
    return out.getvalue()


# Four tiny DPG items about coloured images; the stand-in VQA sees colours only.
ITEMS = [
    ("red1", "a red square", [(1, "0", "Is there a square?"), (2, "1", "Is it red?"),
                              (3, "1", "Is it green?")]),
    ("green1", "a green square with a red dot", [(1, "0", "Is there a square?"),
                                                 (2, "1", "Is it green?"),
                                                 (3, "1", "Is there a red dot?"),
                                                 (4, "3", "Is the dot small?")]),
    ("blue1", "a blue sky", [(1, "0", "Is it blue?"), (2, "1", "Is there a cloud?")]),
    ("red2", "a green field", [(1, "0", "Is it green?"), (2, "1", "Is the grass tall?"),
                               (3, "2", "Is the field wide?")]),
]  # fmt: skip
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourVQA:
    """'yes' when the image's colour is named in the question or it asks 'Is there a'/'Is the'
    something of the image's colour; deterministic, no model."""

    def __init__(self) -> None:
        self.calls = 0

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        self.calls += 1
        out = []
        for path, question in zip(images, questions, strict=True):
            with Image.open(path) as image:
                pixel = image.convert("RGB").getpixel((0, 0))
            colour = next(name for name, rgb in COLOURS.items() if rgb == pixel)
            named = [c for c in COLOURS if c in question.lower()]
            out.append(
                "yes" if (named == [colour] or (not named and "square" in question)) else "no"
            )
        return out


def test_parse_keeps_the_authors_first_row_quirk() -> None:
    items = dpg.parse_csv(rows(ITEMS))
    assert list(items) == ["red1", "green1", "blue1", "red2"]
    assert items["red1"].prompt == "a red square"
    assert list(items["red1"].questions) == [2, 3]  # row 0 (red1's q1) dropped
    assert items["green1"].parents == {1: [0], 2: [1], 3: [1], 4: [3]}
    assert list(dpg.parse_csv(rows(ITEMS), skip_first_row=False)["red1"].questions) == [1, 2, 3]
    with pytest.raises(ValueError, match="lacks column"):
        dpg.parse_csv("item_id,text\nx,y\n")
    with pytest.raises(ValueError, match="row 3"):
        dpg.parse_csv(rows([("a", "p", [(1, "0", "q"), (2, "one", "q2")])]), skip_first_row=False)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """One PNG per item, coloured by its item id (red2 is red, though its prompt says green)."""
    out = []
    for item_id, _, _ in ITEMS:
        path = tmp_path / f"{item_id}.png"
        Image.new("RGB", (8, 8), COLOURS[item_id.rstrip("12")]).save(path)
        out.append(path)
    return out


# By hand, with ColourVQA and the first row dropped:
#   red1 (red):    q2 red yes, q3 green no -> 1/2
#   green1 (green): q1 square yes, q2 green yes, q3 red no, q4 (parent q3) no -> 2/4
#   blue1 (blue):  q1 blue yes, q2 cloud no -> 1/2
#   red2 (red):    q1 green no, q2, q3 zeroed down the chain -> 0/3
BY_HAND = [50.0, 50.0, 50.0, 0.0]


def test_score_images_in_process(images: list[Path]) -> None:
    items = dpg.parse_csv(rows(ITEMS))
    vqa = ColourVQA()
    got = dpg.score_images(images, [i for i, _, _ in ITEMS], items, vqa)
    np.testing.assert_allclose(got, BY_HAND)
    assert vqa.calls == 1  # every question of the set in one request
    summary = dpg.summary(got, [i for i, _, _ in ITEMS], n_boot=200, seed=0)
    assert summary[dpg.KEY] == pytest.approx(37.5)
    ci = bootstrap_ci(got, [i for i, _, _ in ITEMS], n_boot=200, seed=0)
    assert summary[f"{dpg.KEY}_ci"] == [ci.low, ci.high] and ci.low <= 37.5 <= ci.high
    with pytest.raises(ValueError, match="nope is not in the DPG-Bench CSV"):
        dpg.score_images(images[:1], ["nope"], items, vqa)


# ---------------------------------------------------------------- the runner protocol


def test_serve_answers_line_by_line(images: list[Path]) -> None:
    requests = [
        json.dumps(
            {"images": [str(images[0]), str(images[2])], "questions": ["Is it red?", "Is it red?"]}
        ),
        "",
        json.dumps({"images": [str(images[0])], "questions": []}),
        "not json",
        json.dumps({"images": [str(images[0]) + ".missing"], "questions": ["Is it red?"]}),
    ]
    out = io.StringIO()
    dpg_vqa.serve(ColourVQA(), [r + "\n" for r in requests], out)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[0] == {"answers": ["yes", "no"]}
    assert replies[1] == {"error": "1 images but 0 questions"}
    assert replies[2]["error"].startswith("JSONDecodeError")
    assert replies[3]["error"].startswith("FileNotFoundError")
    assert len(replies) == 4 and all("\n" not in r.get("error", "") for r in replies)


RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
from test_dpg import ColourVQA
from cdm.metrics.dpg_vqa import serve
print(json.dumps({{"ready": "colour"}}), flush=True)
serve(ColourVQA(), sys.stdin, sys.stdout)
"""


def test_subprocess_client_scores_like_in_process(images: list[Path]) -> None:
    """The real client and a real runner process, with the stand-in VQA behind `serve`."""
    script = RUNNER.format(tests=str(Path(__file__).parent))
    items = dpg.parse_csv(rows(ITEMS))
    with dpg_vqa.SubprocessVQA([sys.executable, "-c", script], chunk=3) as vqa:
        got = dpg.score_images(images, [i for i, _, _ in ITEMS], items, vqa)
    np.testing.assert_allclose(got, BY_HAND)
    assert vqa.proc.returncode == 0


def test_runner_failures_are_one_line(images: list[Path]) -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        dpg_vqa.SubprocessVQA([sys.executable, "-c", 'print(\'{"error": "no modelscope"}\')'])
    with pytest.raises(RuntimeError, match="runner exited"):
        dpg_vqa.SubprocessVQA([sys.executable, "-c", "import sys; sys.exit(3)"])
    script = RUNNER.format(tests=str(Path(__file__).parent))
    with dpg_vqa.SubprocessVQA([sys.executable, "-c", script]) as vqa:
        with pytest.raises(RuntimeError, match="runner failed: FileNotFoundError"):
            vqa.answer([images[0].with_suffix(".gone")], ["Is it red?"])


# ---------------------------------------------------------------- the environment


def test_env_is_built_once_per_requirements(tmp_path: Path) -> None:
    reqs, env, calls = tmp_path / "reqs.txt", tmp_path / "env", []
    reqs.write_text("modelscope==1.40.2\n")

    def make(path: Path) -> None:
        venv.EnvBuilder(with_pip=False, clear=True).create(path)

    def install(command: Sequence[str]) -> None:
        calls.append(list(command))

    assert dpg_env.ensure_env(env, reqs, install, make) is True
    assert calls == [[str(env / "bin" / "python"), "-m", "pip", "install", "-r", str(reqs)]]
    assert dpg_env.ensure_env(env, reqs, install, make) is False and len(calls) == 1
    reqs.write_text("modelscope==1.40.3\n")  # changed requirements rebuild the env
    assert dpg_env.ensure_env(env, reqs, install, make) is True and len(calls) == 2

    def broken(command: Sequence[str]) -> None:
        raise OSError("no network")

    reqs.write_text("modelscope==1.41\n")
    with pytest.raises(OSError):
        dpg_env.ensure_env(env, reqs, broken, make)
    assert not (env / dpg_env.MARKER).exists()  # a failed install is not taken as built
    with pytest.raises(FileNotFoundError, match="no requirements"):
        dpg_env.ensure_env(env, tmp_path / "none.txt", install, make)


# ---------------------------------------------------------------- the pinned fetch


def params_file(folder: Path, **prompts: str | None) -> str:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"prompts": prompts}))
    return str(path)


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        fetch.cli(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_dpg_csv_wrong_hash_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src" / "dpg_bench.csv"
    source.parent.mkdir()
    source.write_text(rows(ITEMS))
    out = tmp_path / "data" / "dpg_bench.csv"
    out.parent.mkdir()
    code, err = call(["dpg", "--params", params_file(tmp_path, dpg_file=str(out)),
                      "--source", str(source)], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert fetch.git_blob_id(source.read_bytes()) in err and fetch.DPG_GIT_BLOB in err
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary left
    code, err = call(["dpg", "--params", params_file(tmp_path)], capsys)
    assert code == 2 and "prompts.dpg_file is null" in err


def test_dpg_csv_with_the_pinned_id_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = rows(ITEMS).encode()
    source, out = tmp_path / "copy.csv", tmp_path / "data" / "dpg_bench.csv"
    source.write_bytes(data)
    monkeypatch.setattr(fetch, "DPG_GIT_BLOB", fetch.git_blob_id(data))
    code, err = call(["dpg", "--params", params_file(tmp_path, dpg_source=str(source)),
                      "--out", str(out)], capsys)  # fmt: skip
    assert (code, err) == (0, "") and out.read_bytes() == data
    assert list(dpg.load_items(out)) == ["red1", "green1", "blue1", "red2"]


def test_git_blob_id_is_gits() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert fetch.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert len(fetch.DPG_GIT_BLOB) == 40


def test_score_sets_maps_pairs_to_items_in_csv_order(images: list[Path]) -> None:
    items = dpg.parse_csv(rows(ITEMS))
    folder = images[0].parent
    # pairs 0..3 are the items in CSV order; pair 5 wraps to item 1 (green1)
    files = [p.name for p in images] + [images[1].name]
    got = dpg.score_sets([("cdm", 4, folder, [0, 1, 2, 3, 5], files)], items, ColourVQA(), 100)
    assert got["cdm"]["4"][dpg.KEY] == pytest.approx((50 + 50 + 50 + 0 + 50) / 5)
    assert dpg.item_ids_of([0, 3, 4, 6], items) == ["red1", "red2", "red1", "blue1"]
