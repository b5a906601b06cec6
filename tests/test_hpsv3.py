"""HPSv3 scorer on a tiny random Qwen2-VL saved like the real thing (a base folder with config
and processor, a full-model `HPSv3.safetensors` in transformers 4.45 key names with a random
rm_head), loaded through the scorer's offline code and checked against a hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from cdm.metrics.base import FETCH_COMMAND
from cdm.metrics.hpsv3 import (
    CHECKPOINT_FILE,
    INSTRUCTION,
    HPSv3Scorer,
    fetch_image,
    smart_resize,
)
from cdm.metrics.scorers import SCORERS, build_scorer
from tests.tiny_pipelines import qwen_tokenizer

# Qwen2-VL-7B-Instruct's chat template (its chat_template.json), written out here.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["a red cube", "two cats on a sofa, oil painting", "a lighthouse at night"]
SIZES = [(64, 64), (80, 48), (33, 90)]  # (width, height): square, landscape, portrait


def images() -> list[Image.Image]:
    gen = np.random.default_rng(0)
    return [Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def tiny_config(tokenizer) -> Qwen2VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},  # head_dim 8
        },
        vision_config={
            "depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip


def package_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> the 4.45 names the package's checkpoint carries."""
    out = {}
    for key, value in state.items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        out[key] = value.contiguous()
    return out


def build_tiny(root: Path):
    """(base folder, checkpoint folder, reference model with the same weights, tokenizer,
    rm_head state): conftest's session fixture `tiny`."""
    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(root / "base")
    tiny_config(tokenizer).save_pretrained(root / "base")
    # The package adds <|Reward|> and resizes the embeddings before training and saving.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    model = Qwen2VLForConditionalGeneration(tiny_config(tokenizer)).eval()
    for p in model.parameters():  # random, not init's zeros/ones, so every weight matters
        p.data.normal_(0, 0.2)
    head = {
        "0.weight": torch.randn(1024, 32) * 0.2, "0.bias": torch.randn(1024) * 0.2,
        "3.weight": torch.randn(16, 1024) * 0.05, "3.bias": torch.randn(16) * 0.2,
        "5.weight": torch.randn(2, 16) * 0.3, "5.bias": torch.randn(2) * 0.2,
    }  # fmt: skip
    state = package_keys(model.state_dict()) | {f"rm_head.{k}": v for k, v in head.items()}
    assert "model.embed_tokens.weight" in state and "visual.patch_embed.proj.weight" in state
    (root / "ckpt").mkdir()
    save_file(state, root / "ckpt" / CHECKPOINT_FILE)
    return root / "base", root / "ckpt", model, tokenizer, head


def tiny_hpsv3_config(tiny) -> dict[str, object]:
    """score.models.hpsv3 for the tiny model (local folders, as a fetched run has them)."""
    return {"checkpoint": str(tiny[1]), "base": str(tiny[0]), "batch_size": 2}


def scorer(tiny, **kw) -> HPSv3Scorer:
    return HPSv3Scorer(str(tiny[1]), base=str(tiny[0]), device="cpu", **kw)


def hand_score(tiny, image: Image.Image, prompt: str) -> float:
    """One pair alone (no padding): the package's text, the vision tower's tokens scattered
    into the image pads, the decoder with positions 0..L-1 on every M-RoPE axis, then
    mu = W5 relu(W3 relu(W0 h + b0) + b3) + b5 at the <|Reward|> token."""
    base, _, model, tokenizer, head = tiny
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width)
    pixels = Qwen2VLImageProcessorPil.from_pretrained(base)(
        images=[image.resize((w, h), Image.BICUBIC)], return_tensors="pt"
    )
    grid = pixels["image_grid_thw"]
    n_image = int(grid.prod()) // 4  # 2x2 patches merge into one token
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>"
        + INSTRUCTION.format(text_prompt=prompt)
        + "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
        + "<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids)
        vision = model.model.visual(pixels["pixel_values"], grid_thw=grid).pooler_output
        pads = ids[0] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        embeds[0, pads] = vision
        positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions)[0]
        (at,) = (ids[0] == tokenizer.convert_tokens_to_ids("<|Reward|>")).nonzero()[:, 0]
        x = hidden[0, at]
        x = torch.relu(head["0.weight"] @ x + head["0.bias"])
        x = torch.relu(head["3.weight"] @ x + head["3.bias"])
        return float((head["5.weight"] @ x + head["5.bias"])[0])


def test_smart_resize_matches_the_package() -> None:
    """256 * 28 * 28 pixels, multiples of 28 (values worked out from hpsv3's smart_resize)."""
    assert smart_resize(64, 64) == (448, 448)
    assert smart_resize(1024, 1024) == (448, 448)
    assert smart_resize(48, 80) == (364, 588)  # (height, width): 28 ceil(48 * 7.23 / 28), ...
    assert fetch_image(Image.new("L", (80, 48))).size == (588, 364)


def test_scores_match_the_hand_computation(tiny) -> None:
    ims = images()
    got = scorer(tiny, batch_size=3).score(ims, PROMPTS)
    want = np.array([hand_score(tiny, im, p) for im, p in zip(ims, PROMPTS, strict=True)])
    assert got.shape == (3,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.ptp(got) > 1e-3  # the three pairs score differently: the check has teeth


def test_scores_do_not_depend_on_the_batch_size(tiny) -> None:
    ims = images()
    one = scorer(tiny, batch_size=1).score(ims, PROMPTS)
    np.testing.assert_allclose(scorer(tiny, batch_size=2).score(ims, PROMPTS), one, atol=1e-5)


def test_missing_checkpoint_is_one_line(tiny, tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as exc:
        HPSv3Scorer(absent, base=str(tiny[0]), device="cpu")
    message = str(exc.value)
    assert absent in message and FETCH_COMMAND in message and "\n" not in message
    with pytest.raises(FileNotFoundError) as exc:  # a hub id that is not in the (empty) cache
        HPSv3Scorer(cache_dir=str(tmp_path / "cache"), device="cpu")
    message = str(exc.value)
    assert f"MizzenAI/HPSv3/{CHECKPOINT_FILE}" in message and "\n" not in message


def test_registry_builds_it_from_a_config(tiny) -> None:
    assert SCORERS["hpsv3"] is HPSv3Scorer
    built = build_scorer(
        "hpsv3",
        {"checkpoint": str(tiny[1]), "base": str(tiny[0]), "batch_size": 2, "device": "cpu"},
    )
    assert isinstance(built, HPSv3Scorer) and built.batch_size == 2
    assert built.dtype == torch.float32 and built.head[0].weight.dtype == torch.float32


def test_explicit_bf16_runs_the_model_in_bf16_and_the_head_in_fp32(tiny) -> None:
    """The package's precision (bf16 model, fp32 rm_head), as on a GPU, at tiny size on the CPU."""
    ims = images()
    half = scorer(tiny, batch_size=3, dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.head.parameters()} == {torch.float32}
    full = scorer(tiny, batch_size=3).score(ims, PROMPTS)
    got = half.score(ims, PROMPTS)
    assert np.isfinite(got).all() and not np.array_equal(got, full)
    np.testing.assert_allclose(got, full, atol=0.05 * (np.abs(full).max() + 1))
