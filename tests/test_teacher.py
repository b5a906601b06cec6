import torch

from cdm.params import Params
from cdm.sampling import inference_sigmas
from cdm.velocity import TransformerVelocity
from cdm.world.teacher import WorldTeacher

MAX_COMMITTED_BYTES = 10 * 1024 * 1024


def test_save_load_round_trip_gives_identical_outputs(tiny_teacher_dir, tmp_path):
    a = WorldTeacher.from_pretrained(tiny_teacher_dir)
    a.save_pretrained(tmp_path)
    b = WorldTeacher.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.2, 0.5, 0.9])
    prompts = [
        "a red ring on the left on a dark background",
        "",
        "a blue pillar on the right on a light background",
    ]
    with torch.no_grad():
        ca, cb = a.condition(prompts), b.condition(prompts)
        va = TransformerVelocity(a.transformer)(x, sigma, ca)
        vb = TransformerVelocity(b.transformer)(x, sigma, cb)
    assert torch.equal(ca.embeds, cb.embeds) and torch.equal(ca.pooled, cb.pooled)
    assert torch.equal(va, vb)
    assert a.shift == b.shift == 2.0


def test_missing_parts_name_what_is_expected(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="transformer/, text_encoder/"):
        WorldTeacher.from_pretrained(tmp_path)


def test_committed_teacher_loads_and_is_small(root):
    path = root / Params().teacher.path
    weights = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert 0 < weights <= MAX_COMMITTED_BYTES
    teacher = WorldTeacher.from_pretrained(path)
    assert (path / "params.json").is_file() and (path / "loss.csv").is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        v = TransformerVelocity(teacher.transformer)(
            x, torch.tensor([0.5, 0.5]), teacher.condition(["", ""])
        )
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_inference_sigmas_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=2.0)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    ours = inference_sigmas(4, 2.0, [1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)
