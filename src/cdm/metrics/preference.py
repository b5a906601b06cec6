"""Preference metrics of real sample sets (SD3-Medium, LongCat-Image runs).

Per sample set `samples/<model>/<steps>/`: every configured scorer (CLIP score, PickScore,
aesthetic score, HPSv3) on each image and its prompt, the means with
95% bootstrap intervals over prompts, and the Fréchet distance of the set's CLIP image features
(the clip scorer's own, so no extra model) to the teacher sets with and without CFG at their
largest step count. `paired_difference` compares two sets of the same pairs; `conventions`
says which weights, preprocessing and formula stand behind each number.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import open_clip
import pandas as pd
import torch
from PIL import Image

from cdm.metrics.aesthetic import AestheticScorer, resolve_head
from cdm.metrics.base import HUB_ID, Scorer
from cdm.metrics.bootstrap import bootstrap_ci
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.frechet import frechet_distance
from cdm.metrics.openclip import architecture, resolve_weights
from cdm.metrics.pickscore import PickScorer
from cdm.metrics.scorers import SCORERS, build_scorer

INDEX = "index.parquet"
CLIP = "clip"  # the scorer whose image features give the FD metrics
TEACHER_CFG, TEACHER_NOCFG = "teacher_cfg", "teacher_nocfg"
FD_KEYS = {TEACHER_CFG: "fd_to_teacher_cfg", TEACHER_NOCFG: "fd_to_teacher_nocfg"}
LEVEL = 0.95
CHUNK = 256  # images decoded at once: a 2,048-image set of 1024 px PNGs is 6 GB as arrays
# The paper's metrics.
DEFAULT_SCORER_CONFIGS: dict[str, dict[str, Any]] = {
    "clip": {},
    "pickscore": {},
    "aesthetic": {},
    "hpsv3": {},
}

SetKey = tuple[str, int]
ScorerConfigs = Mapping[str, Mapping[str, Any] | None]
Reference = SetKey | None | Literal["auto"]


class PreferenceResult(NamedTuple):
    per_image: pd.DataFrame  # model, steps, pair, prompt, one column per scored metric
    metrics: dict[str, dict[str, dict[str, Any]]]  # model -> str(steps) -> values
    skipped: dict[str, str]  # metric -> one-line reason its column is absent
    conventions: dict[str, dict[str, Any]]  # metric -> weights, preprocessing, formula


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over paired images and its bootstrap interval (prompts resampled)."""

    mean: float
    low: float
    high: float
    level: float
    n_prompts: int

    @property
    def holds(self) -> bool:
        """The difference holds only when its interval excludes zero."""
        return self.low > 0 or self.high < 0


# ---------------------------------------------------------------- scorers


def unavailable_reason(name: str) -> str | None:
    """Why a configured metric cannot be scored here (None: it can); unknown names raise."""
    if name in SCORERS:
        return None
    known = ", ".join(sorted(SCORERS))
    raise ValueError(f"unknown metric '{name}' in the scorer configs; known: {known}")


