"""Your fine-tune as the teacher (`teacher.lora`, cdm.teacherlora): the LoRA is fused into the
teacher as diffusers' own fuse_lora would, the fused teacher differs from the base, and a
LoRA-mode student's exported LoRA, loaded on the stock *base* pipeline, gives the student's
samples (cdm.lorafactors stacks the teacher's LoRA with the student's adapter)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cdm import lora, lorafactors, teacherlora
from cdm import params as P
from cdm.backends import backend_module
from cdm.validate import check_inputs
from tests.conftest import copy_project, edit_params
from tests.test_pipeline_backends import (
    BACKENDS,
    ENV,
    PROMPTS,
)

SCALE = 0.8  # the teacher LoRA's weight in these tests (not 1: the scale must be applied)


def _teacher_lora(backend: str, base: Path, out: Path, seed: int = 3) -> Path:
    """A random rank-2 LoRA (alpha 3) on the base transformer's attention, saved by diffusers'
    writer as a fine-tune's LoRA would be."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    transformer = backend_module(backend).load_velocity(base)[0].transformer
    names = lora.targets(transformer, P.Lora(rank=2, alpha=3.0, include_ff=False))
    config = LoraConfig(r=2, lora_alpha=3.0, target_modules=names)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    meta = config.to_dict() | {"target_modules": sorted(names)}
    StableDiffusion3Pipeline.save_lora_weights(
        out,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="default"),
        transformer_lora_adapter_metadata=meta,
    )
    return out / lora.LORA_FILE


def test_stacked_factors_carry_the_sum_of_the_deltas_at_one_rank():
    gen = torch.Generator().manual_seed(0)

    def pair(r: int, n_in: int = 6, n_out: int = 5):
        return torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)

    teacher = {"a": pair(2), "b": pair(3)}
    student = {"a": pair(4), "c": pair(4)}
    stacked = lorafactors.stack(teacher, student)
    assert {a.shape[0] for a, _ in stacked.values()} == {3 + 4}
    zero = torch.zeros(5, 6)
    for name in ("a", "b", "c"):
        want = sum(
            (b @ a for part in (teacher, student) for n, (a, b) in part.items() if n == name), zero
        )
        a, b = stacked[name]
        torch.testing.assert_close(b @ a, want)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_fused_teacher_is_diffusers_fuse_lora_and_differs_from_the_base(
    backend, tiny_dirs, tmp_path
):
    base = tiny_dirs[backend]
    path = _teacher_lora(backend, base, tmp_path / "mine")
    cfg = P.TeacherLora(path=str(path), scale=SCALE)
    entry = teacherlora.prepare(backend_module(backend), base, cfg, tmp_path / "teacher")
    assert entry["rank"] == 2 and entry["scale"] == SCALE and len(entry["sha256"]) == 64

    load = backend_module(backend).load_velocity
    ours = load(tmp_path / "teacher")[0].transformer.state_dict()
    theirs = load(base)[0].transformer
    plain = {k: v.clone() for k, v in theirs.state_dict().items()}
    theirs.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    theirs.fuse_lora(lora_scale=SCALE)
    theirs.unload_lora()
    fused = theirs.state_dict()
    assert ours.keys() == fused.keys()
    moved = max((ours[k] - plain[k]).abs().max().item() for k in ours)
    assert moved > 1e-2  # the fine-tune differs from the base
    assert max((ours[k] - fused[k]).abs().max().item() for k in ours) <= 1e-6
    # The factors kept beside it are what was fused.
    kept = teacherlora.fused(tmp_path / "teacher")
    assert kept is not None and len(kept) == entry["modules"]
    assert lorafactors.note(tmp_path / "teacher" / teacherlora.FACTORS)["sha256"] == entry["sha256"]


