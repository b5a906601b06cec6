"""The paper's Table 1 for a real run (sd3, longcat): Method, NFE and the five metrics, ours as
mean [95% interval] beside the authors' published value (cdm.report.published), and the
protocol it was measured under. A metric a run did not measure reads "not measured", a set
it did not sample "not run": never a number that was not measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cdm import params as P
from cdm.io import read_json
from cdm.report.published import METRICS, MODEL_NAMES, SOURCE, TABLE1, Row
from cdm.samplefiles import NOISE_SEED_BASE, RECIPE

# metrics.json key of each column; the CLIP column prefers the authors' code's variant.
KEYS = {"aesthetic": "aesthetic", "dpg": "dpg_score", "pickscore": "pickscore", "hpsv3": "hpsv3"}
CLIP_PAPER = "clip_vitl14"  # their code: OpenAI CLIP ViT-L/14 (transformers)
LABELS = {"aesthetic": "Aesthetic", "dpg": "DPGBench", "pickscore": "PickScore", "hpsv3": "HPSv3"}
NOT_MEASURED, NOT_RUN, UNPUBLISHED = "not measured", "not run", "-"


def with_dpg(metrics: dict, path: Path) -> dict:
    """metrics.json with score_dpg's entries (results/dpg.json, when that stage ran) merged in
    by model and steps: Table 1's DPGBench column reads them like any other metric."""
    if not Path(path).is_file():
        return metrics
    merged = {m: {s: dict(e) for s, e in by.items()} for m, by in metrics.items()}
    for model, by_steps in read_json(path, "rerun the score_dpg stage").items():
        for steps, entry in by_steps.items():
            merged.setdefault(model, {}).setdefault(steps, {}).update(
                {k: v for k, v in entry.items() if k.startswith(KEYS["dpg"])}
            )
    return merged


def _has(metrics: dict, key: str) -> bool:
    return any(key in e for by in metrics.values() for e in by.values())


def clip_column(metrics: dict) -> tuple[str, str]:
    """(metrics.json key, column label) of the CLIPScore column: the authors' code's ViT-L/14
    variant when the run scored it, else our ViT-H-14 score, labelled as such."""
    if _has(metrics, CLIP_PAPER):
        return CLIP_PAPER, "CLIPScore (ViT-L/14)"
    return "clip", "CLIPScore (ViT-H-14)"


def metric_keys(metrics: dict) -> dict[str, tuple[str, str]]:
    """Column -> (metrics.json key, label), in the paper's order."""
    keys = {m: (KEYS[m], LABELS[m]) for m in KEYS}
    keys["clip"] = clip_column(metrics)
    return {m: keys[m] for m in METRICS}


def ours(entry: dict | None, key: str) -> str:
    if entry is None:
        return NOT_RUN
    value = entry.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_MEASURED
    low, high = entry.get(f"{key}_ci", [math.nan, math.nan])
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def set_steps(model: str, params: P.Params, metrics: dict) -> str | None:
    """The step count of `model`'s Table 1 set: the teacher's own steps (the Base row), a
    published model's recipe steps, report.steps for our students."""
    if model.startswith("teacher"):
        want = str(params.teacher.steps)
        have = metrics.get(model, {})
        return want if want in have else (max(have, key=float) if have else None)
    if model in params.compare:
        return str(params.compare[model].steps)
    return params.report.steps


def rows(metrics: dict, params: P.Params) -> list[tuple[str, str | None, Row | None]]:
    """(method label, our set, published row): the published rows in the paper's order, then
    our students and compare sets the paper has no row for."""
    published = TABLE1.get(params.teacher.backend, ())
    out: list[tuple[str, str | None, Row | None]] = [(r.method, r.model, r) for r in published]
    named = {r.model for r in published}
    extra = [*params.distill.methods, *params.compare]
    out += [(m, m, None) for m in extra if m not in named]
    return out


def paper_label(label: str) -> str:
    """The published column beside ours: "CLIPScore (ViT-H-14)" -> "CLIPScore (paper)" (the
    paper's own CLIP variant is named in the protocol)."""
    return f"{label.split(' (')[0]} (paper)"


