"""Preference scorers built from tiny random-weight models saved to disk and loaded through the
same offline code the real run uses, checked against scores computed by hand."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from cdm.metrics.aesthetic import HEAD_FILE, AestheticScorer
from cdm.metrics.base import FETCH_COMMAND, Scorer, as_dtype
from cdm.metrics.bootstrap import bootstrap_ci
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.clip_vitl14 import ClipVitL14Scorer
from cdm.metrics.hpsv3 import HPSv3Scorer
from cdm.metrics.pickscore import PickScorer
from cdm.metrics.scorers import SCORERS, build_scorer

TINY_CLIP = "cdm-test-tiny-clip"
TINY_CLIP_CFG = {  # full CLIP vocabulary (the stock tokenizer), everything else tiny
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = [
    "a red cube",
    "two blue spheres on a wooden table at night",
    "a cat",
    "an oil painting of a lighthouse in a storm",
    "green",
]
HEAD_LAYERS = ("0", "2", "4", "6", "7")  # the released head's Linear indices


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes
    ]


IMAGES = random_images([(48, 40), (32, 32), (64, 50), (40, 72), (33, 35)])


def put_in_hub_cache(cache: Path, repo: str, name: str, src: Path) -> None:
    """Lay out `src` as the hub cache holds a downloaded `repo`/`name` at its main revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    shutil.copy(src, root / "snapshots" / commit / name)


def assert_missing(exc: pytest.ExceptionInfo[FileNotFoundError], model_id: str) -> None:
    message = str(exc.value)
    assert model_id in message and FETCH_COMMAND in message and "\n" not in message


# ---------------------------------------------------------------- open_clip (CLIP, aesthetic)


def build_tiny_clip(folder: Path) -> Path:
    """A registered tiny open_clip architecture; its random weights saved as a state dict
    (conftest's session fixture `tiny_clip`)."""
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    weights = folder / "tiny_clip.pt"
    state = open_clip.create_model(TINY_CLIP).state_dict()
    torch.save(state, weights)
    # Text features negated, so every cosine flips sign: both sides of the clamp get checked.
    torch.save({**state, "text_projection": -state["text_projection"]}, folder / "negated.pt")
    return weights