def _latents(pipe, backend: str, steps: int = 2) -> torch.Tensor:
    """The stock call's final latents for one prompt and seeded noise."""
    _, _, resolution, shape = BACKENDS[backend]
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(5))
    extra = {"enable_prompt_rewrite": False} if backend == "longcat" else {}
    if backend in ("longcat", "qwen-image"):  # their calls take packed 2x2 tokens
        noise = pipe._pack_latents(noise, 1, *shape)
    return pipe(
        prompt=PROMPTS[1], num_inference_steps=steps, guidance_scale=1.0, latents=noise,
        height=resolution, width=resolution, output_type="latent", **extra,
    ).images  # fmt: skip


def _load_student_lora(pipe, backend: str, folder: Path) -> None:
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(folder)
    else:  # LongCat has no pipeline-level loader
        pipe.transformer.load_lora_adapter(folder, prefix="transformer", weight_name=lora.LORA_FILE)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_exported_lora_on_the_stock_base_pipeline_samples_the_student(
    backend, tiny_dirs, tmp_path
):
    """A LoRA-mode student of the fused teacher (a random adapter, as training leaves one):
    its exported LoRA on the stock *base* pipeline samples the student's latents; the base
    alone, and the student adapter alone on the base, do not."""
    import diffusers

    base = tiny_dirs[backend]
    mine = _teacher_lora(backend, base, tmp_path / "mine")
    module = backend_module(backend)
    teacher_dir = tmp_path / "teacher"
    teacherlora.prepare(module, base, P.TeacherLora(path=str(mine), scale=SCALE), teacher_dir)
    velocity = module.load_velocity(teacher_dir)[0].float()
    _, view, _ = lora.networks(velocity, P.Lora(rank=4, alpha=8.0), 0, False)
    gen = torch.Generator().manual_seed(4)
    ema = {
        f"weights.{i}": torch.randn(p.shape, generator=gen) * 0.1
        for i, p in enumerate(view.weights)
    }
    student = lora.student_module(velocity, ema, view)
    lora.save_diffusers_lora(student, tmp_path / "alone")  # the adapter without the teacher's
    lora.save_diffusers_lora(student, tmp_path / "student", teacherlora.fused(teacher_dir))
    merged = lora.merged(student).transformer  # the project's full student

    cls = getattr(diffusers, BACKENDS[backend][1])
    want = _latents(cls.from_pretrained(base, transformer=merged), backend)
    pipe = cls.from_pretrained(base)
    bare = _latents(pipe, backend)
    _load_student_lora(pipe, backend, tmp_path / "student")
    got = _latents(pipe, backend)
    alone = cls.from_pretrained(base)
    _load_student_lora(alone, backend, tmp_path / "alone")
    assert (got - want).abs().max().item() <= 1e-4
    assert (bare - want).abs().max().item() > 1e-2
    assert (_latents(alone, backend) - want).abs().max().item() > 1e-2  # the teacher's part counts


# The stages wired together (prepare_teacher fusing, LoRA-mode distill, sample, the export
# on the stock base pipeline): tests/test_pipeline_backends.py, its LoRA run on LongCat.


# --- one-line refusals and the fingerprint ---------------------------------------------------


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"backend": "sd3", "lora": {"path": "x.safetensors", "scale": 0}}, "scale 0 fuses"),
        ({"backend": "sd3", "lora": {"path": "x.bin"}}, "is not a .safetensors file"),
        ({"backend": "sd3", "lora": {"scale": 1.0}}, "teacher.lora.path: field required"),
        ({"backend": "shapes", "lora": {"path": "x.safetensors"}}, "takes no LoRA"),
    ],
)
def test_bad_teacher_lora_params_are_one_line(teacher, message):
    with pytest.raises(P.ParamsError, match=message) as err:
        P.parse({"teacher": teacher})
    assert "\n" not in str(err.value)


