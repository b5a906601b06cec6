"""LoRA distillation (cdm.lora): the teacher is the shared base with its adapters disabled, only
adapter weights train, a mixed setting is refused, each family's target list covers its
attention and feed-forward linears, and a run goes end to end on the tiny world."""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdm import engine, lora, plan
from cdm import params as P
from cdm.backends.shapes import load_velocity
from cdm.conditioning import Condition
from cdm.velocity import LongCatVelocity, TransformerVelocity
from tests import tiny_pipelines
from tests.conftest import PYTHON, ROOT, call_main
from tests.test_distill import ACCELERATE, ENV, _clone, _max_diff, _reference, _run, _student

LORA = P.Lora(rank=4, alpha=8.0)
SD3_ATTENTION = {
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
}  # fmt: skip


def _sample(velocity, shape, n: int = 3):
    width = velocity.transformer.config.joint_attention_dim
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen)
    cond = Condition(torch.randn(n, 5, width, generator=gen), torch.randn(n, width, generator=gen))
    return x, torch.rand(n, generator=gen), cond


def _relative(names: list[str]) -> set[str]:
    return {".".join(n.split(".")[2:]) for n in names}


def test_teacher_with_adapters_disabled_is_the_bare_teacher_bit_for_bit(tiny_teacher_dir):
    velocity, _, shape = load_velocity(tiny_teacher_dir)
    bare = copy.deepcopy(velocity)
    teacher, student, fake = lora.networks(velocity, LORA, seed=0, checkpointing=False)
    with torch.no_grad():  # non-zero B: the adapters now change the output
        for view in (student, fake):
            for name, p in zip(view.names, view.weights, strict=True):
                if "lora_B" in name:
                    p.normal_()
        x, s, cond = _sample(bare, shape)
        assert torch.equal(teacher(x, s, cond), bare(x, s, cond))
        out_g, out_f = student(x, s, cond), fake(x, s, cond)
        assert not torch.equal(out_g, bare(x, s, cond))
        assert not torch.equal(out_g, out_f)
        assert torch.equal(teacher(x, s, cond), bare(x, s, cond))  # switched back cleanly


def test_running_names_the_adapter_switched_on(tiny_teacher_dir):
    velocity, _, _ = load_velocity(tiny_teacher_dir)
    with pytest.raises(ValueError, match="not a LoRA module"):
        lora.running(velocity)
    lora.add_adapters(velocity, LORA, seed=0)
    for name in (None, lora.STUDENT, lora.FAKE):
        with lora.active(velocity, name):
            assert lora.running(velocity) == name
            with lora.active(velocity, lora.FAKE if name else None):  # nested, then restored
                assert lora.running(velocity) == (lora.FAKE if name else None)
            assert lora.running(velocity) == name


def test_only_adapter_weights_train_and_the_base_stays_bitwise(tiny_teacher_dir, tmp_path):
    """One iteration (update_ratio 2): a fake-score step and the blend, no student step."""
    velocity, shift, shape = load_velocity(tiny_teacher_dir)
    base = {n: p.detach().clone() for n, p in velocity.named_parameters()}
    cfg = P.load(ROOT / "params.yaml").distill.model_copy(
        update={"batch_size": 3, "k_max": 4, "warmup": 1, "iterations": 1, "lora": LORA}
    )
    width = velocity.transformer.config.joint_attention_dim
    gen = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(6, 5, width, generator=gen), torch.randn(6, width, generator=gen))
    null = Condition(torch.zeros(1, 5, width), torch.zeros(1, width))
    paths = engine.RunPaths(tmp_path / "ckpt", tmp_path / "ckpt" / "train.csv")
    method = P.load(ROOT / "params.yaml").methods["cdm"]
    fresh, *_ = load_velocity(tiny_teacher_dir)
    _, g0, f0 = lora.networks(fresh, LORA, seed=0, checkpointing=False)  # the same draws
    engine.train(velocity, cond, null, shift, shape, method, cfg, paths, 0, torch.device("cpu"))

    after = {n.replace(".base_layer", ""): p for n, p in velocity.named_parameters()}
    for name, value in base.items():
        assert torch.equal(after[name], value), f"base weight {name} changed"
    student, fake = (
        lora.adapter_params(velocity, lora.STUDENT),
        lora.adapter_params(velocity, lora.FAKE),
    )
    assert set(after) == set(base) | set(student) | set(fake)  # nothing else was added
    # No student step yet: G is its initial draw; F took a step, then 0.1% of G.
    for (n, p), p0 in zip(student.items(), g0.state().values(), strict=True):
        assert torch.equal(p, p0), n
    moved = [n for (n, p), p0 in zip(fake.items(), f0.state().values(), strict=True)
             if not torch.equal(p, p0)]  # fmt: skip
    # Every A moved (the blend mixes in G's other draw); B moved wherever a gradient reaches
    # it (the last block's add_q_proj feeds only the discarded context output: B stays 0).
    assert {n for n in fake if "lora_A" in n} <= set(moved)
    assert any("lora_B" in n for n in moved)