def hand_features(weights: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text features of IMAGES/PROMPTS, one pair at a time."""
    model = open_clip.create_model(TINY_CLIP).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    transform = open_clip.image_transform(32, is_train=False)
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        img = torch.cat([model.encode_image(transform(im)[None]) for im in IMAGES])
        txt = torch.cat([model.encode_text(tokenize([p])) for p in PROMPTS])
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_clip_score_matches_hand_computation(tiny_clip: Path) -> None:
    img, txt = hand_features(tiny_clip)
    cos = (img * txt).sum(-1).numpy()
    assert np.abs(cos).min() > 1e-3  # each pair is on one side of the clamp
    scorer = ClipScorer(TINY_CLIP, str(tiny_clip), batch_size=2)
    scores = scorer.score(IMAGES, PROMPTS)
    assert scores.shape == (len(IMAGES),)
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)
    negated = ClipScorer(TINY_CLIP, str(tiny_clip.parent / "negated.pt")).score(IMAGES, PROMPTS)
    np.testing.assert_allclose(negated, 100 * np.maximum(-cos, 0), rtol=1e-4, atol=1e-4)
    one_by_one = ClipScorer(TINY_CLIP, str(tiny_clip), batch_size=1).score(IMAGES, PROMPTS)
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-4, atol=1e-4)
    features = scorer.image_features(IMAGES)
    assert features.shape == (len(IMAGES), TINY_CLIP_CFG["embed_dim"])
    np.testing.assert_allclose(features, img.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer.score(IMAGES, PROMPTS[:4])


def test_open_clip_tag_resolves_from_the_hub_cache_only(
    tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag is looked up in the cache (never downloaded); the tag's QuickGELU and
    normalisation are applied as open_clip applies them to a downloaded tag."""
    tag = {"hf_hub": "cdm-test/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    tags = {(TINY_CLIP, "tiny"): tag, (TINY_CLIP, "tiny_qg"): {**tag, "quick_gelu": True}}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: tags.get((m, t), {}))
    with pytest.raises(FileNotFoundError) as exc:
        ClipScorer(TINY_CLIP, "tiny", cache_dir=str(tmp_path))
    assert_missing(exc, f"{TINY_CLIP}/tiny")
    put_in_hub_cache(tmp_path, "cdm-test/tiny-clip", "open_clip_pytorch_model.bin", tiny_clip)

    plain = ClipScorer(TINY_CLIP, "tiny", cache_dir=str(tmp_path))
    model = plain.encoder.model
    assert model.visual.preprocess_cfg["mean"] == tag["mean"]
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())
    state = torch.load(tiny_clip, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    quick = ClipScorer(TINY_CLIP, "tiny_qg", cache_dir=str(tmp_path)).encoder.model
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in quick.modules())


def test_real_open_clip_ids_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        ClipScorer("ViT-H-14", "laion2b_s32b_b79k", cache_dir=str(tmp_path))
    assert_missing(exc, "ViT-H-14/laion2b_s32b_b79k")
    with pytest.raises(FileNotFoundError) as exc:
        ClipScorer(TINY_CLIP, str(tmp_path / "absent.pt"))
    assert_missing(exc, str(tmp_path / "absent.pt"))


def test_openai_torchscript_in_the_url_cache_is_the_fetch_error(
    tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~/.cache/clip/ViT-L-14.pt as the `clip` package leaves it (a TorchScript archive) is
    refused by open_clip under weights_only: the one-line fetch error, not a crash; a plain
    checkpoint there still loads."""
    url = "https://openaipublic.azureedge.net/clip/models/0123/ViT-L-14.pt"
    tag = {"url": url, "hf_hub": "timm/vit_large_patch14_clip_224.openai/"}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: tag if t == "oai" else {})
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError) as exc:
        ClipScorer(TINY_CLIP, "oai", cache_dir=str(tmp_path))
    assert_missing(exc, f"{TINY_CLIP}/oai")
    assert "TorchScript" in str(exc.value)
    shutil.copy(tiny_clip, tmp_path / "ViT-L-14.pt")
    plain = ClipScorer(TINY_CLIP, "oai", cache_dir=str(tmp_path), batch_size=2)
    img, txt = hand_features(tiny_clip)
    expected = 100 * np.maximum((img * txt).sum(-1).numpy(), 0)
    np.testing.assert_allclose(plain.score(IMAGES, PROMPTS), expected, rtol=1e-4, atol=1e-4)


def tiny_scorer_configs(clip: Path, pick: tuple[Path, Path], head_dir: Path) -> dict[str, dict]:
    """score.models for the tiny scorers: every real class, weights from local files."""
    head = head_dir / HEAD_FILE
    torch.save(random_head(16), head)
    return {
        "clip": {"model": TINY_CLIP, "pretrained": str(clip)},
        "clip_vitl14": {"model": str(l14_folder(pick[0], head_dir / "clip_vitl14"))},
        "pickscore": {"model": str(pick[0]), "processor": str(pick[1])},
        "aesthetic": {"head": str(head), "clip_model": TINY_CLIP, "clip_pretrained": str(clip)},
    }  # hpsv3 has its own tiny model in tests/test_hpsv3.py


def random_head(width: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict shaped and named like sac+logos+ava1-l14-linearMSE.pth, for `width` inputs."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [width, 1024, 128, 64, 16, 1]
    state = {}
    for i, key in enumerate(HEAD_LAYERS):
        state[f"layers.{key}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=gen) * 0.1
        state[f"layers.{key}.bias"] = torch.randn(sizes[i + 1], generator=gen) * 0.1
    return state


def test_aesthetic_matches_hand_computation(tiny_clip: Path, tmp_path: Path) -> None:
    state = random_head(TINY_CLIP_CFG["embed_dim"])
    torch.save(state, tmp_path / HEAD_FILE)
    img, _ = hand_features(tiny_clip)
    expected = img.double()
    for key in HEAD_LAYERS:  # five affine maps in sequence, no activations
        expected = expected @ state[f"layers.{key}.weight"].double().T
        expected = expected + state[f"layers.{key}.bias"].double()
    expected = expected[:, 0].numpy()

    for head in (str(tmp_path / HEAD_FILE), str(tmp_path)):  # the file, or a folder holding it
        scorer = AestheticScorer(head, TINY_CLIP, str(tiny_clip), batch_size=3)
        scores = scorer.score(IMAGES, PROMPTS)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 0  # the head does tell the images apart

    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "cdm-test/aesthetic", HEAD_FILE, tmp_path / HEAD_FILE)
    hub = AestheticScorer(
        f"cdm-test/aesthetic/{HEAD_FILE}", TINY_CLIP, str(tiny_clip), cache_dir=str(cache)
    )
    np.testing.assert_allclose(hub.score(IMAGES, PROMPTS), expected, rtol=1e-4, atol=1e-5)


def test_aesthetic_head_width_must_match_clip(tiny_clip: Path, tmp_path: Path) -> None:
    torch.save(random_head(768), tmp_path / HEAD_FILE)
    with pytest.raises(ValueError, match="768-d features"):
        AestheticScorer(str(tmp_path), TINY_CLIP, str(tiny_clip))


def test_aesthetic_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        AestheticScorer(cache_dir=str(tmp_path))
    assert_missing(exc, f"camenduru/improved-aesthetic-predictor/{HEAD_FILE}")
    torch.save(random_head(768), tmp_path / HEAD_FILE)
    with pytest.raises(FileNotFoundError) as exc:  # head present, ViT-L-14/openai absent
        AestheticScorer(str(tmp_path), cache_dir=str(tmp_path))
    assert_missing(exc, "ViT-L-14/openai")


# ---------------------------------------------------------------- transformers (PickScore)


def clip_tokenizer() -> CLIPTokenizer:
    """The stock CLIP BPE tokenizer, built from the vocabulary file open_clip ships."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def build_tiny_pick(folder: Path) -> tuple[Path, Path]:
    """(model folder, processor folder) of a tiny random CLIPModel and a CLIP processor
    (conftest's session fixture `tiny_pick`)."""
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(folder / "processor")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,  # pooling reads the first end-of-text token
            "pad_token_id": 49407,
        },
        vision_config={**text, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.logit_scale.data.fill_(3.1)  # not the init value: the score must read it
    model.save_pretrained(folder / "model")
    return folder / "model", folder / "processor"


def test_pickscore_matches_hand_computation(tiny_pick: tuple[Path, Path]) -> None:
    model_dir, proc_dir = tiny_pick
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(proc_dir)
    expected = []
    with torch.no_grad():
        for image, prompt in zip(IMAGES, PROMPTS, strict=True):  # unpadded, one pair at a time
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
            i = model.get_image_features(pixel_values=pixels).pooler_output[0]
            t = model.get_text_features(**processor(text=[prompt], return_tensors="pt"))
            t = t.pooler_output[0]
            expected.append(math.exp(3.1) * float(i @ t / (i.norm() * t.norm())))
    scorer = PickScorer(str(model_dir), str(proc_dir), batch_size=3)
    scores = scorer.score(IMAGES, PROMPTS)
    assert scores.shape == (len(IMAGES),)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert (
        scorer.from_config({"model": str(model_dir), "processor": str(proc_dir)}).batch_size == 32
    )


class TensorFeatures(CLIPModel):
    """get_*_features as plain tensors: torchmetrics 1.9 expects transformers 4's return type."""

    def get_image_features(self, *args, **kwargs):  # type: ignore[override]
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):  # type: ignore[override]
        return super().get_text_features(*args, **kwargs).pooler_output


@pytest.mark.parametrize("sign", [1, -1])  # -1 negates every cosine: both sides of the clamp
def test_pickscore_agrees_with_torchmetrics_clip_score(
    tiny_pick: tuple[Path, Path], tmp_path: Path, sign: int
) -> None:
    """With logit_scale = ln 100, max(PickScore, 0) is torchmetrics' CLIPScore of the model."""
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score")
    model_dir, proc_dir = tiny_pick
    model = CLIPModel.from_pretrained(model_dir)
    model.logit_scale.data.fill_(math.log(100))
    model.text_projection.weight.data.mul_(sign)
    model.save_pretrained(tmp_path / "model")
    metric = tm.CLIPScore(
        model_name_or_path=lambda: (
            TensorFeatures.from_pretrained(tmp_path / "model"),
            CLIPProcessor.from_pretrained(proc_dir),
        )
    )
    images = random_images([(32, 32)] * len(PROMPTS), seed=3)  # no resize: same pixels either way
    ours = PickScorer(str(tmp_path / "model"), str(proc_dir)).score(images, PROMPTS)
    theirs = []
    for image, prompt in zip(images, PROMPTS, strict=True):
        metric.reset()
        metric.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt)
        theirs.append(float(metric.compute()))
    assert np.abs(ours).min() > 1e-2  # each pair is on one side of the clamp
    np.testing.assert_allclose(np.maximum(ours, 0), theirs, rtol=1e-4, atol=1e-3)


