"""The flux2-klein backend against diffusers' own Flux2KleinPipeline on a tiny random pipeline:
the velocity is the pipeline's transformer call, the guided teacher its CFG, the decoder its
decode, the exported student a stock pipeline that runs our sigmas at 1, 2 and 4 steps and
samples what our sampler samples. End to end under both orchestrators:
tests/test_real_run_orchestration.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from cdm.backends import few_step, flux2
from cdm.conditioning import Condition
from cdm.sampling import inference_sigmas, sample_euler
from tests.conftest import call_stage
from tests.test_pipeline_backends import _params

RES = 32  # px: a 16x16 VAE latent, 8x8 patchified cells, 64 image tokens
PROMPTS = ["a red cat", "two birds in the sky"]


@pytest.fixture(scope="module")
def folder(tiny_dirs) -> Path:
    return tiny_dirs["flux2-klein"]


@pytest.fixture(scope="module")
def text(folder) -> tuple[Condition, Condition]:
    """(cond of PROMPTS, null) as cache_teacher writes them."""
    teacher = flux2.load(folder, RES)
    return teacher.encode(PROMPTS), teacher.null_condition()


def _noise(shape, n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _pipe(folder: Path) -> Flux2KleinPipeline:
    return Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)


def test_the_cache_is_the_pipelines_prompt_encoding(folder, text):
    cond, null = text
    pipe = _pipe(folder)
    embeds, _ = pipe.encode_prompt(PROMPTS)
    width = 3 * pipe.text_encoder.config.hidden_size  # layers 9, 18, 27 side by side
    assert cond.embeds.shape == (2, flux2.TEXT_TOKENS, width)
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(null.embeds, pipe.encode_prompt("")[0], rtol=0, atol=0)
    teacher = flux2.load(folder, RES)
    long = "a cat " * 300  # 600 prompt tokens at most over the 512 kept
    assert teacher.truncated([*PROMPTS, long]) == 1


def test_the_velocity_is_the_pipelines_transformer_call(folder, text):
    """One step of the stock pipeline, its transformer call recorded: our velocity on the
    same latent, sigma and prompt gives the same output."""
    cond, _ = text
    velocity, _, shape = flux2.load_velocity(folder, RES)
    pipe = _pipe(folder)
    calls = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw, out[0])), with_kwargs=True
    )
    noise = _noise(shape)
    pipe(prompt=PROMPTS[0], num_inference_steps=1, guidance_scale=1.0, latents=noise,
         height=RES, width=RES, output_type="latent")  # fmt: skip
    (kwargs, out), sigma = calls[0], pipe.scheduler.sigmas[:1]
    assert kwargs["guidance"] is None
    torch.testing.assert_close(kwargs["timestep"], sigma, rtol=0, atol=1e-6)  # sigma, not 1000 s
    ours = velocity(noise, sigma, cond.take(slice(0, 1)))
    theirs = out.permute(0, 2, 1).reshape(ours.shape)
    assert theirs.abs().mean() > 0.01
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_guided_teacher_is_the_pipelines_cfg_and_decode(folder, text):
    """Our Euler sampler with CFG (v_u + g (v_c - v_u), the null prompt "") on the stock
    teacher's own sigmas gives the stock guided call's image: two passes, no guidance
    embedding, the same negative prompt, the same decode. The sigmas are time_shift by
    exp(compute_empirical_mu(tokens, steps))."""
    cond, null = text
    velocity, _, shape = flux2.load_velocity(folder, RES)
    pipe = _pipe(folder)
    noise, steps, scale = _noise(shape, seed=1), 2, 4.0
    image = pipe(prompt=PROMPTS[1], num_inference_steps=steps, guidance_scale=scale,
                 latents=noise, height=RES, width=RES, output_type="np").images[0]  # fmt: skip
    sigmas = pipe.scheduler.sigmas.float()
    shift = math.exp(compute_empirical_mu(shape[1] * shape[2], steps))
    torch.testing.assert_close(sigmas, inference_sigmas(steps, shift), rtol=0, atol=1e-6)
    x = sample_euler(velocity, noise, sigmas, cond.take(slice(1, 2)), null, scale)
    ours = flux2.load_decoder(folder)(x)[0].numpy().astype(np.int16)
    theirs = (image * 255).round().astype(np.int16)
    assert theirs.shape == ours.shape == (RES, RES, 3) and theirs.std() > 1
    assert np.abs(ours - theirs).max() <= 1
    unguided = sample_euler(velocity, noise, sigmas, cond.take(slice(1, 2)))
    assert (unguided - x).abs().max() > 1e-3  # guidance changed the sample


def test_the_decoder_is_the_pipelines_decode(folder):
    """A latent put in place of the pipeline's last one (its step callback) decodes to the
    image our decoder gives: batch-norm statistics undone, unpatchified, decoded."""
    _, _, shape = flux2.load_velocity(folder, RES)
    z = _noise(shape, seed=2)
    pipe = _pipe(folder)
    image = pipe(
        prompt="x", num_inference_steps=1, guidance_scale=1.0, height=RES, width=RES,
        output_type="np",
        callback_on_step_end=lambda p, i, t, kw: {"latents": p._pack_latents(z)},
    ).images[0]  # fmt: skip
    ours = flux2.load_decoder(folder)(z)[0].numpy().astype(np.int16)
    theirs = (image * 255).round().astype(np.int16)
    assert np.abs(ours - theirs).max() <= 1 and theirs.std() > 1
    bn = pipe.vae.bn
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1


@pytest.fixture(scope="module")
def student(folder, tmp_path_factory) -> Path:
    """The teacher's own transformer exported as a 4-step student (the export's work does not
    depend on training)."""
    velocity, shift, _ = flux2.load_velocity(folder, RES)
    out = tmp_path_factory.mktemp("flux2_student")
    raw = [1.0, 0.75, 0.5, 0.25]
    inference = {"sigmas_raw": raw, "shift": shift, "steps": 4, "guidance": 1.0, "method": "cdm"}
    flux2.export(velocity, folder, out, inference, {"teacher": {"resolution": RES}})
    return out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_exported_student_samples_our_sigmas_with_the_stock_call(folder, text, student, steps):
    """The stock call `pipe(prompt=..., num_inference_steps=k)` (default guidance_scale 4.0,
    skipped: the export says is_distilled) runs time_shift(linspace(1, 1/k, k), S) + [0],
    S the teacher's 50-step shift, and gives our sampler's image."""
    cond, _ = text
    recipe = json.loads((student / "inference.json").read_text())
    shift = recipe["shift"]
    assert shift == pytest.approx(math.exp(compute_empirical_mu(64, flux2.TEACHER_STEPS)))
    assert recipe["default_call_exact"]
    index = json.loads((student / "model_index.json").read_text())
    assert index["is_distilled"] is True and index["_class_name"] == "Flux2KleinPipeline"
    pipe = _pipe(student)
    velocity, _, shape = flux2.load_velocity(student, RES)
    noise = _noise(shape, seed=3)
    image = pipe(prompt=PROMPTS[0], num_inference_steps=steps, latents=noise, height=RES,
                 width=RES, output_type="np").images[0]  # fmt: skip
    ours_sigmas = inference_sigmas(steps, shift)
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), ours_sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(few_step.exported_sigmas(student, steps), ours_sigmas)
    x = sample_euler(velocity, noise, ours_sigmas, cond.take(slice(0, 1)))
    ours = flux2.load_decoder(student)(x)[0].numpy().astype(np.int16)
    theirs = (image * 255).round().astype(np.int16)
    assert np.abs(ours - theirs).max() <= 1 and theirs.std() > 1


def test_the_model_card_names_the_licence_and_the_stock_call(student):
    card = (student / "README.md").read_text()
    assert "license: apache-2.0" in card
    assert "pipe(prompt=prompt, num_inference_steps=4, guidance_scale=1.0)" in card
    assert "Flux2KleinPipeline" in card


def test_uneven_sigmas_are_passed_explicitly(folder):
    """A recipe off the linspace grid: the stock call must pass sigmas=raw, and then runs ours."""
    raw, shift = [1.0, 0.8, 0.3], 4.0
    assert flux2.FAMILY.default_call(raw, shift, {}) is None
    config = flux2.FAMILY.explicit(shift, {"use_dynamic_shifting": True})
    assert few_step.matches(config, raw, shift, 64, raw)


def test_geometry_shift_and_resolution_errors(folder, tmp_path):
    shift, shape, tokens = flux2.geometry(folder, RES)
    assert (shape, tokens) == ((32, 8, 8), 64)
    assert shift == pytest.approx(math.exp(compute_empirical_mu(64, 50)))
    _, default, _ = flux2.geometry(folder, None)  # the pipeline's 128 latent px a side
    assert default[1] * 2 == 128
    with pytest.raises(ValueError, match=r"teacher.resolution \(30\) must be a multiple of 4 "):
        flux2.geometry(folder, 30)
    (tmp_path / "tiny_flux2-klein").symlink_to(folder)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    _params(tmp_path / "params.yaml", "flux2-klein", resolution=RES + 2)
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2 and err.count("\n") == 1, err
    assert "(VAE factor 2 x patch 2) for this flux2-klein model" in err, err
