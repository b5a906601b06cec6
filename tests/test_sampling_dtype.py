"""The sample stage's precision: the transformer in bf16 on a GPU, fp32 on the CPU, the dtype
named in every index row. bf16 is exercised on the CPU through the explicit dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.backends import shapes
from cdm.sampler import Sampler, sample_pairs, sampling_dtype
from cdm.world.evaluate import EvalPairs


def test_a_gpu_samples_in_bf16_and_the_cpu_in_fp32():
    assert sampling_dtype(torch.device("cuda", 0)) is torch.bfloat16
    assert sampling_dtype(torch.device("cpu")) is torch.float32


def _sample(teacher_dir, dtype: torch.dtype, out) -> tuple[set, list, np.ndarray]:
    """(dtypes the transformer's weights and inputs had in each call, index dtypes, images)."""
    backend = shapes.load(teacher_dir)
    velocity, shift, shape = shapes.load_velocity(teacher_dir, dtype=dtype)
    assert velocity.transformer.dtype is dtype  # read in the sampling dtype, not cast later
    seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def record(module, args, kwargs):
        seen.add((module.dtype, kwargs["hidden_states"].dtype))

    velocity.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pairs = EvalPairs.world(3)
    cond, null = backend.encode(pairs.prompts), backend.null_condition()
    index = sample_pairs(
        Sampler(velocity, shift, shape, 2.0), shapes.decode, pairs, [0, 1, 2], cond, null,
        2, 2, out, "teacher_cfg", torch.device("cpu"), dtype,
    )  # fmt: skip
    images = np.stack([np.asarray(Image.open(out / f)) for f in index["file"]]).astype(np.int16)
    return seen, index["dtype"].tolist(), images


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_transformer_runs_in_the_sampling_dtype(tiny_teacher_dir, tmp_path, dtype):
    out = tmp_path / "bf16"
    out.mkdir()
    seen, named, images = _sample(tiny_teacher_dir, dtype, out)
    assert seen == {(dtype, dtype)}
    assert named == [str(dtype).removeprefix("torch.")] * 3
    if dtype is torch.bfloat16:  # the same images as fp32's within bf16's rounding
        ref_dir = tmp_path / "fp32"
        ref_dir.mkdir()
        _, _, reference = _sample(tiny_teacher_dir, torch.float32, ref_dir)
        assert np.abs(images - reference).max() <= 16


@pytest.mark.parametrize("backend", ["sd3", "longcat", "flux2-klein"])
def test_the_real_backends_sample_in_bf16(tiny_dirs, tmp_path, backend):
    """The sample stage's path for a real teacher (load_sampler -> backend.load_velocity with
    torch_dtype -> sample_pairs -> the backend's decoder) on the tiny pipelines, in bf16
    against fp32: the weights are read in bf16, every transformer call runs in it, and the
    images agree within bf16's rounding."""
    from cdm import params as P
    from cdm.backends import backend_module
    from cdm.sampler import load_sampler
    from tests.conftest import ROOT

    folder = tiny_dirs[backend]
    base = P.load(ROOT / "params.yaml")
    teacher = base.teacher.model_copy(update={"backend": backend, "path": str(folder)})
    params = base.model_copy(update={"teacher": teacher})
    module = backend_module(backend)
    prompts = ["a red square", "two blue circles"]
    text = module.load(folder)
    cond, null = text.encode(prompts), text.encode([""])
    decode = module.load_decoder(folder)

    def run(dtype: torch.dtype) -> tuple[set, list, np.ndarray]:
        sampler = load_sampler("teacher_cfg", params, folder, tmp_path, dtype)
        weights = {p.dtype for p in sampler.velocity.transformer.parameters()}
        assert weights == {dtype}  # read in the sampling dtype, not cast later
        seen: set[tuple[torch.dtype, torch.dtype]] = set()
        sampler.velocity.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.add((m.dtype, kw["hidden_states"].dtype)), with_kwargs=True
        )
        out = tmp_path / str(dtype)
        out.mkdir()
        index = sample_pairs(
            sampler, decode, EvalPairs.of(prompts, [0, 1]), [0, 1], cond, null, 2, 2, out,
            "teacher_cfg", torch.device("cpu"), dtype,
        )  # fmt: skip
        images = [np.asarray(Image.open(out / f)) for f in index["file"]]
        return seen, index["dtype"].tolist(), np.stack(images).astype(np.int16)

    seen, named, images = run(torch.bfloat16)
    assert seen == {(torch.bfloat16, torch.bfloat16)} and named == ["bfloat16"] * 2
    _, _, reference = run(torch.float32)
    assert reference.std() > 0  # images, not a flat fill that any dtype would match
    assert images.shape == reference.shape and np.abs(images - reference).max() <= 16


def test_pngs_are_written_off_the_sampling_thread_and_all_before_the_index(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    """sample_pairs hands each PNG to a writer thread (the next batch samples meanwhile) and
    returns only when every file is written; a failed write fails the set."""
    import threading

    from cdm import sampler as S

    threads: set[str] = set()
    save = S.save_png

    def recording(image, target):
        threads.add(threading.current_thread().name)
        save(image, target)

    monkeypatch.setattr(S, "save_png", recording)
    (tmp_path / "a").mkdir()
    seen, _, images = _sample(tiny_teacher_dir, torch.float32, tmp_path / "a")
    assert len(images) == 3 and threading.current_thread().name not in threads

    def failing(image, target):
        raise OSError("disk full")

    monkeypatch.setattr(S, "save_png", failing)
    (tmp_path / "b").mkdir()
    with pytest.raises(OSError, match="disk full"):
        _sample(tiny_teacher_dir, torch.float32, tmp_path / "b")
