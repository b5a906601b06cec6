"""The sd3, longcat and qwen-image backends end to end on tiny random pipelines built offline.

prepare_teacher -> cache_teacher -> distill (ZeRO-2, one process) -> sample -> export run as
subprocesses in a scratch project; distill and sample run under a guard that makes building
any transformers model (every text encoder) raise. The exported folder then samples with
stock diffusers and must give the project's own sampler's images for the same noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cdm.backends import few_step, longcat, qwenimage, sd3
from cdm.cache import load_condition
from cdm.sampling import inference_sigmas
from cdm.world.evaluate import EvalPairs
from tests import tiny_pipelines
from tests.conftest import PYTHON, ROOT, call_stage

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
GUARD = ENV | {"PYTHONPATH": str(ROOT / "tests" / "guard"), "CDM_FORBID_TEXT_ENCODERS": "1"}
# The guard on a whole Snakemake run (conftest.real_runs): the scripts that must not build a
# text encoder; cache_teacher and the published baselines' sample jobs must.
SMK_GUARD = GUARD | {
    "CDM_FORBID_TEXT_ENCODERS": "distill.py,sample.py:cdm,sample.py:teacher_cfg,sample.py:teacher_nocfg"
}
PROMPTS = ["a red cat", "a blue dog on a green mat", "an apple", "two birds in the sky"]
N_PAIRS = 3
# backend -> (builder, pipeline class, resolution in px, latent shape (C, h, w))
BACKENDS = {
    "sd3": (tiny_pipelines.sd3_pipeline, "StableDiffusion3Pipeline", 16, (16, 8, 8)),
    "longcat": (tiny_pipelines.longcat_pipeline, "LongCatImagePipeline", 32, (16, 16, 16)),
    "qwen-image": (tiny_pipelines.qwen_pipeline, "QwenImagePipeline", 32, (16, 16, 16)),
    "flux2-klein": (tiny_pipelines.flux2_pipeline, "Flux2KleinPipeline", 32, (32, 8, 8)),
}
# The stock call without CFG, as each model card shows it.
NO_CFG = {
    "sd3": {"guidance_scale": 1.0},
    "longcat": {"guidance_scale": 1.0, "enable_prompt_rewrite": False},
    "qwen-image": {"true_cfg_scale": 1.0},
    "flux2-klein": {"guidance_scale": 1.0},
}
# The backends whose whole chain runs here; flux2-klein's is checked against its stock
# pipeline in tests/test_flux2.py and run end to end by tests/test_real_run_orchestration.py.
CHAINED = ["sd3", "longcat", "qwen-image"]


def _params(params_file: Path, backend: str, **teacher) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["teacher"].update(
        {"backend": backend, "path": f"tiny_{backend}", "resolution": BACKENDS[backend][2]}
        | {"steps": 2}
        | teacher
    )
    data["prompts"].update(train_file="prompts.txt", eval_file="prompts.txt", eval_pairs=N_PAIRS)
    data["distill"].update(
        methods=["cdm"], iterations=4, batch_size=2, k_max=3, checkpoint_every=1, warmup=1
    )
    data["sample"].update(student_steps=[4], teacher_steps=[2], batch_size=2)
    data["report"].update(steps="4")
    params_file.write_text(yaml.safe_dump(data))
    return params_file


def _run(cwd: Path, script: str, *args: str, env: dict | None = None, check: bool = True):
    cmd = [PYTHON, str(ROOT / "src" / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or ENV, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(params=CHAINED)
def project(request, real_runs) -> Path:
    """The backend's project run through every stage by Snakemake (conftest.real_runs:
    prepare_teacher, cache_teacher, then distill and sample under the guard). Read only."""
    return real_runs(request.param)


def _backend(project: Path) -> str:
    return yaml.safe_load((project / "params.yaml").read_text())["teacher"]["backend"]


def test_prepare_teacher_links_the_pipeline_and_reports_it(project):
    backend = _backend(project)
    report = json.loads((project / "results/teacher.json").read_text())
    assert report["backend"] == backend and report["resolution"] == BACKENDS[backend][2]
    assert report["latent_shape"] == list(BACKENDS[backend][3])
    assert report["parameters"]["transformer"] > 0 and "vae" in report["parameters"]
    assert report["sanity"]["image_shape"] == [1, report["resolution"], report["resolution"], 3]
    teacher = project / "models/teacher"
    index = json.loads((teacher / "model_index.json").read_text())
    assert index["_class_name"] == BACKENDS[backend][1]
    weights = next((teacher / "transformer").glob("*.safetensors"))
    assert weights.stat().st_nlink > 1 or weights.is_symlink()  # linked, not copied
    assert not (project / "models/judge").exists()


def test_cache_holds_the_pipelines_own_prompt_encoding(project, tiny_dirs):
    backend = _backend(project)
    cond, prompts = load_condition(project / "cache/prompts/eval.safetensors")
    null, _ = load_condition(project / "cache/prompts/null.safetensors")
    assert prompts == PROMPTS and len(null) == 1
    if backend == "sd3":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dirs["sd3"])
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False
        )
        assert cond.embeds.shape == (4, 77 + 256, 16)
        torch.testing.assert_close(cond.pooled, pooled)
    elif backend == "longcat":
        from diffusers import LongCatImagePipeline

        pipe = LongCatImagePipeline.from_pretrained(tiny_dirs["longcat"])
        embeds, _ = pipe.encode_prompt(PROMPTS)
        assert cond.embeds.shape == (4, longcat.TEXT_TOKENS, 16)
    else:  # per-prompt lengths, padded to one, the mask in pooled
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(tiny_dirs["qwen-image"])
        embeds, mask = pipe.encode_prompt(PROMPTS)
        assert cond.embeds.shape == (4, qwenimage.TEXT_TOKENS, 16)
        torch.testing.assert_close(cond.pooled[:, : mask.shape[1]], mask.float())
        assert cond.pooled[:, mask.shape[1] :].sum() == 0 and null.pooled.sum() > 0
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, qwenimage.TEXT_TOKENS - embeds.shape[1]))
    torch.testing.assert_close(cond.embeds, embeds)


def _stock_images(pipe, backend: str, resolution: int, shape) -> list[np.ndarray]:
    """The stock pipeline's default call on pair j's prompt and noise, as uint8 images."""
    pairs = EvalPairs.of(PROMPTS, range(N_PAIRS))
    noise = pairs.noise(shape)
    images = []
    for j in range(N_PAIRS):
        latents = noise[j : j + 1]
        if backend != "sd3":  # packed 2x2 tokens
            latents = pipe._pack_latents(latents, 1, *shape)
        out = pipe(
            pairs.prompts[j], num_inference_steps=4, latents=latents, height=resolution,
            width=resolution, output_type="np", **NO_CFG[backend],
        ).images[0]  # fmt: skip
        images.append((out * 255).round().astype(np.int16))
    return images


def test_export_is_a_stock_pipeline_that_samples_like_our_sampler(project):
    """Same prompt and noise: stock diffusers' default 4-step call on the exported folder
    gives the images sample.py wrote (decoded uint8, at most 1 level apart)."""
    backend = _backend(project)
    _, cls_name, resolution, shape = BACKENDS[backend]
    folder = project / "models/students/cdm"
    recipe = json.loads((folder / "inference.json").read_text())
    assert recipe["default_call_exact"] and recipe["sigmas_raw"] == [1.0, 0.75, 0.5, 0.25]
    card = (folder / "README.md").read_text()
    cfg_off = next(iter(NO_CFG[backend].items()))
    assert f"num_inference_steps=4, {cfg_off[0]}={cfg_off[1]}" in card
    assert "| distill.lr_student |" in card and "[1.0, 0.75, 0.5, 0.25]" in card

    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    stock = _stock_images(pipe, backend, resolution, shape)
    for j in range(N_PAIRS):
        ours = np.asarray(Image.open(project / f"samples/cdm/4/{j:05d}.png")).astype(np.int16)
        assert stock[j].shape == ours.shape == (resolution, resolution, 3)
        assert np.abs(stock[j] - ours).max() <= 1, j
    # The stock scheduler ran exactly our 4 sigmas.
    torch.testing.assert_close(
        pipe.scheduler.sigmas.cpu().float(),
        inference_sigmas(4, recipe["shift"]),
        rtol=0,
        atol=1e-6,
    )


def test_a_lora_runs_adapter_on_the_stock_teacher_samples_the_students_images(project, tmp_path):
    """LoRA mode on the real classes, end to end: the adapter a distill run exports
    (pytorch_lora_weights.safetensors), loaded on the stock teacher transformer in the
    student's pipeline (its few-step scheduler), gives the images sample.py wrote for that
    student (at most 1 level apart); the same pipeline without the adapter does not. SD3 and
    Qwen-Image load it at pipeline level, LongCat (no pipeline loader) on its transformer.

    On LongCat the teacher is a fine-tune (`teacher.lora`, issue 37): prepare_teacher fuses a
    LoRA into it, and the exported LoRA, against the *base* model, is loaded on the stock base
    transformer (the fine-tune's factors stacked with the student's, cdm.lorafactors)."""
    import diffusers

    from cdm import loralayout
    from cdm.lora import LORA_FILE
    from tests.test_teacher_lora import SCALE, _teacher_lora

    backend = _backend(project)
    _, cls_name, resolution, shape = BACKENDS[backend]
    work = tmp_path / "lora"
    for part in ("models/teacher", "cache", "tiny_" + backend):
        shutil.copytree(project / part, work / part, symlinks=True)
    shutil.copy(project / "prompts.txt", work / "prompts.txt")
    data = yaml.safe_load((project / "params.yaml").read_text())
    # A fast student, so that 2 updates move the adapter to where images show it.
    data["distill"].update(lora={"rank": 4, "alpha": 8.0}, lr_student=0.01)
    base = work / "models/teacher"
    if backend == "longcat":  # the teacher's text encoders are the base's: the cache stands
        mine = _teacher_lora(backend, work / f"tiny_{backend}", tmp_path / "mine")
        data["teacher"]["lora"] = {"path": str(mine), "scale": SCALE}
        base = work / f"tiny_{backend}"
    (work / "params.yaml").write_text(yaml.safe_dump(data))
    if backend == "longcat":
        shutil.rmtree(work / "models/teacher")
        _run(work, "prepare_teacher.py")
        report = json.loads((work / "results/teacher.json").read_text())
        assert report["lora"]["scale"] == SCALE and report["lora"]["modules"] > 0
    _run(work, "distill.py", "--method", "cdm", env=GUARD)
    _run(work, "sample.py", "--model", "cdm", "--steps", "4", env=GUARD)
    folder = work / "models/students/cdm"
    assert (folder / LORA_FILE).is_file()
    ours = [
        np.asarray(Image.open(work / f"samples/cdm/4/{j:05d}.png")).astype(np.int16)
        for j in range(N_PAIRS)
    ]

    cls = getattr(diffusers, cls_name)
    transformer = type(cls.from_pretrained(folder).transformer).from_pretrained(
        base, subfolder="transformer"
    )
    pipe = cls.from_pretrained(folder, transformer=transformer)
    bare = _stock_images(pipe, backend, resolution, shape)
    card = (folder / "README.md").read_text()  # the card's own loading code is what runs here
    assert f"pipe = {cls_name}.from_pretrained(" in card
    if backend in ("sd3", "qwen-image"):
        assert 'pipe.load_lora_weights("<this folder>")' in card
        pipe.load_lora_weights(folder)
    else:
        assert "pipe.transformer.load_lora_adapter(" in card
        # As the model card says (without weight_name diffusers looks for a .bin file).
        pipe.transformer.load_lora_adapter(folder, prefix="transformer", weight_name=LORA_FILE)
    stock = _stock_images(pipe, backend, resolution, shape)
    for j in range(N_PAIRS):
        assert stock[j].shape == ours[j].shape == (resolution, resolution, 3)
        assert np.abs(stock[j] - ours[j]).max() <= 1, j
    assert max(np.abs(b - o).max() for b, o in zip(bare, ours, strict=True)) > 2
    # The ComfyUI / kohya copy (cdm.loralayout), read through diffusers' own conversion of
    # non-diffusers LoRAs on a fresh stock pipeline, samples the same images.
    kohya = folder / loralayout.FILE
    if backend in loralayout.LAYOUTS:
        pipe = cls.from_pretrained(folder, transformer=type(transformer).from_pretrained(
            base, subfolder="transformer"))  # fmt: skip
        pipe.load_lora_weights(folder, weight_name=kohya.name)
        converted = _stock_images(pipe, backend, resolution, shape)
        for j in range(N_PAIRS):
            assert np.abs(converted[j] - ours[j]).max() <= 1, j
    else:
        assert not kohya.exists()


def test_distill_and_sample_never_build_a_text_encoder(project, tmp_path):
    """The run ran distill and sample under the guard, named by script (tests/guard); here
    that form of the guard is shown to bite: cache_teacher, which must build the text
    encoders, fails under it."""
    work = tmp_path / "guarded"
    shutil.copytree(project, work, ignore=shutil.ignore_patterns("cache", "samples"))
    env = GUARD | {"CDM_FORBID_TEXT_ENCODERS": "sample.py:cdm,cache_teacher.py"}
    proc = _run(work, "cache_teacher.py", env=env, check=False)
    assert proc.returncode != 0 and "text encoder instantiated" in proc.stderr
    assert (project / "samples/teacher_cfg/2/index.parquet").is_file()
    from tests.guard.sitecustomize import _guarded  # which processes the run's form guards

    run_guard = SMK_GUARD["CDM_FORBID_TEXT_ENCODERS"]
    assert _guarded(run_guard, ["/p/src/distill.py", "--method", "cdm"])
    assert _guarded(run_guard, ["src/sample.py", "--model", "cdm", "--steps", "4"])
    assert not _guarded(run_guard, ["src/sample.py", "--model", "tdm", "--steps", "4"])
    assert not _guarded(run_guard, ["src/cache_teacher.py", "--params", "params.yaml"])


@pytest.mark.parametrize(
    ("backend", "path", "message"),
    [
        ("sd3", "/nonexistent/sd3", "does not exist; expected a StableDiffusion3Pipeline folder"),
        ("sd3", "someone/no-such-model", "could not be fetched from the hub"),
        (
            "sd3",
            "tiny_longcat",
            "holds a LongCatImagePipeline, expected a StableDiffusion3Pipeline",
        ),
        (
            "longcat",
            "tiny_sd3",
            "holds a StableDiffusion3Pipeline, expected a LongCatImagePipeline",
        ),
        ("longcat", "prompts.txt", "is not a folder; expected a LongCatImagePipeline folder"),
        (
            "qwen-image",
            "tiny_longcat",
            "holds a LongCatImagePipeline, expected a QwenImagePipeline",
        ),
        (
            "flux2-klein",
            "tiny_longcat",
            "holds a LongCatImagePipeline, expected a Flux2KleinPipeline",
        ),
        ("sd3", "empty", "has no model_index.json, so it is not a diffusers pipeline"),
    ],
)
def test_a_wrong_teacher_path_is_one_line(tiny_dirs, tmp_path, backend, path, message):
    for name, folder in tiny_dirs.items():
        (tmp_path / f"tiny_{name}").symlink_to(folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    _params(tmp_path / "params.yaml", backend, path=path)
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "models").exists()


def test_geometry_and_params_errors_are_one_line(tiny_dirs, tmp_path):
    (tmp_path / "tiny_sd3").symlink_to(tiny_dirs["sd3"])
    (tmp_path / "prompts.txt").write_text("a cat\n")
    _params(tmp_path / "params.yaml", "sd3", resolution=18)
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2 and "teacher.resolution (18) must be a multiple of 4" in err, err
    _params(tmp_path / "params.yaml", "sd3", resolution=64)
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2 and "exceeds this sd3 model's position grid (32 px at most)" in err, err
    data = yaml.safe_load((tmp_path / "params.yaml").read_text())
    data["prompts"]["train_file"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2 and "prompts.train_file must name a prompts file" in err, err


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 3.16])
@pytest.mark.parametrize(
    "raw", [[1.0], [1.0, 0.5], [1.0, 0.75, 0.5, 0.25], [1.0, 0.8, 0.6, 0.4, 0.2]]
)
def test_scheduler_configs_reproduce_inference_sigmas(raw, shift):
    """FlowMatchEulerDiscreteScheduler, driven as each pipeline drives it, yields exactly
    time_shift(raw, shift) + [0] (float32) under the configs export writes."""
    n = len(raw)
    config = few_step.sd3_default_call(raw, shift, 1000)
    theirs = few_step.pipeline_sigmas(config, n, seq_len=4096)
    torch.testing.assert_close(theirs, inference_sigmas(n, shift, raw), rtol=0, atol=1e-6)
    lc = few_step.longcat_default_call(raw, shift)
    grid = list(np.linspace(1.0, 1.0 / n, n))
    if np.allclose(raw, grid):
        for seq_len in (64, 4096):  # mu is pinned: the same at every resolution
            assert few_step.matches(lc, raw, shift, seq_len, grid)
    else:
        assert lc is None
        assert few_step.matches(few_step.constant_mu(shift), raw, shift, 4096, raw)


def test_uneven_sigmas_fall_back_to_an_explicit_sigmas_call():
    raw = [1.0, 0.8, 0.3]
    assert few_step.sd3_default_call(raw, 3.0, 1000) is None
    assert few_step.matches(few_step.plain(3.0), raw, 3.0, 4096, raw)


def test_effective_shift_follows_the_scheduler_config():
    assert few_step.effective_shift({"shift": 3.0}, 4096) == 3.0
    dynamic = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    assert few_step.effective_shift(dynamic, 4096) == pytest.approx(np.exp(1.15))
    assert few_step.effective_shift(dynamic, 256) == pytest.approx(np.exp(0.5))


def test_geometry_from_configs_alone(tiny_dirs):
    shift, shape, tokens = sd3.geometry(tiny_dirs["sd3"], None)
    assert (shift, shape, tokens) == (3.0, (16, 8, 8), 16)  # transformer sample_size
    shift, shape, tokens = longcat.geometry(tiny_dirs["longcat"], 32)
    assert shape == (16, 16, 16) and tokens == 64
    assert shift == pytest.approx(np.exp(few_step.calculate_shift(64, {})))