def resolved_config(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scorer's constructor defaults overlaid with `config` (what it will actually use)."""
    params = inspect.signature(SCORERS[name].__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **(config or {})}


def build_scorers(
    configs: ScorerConfigs, batch_size: int | None = None
) -> tuple[dict[str, Scorer], dict[str, str]]:
    """(scorers that can run, {metric: reason} of those that cannot); `batch_size` applies
    where a config names none."""
    scorers, skipped = {}, {}
    for name, config in configs.items():
        reason = unavailable_reason(name)
        if reason is not None:
            skipped[name] = reason
            continue
        kwargs = dict(config or {})
        if batch_size is not None:
            kwargs.setdefault("batch_size", batch_size)
        scorers[name] = build_scorer(name, kwargs)
    return scorers, skipped


# ---------------------------------------------------------------- sample sets


def read_index(folder: Path) -> pd.DataFrame:
    """A set's index rows in pair order."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sample index; run the sample stage for this set")
    index = pd.read_parquet(path)
    if index.empty:
        raise ValueError(f"{path}: the sample set holds no images; rerun the sample stage")
    return index.sort_values("pair", kind="stable").reset_index(drop=True)


def missing_image(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: image listed in {INDEX} is missing; resample this set")


def check_files(folder: Path, index: pd.DataFrame) -> None:
    for name in index["file"]:
        if not (folder / name).is_file():
            raise missing_image(folder / name)


def load_png(path: Path) -> Image.Image:
    """A decoded RGB image; a missing or corrupt file is one line naming it."""
    if not path.is_file():
        raise missing_image(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes fully: a truncated file fails here
    # PIL reports a broken PNG chunk as SyntaxError, truncated data as OSError
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable PNG ({reason}); resample this set") from None


def image_chunks(
    folder: Path, index: pd.DataFrame, size: int = CHUNK
) -> Iterator[tuple[list[Image.Image], list[str]]]:
    """(images, prompts) of the set in pair order, `size` at a time."""
    files, prompts = index["file"].tolist(), index["prompt"].tolist()
    for lo in range(0, len(files), size):
        images = [load_png(Path(folder) / f) for f in files[lo : lo + size]]
        yield images, prompts[lo : lo + size]


def score_folder(
    folder: Path, index: pd.DataFrame, scorers: Mapping[str, Scorer], chunk: int = CHUNK
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Per-image scores of every scorer, and the clip scorer's image features (or None)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    features: list[np.ndarray] = []
    clip = scorers.get(CLIP)
    for images, prompts in image_chunks(folder, index, chunk):
        for name, scorer in scorers.items():
            parts[name].append(scorer.score(images, prompts))
        if isinstance(clip, ClipScorer):
            features.append(clip.image_features(images))
    scores = {name: np.concatenate(p) for name, p in parts.items()}
    return scores, np.concatenate(features) if features else None


def check_sets(sets: Sequence[tuple[str, int, Path]]) -> None:
    if not sets:
        raise ValueError("no sample sets to score; run the sample stage first")
    keys = [(m, int(s)) for m, s, _ in sets]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"sample set {dupes[0][0]}@{dupes[0][1]} is listed twice")


def pick_reference(
    sets: Sequence[tuple[str, int, Path]], model: str, ref: Reference
) -> SetKey | None:
    """'auto': the teacher set `model` at its largest step count among `sets`."""
    keys = [(m, int(s)) for m, s, _ in sets]
    if ref == "auto":
        steps = [s for m, s in keys if m == model]
        return (model, max(steps)) if steps else None
    if ref is not None and (ref[0], int(ref[1])) not in keys:
        raise ValueError(f"reference set {ref[0]}@{ref[1]} is not among the sets scored")
    return None if ref is None else (ref[0], int(ref[1]))


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance, clipped at 0 (a set against itself can come out at -1e-9)."""
    return max(0.0, frechet_distance(torch.from_numpy(a), torch.from_numpy(b)))


def summarise(
    index: pd.DataFrame, scores: Mapping[str, np.ndarray], n_boot: int, seed: int
) -> dict[str, Any]:
    """Mean and bootstrap interval of each metric, NFE and throughput of one set."""
    prompts = index["prompt"].tolist()
    entry: dict[str, Any] = {}
    for name, values in scores.items():
        ci = bootstrap_ci(values, prompts, n_boot=n_boot, level=LEVEL, seed=seed)
        entry[name] = ci.mean
        entry[f"{name}_ci"] = [ci.low, ci.high]
    seconds = float(index["seconds"].mean())
    entry["nfe"] = int(index["nfe"].iloc[0])
    entry["images_per_s"] = 1.0 / seconds if seconds > 0 else math.nan
    entry["n_images"] = len(index)
    return entry


def score_sets(
    sets: Sequence[tuple[str, int, Path]],
    scorer_configs: ScorerConfigs,
    batch_size: int | None = None,
    n_boot: int = 1000,
    *,
    reference_cfg: Reference = "auto",
    reference_nocfg: Reference = "auto",
    seed: int = 0,
    scorers: Mapping[str, Scorer] | None = None,
    chunk: int = CHUNK,
) -> PreferenceResult:
    """Score every set (model, steps, folder) with every configured metric.

    The scorers are built once from `scorer_configs` (name -> constructor kwargs; `scorers`
    passes ready ones instead) and reused across sets. A reference is a (model, steps) among
    `sets`, None for no FD, or "auto": that teacher at its largest step count in `sets`."""
    check_sets(sets)
    for name in scorer_configs:
        unavailable_reason(name)  # an unknown metric name fails before anything is read
    refs = {
        TEACHER_CFG: pick_reference(sets, TEACHER_CFG, reference_cfg),
        TEACHER_NOCFG: pick_reference(sets, TEACHER_NOCFG, reference_nocfg),
    }
    # Every index and image present before any model loads: fail in seconds, not after a set.
    indexes = {(m, int(s)): read_index(Path(f)) for m, s, f in sets}
    for (_, _, folder), index in zip(sets, indexes.values(), strict=True):
        check_files(Path(folder), index)
    if scorers is None:
        scorers, skipped = build_scorers(scorer_configs, batch_size)
    else:
        skipped = {
            n: r for n in scorer_configs if (r := unavailable_reason(n)) and n not in scorers
        }
    frames, features, entries = [], {}, {}
    for model, steps, folder in sets:
        key = (model, int(steps))
        index = indexes[key]
        scores, features[key] = score_folder(Path(folder), index, scorers, chunk)
        frame = index[["pair", "prompt"]].copy()
        frame.insert(0, "steps", key[1])
        frame.insert(0, "model", model)
        for name, values in scores.items():
            frame[name] = values
        frames.append(frame)
        entries[key] = summarise(index, scores, n_boot, seed)
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in entries.items():
        for teacher, ref in refs.items():
            own, other = features[key], features.get(ref) if ref else None
            entry[FD_KEYS[teacher]] = math.nan if own is None or other is None else fd(own, other)
        metrics.setdefault(key[0], {})[str(key[1])] = entry
    notes = conventions(scorer_configs, scorers)
    notes.update(fd_conventions(refs, CLIP in scorers))
    notes["ci"] = {
        "level": LEVEL,
        "method": "percentile bootstrap; prompts resampled with their images",
        "n_boot": n_boot,
        "seed": seed,
    }
    return PreferenceResult(pd.concat(frames, ignore_index=True), metrics, skipped, notes)


# ---------------------------------------------------------------- paired comparisons


def paired_difference(
    a_scores: Sequence[float] | np.ndarray,
    b_scores: Sequence[float] | np.ndarray,
    prompts: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> PairedDifference:
    """Mean of a - b (row i of both is the same pair) and its 95% interval over prompts."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    ci = bootstrap_ci(a - b, list(prompts), n_boot=n_boot, level=LEVEL, seed=seed)
    return PairedDifference(ci.mean, ci.low, ci.high, ci.level, ci.n_prompts)


def compare(
    per_image: pd.DataFrame,
    metric: str,
    a: SetKey,
    b: SetKey,
    n_boot: int = 1000,
    seed: int = 0,
) -> PairedDifference:
    """paired_difference of `metric` between sets a and b of score_sets' per-image table."""
    rows = [per_image[(per_image.model == m) & (per_image.steps == s)] for m, s in (a, b)]
    for (m, s), r in zip((a, b), rows, strict=True):
        if r.empty:
            raise ValueError(f"no per-image scores of {m}@{s}")
    x, y = (r.sort_values("pair") for r in rows)
    if x["pair"].tolist() != y["pair"].tolist():
        raise ValueError(f"{a[0]}@{a[1]} and {b[0]}@{b[1]} do not hold the same pairs")
    return paired_difference(x[metric], y[metric], x["prompt"].tolist(), n_boot, seed)


# ---------------------------------------------------------------- conventions

FORMULAS = {
    "clip": "100 * max(cos, 0) (Hessel et al. 2021); cos of L2-normalised open_clip image "
    "and prompt embeddings",
    "pickscore": "logit_scale.exp() * cos (Kirstain et al. 2023); cos of L2-normalised "
    "image and prompt embeddings of the PickScore CLIP",
    "aesthetic": "LAION improved aesthetic MLP on L2-normalised CLIP ViT-L/14 image features "
    "(prompt ignored)",
}


def hub_commit(path: str | Path | None) -> str | None:
    """The commit of a file in a hub cache snapshot (…/snapshots/<commit>/…), else None."""
    parts = Path(path).parts if path else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def describe_transform(transform: Any) -> str:
    """torchvision Compose steps in order, as they are applied."""
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(getattr(t, "__name__", None) or repr(t) for t in steps)


def open_clip_transform(model: str, pretrained: str) -> Any:
    """The eval transform OpenClipEncoder builds, from the configs alone (no weights)."""
    model = architecture(model)
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return open_clip.image_transform(
        size,
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )


def open_clip_weights(model: str, pretrained: str, cache_dir: str | None) -> dict[str, Any]:
    """The open_clip model, its tag, where the tag's weights come from and their revision."""
    model = architecture(model)
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    try:
        path, _ = resolve_weights(model, pretrained, cache_dir)
    except FileNotFoundError:
        path = None  # not fetched yet: the revision is unknown
    text = open_clip.get_model_config(model)["text_cfg"].get("context_length", 77)
    return {
        "model": model,
        "pretrained": pretrained,
        "source": cfg.get("hf_hub") or cfg.get("url") or pretrained,
        "revision": hub_commit(path),
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "text": f"open_clip tokenizer, context {text} tokens (longer prompts truncated)",
    }


def describe_processor(processor: Any) -> str:
    """A transformers CLIP image processor's steps, as it applies them."""

    def nonempty(size: Any) -> dict[str, Any]:
        items = size.items() if isinstance(size, Mapping) else vars(size).items()
        return {k: v for k, v in items if v is not None}

    resample = getattr(processor, "resample", None)
    if isinstance(resample, int):  # saved configs hold PIL's enum as its int
        resample = Image.Resampling(resample)
    resample = getattr(resample, "name", resample)
    steps = ["convert RGB"] if getattr(processor, "do_convert_rgb", True) else []
    if processor.do_resize:
        steps.append(f"resize {nonempty(processor.size)} ({resample})")
    if processor.do_center_crop:
        steps.append(f"center crop {nonempty(processor.crop_size)}")
    if processor.do_rescale:
        steps.append(f"rescale x{processor.rescale_factor:.6g}")
    if processor.do_normalize:
        steps.append(f"normalize mean={processor.image_mean} std={processor.image_std}")
    return " -> ".join(steps)


def cached_processor(processor: str, cache_dir: str | None) -> Any | None:
    """The CLIP image processor from a folder or the hub cache, None when absent offline."""
    from transformers import CLIPImageProcessor

    if not Path(processor).exists() and not HUB_ID.match(processor):
        return None
    try:
        return CLIPImageProcessor.from_pretrained(
            processor, cache_dir=cache_dir, local_files_only=True
        )
    except OSError:
        return None


def hub_revision(model_id: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    if Path(model_id).exists() or not HUB_ID.match(model_id):
        return None
    found = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir)
    return hub_commit(found) if isinstance(found, str) else None


def clip_conventions(config: Mapping[str, Any], scorer: Scorer | None) -> dict[str, Any]:
    cfg = resolved_config("clip", config)
    live = scorer.encoder.preprocess if isinstance(scorer, ClipScorer) else None
    transform = live or open_clip_transform(cfg["model"], cfg["pretrained"])
    return {
        **open_clip_weights(cfg["model"], cfg["pretrained"], cfg.get("cache_dir")),
        "preprocess": describe_transform(transform),
        "formula": FORMULAS["clip"],
    }


def pickscore_conventions(config: Mapping[str, Any], scorer: Scorer | None) -> dict[str, Any]:
    cfg = resolved_config("pickscore", config)
    cache = cfg.get("cache_dir")
    if isinstance(scorer, PickScorer):
        processor = scorer.processor.image_processor
        logit_scale = float(scorer.model.logit_scale.detach().exp())
        max_length = scorer.max_length
    else:
        processor, logit_scale, max_length = cached_processor(cfg["processor"], cache), None, None
    preprocess = (
        describe_processor(processor)
        if processor is not None
        else f"CLIPImageProcessor of '{cfg['processor']}' (not in the local cache)"
    )
    return {
        "model": cfg["model"],
        "revision": hub_revision(cfg["model"], cache),
        "processor": cfg["processor"],
        "processor_revision": hub_revision(cfg["processor"], cache),
        "preprocess": preprocess,
        "text": f"CLIP tokenizer, padded, truncated at {max_length or 'the text tower length'}",
        "logit_scale_exp": logit_scale,
        "formula": FORMULAS["pickscore"],
    }


def aesthetic_conventions(config: Mapping[str, Any], scorer: Scorer | None) -> dict[str, Any]:
    cfg = resolved_config("aesthetic", config)
    cache = cfg.get("cache_dir")
    try:
        head = resolve_head(cfg["head"], cache)
        head_sha = hashlib.sha256(head.read_bytes()).hexdigest()  # a small file: pin its bytes
    except FileNotFoundError:
        head, head_sha = None, None
    live = scorer.encoder.preprocess if isinstance(scorer, AestheticScorer) else None
    transform = live or open_clip_transform(cfg["clip_model"], cfg["clip_pretrained"])
    clip = open_clip_weights(cfg["clip_model"], cfg["clip_pretrained"], cache)
    return {
        "model": cfg["head"],
        "revision": hub_commit(head),
        "head_sha256": head_sha,
        "clip": {k: clip[k] for k in ("model", "pretrained", "source", "revision")},
        "preprocess": describe_transform(transform),
        "formula": FORMULAS["aesthetic"],
    }


CONVENTIONS = {
    "clip": clip_conventions,
    "pickscore": pickscore_conventions,
    "aesthetic": aesthetic_conventions,
}


def conventions(
    scorer_configs: ScorerConfigs, scorers: Mapping[str, Scorer] | None = None
) -> dict[str, dict[str, Any]]:
    """Per metric: model id, weights revision (hub commit where cached), preprocessing and
    score formula. Built scorers, when given, supply the preprocessing they actually apply;
    otherwise it is rebuilt from the configs (no weights needed)."""
    out: dict[str, dict[str, Any]] = {}
    for name, config in scorer_configs.items():
        reason = unavailable_reason(name)
        if reason is not None:
            out[name] = {"skipped": reason}
        elif name in CONVENTIONS:
            out[name] = CONVENTIONS[name](config or {}, (scorers or {}).get(name))
        else:  # a registered scorer this module does not describe yet
            out[name] = {"config": resolved_config(name, config)}
    return out


def fd_conventions(refs: Mapping[str, SetKey | None], have_clip: bool) -> dict[str, Any]:
    out = {}
    for teacher, key in FD_KEYS.items():
        ref = refs.get(teacher)
        out[key] = {
            "reference": f"{ref[0]}@{ref[1]}" if ref else None,
            "features": "the clip scorer's L2-normalised image features",
            "formula": "||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), clipped at 0",
            "nan_when": "no reference set" if ref is None else None,
        }
        if not have_clip:
            out[key]["nan_when"] = "the clip scorer is not configured"
    return out