@pytest.mark.parametrize(
    "lora_value, message",
    [
        ({"student_only": True}, "mixed LoRA/full setting is not supported"),
        ({"fake_score": None}, "mixed LoRA/full setting is not supported"),
        ({"rank": 0}, "distill.lora.rank"),
    ],
)
def test_bad_lora_settings_are_refused_in_one_line(lora_value, message):
    with pytest.raises(P.ParamsError) as err:
        P.parse({"distill": {"lora": lora_value}})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lora_under_zero3_is_refused_naming_zero2():
    with pytest.raises(P.ParamsError, match="set distill.zero_stage: 2"):
        P.parse({"distill": {"lora": {}, "zero_stage": 3}})


def test_lora_enters_the_fingerprint_and_null_keeps_the_old_one():
    plain = P.parse({})
    inputs = P.student_inputs(plain, "cdm")
    assert "lora" not in inputs["distill"]  # runs from before LoRA keep their folders
    tuned = P.student_inputs(P.parse({"distill": {"lora": {"rank": 8}}}), "cdm")
    other = P.student_inputs(P.parse({"distill": {"lora": {"rank": 16}}}), "cdm")
    assert tuned["distill"]["lora"]["rank"] == 8
    assert len({str(inputs), str(tuned), str(other)}) == 3


def test_sd3_targets_are_the_authors_list():
    transformer = tiny_pipelines.sd3_pipeline().transformer
    joint = _relative(lora.targets(transformer, P.Lora(include_ff=False)))
    assert joint == SD3_ATTENTION & {
        ".".join(n.split(".")[2:]) for n, _ in transformer.named_modules()
    }
    with_ff = _relative(lora.targets(transformer, P.Lora()))
    ff = {r for r in with_ff if r.startswith(("ff.", "ff_context."))}
    assert with_ff == joint | ff and {"ff.net.0.proj", "ff.net.2"} <= ff


def test_longcat_targets_cover_its_attention_and_feed_forward_linears():
    pipe = tiny_pipelines.longcat_pipeline()
    transformer = pipe.transformer
    names = set(lora.targets(transformer, P.Lora()))
    linears = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in linears:
        parts = name.split(".")
        if parts[0] not in lora.BLOCKS:
            assert name not in names, name  # embedders, final norm and projection stay frozen
            continue
        rel = ".".join(parts[2:])
        wanted = rel.startswith(("attn.", "ff.", "ff_context.")) or rel in ("proj_mlp", "proj_out")
        assert (name in names) == wanted, name
    assert any(n.startswith("single_transformer_blocks") and "attn.to_q" in n for n in names)
    assert any(n.startswith("transformer_blocks") and "attn.add_q_proj" in n for n in names)
    # Adapters attach to the wrapped LongCat model and leave the disabled teacher alone.
    velocity = LongCatVelocity(transformer, text_tokens=8)
    teacher, student, _ = lora.networks(velocity, P.Lora(rank=2, alpha=4.0), 0, False)
    assert len(student.names) == 2 * len(names)  # lora_A and lora_B per target


def test_qwen_image_targets_its_attention_and_mlps_not_its_modulation():
    """Qwen-Image's blocks: attention (both streams) and img_mlp / txt_mlp get adapters, the
    img_mod / txt_mod modulation linears stay frozen; the adapters attach to the wrapped
    model and run as the student while the teacher runs bare."""
    from cdm.guidance import guide_of
    from cdm.velocity import QwenImageVelocity

    transformer = tiny_pipelines.qwen_pipeline().transformer
    names = set(lora.targets(transformer, P.Lora()))
    linears = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = {
        n for n in linears
        if n.startswith("transformer_blocks.") and (".attn." in n or "_mlp." in n)
    }  # fmt: skip
    assert names == wanted and any(".img_mod." in n for n in linears - names)
    assert any("attn.add_q_proj" in n for n in names) and any("txt_mlp.net.2" in n for n in names)
    velocity = QwenImageVelocity(transformer)
    teacher, student, _ = lora.networks(velocity, P.Lora(rank=2, alpha=4.0), 0, False)
    with torch.no_grad():
        for p in student.weights:
            p.normal_(std=0.1)
    x, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    cond = Condition(torch.randn(1, 6, 16), torch.ones(1, 6))
    with torch.no_grad():
        assert not torch.allclose(teacher(x, sigma, cond), student(x, sigma, cond))
        assert torch.equal(teacher(x, sigma, cond), teacher(x, sigma, cond))
    # The LoRA-mode teacher keeps Qwen-Image's true CFG for the CA loss (cdm.guidance).
    assert guide_of(teacher) == QwenImageVelocity.guide


