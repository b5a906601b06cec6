"""Preference metrics of sample sets, with the tiny offline scorers of test_scorers: every
number checked against the scorers' own output, bootstrap and Fréchet distance."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cdm.metrics import conventions as conv
from cdm.metrics import preference as pref
from cdm.metrics import scorers as registry
from cdm.metrics.aesthetic import HEAD_FILE
from cdm.metrics.bootstrap import bootstrap_ci
from cdm.metrics.openclip import OpenClipEncoder
from cdm.metrics.scorers import build_scorer
from cdm.samplefiles import COLUMNS, png_name
from tests.test_scorers import (
    PROMPTS,
    TINY_CLIP,
    random_images,
    tiny_scorer_configs,
)

N_PAIRS = 7  # more pairs than PROMPTS: pairs 5 and 6 repeat prompts 0 and 1


def write_set(root: Path, model: str, steps: int, seed: int, dark: bool = False) -> Path:
    """samples/<model>/<steps>/ with PNGs and an index written out of pair order."""
    folder = root / model / str(steps)
    folder.mkdir(parents=True)
    images = random_images([(36 + 4 * j, 32 + 2 * j) for j in range(N_PAIRS)], seed)
    rows = []
    for pair, image in enumerate(images):
        if dark:  # a different image distribution: its FD to the others is not 0
            image = Image.fromarray((np.asarray(image) // 4).astype(np.uint8))
        image.save(folder / png_name(pair), format="PNG")
        prompt = PROMPTS[pair % len(PROMPTS)]
        rows.append(
            [prompt, pair, 1000 + pair, model, steps, steps * 2, 0.25, png_name(pair), "float32"]
        )
    pd.DataFrame(rows[::-1], columns=COLUMNS).to_parquet(folder / "index.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def configs(
    tiny_clip: Path,  # noqa: F811
    tiny_pick: tuple[Path, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict]:
    configs = tiny_scorer_configs(tiny_clip, tiny_pick, tmp_path_factory.mktemp("head"))
    configs["clip"]["batch_size"] = 3
    return configs


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, Path]]:
    root = tmp_path_factory.mktemp("samples")
    return [
        ("teacher_cfg", 2, write_set(root, "teacher_cfg", 2, seed=1)),
        ("teacher_cfg", 4, write_set(root, "teacher_cfg", 4, seed=2)),
        ("cdm", 1, write_set(root, "cdm", 1, seed=3, dark=True)),
    ]


@pytest.fixture(scope="module")
def result(
    configs: dict[str, dict], sets: list[tuple[str, int, Path]]
) -> tuple[pref.PreferenceResult, int]:
    """score_sets once for the module, counting how often a scorer gets built."""
    built = []

    def counting(name: str, config: dict) -> object:
        built.append(name)
        return build_scorer(name, config)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "build_scorer", counting)
        out = pref.score_sets(sets, configs, batch_size=2, n_boot=300, chunk=3)
    return out, len(built)


def own_scores(configs: dict[str, dict], folder: Path) -> dict[str, np.ndarray]:
    """Each scorer's own output on the set's images and prompts, in pair order."""
    images = [Image.open(folder / png_name(p)).convert("RGB") for p in range(N_PAIRS)]
    prompts = [PROMPTS[p % len(PROMPTS)] for p in range(N_PAIRS)]
    return {
        name: build_scorer(name, configs[name]).score(images, prompts)
        for name in ("clip", "clip_vitl14", "pickscore", "aesthetic")
    }


def test_per_image_scores_are_the_scorers_own(
    result: tuple[pref.PreferenceResult, int],
    configs: dict[str, dict],
    sets: list[tuple[str, int, Path]],
) -> None:
    out, n_built = result
    assert n_built == 4  # once each, reused across the three sets
    table = out.per_image
    assert list(table.columns) == [
        "model",
        "steps",
        "pair",
        "prompt",
        "clip",
        "clip_vitl14",
        "pickscore",
        "aesthetic",
    ]
    for model, steps, folder in sets:
        rows = table[(table.model == model) & (table.steps == steps)]
        assert rows["pair"].tolist() == list(range(N_PAIRS))
        assert rows["prompt"].tolist() == [PROMPTS[p % len(PROMPTS)] for p in range(N_PAIRS)]
        for name, expected in own_scores(configs, folder).items():
            np.testing.assert_allclose(rows[name].to_numpy(), expected, rtol=1e-5, atol=1e-5)
            assert np.ptp(expected) > 0  # the images do score differently


def test_means_intervals_and_set_facts(result: tuple[pref.PreferenceResult, int]) -> None:
    out, _ = result
    table = out.per_image
    assert set(out.metrics) == {"teacher_cfg", "cdm"}
    assert set(out.metrics["teacher_cfg"]) == {"2", "4"}
    for model, by_steps in out.metrics.items():
        for steps, entry in by_steps.items():
            rows = table[(table.model == model) & (table.steps == int(steps))]
            for name in ("clip", "clip_vitl14", "pickscore", "aesthetic"):
                assert entry[name] == pytest.approx(rows[name].mean(), rel=1e-12)
                low, high = entry[f"{name}_ci"]
                assert low <= entry[name] <= high and low < high
                ci = bootstrap_ci(rows[name], rows["prompt"].tolist(), n_boot=300, seed=0)
                assert [ci.low, ci.high] == [low, high]  # grouped by prompt, seeded
                assert ci.n_prompts == len(PROMPTS)
            assert entry["nfe"] == 2 * int(steps)
            assert entry["images_per_s"] == pytest.approx(4.0)
            assert entry["n_images"] == N_PAIRS
            assert "hpsv3" not in entry


def test_fd_to_the_teacher_sets(result: tuple[pref.PreferenceResult, int]) -> None:
    out, _ = result
    cfg = {k: v["fd_to_teacher_cfg"] for k, v in out.metrics["teacher_cfg"].items()}
    assert cfg["4"] == pytest.approx(0.0, abs=1e-6)  # the reference: largest step count
    assert cfg["2"] > 1e-3
    assert out.metrics["cdm"]["1"]["fd_to_teacher_cfg"] > cfg["2"]  # darker images: further
    assert all(
        math.isnan(e["fd_to_teacher_nocfg"]) for m in out.metrics.values() for e in m.values()
    )
    notes = out.conventions
    assert notes["fd_to_teacher_cfg"]["reference"] == "teacher_cfg@4"
    assert notes["fd_to_teacher_nocfg"]["reference"] is None


def test_nothing_is_skipped(result: tuple[pref.PreferenceResult, int]) -> None:
    """HPSv3 is a registered scorer now (tests/test_hpsv3.py); these configs leave it out."""
    out, _ = result
    assert out.skipped == {}
    assert "hpsv3" not in out.per_image.columns and "hpsv3" not in out.conventions


def test_conventions_name_weights_preprocessing_and_formula(
    result: tuple[pref.PreferenceResult, int], configs: dict[str, dict]
) -> None:
    out, _ = result
    notes = out.conventions
    clip = notes["clip"]
    assert clip["model"] == TINY_CLIP and clip["pretrained"] == configs["clip"]["pretrained"]
    assert "Hessel et al. 2021" in clip["formula"] and clip["formula"].startswith(
        "100 * max(cos, 0)"
    )
    assert "Resize(size=32" in clip["preprocess"] and "Normalize(mean=" in clip["preprocess"]
    pick = notes["pickscore"]
    assert pick["formula"].startswith("logit_scale.exp() * cos")
    assert pick["logit_scale_exp"] == pytest.approx(math.exp(3.1), rel=1e-5)
    assert "resize {'shortest_edge': 32} (BICUBIC)" in pick["preprocess"]
    assert "center crop {'height': 32, 'width': 32}" in pick["preprocess"]
    aes = notes["aesthetic"]
    assert "L2-normalised CLIP ViT-L/14" in aes["formula"]
    head = Path(configs["aesthetic"]["head"]).read_bytes()
    assert aes["head_sha256"] == hashlib.sha256(head).hexdigest()
    assert aes["head_file"] == HEAD_FILE
    assert aes["authors_head"] == "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
    assert notes["ci"]["n_boot"] == 300 and notes["ci"]["level"] == 0.95
    # Labels, and the metric of each Table 1 column (CLIPScore only with clip_vitl14 scored).
    assert clip["label"].startswith(f"CLIPScore ({TINY_CLIP}") and clip["paper_column"] is None
    assert aes["paper_column"] == "Aesthetic" and pick["paper_column"] == "PickScore"
    assert notes["paper_table"] == {
        "Aesthetic": "aesthetic",
        "PickScore": "pickscore",
        "CLIPScore": "clip_vitl14",
    }
    l14 = notes["clip_vitl14"]
    assert "resize shorter side to 32 (bilinear, antialias=True)" in l14["preprocess"]
    assert l14["text"] == "CLIP tokenizer, padded and truncated to 77 tokens"
    # From the configs alone (no scorer built) the preprocessing reads the same.
    static = conv.conventions(configs)
    for name in ("clip", "pickscore", "aesthetic"):
        assert static[name]["preprocess"] == notes[name]["preprocess"]
    assert static["pickscore"]["logit_scale_exp"] is None


def test_defaults_describe_the_real_models_without_weights(tmp_path: Path) -> None:
    notes = conv.conventions(
        {**registry.DEFAULT_SCORER_CONFIGS, "pickscore": {"cache_dir": str(tmp_path)}}
    )
    assert notes["clip"]["source"] == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/"
    assert "Resize(size=224" in notes["clip"]["preprocess"]
    assert notes["aesthetic"]["clip"]["pretrained"] == "openai"
    assert notes["aesthetic"]["model"] == f"camenduru/improved-aesthetic-predictor/{HEAD_FILE}"
    assert "not in the local cache" in notes["pickscore"]["preprocess"]
    l14 = notes["clip_vitl14"]
    assert l14["model"] == "openai/clip-vit-large-patch14" and l14["paper_column"] == "CLIPScore"
    assert "bilinear" in l14["preprocess"] and "centre crop" in l14["preprocess"]
    assert "(77)" in l14["text"] and l14["formula"].startswith("100 * cos, not clamped")
    assert "ViT-H-14 laion2b_s32b_b79k" in notes["clip"]["label"] != l14["label"]


def test_no_clip_scorer_or_no_reference_gives_nan_fd(
    configs: dict[str, dict], sets: list[tuple[str, int, Path]]
) -> None:
    only_pick = {"pickscore": configs["pickscore"]}
    out = pref.score_sets(sets[:2], only_pick, n_boot=50)
    assert list(out.per_image.columns)[-1] == "pickscore"
    entries = out.metrics["teacher_cfg"].values()
    assert all(math.isnan(e["fd_to_teacher_cfg"]) for e in entries)
    clip = {"clip": configs["clip"]}
    out = pref.score_sets(sets, clip, n_boot=50, reference_cfg=None, reference_nocfg=("cdm", 1))
    assert all(math.isnan(e["fd_to_teacher_cfg"]) for m in out.metrics.values() for e in m.values())
    assert out.metrics["cdm"]["1"]["fd_to_teacher_nocfg"] == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["teacher_cfg"]["4"]["fd_to_teacher_nocfg"] > 1e-3
    with pytest.raises(ValueError, match="reference set teacher_nocfg@28 is not among"):
        pref.score_sets(sets, clip, reference_nocfg=("teacher_nocfg", 28))


def test_unreadable_png_is_one_line_naming_the_file(
    configs: dict[str, dict], tmp_path: Path
) -> None:
    clip = {"clip": configs["clip"]}
    folder = write_set(tmp_path, "cdm", 4, seed=5)
    bad = folder / png_name(3)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError) as exc:
        pref.score_sets([("cdm", 4, folder)], clip)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    good = (folder / png_name(2)).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated: opens, fails to decode
    with pytest.raises(ValueError, match=f"{bad}: not a readable PNG") as exc:
        pref.score_sets([("cdm", 4, folder)], clip)
    assert "\n" not in str(exc.value)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=f"{bad}: image listed"):
        pref.score_sets([("cdm", 4, folder)], clip)


def test_bad_inputs_are_one_line(configs: dict[str, dict], tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown metric 'hps'.*known: aesthetic, clip, clip_vitl14"
    ):
        pref.score_sets([("cdm", 1, tmp_path)], {"hps": {}})
    with pytest.raises(FileNotFoundError, match="no sample index"):
        pref.score_sets([("cdm", 1, tmp_path)], {})
    with pytest.raises(ValueError, match="cdm@1 is listed twice"):
        pref.score_sets([("cdm", 1, tmp_path), ("cdm", 1, tmp_path)], {})
    with pytest.raises(ValueError, match="no sample sets"):
        pref.score_sets([], {})


def test_clip_image_encoder_runs_once_per_image(
    configs: dict[str, dict], sets: list[tuple[str, int, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clip score and the FD features come from one pass of the image encoder (the
    aesthetic scorer's own CLIP is a second encoder: once per image too), unchanged."""
    seen: dict[int, int] = {}
    images = OpenClipEncoder.images

    def counting(self: OpenClipEncoder, ims: list) -> object:
        seen[id(self)] = seen.get(id(self), 0) + len(ims)
        return images(self, ims)

    monkeypatch.setattr(OpenClipEncoder, "images", counting)
    picked = {k: configs[k] for k in ("clip", "aesthetic")}
    out = pref.score_sets(sets, picked, n_boot=50, chunk=3)
    assert sorted(seen.values()) == [N_PAIRS * len(sets)] * 2
    monkeypatch.setattr(OpenClipEncoder, "images", images)
    clip = build_scorer("clip", configs["clip"])
    own = {(m, s): clip.image_features(load(f)) for m, s, f in sets}
    for (model, steps), features in own.items():
        want = pref.fd(features, own[("teacher_cfg", 4)])
        assert out.metrics[model][str(steps)]["fd_to_teacher_cfg"] == pytest.approx(want, abs=1e-9)