def test_a_missing_teacher_lora_file_is_named_before_any_stage(tmp_path, tiny_dirs):
    params = P.parse(
        {
            "teacher": {
                "backend": "sd3", "path": str(tiny_dirs["sd3"]),
                "lora": {"path": str(tmp_path / "gone.safetensors")},
            },
            "prompts": {"train_file": "t.txt", "eval_file": "e.txt"},
        }
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="teacher.lora.path .* does not exist"):
        check_inputs(params)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["text_encoder.x.lora_A.weight", "transformer.y.lora_A.weight"], "text-encoder"),
        (["lora_unet_blocks_0_attn.lora_down.weight"], "kohya/ComfyUI key layout"),
        (["transformer.proj_out.weight"], "no lora_A/lora_B weights"),
        (["transformer.no_such.lora_A.weight"], "module 'no_such' is not in this"),
        (  # the module exists, the shapes are another model's
            [f"transformer.transformer_blocks.0.attn.to_q.lora_{x}.weight" for x in "AB"],
            "does not fit this SD3Transformer2DModel",
        ),
    ],
)
def test_a_lora_the_teacher_cannot_take_is_refused_in_one_line(keys, message, tmp_path, tiny_dirs):
    path = tmp_path / "lora.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    transformer = backend_module("sd3").load_velocity(tiny_dirs["sd3"])[0].transformer
    with pytest.raises(ValueError, match=message) as err:
        teacherlora.read(transformer, P.TeacherLora(path=str(path)))
    assert "\n" not in str(err.value)


def test_the_teacher_loras_content_and_scale_enter_the_fingerprint(tmp_path):
    path = tmp_path / "mine.safetensors"
    save_file({"transformer.a.lora_A.weight": torch.zeros(1)}, str(path))

    def inputs(**lora_cfg):
        teacher = {"backend": "sd3", "path": "x"} | ({"lora": lora_cfg} if lora_cfg else {})
        data = {"teacher": teacher, "prompts": {"train_file": "t", "eval_file": "e"}}
        return P.student_inputs(P.parse(data), "cdm")

    plain, first = inputs(), inputs(path=str(path))
    assert "teacher_lora" not in plain  # no LoRA: the fingerprint it always had
    assert first["teacher_lora"]["sha256"] is not None
    assert inputs(path=str(path), scale=0.5) != first
    save_file({"transformer.a.lora_A.weight": torch.ones(1)}, str(path))
    assert inputs(path=str(path)) != first  # a new file under the same name


def test_a_dora_teacher_lora_is_refused_in_one_line(tmp_path, tiny_dirs):
    """DoRA rescales each weight's columns: no low-rank delta to fuse or export against the
    base, so it is refused naming the file."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    transformer = backend_module("sd3").load_velocity(tiny_dirs["sd3"])[0].transformer
    dora = LoraConfig(r=2, lora_alpha=2, target_modules=["attn.to_q"], use_dora=True)
    inject_adapter_in_model(dora, transformer, adapter_name="default")
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    path = tmp_path / "dora.safetensors"
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(path))
    transformer.unload_lora()
    with pytest.raises(ValueError, match=r"dora.safetensors': .*DoRA") as err:
        teacherlora.read(transformer, P.TeacherLora(path=str(path)))
    assert "\n" not in str(err.value)


def test_snakemake_reads_the_teacher_lora_file_as_an_input_of_prepare_teacher(tmp_path):
    """New content under the same name reruns the teacher's stages under Snakemake (DVC
    reruns on the `teacher` params; see docs/real-runs.md)."""
    work = copy_project(tmp_path / "project", skip=("dvc.lock",))
    mine = tmp_path / "mine.safetensors"
    save_file({"transformer.a.lora_A.weight": torch.zeros(1)}, str(mine))
    edit_params(
        work / "params.yaml",
        teacher={"backend": "sd3", "path": "someone/model", "lora": {"path": str(mine)}},
        prompts={"train_file": "data/train.txt", "eval_file": "data/eval.txt"},
    )
    cmd = ["snakemake", "-n", "--cores", "1", "models/teacher"]
    proc = subprocess.run(cmd, cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = proc.stdout + proc.stderr
    block = plan[plan.index("rule prepare_teacher:") :]
    inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
    assert str(mine) in inputs