# --- whole runs on the tiny world (src/distill.py, as tests/test_distill.py drives them) ---

LORA_RUN = {"rank": 4, "alpha": 8.0}


@pytest.fixture
def project(distill_project) -> Path:
    """conftest's session-wide tiny distill project: teacher prepared, prompts cached."""
    return distill_project


def _adapters(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "models/students/cdm" / lora.LORA_FILE)


def _moved(adapters: dict[str, torch.Tensor]) -> float:
    """lora_B starts at zero: its size is what training moved."""
    return max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k)


def test_a_lora_run_goes_end_to_end_and_exports_a_full_student(project, reference):
    work = _reference(reference, project, "cdm", iterations=10, lora=LORA_RUN)
    assert len((work / "logs/cdm/train.csv").read_text().splitlines()) == 11
    student = _student(work, "cdm")
    teacher = load_file(work / "models/teacher/transformer/diffusion_pytorch_model.safetensors")
    assert set(student) == set(teacher)  # merged: the teacher's architecture, no adapter keys
    assert max((student[k] - teacher[k]).abs().max().item() for k in teacher) > 0
    # Only adapters are checkpointed: the student's state is a small fraction of the teacher.
    folder = next(work.glob("checkpoints/cdm-*/it-*/ema"))
    kept = sum(v.numel() for f in folder.glob("rank-*.safetensors") for v in load_file(f).values())
    assert 0 < kept < sum(v.numel() for v in teacher.values())
    folder = work / "models/students/cdm"
    assert json.loads((folder / "params.json").read_text())["distill"]["lora"]["rank"] == 4
    # The adapter beside the merged transformer, in diffusers LoRA keys.
    adapter = load_file(folder / lora.LORA_FILE)
    assert adapter and all(k.startswith("transformer.") and ".lora_" in k for k in adapter)


def test_lora_with_gradient_checkpointing_gives_the_same_student(project, reference, tmp_path):
    """The recomputation in backward runs the engine's own adapter (lora.engine_adapter)."""
    plain = _reference(reference, project, "cdm", iterations=10, lora=LORA_RUN)  # shared
    ckpt = _clone(
        project, tmp_path / "ckpt", iterations=10, lora=LORA_RUN, gradient_checkpointing=True
    )
    _run(ckpt, "distill.py", "--method", "cdm")
    # The adapters moved (a few 1e-5 here), and agree to a thousandth of that.
    a, b = _adapters(plain), _adapters(ckpt)
    moved = _moved(a)
    assert moved > 0 and _max_diff(a, b) <= min(1e-6, 1e-3 * moved)
    assert _max_diff(_student(plain, "cdm"), _student(ckpt, "cdm")) <= 1e-3 * moved


