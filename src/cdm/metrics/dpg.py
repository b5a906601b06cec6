"""DPG-Bench: dense prompts, each with a graph of yes/no questions a VQA model answers.

The benchmark (ELLA's dpg_bench, 1,065 prompts) as the CDM authors' `dpg_scorer` computes it:
- the questions come from `dpg_bench.csv` (item_id, text, proposition_id, dependency,
  question_natural_language, ...); the prompt of an item is its first row's `text`;
- their loader drops the CSV's first data row (the first question of the first item), as
  ELLA's compute_dpg_bench.py does; kept here so the numbers compare (`SKIP_FIRST_ROW`);
- each question scores 1 when the VQA answer is exactly "yes", else 0;
- in CSV order, a question any of whose parents (dependency ids, 0 = none) now scores 0 is set
  to 0: the zeroing cascades down the graph; a parent id absent from the item counts as passed;
- an image's score is the mean over its item's questions; the benchmark score is the mean over
  images x 100 (the authors: one image per prompt, the whole image; ELLA: a 2x2 grid of four).

The VQA model (mPLUG-large through modelscope) is behind the `VQA` protocol; its dependencies
conflict with this project's, so it runs in its own environment (`cdm.metrics.dpg_vqa`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cdm.metrics.bootstrap import bootstrap_ci

MODEL_ID = "damo/mplug_visual-question-answering_coco_large_en"
SKIP_FIRST_ROW = True
YES = "yes"
KEY = "dpg_score"  # metrics.json key (the report's DPGBench column)
COLUMNS = ("item_id", "text", "proposition_id", "dependency", "question_natural_language")


class VQA(Protocol):
    """Answers questions about images: answers[i] is the answer to questions[i] on images[i]."""

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class Item:
    """One DPG-Bench prompt and its question graph, in CSV order."""

    item_id: str
    prompt: str
    questions: dict[int, str]  # proposition id -> question
    parents: dict[int, list[int]]  # proposition id -> dependency ids (0: none)


def parse_csv(text: str, skip_first_row: bool = SKIP_FIRST_ROW) -> dict[str, Item]:
    """The items of a dpg_bench.csv, in the order they first appear."""
    rows = list(csv.DictReader(io.StringIO(text)))
    missing = [c for c in COLUMNS if rows and c not in rows[0]] if rows else list(COLUMNS)
    if missing:
        raise ValueError(f"DPG-Bench CSV lacks column(s) {', '.join(missing)}; fetch it again")
    items: dict[str, Item] = {}
    for n, row in enumerate(rows):
        item_id = row["item_id"]
        item = items.setdefault(item_id, Item(item_id, row["text"].strip(), {}, {}))
        if skip_first_row and n == 0:
            continue  # the prompt still counts; only its first question is dropped
        try:
            qid = int(row["proposition_id"])
            deps = [int(d) for d in row["dependency"].split(",")]
        except ValueError:
            raise ValueError(
                f"DPG-Bench CSV row {n + 2}: proposition_id/dependency are not integers "
                f"({row['proposition_id']!r}, {row['dependency']!r}); fetch it again"
            ) from None
        item.questions[qid] = row["question_natural_language"]
        item.parents[qid] = deps
    return items


def load_items(path: Path) -> dict[str, Item]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no DPG-Bench CSV; run `python -m cdm.fetch dpg`")
    return parse_csv(path.read_text(encoding="utf-8"))


def score_answers(
    answers: Mapping[int, str], parents: Mapping[int, Sequence[int]]
) -> dict[int, float]:
    """Each question's final score: 1 for "yes", 0 otherwise or when a parent scores 0."""
    scores = {qid: float(answers[qid] == YES) for qid in parents}
    for qid, ids in parents.items():  # in order: a zeroed parent zeroes its children in turn
        if any(scores.get(p, 1.0) == 0 for p in ids if p != 0):
            scores[qid] = 0.0
    return scores


def image_score(answers: Mapping[int, str], parents: Mapping[int, Sequence[int]]) -> float:
    """The mean of an image's final question scores, in [0, 1]."""
    scores = score_answers(answers, parents)
    if not scores:
        raise ValueError("a DPG-Bench item with no questions has no score")
    return sum(scores.values()) / len(scores)


def score_images(
    images: Sequence[Path], item_ids: Sequence[str], items: Mapping[str, Item], vqa: VQA
) -> np.ndarray:
    """Per-image DPG scores x 100: every question of every image asked in one VQA call."""
    if len(images) != len(item_ids):
        raise ValueError(f"{len(images)} images but {len(item_ids)} DPG item ids")
    unknown = sorted({i for i in item_ids if i not in items})
    if unknown:
        raise ValueError(f"DPG item id {unknown[0]} is not in the DPG-Bench CSV; resample the set")
    flat_images, flat_questions = [], []
    for image, item_id in zip(images, item_ids, strict=True):
        for question in items[item_id].questions.values():
            flat_images.append(image)
            flat_questions.append(question)
    flat = vqa.answer(flat_images, flat_questions)
    if len(flat) != len(flat_questions):
        raise RuntimeError(
            f"the VQA model gave {len(flat)} answers to {len(flat_questions)} questions"
        )
    out, at = [], 0
    for item_id in item_ids:
        qids = list(items[item_id].questions)
        answers = dict(zip(qids, flat[at : at + len(qids)], strict=True))
        at += len(qids)
        out.append(100.0 * image_score(answers, items[item_id].parents))
    return np.asarray(out, dtype=np.float64)


def summary(scores: np.ndarray, item_ids: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """metrics.json's dpg_score and its 95% bootstrap interval over prompts."""
    ci = bootstrap_ci(scores, list(item_ids), n_boot=n_boot, level=0.95, seed=seed)
    return {KEY: ci.mean, f"{KEY}_ci": [ci.low, ci.high]}


def conventions(images_per_prompt: int = 1, model_id: str = MODEL_ID) -> dict[str, Any]:
    """What stands behind dpg_score, for metrics.json."""
    return {
        "benchmark": "DPG-Bench (ELLA dpg_bench/dpg_bench.csv, 1,065 prompts)",
        "vqa_model": f"{model_id} (modelscope visual-question-answering pipeline)",
        "images_per_prompt": images_per_prompt,
        "image": "the whole generated image (no grid crops), as the CDM authors' dpg_scorer",
        "rule": "question = 1 if answer == 'yes' else 0; zeroed when a parent question scores 0 "
        "(in CSV order, cascading); image = mean over its questions; score = 100 x mean",
        "first_row": "the CSV's first data row is dropped, as the authors' loader does"
        if SKIP_FIRST_ROW
        else "every row",
    }


def item_ids_of(pairs: Sequence[int], items: Mapping[str, Item]) -> list[str]:
    """The item of each pair of a DPG sample set: pair j is the (j mod n)-th item in CSV order,
    as the sample stage's pair j takes prompt j mod n of the prompt set."""
    ids = list(items)
    return [ids[int(j) % len(ids)] for j in pairs]


def score_sets(
    sets: Sequence[tuple[str, int, Path, Sequence[int], Sequence[Path]]],
    items: Mapping[str, Item],
    vqa: VQA,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """metrics.json entries {model: {steps: {dpg_score, dpg_score_ci}}} of DPG sample sets,
    each given as (model, steps, folder, pairs, image files)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, steps, folder, pairs, files in sets:
        ids = item_ids_of(pairs, items)
        scores = score_images([Path(folder) / f for f in files], ids, items, vqa)
        out.setdefault(model, {})[str(int(steps))] = summary(scores, ids, n_boot, seed)
    return out