def test_pickscore_missing_offline(tiny_pick: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        PickScorer(cache_dir=str(tmp_path))
    assert_missing(exc, "yuvalkirstain/PickScore_v1")
    with pytest.raises(FileNotFoundError) as exc:  # model present, processor absent
        PickScorer(str(tiny_pick[0]), cache_dir=str(tmp_path))
    assert_missing(exc, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(FileNotFoundError) as exc:
        PickScorer(str(tmp_path / "no" / "folder"))
    assert_missing(exc, str(tmp_path / "no" / "folder"))


# ---------------------------------------------------------------- CLIPScore as the paper's code


def l14_folder(pick_model: Path, folder: Path) -> Path:
    """A repo-like folder: the tiny transformers CLIP (32 px, 77 positions) and its tokenizer,
    as openai/clip-vit-large-patch14 holds both."""
    CLIPModel.from_pretrained(pick_model).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def code_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """The authors' preprocessing written out: floats in [0, 1], the shorter side bilinearly
    resized to `size` (antialiased), the centre `size` square, CLIP mean and std."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    h, w = x.shape[1:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = torch.nn.functional.interpolate(
        x[None], size=new, mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    x = x[:, top : top + size, left : left + size]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return (x - mean) / std


def code_clip_scores(folder: Path, prompts: list[str], sign: int = 1) -> np.ndarray:
    """100 * cos of the transformers CLIP, one pair at a time, text padded to 77 tokens."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for image, prompt in zip(IMAGES, prompts, strict=True):
            i = model.get_image_features(pixel_values=code_preprocess(image, 32)[None])
            tokens = tokenizer(
                [prompt], padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            )
            assert tokens["input_ids"].shape == (1, 77)
            t = model.get_text_features(**tokens)
            i, t = i.pooler_output[0].double(), sign * t.pooler_output[0].double()
            out.append(100 * float(i @ t / (i.norm() * t.norm())))
    return np.array(out)


def test_clip_vitl14_matches_the_codes_preprocessing_and_formula(tiny_l14: Path) -> None:
    prompts = [*PROMPTS[:4], "a very long prompt " * 40]  # past 77 tokens: truncated
    expected = code_clip_scores(tiny_l14, prompts)
    scorer = ClipVitL14Scorer(str(tiny_l14), batch_size=2)
    assert (scorer.size, scorer.max_length) == (32, 77)
    got = scorer.score(IMAGES, prompts)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 0.1
    # Not clamped at 0, unlike `clip`: negated text features give the negated scores.
    model = CLIPModel.from_pretrained(tiny_l14)
    model.text_projection.weight.data.neg_()
    negated = tiny_l14.parent / "clip_vitl14_negated"
    model.save_pretrained(negated)
    CLIPTokenizer.from_pretrained(tiny_l14).save_pretrained(negated)
    np.testing.assert_allclose(
        ClipVitL14Scorer(str(negated)).score(IMAGES, prompts), -expected, rtol=1e-4, atol=1e-4
    )


def test_clip_vitl14_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        ClipVitL14Scorer(cache_dir=str(tmp_path))
    assert_missing(exc, "openai/clip-vit-large-patch14")


# ---------------------------------------------------------------- precision


def test_dtype_defaults_follow_the_authors_on_cuda_and_fp32_on_cpu() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert as_dtype(None, cuda, HPSv3Scorer.cuda_dtype) == torch.bfloat16  # the package's
    for cls in (ClipScorer, ClipVitL14Scorer, PickScorer, AestheticScorer):
        assert as_dtype(None, cuda, cls.cuda_dtype) == torch.float32
    for cls in SCORERS.values():
        assert as_dtype(None, cpu, cls.cuda_dtype) == torch.float32
    assert as_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'bf17' is no torch dtype"):
        as_dtype("bf17", cpu, torch.float32)


def test_explicit_bf16_runs_each_scorer_in_bf16(
    tiny_clip: Path, tiny_pick: tuple[Path, Path], tmp_path: Path
) -> None:
    """dtype='bfloat16' on the CPU, as on a GPU: the weights are bf16 and the scores stay near
    fp32's (bf16 keeps 8 bits of mantissa)."""
    configs = tiny_scorer_configs(tiny_clip, tiny_pick, tmp_path)
    for name, config in configs.items():
        full = build_scorer(name, config)
        half = build_scorer(name, {**config, "dtype": "bfloat16"})
        module = getattr(half, "model", None) or half.encoder.model
        assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        a, b = full.score(IMAGES, PROMPTS), half.score(IMAGES, PROMPTS)
        assert np.isfinite(b).all() and not np.array_equal(a, b), name
        np.testing.assert_allclose(b, a, atol=0.05 * (np.abs(a).max() + 1), err_msg=name)


# ---------------------------------------------------------------- registry


def test_registry_builds_each_scorer_by_name(tiny_clip: Path) -> None:
    assert set(SCORERS) == {"clip", "clip_vitl14", "pickscore", "aesthetic", "hpsv3"}
    assert all(issubclass(cls, Scorer) and cls.name == key for key, cls in SCORERS.items())
    scorer = build_scorer(
        "clip", {"model": TINY_CLIP, "pretrained": str(tiny_clip), "batch_size": 4}
    )
    assert isinstance(scorer, ClipScorer) and scorer.batch_size == 4
    with pytest.raises(KeyError, match="known: aesthetic, clip, clip_vitl14, hpsv3, pickscore"):
        build_scorer("hps")
    with pytest.raises(ValueError, match="batch_size"):
        build_scorer("clip", {"model": TINY_CLIP, "pretrained": str(tiny_clip), "batch_size": 0})


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_constant_scores_give_a_point_interval() -> None:
    ci = bootstrap_ci([2.5] * 30, n_boot=200)
    assert ci.mean == ci.low == ci.high == 2.5 and ci.n_prompts == 30


def test_bootstrap_contains_the_mean_and_is_seeded() -> None:
    scores = np.random.default_rng(0).gamma(2.0, 1.0, size=200)
    a, b = bootstrap_ci(scores, seed=7), bootstrap_ci(scores, seed=7)
    assert a == b
    assert bootstrap_ci(scores, seed=8) != a
    assert a.mean == pytest.approx(scores.mean())
    assert a.low < a.mean < a.high
    narrow = bootstrap_ci(scores, seed=7, level=0.5)
    assert a.low < narrow.low < narrow.high < a.high


def test_bootstrap_width_matches_normal_theory() -> None:
    scores = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    ci = bootstrap_ci(scores, n_boot=4000, seed=0)
    half = 1.96 * scores.std(ddof=1) / math.sqrt(len(scores))
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    assert (ci.high + ci.low) / 2 == pytest.approx(scores.mean(), abs=0.1 * half)


def test_bootstrap_resamples_prompts_not_images() -> None:
    """Two prompts of ten identical images each: a resample holds prompt A twice, B twice, or
    one of each, so the statistic is 0, 1 or 0.5 and the 95% interval is [0, 1]."""
    scores = [0.0] * 10 + [1.0] * 10
    prompts = ["a"] * 10 + ["b"] * 10
    grouped = bootstrap_ci(scores, prompts, n_boot=2000, seed=0)
    assert (grouped.mean, grouped.low, grouped.high, grouped.n_prompts) == (0.5, 0.0, 1.0, 2)
    per_image = bootstrap_ci(scores, n_boot=2000, seed=0)
    assert per_image.high - per_image.low < 0.6 and per_image.n_prompts == 20
    with pytest.raises(ValueError, match="20 scores but 19 prompts"):
        bootstrap_ci(scores, prompts[:19])
