"""The score stage's scorers on random weights at their real sizes, one at a time as the stage
loads them: images/s, peak device memory and the dtype each ran in.

    python bench/scorers.py --size tiny --device cpu --dtype bfloat16 --images 4   # CPU check
    python bench/scorers.py --size full --device cuda --dtype bfloat16 --images 64  # a GPU

Sizes: `full` is ViT-H-14 (clip), transformers CLIP-H (pickscore), ViT-L-14 + the LAION head
(aesthetic), transformers CLIP-L/14 (clip_vitl14) and a Qwen2-VL at 2B size (hpsv3; the real
one is 7B: its memory scales with the weights, ~16 GB in bf16); `tiny` is the tests' sizes.
`--dtype` overrides every scorer's (the stage: bf16 for HPSv3 on CUDA, fp32 for the rest).
Writes --out (JSON). Weights are random: the figures time the models, not their scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# transformers CLIP: (vision width, layers, heads, mlp), (text width, layers, heads, mlp), proj
HF_CLIP = {
    "H": ((1280, 32, 16, 5120), (1024, 24, 16, 4096), 1024),
    "L": ((1024, 24, 16, 4096), (768, 12, 12, 3072), 768),
    "tiny": ((32, 1, 2, 64), (32, 1, 2, 64), 16),
}


def open_clip_weights(root: Path, arch: str) -> tuple[str, str]:
    """(architecture, random state dict file) of an open_clip model."""
    import open_clip

    if arch == "tiny":
        (root / "bench-tiny-clip.json").write_text(json.dumps(OPEN_CLIP_TINY))
        open_clip.add_model_config(root)
        arch = "bench-tiny-clip"
    path = root / f"{arch}.pt"
    torch.save(open_clip.create_model(arch).state_dict(), path)
    return arch, str(path)


def hf_clip(root: Path, size: str, image: int) -> str:
    """A transformers CLIP folder (model, tokenizer, image processor) of random weights."""
    from tests.tiny_pipelines import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    (vw, vl, vh, vm), (tw, tl, th, tm), proj = HF_CLIP[size]
    config = CLIPConfig(
        text_config=dict(
            hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th, intermediate_size=tm,
            vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, intermediate_size=vm,
            image_size=image, patch_size=14 if image == 224 else 8,
        ),
        projection_dim=proj,
    )  # fmt: skip
    folder = root / f"clip-{size}"
    CLIPModel(config).save_pretrained(folder)
    crop = {"height": image, "width": image}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image}, crop_size=crop),
        tokenizer=tok,
    ).save_pretrained(folder)
    return str(folder)


def hpsv3_files(root: Path, full: bool) -> tuple[str, str]:
    """(base folder, checkpoint folder) of a random HPSv3 (Qwen2-VL-2B size when `full`)."""
    from safetensors.torch import save_file
    from tests.test_hpsv3 import CHAT_TEMPLATE, package_keys, tiny_config
    from tests.tiny_pipelines import qwen_tokenizer
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from cdm.metrics.hpsv3 import CHECKPOINT_FILE, REWARD_TOKEN

    tok = qwen_tokenizer()
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(root / "base")

    def config() -> Qwen2VLConfig:
        if not full:
            return tiny_config(tok)
        ids = tok.convert_tokens_to_ids
        return Qwen2VLConfig(  # Qwen2-VL-2B-Instruct's published config (vocab: ours)
            text_config={
                "vocab_size": len(tok), "hidden_size": 1536, "intermediate_size": 8960,
                "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            },
            vision_config={
                "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16,
                "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            },
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )  # fmt: skip

    config().save_pretrained(root / "base")
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model = Qwen2VLForConditionalGeneration(config()).to(torch.bfloat16)
    hidden = model.config.text_config.hidden_size
    head = {
        "0.weight": torch.randn(1024, hidden) * 0.02, "0.bias": torch.zeros(1024),
        "3.weight": torch.randn(16, 1024) * 0.02, "3.bias": torch.zeros(16),
        "5.weight": torch.randn(2, 16) * 0.2, "5.bias": torch.zeros(2),
    }  # fmt: skip
    state = package_keys(model.state_dict()) | {f"rm_head.{k}": v for k, v in head.items()}
    (root / "ckpt").mkdir()
    save_file(state, root / "ckpt" / CHECKPOINT_FILE)
    return str(root / "base"), str(root / "ckpt")


def configs(root: Path, full: bool) -> dict[str, dict[str, Any]]:
    """score.models of random scorers, in the stage's order."""
    from tests.test_scorers import random_head

    from cdm.metrics.aesthetic import HEAD_FILE

    image = 224 if full else 32
    h14 = open_clip_weights(root, "ViT-H-14" if full else "tiny")
    l14 = open_clip_weights(root, "ViT-L-14") if full else h14
    torch.save(random_head(768 if full else 16), root / HEAD_FILE)
    base, ckpt = hpsv3_files(root, full)
    pick = hf_clip(root, "H" if full else "tiny", image)
    return {
        "clip": {"model": h14[0], "pretrained": h14[1]},
        "clip_vitl14": {"model": hf_clip(root, "L" if full else "tiny", image)},
        "pickscore": {"model": pick, "processor": pick},
        "aesthetic": {
            "head": str(root / HEAD_FILE),
            "clip_model": l14[0],
            "clip_pretrained": l14[1],
        },
        "hpsv3": {"checkpoint": ckpt, "base": base, "batch_size": 8},
    }


def measure(name: str, config: dict[str, Any], images: list, device: str) -> dict[str, Any]:
    """Build one scorer, score `images` twice (the first warms up), free it."""
    from cdm.metrics.preference import release_device_memory
    from cdm.metrics.scorers import build_scorer

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    scorer = build_scorer(name, {**config, "device": device})
    load_s = time.perf_counter() - t0
    prompts = [PROMPT] * len(images)
    scorer.score(images[: scorer.batch_size], prompts[: scorer.batch_size])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = scorer.score(images, prompts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {
        "scorer": name,
        "dtype": str(scorer.dtype).removeprefix("torch."),
        "batch_size": scorer.batch_size,
        "load_s": round(load_s, 2),
        "images_per_s": round(len(images) / seconds, 2),
        "finite": bool(np.isfinite(scores).all()),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    del scorer
    release_device_memory()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="every scorer's dtype (default: the stage's)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32, help="batch of all but hpsv3 (its own: 8)")
    ap.add_argument("--out", default="bench/results/scorers.json")
    args = ap.parse_args()
    from PIL import Image

    rng = np.random.default_rng(0)
    res = args.resolution
    images = [
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs(Path(tmp), args.size == "full").items():
            config.setdefault("batch_size", args.batch)
            if args.dtype:
                config["dtype"] = args.dtype
            rows.append(measure(name, config, images, args.device))
            print(json.dumps(rows[-1]), flush=True)
    out = {"size": args.size, "device": args.device, "images": args.images, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
