"""What stands behind each number of metrics.json: per metric, the model id, the weights'
revision (the hub commit where cached), the preprocessing as applied, and the score formula;
per Fréchet distance, its reference set and formula; a label per metric, and which metric
fills each column of the paper's Table 1 (`paper_table`). `cdm.metrics.preference` records them
beside the scores; built scorers supply the preprocessing they apply, otherwise it is rebuilt
from the configs alone (no weights needed), so a record can be made before anything is fetched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from cdm.hub import HUB_ID, hub_commit
from cdm.metrics.aesthetic import AestheticScorer, resolve_head
from cdm.metrics.base import Scorer
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.clip_vitl14 import ClipVitL14Scorer
from cdm.metrics.openclip import architecture, resolve_weights
from cdm.metrics.pickscore import PickScorer
from cdm.metrics.scorers import ScorerConfigs, resolved_config, unavailable_reason

FORMULAS = {
    "clip": "100 * max(cos, 0) (Hessel et al. 2021); cos of L2-normalised open_clip image "
    "and prompt embeddings",
    "pickscore": "logit_scale.exp() * cos (Kirstain et al. 2023); cos of L2-normalised "
    "image and prompt embeddings of the PickScore CLIP",
    "aesthetic": "LAION improved aesthetic MLP on L2-normalised CLIP ViT-L/14 image features "
    "(prompt ignored)",
    "clip_vitl14": "100 * cos, not clamped (the paper's released evaluation code); cos of "
    "L2-normalised transformers CLIP image and prompt embeddings",
}
# The paper's Table 1 column each metric fills. CLIPScore: the variant its code computes.
PAPER_COLUMNS = {
    "aesthetic": "Aesthetic",
    "pickscore": "PickScore",
    "hpsv3": "HPSv3",
    "clip_vitl14": "CLIPScore",
}
# The aesthetic head the authors' code loads, to compare with `head_sha256` of ours.
AUTHORS_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


def label(name: str, config: Mapping[str, Any] | None) -> str:
    """A metric's name for tables: the two CLIP scores carry their model."""
    cfg = resolved_config(name, config)
    if name == "clip":
        return f"CLIPScore ({cfg['model']} {cfg['pretrained']}, the paper's text)"
    if name == "clip_vitl14":
        return f"CLIPScore ({cfg['model']}, the paper's code)"
    return {"pickscore": "PickScore", "aesthetic": "Aesthetic", "hpsv3": "HPSv3"}.get(name, name)


def paper_table(scored: list[str]) -> dict[str, str]:
    """Table 1 column -> the metric key that fills it, for the metrics scored."""
    return {PAPER_COLUMNS[n]: n for n in PAPER_COLUMNS if n in scored}


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
    try:  # the file the live scorer loaded, else the one it would load
        head = (
            scorer.path if isinstance(scorer, AestheticScorer) else resolve_head(cfg["head"], cache)
        )
        head_sha = hashlib.sha256(head.read_bytes()).hexdigest()  # a small file: pin its bytes
    except FileNotFoundError:
        head, head_sha = None, None
    live = scorer.encoder.preprocess if isinstance(scorer, AestheticScorer) else None
    transform = live or open_clip_transform(cfg["clip_model"], cfg["clip_pretrained"])
    clip = open_clip_weights(cfg["clip_model"], cfg["clip_pretrained"], cache)
    return {
        "model": cfg["head"],
        "revision": hub_commit(head),
        "head_file": head.name if head else Path(cfg["head"]).name,
        "head_sha256": head_sha,  # compare with the sha256 of the authors' copy:
        "authors_head": AUTHORS_HEAD,  # the file their code loads
        "clip": {k: clip[k] for k in ("model", "pretrained", "source", "revision")},
        "preprocess": describe_transform(transform),
        "formula": FORMULAS["aesthetic"],
    }


def clip_vitl14_conventions(config: Mapping[str, Any], scorer: Scorer | None) -> dict[str, Any]:
    cfg = resolved_config("clip_vitl14", config)
    live = scorer if isinstance(scorer, ClipVitL14Scorer) else None
    size = live.size if live else "the vision tower's image_size (224 for ViT-L/14)"
    length = live.max_length if live else "the text tower's positions (77)"
    return {
        "model": cfg["model"],
        "revision": hub_revision(cfg["model"], cfg.get("cache_dir")),
        "preprocess": f"RGB as floats in [0, 1] -> resize shorter side to {size} (bilinear, "
        f"antialias={cfg['antialias']}) -> centre crop {size} -> normalize "
        f"mean={list(OPENAI_DATASET_MEAN)} std={list(OPENAI_DATASET_STD)}",
        "text": f"CLIP tokenizer, padded and truncated to {length} tokens",
        "formula": FORMULAS["clip_vitl14"],
    }


CONVENTIONS = {
    "clip": clip_conventions,
    "clip_vitl14": clip_vitl14_conventions,
    "pickscore": pickscore_conventions,
    "aesthetic": aesthetic_conventions,
}


def conventions(
    scorer_configs: ScorerConfigs, scorers: Mapping[str, Scorer] | None = None
) -> dict[str, dict[str, Any]]:
    """Per metric: model id, weights revision (hub commit where cached), preprocessing and
    score formula. Built scorers, when given, supply the preprocessing they actually apply;
    otherwise it is rebuilt from the configs (no weights needed)."""
    return {
        name: scorer_conventions(name, config, (scorers or {}).get(name))
        for name, config in scorer_configs.items()
    }


def scorer_conventions(
    name: str, config: Mapping[str, Any] | None, scorer: Scorer | None = None
) -> dict[str, Any]:
    """One metric's record (see `conventions`)."""
    reason = unavailable_reason(name)
    if reason is not None:
        return {"skipped": reason}
    described = (
        CONVENTIONS[name](config or {}, scorer)
        if name in CONVENTIONS
        else {"config": resolved_config(name, config)}  # a scorer not described here yet
    )
    return {
        "label": label(name, config),
        "paper_column": PAPER_COLUMNS.get(name),
        **described,
    }


def fd_conventions(refs: Mapping[str, tuple[str, int] | None], have_clip: bool) -> dict[str, Any]:
    """Per FD metric (`refs`: its name -> the reference set (model, steps), or None): the
    reference, the features and the formula, and when it is NaN."""
    out = {}
    for key, ref in refs.items():
        out[key] = {
            "reference": f"{ref[0]}@{ref[1]}" if ref else None,
            "features": "the clip scorer's L2-normalised image features",
            "formula": "||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), clipped at 0",
            "nan_when": "no reference set" if ref is None else None,
        }
        if not have_clip:
            out[key]["nan_when"] = "the clip scorer is not configured"
    return out