def test_lora_sigkill_then_rerun_equals_an_uninterrupted_run(project, reference, tmp_path):
    straight = _reference(reference, project, "cdm", iterations=20, lora=LORA_RUN)
    crashed = _clone(project, tmp_path / "crashed", iterations=20, lora=LORA_RUN)
    cmd = [PYTHON, str(ROOT / "src/distill.py"), "--method", "cdm"]
    proc = subprocess.Popen(
        cmd, cwd=crashed, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not list(crashed.glob("checkpoints/cdm-*/it-0000010/state.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = max(int(p.parent.name[3:]) for p in crashed.glob("checkpoints/cdm-*/it-*/state.json"))
    rerun = _run(crashed, "distill.py", "--method", "cdm")
    assert newest >= 10 and f"resuming from iteration {newest}" in rerun.stderr, rerun.stderr
    a, b = _adapters(straight), _adapters(crashed)
    assert _moved(a) > 0 and _max_diff(a, b) <= min(1e-6, 1e-3 * _moved(a))
    assert _max_diff(_student(straight, "cdm"), _student(crashed, "cdm")) <= 1e-6


def test_two_processes_under_zero2_equal_one_process_of_two_micro_batches(
    project, reference, tmp_path
):
    """Virtual ranks (distill.accumulation): one process accumulating two micro-batches, each
    drawn as rank 0 and rank 1 would, trains the adapters the two-process run trains."""
    two = _clone(project, tmp_path / "two", iterations=10, lora=LORA_RUN)
    launcher = [
        ACCELERATE, "launch", "--config_file", str(ROOT / "configs/accelerate/zero2.yaml"),
        "--num_processes", "2", "--main_process_port", "29721",
    ]  # fmt: skip
    _run(two, "distill.py", "--method", "cdm", launcher=launcher)
    shards = list(two.glob("checkpoints/cdm-*/it-*/student/state/*optim_states.pt"))
    assert {p.name.split("_")[3] for p in shards} == {"0", "1"}  # both ranks hold a shard
    one = _clone(project, tmp_path / "one", iterations=10, lora=LORA_RUN, accumulation=2)
    _run(one, "distill.py", "--method", "cdm")
    adapters = [load_file(w / "models/students/cdm" / lora.LORA_FILE) for w in (two, one)]
    assert set(adapters[0]) == set(adapters[1])
    # lora_B starts at zero: its size is what training moved (a few 1e-5 here), so the
    # issue's 1e-6 alone would be loose; the runs agree to a thousandth of it.
    moved = max(v.abs().max().item() for k, v in adapters[0].items() if "lora_B" in k)
    assert moved > 0 and _max_diff(*adapters) <= min(1e-6, 1e-3 * moved)
    # The same draws, so the same logged schedule lengths and anchors; the losses, averaged
    # over the two micro-batches here, are rank 0's alone in the two-process log.
    logs = [(w / "logs/cdm/train.csv").read_text().splitlines() for w in (two, one)]
    column = logs[0][0].split(",").index("anchor_sigma")
    k = logs[0][0].split(",").index("K")
    for a, b in zip(logs[0][1:], logs[1][1:], strict=True):
        assert a.split(",")[k] == b.split(",")[k]
    assert all(float(r.split(",")[column]) > 0 for r in logs[1][1:])
    # One process with one micro-batch is another run (half the batch, rank 0's draws only).
    alone = _reference(reference, project, "cdm", iterations=10, lora=LORA_RUN)
    other = load_file(alone / "models/students/cdm" / lora.LORA_FILE)
    assert _max_diff(adapters[1], other) > 0.1 * moved


# --- the memory plan in LoRA mode -----------------------------------------------------------


def test_the_plans_adapter_count_is_what_peft_builds():
    pipe = tiny_pipelines.sd3_pipeline()
    cfg = P.Lora(rank=4, alpha=8.0)
    counted = plan.adapter_parameters("sd3", dict(pipe.transformer.config), cfg)
    velocity = TransformerVelocity(pipe.transformer)
    lora.add_adapters(velocity, cfg, seed=0)
    built = sum(p.numel() for p in lora.adapter_params(velocity, lora.STUDENT).values())
    assert counted == built > 0


@pytest.mark.parametrize(
    "overlay, gib, at_least",
    [
        ("configs/sd3-medium-lora.yaml", 24, 2),
        ("configs/longcat-image-lora.yaml", 80, 1),
        ("configs/flux2-klein-lora.yaml", 80, 8),  # the recipe's batch 8 on one GPU
    ],
)
def test_the_lora_configs_fit_one_gpu_by_the_plan(overlay, gib, at_least):
    code, out, err = call_main(plan.main, overlay)
    assert code == 0, err[-2000:]
    assert "1 GPUs, ZeRO-2" in out and "rank 64, alpha 128" in out
    assert "base (frozen; teacher, student and fake score share it)" in out
    fits = re.search(rf"{gib} GiB: (\d+)", out)
    assert fits and int(fits.group(1)) >= at_least, out
    _, full, _ = call_main(plan.main, overlay.replace("-lora", ""), "--gpus", "1", "--zero", "2")
    total = lambda text: float(re.search(r"^  total\s+([0-9.]+)$", text, re.M).group(1))  # noqa: E731
    assert total(out) < total(full) / 2  # one base instead of three, small optimizers


# --- export as a diffusers LoRA ---------------------------------------------------------------


@pytest.mark.parametrize(("backend", "resolution"), [("sd3", 16), ("flux2-klein", 32)])
def test_the_exported_lora_loads_on_the_stock_pipeline_and_gives_the_student(
    tiny_dirs, tmp_path, backend, resolution
):
    """The student adapter saved as a diffusers LoRA: the stock pipeline's load_lora_weights
    (SD3's loader, Flux2LoraLoaderMixin) puts it on the teacher transformer, which then
    predicts the student's velocity; merged, it is the project's full student. FLUX.2's
    targets include its single blocks' fused to_qkv_mlp_proj and to_out."""
    import diffusers

    from cdm.backends import backend_module

    module, teacher_dir = backend_module(backend), tiny_dirs[backend]
    velocity, _, shape = module.load_velocity(teacher_dir, resolution)
    velocity.float()
    _, view, _ = lora.networks(velocity, P.Lora(rank=4, alpha=8.0), 0, False)
    with torch.no_grad():
        for p in view.weights:
            p.normal_(std=0.1)  # a student away from the teacher
    ema = {f"weights.{i}": p.detach().clone() for i, p in enumerate(view.weights)}
    student = lora.student_module(velocity, ema, view)
    path = lora.save_diffusers_lora(student, tmp_path / "student")
    assert path.is_file()
    if backend == "flux2-klein":
        keys = load_file(path).keys()
        for part in ("attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"):
            assert any(part in k for k in keys), part

    cls = getattr(diffusers, module.FAMILY.pipeline)
    card = lora.card_section(str(teacher_dir), pipeline=module.FAMILY.pipeline)  # the card
    assert f'{cls.__name__}.from_pretrained("{teacher_dir}")' in card
    pipe = cls.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    bare = type(velocity)(copy.deepcopy(pipe.transformer))
    pipe.load_lora_weights(tmp_path / "student")
    stock = type(velocity)(pipe.transformer)
    x, s, _ = _sample(stock, shape)
    config = pipe.transformer.config
    gen = torch.Generator().manual_seed(2)
    cond = Condition(
        torch.randn(3, 5, config.joint_attention_dim, generator=gen),
        torch.randn(3, config.get("pooled_projection_dim", 1), generator=gen),
    )
    with torch.no_grad():
        want, got = student(x, s, cond), stock(x, s, cond)
        assert (want - got).abs().max().item() <= 1e-5
        assert (want - bare(x, s, cond)).abs().max().item() > 1e-3  # the adapter matters
        merged = lora.merged(student)(x, s, cond)  # the project's own full student
        assert (want - merged).abs().max().item() <= 1e-5
    assert not lora.is_lora(student)


# --- the student EMA for previews and the export (lora.student_module, lora.merged) --------


def _ema_student(tiny_teacher_dir, base_dtype: torch.dtype, export_dtype: torch.dtype):
    """(student module, base weights, EMA state) of a LoRA run whose base is in `base_dtype`
    (bf16 on GPUs: the adapters are added after the teacher is placed, so they are fp32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    velocity, _, _ = load_velocity(tiny_teacher_dir)
    velocity.to(base_dtype)
    _, view, _ = lora.networks(velocity, LORA, seed=0, checkpointing=False)
    gen = torch.Generator().manual_seed(3)
    ema = {f"weights.{i}": torch.randn(p.shape, generator=gen) for i, p in enumerate(view.weights)}
    base = {n: p.detach().clone() for n, p in velocity.named_parameters() if "lora_" not in n}

    made: dict[int, int] = {}  # fp32 storages the ops make (not views of their inputs): bytes

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    assert t.device.type == "cpu"
                    made[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return out

    with Made():
        student = lora.student_module(velocity, ema, view, export_dtype)
    live = {p.untyped_storage().data_ptr() for p in student.parameters()}
    return student, base, ema, view, sum(v for k, v in made.items() if k in live)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lora_student_is_built_on_the_cpu_in_the_export_dtype(tiny_teacher_dir, dtype):
    """The base in the export dtype (a bf16 base is never copied to fp32: the only fp32
    tensors made and kept are the EMA adapter's), the adapter in fp32; merged, each target linear is
    W + (alpha / r) B A added once and rounded once to the export dtype."""
    student, base, ema, view, fp32_bytes = _ema_student(tiny_teacher_dir, dtype, dtype)
    if dtype is torch.bfloat16:
        assert fp32_bytes <= sum(t.numel() * 4 for t in ema.values())
    params = dict(student.named_parameters())
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {dtype}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    state = {n: ema[f"weights.{i}"] for i, n in enumerate(view.names)}
    lora.merged(student)
    merged = dict(student.named_parameters())
    scaling = LORA.alpha / LORA.rank
    linears = {n.removesuffix(".lora_A.student.weight") for n in state if ".lora_A." in n}
    assert linears
    for name in linears:
        a, b = state[f"{name}.lora_A.student.weight"], state[f"{name}.lora_B.student.weight"]
        w = base[f"{name}.base_layer.weight"].float()
        assert torch.equal(merged[f"{name}.weight"], (w + (b @ a) * scaling).to(dtype)), name