def table(metrics: dict, params: P.Params) -> pd.DataFrame:
    columns = metric_keys(metrics)
    frame = []
    for label, model, row in rows(metrics, params):
        steps = set_steps(model, params, metrics) if model else None
        entry = metrics.get(model, {}).get(steps) if model and steps else None
        nfe = entry.get("nfe") if entry else None
        line: dict[str, Any] = {
            "Method": f"{label} (`{model}`)" if model and model != label else label,
            "NFE": NOT_RUN if entry is None else nfe,
            "NFE (paper)": row.nfe if row else UNPUBLISHED,
        }
        for metric, (key, name) in columns.items():
            line[name] = ours(entry, key)
            line[paper_label(name)] = f"{row.value(metric):.4g}" if row else UNPUBLISHED
        frame.append(line)
    return pd.DataFrame(frame)


def _recipe_line(name: str, recipe: P.Compare, samples: Path) -> str:
    made = samples / name / str(recipe.steps) / RECIPE
    loaded = json.loads(made.read_text()) if made.is_file() else {}
    parts = [f"{recipe.steps} steps, guidance {recipe.guidance:g}"]
    if recipe.lora is not None:
        lora = loaded.get("lora") or {}
        fused = "fused" if recipe.lora.fuse else "not fused"
        parts.append(
            f"LoRA `{recipe.lora.path}`{f' `{recipe.lora.file}`' if recipe.lora.file else ''} "
            f"({recipe.lora.format}, scale {recipe.lora.scale:g}, {fused}"
            f"{_hashes(lora)})"
        )
    if recipe.scheduler is not None:
        kwargs = ", ".join(f"{k}={v}" for k, v in recipe.scheduler.kwargs.items())
        parts.append(f"scheduler {recipe.scheduler.cls}({kwargs})")
    if recipe.vae is not None:
        parts.append(f"VAE {recipe.vae.cls} `{recipe.vae.path}`{_hashes(loaded.get('vae') or {})}")
    if recipe.drop:
        parts.append(f"without {', '.join(recipe.drop)}")
    if recipe.path:
        parts.append(f"base `{recipe.path}`")
    return f"- `{name}`: " + "; ".join(parts)


def _hashes(loaded: dict) -> str:
    commit = f", commit {loaded['commit']}" if loaded.get("commit") else ""
    sums = ", ".join(f"{f} sha256 {h}" for f, h in (loaded.get("sha256") or {}).items())
    return commit + (f"; {sums}" if sums else "")


def teacher_commit(path: str) -> str | None:
    """The hub commit of a hub-id teacher in the local cache, else None."""
    from cdm.hub import HUB_ID, hub_commit

    if Path(path).exists() or not HUB_ID.match(path):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "model_index.json")
    return hub_commit(found) if isinstance(found, str) else None


def protocol(metrics: dict, params: P.Params, samples: Path) -> list[str]:
    """Markdown lines: how every number of the table was made."""
    teacher, prompts = params.teacher, params.prompts
    commit = teacher_commit(teacher.path)
    key, label = clip_column(metrics)
    resolution = f"{teacher.resolution} px" if teacher.resolution else "the model's default"
    lines = [
        f"- Teacher `{teacher.path}`{f' (commit {commit})' if commit else ''}, backend "
        f"`{teacher.backend}`; Base row: `teacher_cfg`, {teacher.steps} steps with CFG "
        f"{teacher.cfg_scale:g}; our students (`{'`, `'.join(params.distill.methods)}`) at "
        f"{params.report.steps} steps, guidance 1.0, trained by "
        f"{P.training_mode(params.distill.lora)}.",
        f"- Prompts: `{prompts.eval_file}`, {prompts.eval_pairs} prompt/seed pairs, one image "
        f"per pair; resolution {resolution}.",
        f"- Seeds: pair j starts from the noise of seed {NOISE_SEED_BASE:,} + j, the same in "
        "every set and independent of batch size and sharding.",
        *(_recipe_line(n, r, samples) for n, r in params.compare.items()),
        f"- {label}: metrics.json key `{key}`"
        + ("" if key == CLIP_PAPER else " (the authors' code's ViT-L/14 variant not measured)")
        + f". DPGBench: key `{KEYS['dpg']}`"
        + ("" if _has(metrics, KEYS["dpg"]) else f" ({NOT_MEASURED} in this run)")
        + ".",
        (
            f"- Published values: {SOURCE}, {MODEL_NAMES[teacher.backend]}; "
            "NFE (paper) counts as the paper does."
            if teacher.backend in TABLE1
            else f"- Published values: none (the paper distils no "
            f"{MODEL_NAMES.get(teacher.backend, teacher.backend)})."
        ),
    ]
    return lines