def load(folder: Path) -> list[Image.Image]:
    return [Image.open(folder / png_name(p)).convert("RGB") for p in range(N_PAIRS)]


FAILING = (44, 36)  # pair 2's size in write_set: the image a flaky scorer fails on


def flaky_clip(configs: dict[str, dict], how: str) -> object:
    """The tiny clip scorer, failing on pair 2's image: raising, or giving NaN features."""
    scorer = build_scorer("clip", configs["clip"])
    images = scorer.encoder.images

    def encode(ims: list) -> torch.Tensor:
        bad = [im.size == FAILING for im in ims]
        if how == "raise" and any(bad):
            raise RuntimeError("cannot score this image\nsecond line")
        if how == "all":
            raise RuntimeError("broken")
        out = images(ims)
        return torch.where(torch.tensor(bad)[:, None], math.nan, out) if how == "nan" else out

    scorer.encoder.images = encode
    return scorer


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_a_failed_image_is_nan_left_out_and_counted(
    configs: dict[str, dict],
    sets: list[tuple[str, int, Path]],
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clip = {"clip": configs["clip"]}
    out = pref.score_sets(
        sets, clip, n_boot=300, chunk=3, scorers={"clip": flaky_clip(configs, how)}
    )
    good = build_scorer("clip", configs["clip"])
    table = out.per_image
    for model, steps, folder in sets:
        rows = table[(table.model == model) & (table.steps == steps)]
        values = rows["clip"].to_numpy()
        assert np.isnan(values[2]) and np.isfinite(np.delete(values, 2)).all()
        ims = load(folder)
        np.testing.assert_allclose(
            np.delete(values, 2), np.delete(good.score(ims, rows["prompt"].tolist()), 2), atol=1e-4
        )
        entry = out.metrics[model][str(steps)]
        assert entry["failed"] == {"clip": 1} and entry["n_images"] == N_PAIRS
        assert entry["clip"] == pytest.approx(np.delete(values, 2).mean(), rel=1e-12)
        kept = [p for i, p in enumerate(rows["prompt"]) if i != 2]
        ci = bootstrap_ci(np.delete(values, 2), kept, n_boot=300, seed=0)
        assert entry["clip_ci"] == [ci.low, ci.high]
        assert math.isfinite(entry["fd_to_teacher_cfg"])
    features = {(m, s): good.image_features(load(f)) for m, s, f in sets}
    ref = np.delete(features[("teacher_cfg", 4)], 2, axis=0)
    want = pref.fd(np.delete(features[("cdm", 1)], 2, axis=0), ref)
    # Features of chunks of 3 against one batch: float32 kernels may round by batch shape
    # (this session's AVX-512 CPU: FD 0.1934951914 vs 0.1934951883).
    assert out.metrics["cdm"]["1"]["fd_to_teacher_cfg"] == pytest.approx(want, rel=1e-6)
    reason = "RuntimeError: cannot score this image" if how == "raise" else "non-finite output"
    assert f"clip failed on {png_name(2)} ({reason})" in caplog.text
    # The paired comparison leaves out pairs failed in either set.
    got = pref.compare(table, "clip", ("cdm", 1), ("teacher_cfg", 4), n_boot=50)
    a, b = (
        table[(table.model == m) & (table.steps == s)]["clip"]
        for m, s in [("cdm", 1), ("teacher_cfg", 4)]
    )
    assert got.mean == pytest.approx(np.nanmean(a.to_numpy() - b.to_numpy()))


def test_a_scorer_failing_on_every_image_stops_the_stage(
    configs: dict[str, dict], sets: list[tuple[str, int, Path]]
) -> None:
    broken = {"clip": flaky_clip(configs, "all")}
    with pytest.raises(ValueError, match=r"^clip failed on all 3 images \(RuntimeError: broken\)$"):
        pref.score_sets(sets, {"clip": configs["clip"]}, chunk=3, scorers=broken)


# ---------------------------------------------------------------- paired differences


def test_paired_difference_holds_only_when_the_interval_excludes_zero() -> None:
    rng = np.random.default_rng(0)
    prompts = [f"p{i % 50}" for i in range(200)]
    b = rng.normal(0, 1, 200)
    shifted = pref.paired_difference(b + 0.5, b, prompts, n_boot=500, seed=1)
    assert shifted.mean == pytest.approx(0.5) and shifted.low == pytest.approx(0.5)
    assert shifted.holds and shifted.n_prompts == 50
    same = pref.paired_difference(b, b, prompts, n_boot=500)
    assert (same.mean, same.low, same.high, same.holds) == (0.0, 0.0, 0.0, False)
    noisy = pref.paired_difference(b + rng.normal(0, 1, 200) * 0.01, b, prompts, n_boot=500)
    assert noisy.low < noisy.mean < noisy.high and not noisy.holds
    worse = pref.paired_difference(b - 1 + rng.normal(0, 0.1, 200), b, prompts, n_boot=500)
    assert worse.high < 0 and worse.holds
    # Paired: a large spread shared by both sets does not widen the interval.
    spread = rng.normal(0, 100, 200)
    assert pref.paired_difference(b + spread + 0.5, b + spread, prompts).holds
    with pytest.raises(ValueError, match="differ in length: 3 and 2"):
        pref.paired_difference([1, 2, 3], [1, 2], ["a", "b", "c"])


def test_compare_aligns_sets_by_pair(result: tuple[pref.PreferenceResult, int]) -> None:
    out, _ = result
    table = out.per_image
    got = pref.compare(table, "clip", ("cdm", 1), ("teacher_cfg", 4), n_boot=200)
    a = table[table.model == "cdm"]["clip"].to_numpy()
    b = table[(table.model == "teacher_cfg") & (table.steps == 4)]["clip"].to_numpy()
    assert got.mean == pytest.approx((a - b).mean())
    assert got.low <= got.mean <= got.high
    shuffled = table.sample(frac=1.0, random_state=0)  # row order must not matter
    assert pref.compare(shuffled, "clip", ("cdm", 1), ("teacher_cfg", 4), n_boot=200) == got
    with pytest.raises(ValueError, match="no per-image scores of cdm@8"):
        pref.compare(table, "clip", ("cdm", 8), ("teacher_cfg", 4))
    fewer = table[~((table.model == "cdm") & (table.pair == 0))]
    with pytest.raises(ValueError, match="do not hold the same pairs"):
        pref.compare(fewer, "clip", ("cdm", 1), ("teacher_cfg", 4))
