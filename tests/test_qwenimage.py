"""The qwen-image backend against the stock QwenImagePipeline on a tiny random pipeline: the
velocity is the pipeline's transformer call, true CFG (with its norm rescale) is the
pipeline's combination in the sampler and in the CA loss, the decoder is the pipeline's
decode, and an exported student samples at 1, 2 and 4 steps as our sampler does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm import engine
from cdm.backends import few_step, qwenimage
from cdm.conditioning import Condition
from cdm.flow import cfg, x0_from_v
from cdm.losses import ca_loss
from cdm.sampling import inference_sigmas, sample_euler
from cdm.velocity import QwenImageVelocity, TransformerVelocity, unpack_longcat
from tests.conftest import call_stage
from tests.test_pipeline_backends import _params

PROMPTS = ["a red cat", "a blue dog on a green mat"]
SIZE = 32  # px: 16x16 latents with the tiny VAE's factor 2, 64 image tokens


@pytest.fixture(scope="module")
def pipe(tiny_dirs):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_dirs["qwen-image"])


def _noise(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 16, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))


def _record(module: torch.nn.Module, log: list) -> None:
    """Keep every output of `module`'s forward in `log`."""
    forward = module.forward

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        log.append(out[0])
        return out

    module.forward = wrapped


def test_velocity_is_the_pipelines_transformer_call(pipe):
    """Prompts of two lengths (a mask), padded to TEXT_TOKENS in the cache: the velocity is the
    transformer as the pipeline calls it (packed latents, timestep t / 1000, img_shapes,
    batch-long embeddings and mask), unpacked."""
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    assert mask is not None and mask.sum(1).unique().numel() == 2
    cond = qwenimage.pad(embeds, mask)
    assert cond.embeds.shape == (2, qwenimage.TEXT_TOKENS, 16) and cond.pooled.sum() == mask.sum()
    x, sigma = _noise(2), torch.tensor([0.8, 0.3])
    t = sigma * 1000  # the scheduler's timesteps
    with torch.no_grad():
        ours = QwenImageVelocity(pipe.transformer)(x, sigma, cond)
        theirs = pipe.transformer(
            hidden_states=pipe._pack_latents(x, 2, 16, SIZE // 2, SIZE // 2),
            timestep=t / 1000, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
            img_shapes=[[(1, SIZE // 4, SIZE // 4)]] * 2, return_dict=False,
        )[0]  # fmt: skip
    torch.testing.assert_close(ours, unpack_longcat(theirs, 16, SIZE // 2, SIZE // 2))
    # A shifted velocity sign or timestep scale would be far off.
    assert ours.abs().mean() > 0.1


def test_true_cfg_is_the_pipelines_combination_bit_for_bit(pipe):
    """A stock call with true_cfg_scale 4 and a negative prompt: the velocity its scheduler
    steps with first is `guide` of the two transformer outputs exactly, the norm rescale included
    (not the linear combination); the CA loss's guided teacher (engine._guided_x0 at g = 3)
    is its clean estimate, and the sampler's CFG combines the same way."""
    outputs: list[torch.Tensor] = []
    stepped: list[torch.Tensor] = []
    _record(pipe.transformer, outputs)
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        stepped.append(model_output)
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        latents = pipe._pack_latents(_noise(), 1, 16, SIZE // 2, SIZE // 2)
        pipe(
            PROMPTS[0], negative_prompt="", true_cfg_scale=4.0, num_inference_steps=2,
            height=SIZE, width=SIZE, latents=latents, output_type="latent",
        )  # fmt: skip
    finally:
        del pipe.transformer.forward, pipe.scheduler.step
    v_c, v_u = (unpack_longcat(o, 16, SIZE // 2, SIZE // 2) for o in outputs[:2])  # step 1
    guided = QwenImageVelocity.guide(v_c, v_u, 4.0)
    assert torch.equal(guided, unpack_longcat(stepped[0], 16, SIZE // 2, SIZE // 2))
    assert (guided - cfg(v_c, v_u, 4.0)).abs().max() > 1e-3  # the rescale does something

    velocity = QwenImageVelocity(pipe.transformer)
    z, tau = _noise(seed=1), torch.tensor([0.6])
    x0 = engine._guided_x0(velocity, z, tau, v_c, v_u, 3.0)
    assert torch.equal(x0, x0_from_v(z, guided, tau))
    assert engine._guided_x0(TransformerVelocity(pipe.transformer), z, tau, v_c, v_u, 3.0) is None
    # The CA direction is the guided teacher's offset from the conditional estimate.
    x0_c, x0_u, x0_s = x0_from_v(z, v_c, tau), x0_from_v(z, v_u, tau), torch.zeros_like(z)
    rescaled = ca_loss(x0_s, x0_c, x0_u, 3.0, guided=x0)
    linear = ca_loss(x0_s, x0_c, x0_u, 3.0)
    w = 1 / (x0_c - x0_s).abs().mean().clamp_min(0.1)
    torch.testing.assert_close(rescaled.loss, (w * (x0 - x0_c)).square().mean())
    assert not torch.isclose(rescaled.loss, linear.loss)


def test_sampler_cfg_uses_the_familys_combination(pipe):
    velocity = QwenImageVelocity(pipe.transformer)
    embeds, mask = pipe.encode_prompt(PROMPTS[:1], device="cpu")
    null = qwenimage.pad(*pipe.encode_prompt([""], device="cpu"))
    cond, x, sigmas = qwenimage.pad(embeds, mask), _noise(), torch.tensor([1.0, 0.0])
    with torch.no_grad():
        ours = sample_euler(velocity, x, sigmas, cond, null, 4.0)
        v_c = velocity(x, sigmas[:1], cond)
        v_u = velocity(x, sigmas[:1], null)
    torch.testing.assert_close(ours, x - QwenImageVelocity.guide(v_c, v_u, 4.0))


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_decoder_is_the_pipelines_decode(pipe, tiny_dirs, output_type):
    """The stock call's latent output, decoded by our decoder (5-D latents, latents_mean /
    latents_std), is its own image output of the same call."""
    latents = pipe._pack_latents(_noise(), 1, 16, SIZE // 2, SIZE // 2)
    # 2 steps: the teacher's shift_terminal makes its 1-step sigmas 0 / 0.
    call = dict(prompt=PROMPTS[0], num_inference_steps=2, height=SIZE, width=SIZE)
    packed = pipe(**call, latents=latents, output_type="latent").images
    image = pipe(**call, latents=latents, output_type=output_type).images
    image = torch.as_tensor(np.asarray(image)).float()
    if output_type == "pt":
        image = image.permute(0, 2, 3, 1)
    ours = qwenimage.load_decoder(tiny_dirs["qwen-image"])(
        unpack_longcat(packed, 16, SIZE // 2, SIZE // 2)
    )
    assert ours.shape == (1, SIZE, SIZE, 3) and ours.dtype == torch.uint8
    assert torch.equal(ours, (image * 255).round().to(torch.uint8))


def test_geometry_shift_and_resolution_errors(tiny_dirs):
    """Dynamic shift exp(mu) at the image's token count, from the published scheduler config
    (to 8192 tokens, max_shift 0.9); a resolution off the VAE factor x packing is one line."""
    shift, shape, tokens = qwenimage.geometry(tiny_dirs["qwen-image"], SIZE)
    assert shape == (16, SIZE // 2, SIZE // 2) and tokens == (SIZE // 4) ** 2
    config = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "max_shift": 0.9}
    assert shift == pytest.approx(np.exp(few_step.calculate_shift(tokens, config)))
    assert qwenimage.geometry(tiny_dirs["qwen-image"], None)[1] == (16, 128, 128)
    with pytest.raises(ValueError, match=r"^teacher.resolution \(34\) must be a multiple of 4 "):
        qwenimage.geometry(tiny_dirs["qwen-image"], 34)


def test_a_resolution_off_the_packing_grid_stops_prepare_teacher_in_one_line(tiny_dirs, tmp_path):
    (tmp_path / "tiny_qwen-image").symlink_to(tiny_dirs["qwen-image"])
    (tmp_path / "prompts.txt").write_text("a cat\n")
    _params(tmp_path / "params.yaml", "qwen-image", resolution=34)
    code, err = call_stage(tmp_path, "prepare_teacher.py")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "teacher.resolution (34) must be a multiple of 4 (VAE factor 2 x packing 2)" in err
    assert not (tmp_path / "models").exists()


def test_an_exported_student_samples_like_our_sampler_at_1_2_4_steps(pipe, tiny_dirs, tmp_path):
    """The teacher exported as a student (recipe [1, .75, .5, .25]): the stock default call at
    k steps runs our k-step sigmas and gives our sampler's latents."""
    from diffusers import QwenImagePipeline

    velocity, shift, _ = qwenimage.load_velocity(tiny_dirs["qwen-image"], SIZE)
    recipe = {"sigmas_raw": [1.0, 0.75, 0.5, 0.25], "shift": shift}
    out = tmp_path / "student"
    qwenimage.export(
        velocity, tiny_dirs["qwen-image"], out, recipe, {"teacher": {"resolution": SIZE}}
    )
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "true_cfg_scale=1.0" in card
    student = QwenImagePipeline.from_pretrained(out)
    embeds, mask = student.encode_prompt(PROMPTS[:1], device="cpu")
    cond, x = qwenimage.pad(embeds, mask), _noise(seed=2)
    for steps in (1, 2, 4):
        latents = student._pack_latents(x, 1, 16, SIZE // 2, SIZE // 2)
        stock = student(
            PROMPTS[0], num_inference_steps=steps, true_cfg_scale=1.0, height=SIZE, width=SIZE,
            latents=latents, output_type="latent",
        ).images  # fmt: skip
        sigmas = inference_sigmas(steps, shift)
        torch.testing.assert_close(student.scheduler.sigmas.float(), sigmas, rtol=0, atol=1e-6)
        with torch.no_grad():
            ours = sample_euler(velocity, x, sigmas, cond)
        torch.testing.assert_close(
            unpack_longcat(stock, 16, SIZE // 2, SIZE // 2), ours, atol=1e-4, rtol=0
        )


def test_a_condition_of_one_length_for_every_prompt():
    """pad: every prompt's embeddings at TEXT_TOKENS, the mask marking its own tokens, so the
    cache's batches and the engine's cond + null concatenate."""
    cond = qwenimage.pad(torch.ones(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    both = Condition.cat([cond, qwenimage.pad(torch.ones(1, 7, 3), None)])
    assert both.embeds.shape == (3, qwenimage.TEXT_TOKENS, 3)
    assert both.pooled.sum(1).tolist() == [3.0, 5.0, 7.0]
    assert both.embeds[0, 5:].abs().sum() == 0 and both.embeds[2, :7].sum() == 21


def test_the_engines_ca_loss_takes_the_rescaled_guided_teacher(pipe, monkeypatch):
    """student_losses (CA only) with the Qwen-Image teacher: the CA direction comes from
    _guided_x0 on the teacher's conditional and null velocities at the re-noised point, scale
    g + 1; with the same network behind a linear-CFG wrapper, ca_loss gets no guided estimate."""
    from cdm import params as P
    from cdm.rollout import Rollout

    seen: dict = {}
    guided_x0, loss = engine._guided_x0, engine.ca_loss

    def spy_guided(teacher, z, tau, v_c, v_u, g):
        seen.update(z=z, tau=tau, v_c=v_c, v_u=v_u, g=g)
        seen["out"] = guided_x0(teacher, z, tau, v_c, v_u, g)
        return seen["out"]

    def spy_loss(*args, guided=None, **kwargs):
        seen["passed"] = guided
        return loss(*args, guided=guided, **kwargs)

    monkeypatch.setattr(engine, "_guided_x0", spy_guided)
    monkeypatch.setattr(engine, "ca_loss", spy_loss)
    velocity = QwenImageVelocity(pipe.transformer)
    cond = qwenimage.pad(*pipe.encode_prompt(PROMPTS, device="cpu"))
    null = qwenimage.pad(*pipe.encode_prompt([""], device="cpu"))
    x = _noise(2)
    roll = Rollout(x, torch.zeros_like(x), torch.tensor([0.9, 0.6]), x, 1)
    method = P.Method(schedule="fixed", ca=True, dm=False, cdm=False)
    cfg = P.Params().distill.model_copy(update={"guidance": 3.0})
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        engine.student_losses(velocity, velocity, velocity, roll, cond, null, method, cfg, gen())
        assert seen["g"] == 3.0 and seen["passed"] is seen["out"]
        torch.testing.assert_close(seen["v_c"], velocity(seen["z"], seen["tau"], cond))
        torch.testing.assert_close(seen["v_u"], velocity(seen["z"], seen["tau"], null.expand(2)))
        want = x0_from_v(
            seen["z"], QwenImageVelocity.guide(seen["v_c"], seen["v_u"], 4.0), seen["tau"]
        )
        assert torch.equal(seen["out"], want)

        class Linear(torch.nn.Module):  # the same network, the linear CFG of other families
            def forward(self, *args):
                return velocity(*args)

        engine.student_losses(velocity, Linear(), velocity, roll, cond, null, method, cfg, gen())
    assert seen["passed"] is None
