"""The training iteration as the authors run it (docs/method.md): order, EMA count, non-finite
values and data-parallel schedules, on a tiny teacher, in this process (one gloo rank)."""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import time
from pathlib import Path

import deepspeed
import pytest
import torch

from cdm import engine, preemption, zero
from cdm import params as P
from cdm.backends.shapes import load_velocity
from cdm.conditioning import Condition
from cdm.velocity import TransformerVelocity
from tests.conftest import ROOT


def _cfg(**distill) -> P.Distill:
    base = P.load(ROOT / "params.yaml").distill
    tiny = {"batch_size": 3, "k_max": 4, "warmup": 1, "checkpoint_every": 1, "iterations": 2}
    return base.model_copy(update=tiny | distill)


def _method(name: str = "cdm") -> P.Method:
    return P.load(ROOT / "params.yaml").methods[name]


class Poisoned(TransformerVelocity):
    """A velocity network whose output holds NaNs in one mode: `train` poisons the student
    and the fake score (the engine trains them), `eval` poisons the frozen teacher."""

    def __init__(self, inner: TransformerVelocity, mode: str):
        super().__init__(inner.transformer)
        self.mode = mode

    def forward(self, x, sigma, cond):
        out = super().forward(x, sigma, cond)
        if self.mode == ("train" if self.training else "eval"):
            out = out.clone()
            out[:, 0, 0, 0] = float("nan")
        return out


def _train(root: Path, teacher_dir: Path, cfg: P.Distill, method="cdm", wrap=None, stop=None):
    velocity, shift, shape = load_velocity(teacher_dir)
    if wrap is not None:
        velocity = Poisoned(velocity, wrap)
    width = velocity.transformer.config.joint_attention_dim
    gen = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(6, 5, width, generator=gen), torch.randn(6, width, generator=gen))
    null = Condition(torch.zeros(1, 5, width), torch.zeros(1, width))
    paths = engine.RunPaths(root / "ckpt", root / "ckpt" / "train.csv")
    ema = engine.train(
        velocity, cond, null, shift, shape, _method(method), cfg, paths, 0, torch.device("cpu"),
        {}, stop,
    )  # fmt: skip
    return ema, paths


def _rows(paths: engine.RunPaths) -> list[dict[str, str]]:
    with open(paths.log_csv, newline="") as f:
        return list(csv.DictReader(f))


def test_fake_score_step_comes_before_the_student_step(tmp_path, tiny_teacher_dir, monkeypatch):
    """One rollout; the fake-score step and blend; then the student step on the same rollout,
    reading the fake score just updated."""
    calls: list[tuple[str, int]] = []
    fake_step, student_step = engine.fake_score_step_loss, engine.student_losses

    def fake_spy(fake, roll, *args):
        calls.append(("fake", id(roll)))
        return fake_step(fake, roll, *args)

    def student_spy(student, teacher, fake, roll, *args):
        # The fake score the student reads already holds this iteration's update.
        calls.append(("student", id(roll)))
        weights = torch.cat([p.detach().flatten() for p in fake.parameters()])
        seen.append(weights.clone())
        return student_step(student, teacher, fake, roll, *args)

    seen: list[torch.Tensor] = []
    monkeypatch.setattr(engine, "fake_score_step_loss", fake_spy)
    monkeypatch.setattr(engine, "student_losses", student_spy)
    _train(tmp_path, tiny_teacher_dir, _cfg(iterations=4, update_ratio=2))
    assert [c[0] for c in calls] == ["fake", "fake", "student", "fake", "fake", "student"]
    assert calls[1][1] == calls[2][1] and calls[4][1] == calls[5][1]  # the same rollout
    assert not torch.equal(seen[0], seen[1])


def test_ema_counts_student_updates_from_one(tmp_path, tiny_teacher_dir):
    """After the first student update the EMA is 2/11 teacher + 9/11 student (n = 1)."""
    cfg = _cfg(iterations=2, update_ratio=2, lr_student=1e-2)
    ema, paths = _train(tmp_path, tiny_teacher_dir, cfg)
    state = torch.load(
        next(paths.checkpoints.glob("it-0000002/student/state/*model_states.pt")),
        map_location="cpu",
        weights_only=False,
    )["module"]
    teacher, _, _ = load_velocity(tiny_teacher_dir)
    t = dict(teacher.named_parameters())
    worst, moved = 0.0, 0.0
    for name, e in ema.named_parameters():
        student = state[name].float()
        expected = 2 / 11 * t[name].detach() + 9 / 11 * student
        worst = max(worst, (e - expected).abs().max().item())
        moved = max(moved, (student - t[name]).abs().max().item())
    assert moved > 1e-3  # the 1/10 count would miss by ~0.08 x moved
    assert worst <= 1e-6


def test_teacher_nans_are_replaced_and_counted(tmp_path, tiny_teacher_dir):
    cfg = _cfg(iterations=4, update_ratio=2)
    _, paths = _train(tmp_path, tiny_teacher_dir, cfg, wrap="eval")
    rows = _rows(paths)
    for row in rows:
        # One NaN per teacher sample-evaluation, none on fake-only iterations; losses finite.
        assert int(row["n_nonfinite"]) == int(row["n_teacher_evals"])
        assert all(
            torch.isfinite(torch.tensor(float(row[c])))
            for c in ("loss_fake", "loss_ca", "loss_dm", "loss_cdm")
            if row[c]
        )
    assert sum(int(r["n_nonfinite"]) for r in rows) == 2 * 4 * cfg.batch_size


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "train.csv"
    }


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_non_finite_streak_stops_the_run_and_keeps_the_good_checkpoint(
    tmp_path, tiny_teacher_dir, accumulation
):
    cfg = _cfg(iterations=12, update_ratio=2, max_nonfinite=3, accumulation=accumulation)
    _train(tmp_path, tiny_teacher_dir, cfg, stop=4)
    before = _digest(tmp_path / "ckpt")
    assert any(k.startswith("it-0000004/") for k in before)
    with pytest.raises(engine.TrainingDiverged) as err:
        _train(tmp_path, tiny_teacher_dir, cfg, wrap="train")  # resumes at 4, then NaNs
    message = str(err.value)
    assert "\n" not in message and "3 consecutive iterations" in message
    assert "it-0000004" in message and "iteration 7" in message
    assert _digest(tmp_path / "ckpt") == before  # no update was taken, nothing saved
    rows = _rows(engine.RunPaths(tmp_path / "ckpt", tmp_path / "ckpt" / "train.csv"))
    assert [r["iteration"] for r in rows] == [str(i) for i in range(1, 8)]
    assert all(r["loss_fake"] == "nan" and r["grad_norm_fake"] == "" for r in rows[4:])


def test_ranks_share_k_but_draw_their_own_sigmas():
    cfg, method = _cfg(k_min=3, k_max=12), _method("cdm")
    for it in range(5):
        shared = [engine.generator(0, it) for _ in range(2)]
        own = [engine.generator(0, it, rank + 1) for rank in range(2)]
        a, b = (
            engine.schedule_for(method, cfg, 3.0, s, o) for s, o in zip(shared, own, strict=True)
        )
        assert len(a) == len(b)  # K agrees: the ranks run the same number of forwards
        assert a[0] == b[0] == 1.0 and a[-1] == b[-1] == 0.0
        assert not torch.equal(a, b)  # the inner sigmas are each rank's own
        again = engine.schedule_for(
            method, cfg, 3.0, engine.generator(0, it), engine.generator(0, it, 2)
        )
        assert torch.equal(again, b)  # reproducible from (seed, iteration, rank)
    fixed = _method("dmd2")
    gens = [(engine.generator(0, 0), engine.generator(0, 0, r + 1)) for r in range(2)]
    a, b = (engine.schedule_for(fixed, cfg, 3.0, s, o) for s, o in gens)
    assert torch.equal(a, b)  # DMD2's schedule is the inference one on every rank


def test_near_the_slurm_limit_the_run_checkpoints_and_exits(
    tmp_path, tiny_teacher_dir, monkeypatch
):
    """Less than distill.stop_before_limit seconds left: checkpoint now, stop for a retry."""
    monkeypatch.setattr(preemption, "slurm_end_time", lambda: time.time() + 100)
    cfg = _cfg(iterations=8, update_ratio=2, stop_before_limit=600, checkpoint_every=100)
    with pytest.raises(preemption.Preempted, match="the SLURM time limit at iteration 1"):
        _train(tmp_path, tiny_teacher_dir, cfg)
    assert (tmp_path / "ckpt/it-0000001/state.json").is_file()
    monkeypatch.setattr(preemption, "slurm_end_time", lambda: time.time() + 10_000)
    _train(tmp_path, tiny_teacher_dir, cfg)  # the retry resumes and finishes
    assert [
        r["iteration"]
        for r in _rows(engine.RunPaths(tmp_path / "ckpt", tmp_path / "ckpt/train.csv"))
    ] == [str(i) for i in range(1, 9)]


# --- several micro-batches per process (distill.accumulation) ------------------------------


def test_virtual_ranks_are_the_ranks_a_process_stands_for():
    assert list(engine.virtual_ranks(0, 1)) == [0] and list(engine.virtual_ranks(3, 1)) == [3]
    # Two processes of two micro-batches draw as four processes of one.
    assert [list(engine.virtual_ranks(r, 2)) for r in range(2)] == [[0, 1], [2, 3]]


def _linear_engines(n: int, accumulation: int, stage: int = 2, warmup: int = 2):
    zero.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    conf = zero.ds_config(1, stage, False, 1.0, {}, accumulation)
    opt = dict(warmup=warmup, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    return [zero.make_engine(copy.deepcopy(model), 0.1, config=conf, **opt) for _ in range(n)]


def _weights(eng) -> list[torch.Tensor]:
    return [w.clone() for _, w in zero.full_fp32_params(eng)]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_non_finite_micro_batch_discards_the_whole_accumulated_step(stage, monkeypatch):
    """The first micro-batch is accumulated before the second is known: a non-finite one must
    discard both, and leave nothing (gradients, Adam's step count, warm-up) to the next step."""
    # A ZeRO-3 engine built on a bare module swaps torch.nn.functional.linear for its own
    # for good (which TorchScript cannot compile): put it back after this test.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    poisoned, clean = _linear_engines(2, accumulation=2, stage=stage)
    start = _weights(poisoned)

    def loss(eng, nan_at: int | None = None):
        # A NaN that reaches the loss but not the gradient: only the engine's own check
        # (the last backward made non-finite) can discard this step.
        return lambda i: eng(x[i : i + 1]).pow(2).sum() + (math.nan if i == nan_at else 0.0)

    _, taken = engine.update(poisoned, [0, 1], loss(poisoned, nan_at=0))
    assert not taken
    assert all(torch.equal(a, b) for a, b in zip(_weights(poisoned), start, strict=True))
    _, taken = engine.update(poisoned, [2, 3], loss(poisoned))
    assert taken and not all(
        torch.equal(a, b) for a, b in zip(_weights(poisoned), start, strict=True)
    )
    # The clean engine takes only that second step: the same weights, bit for bit.
    assert engine.update(clean, [2, 3], loss(clean))[1]
    assert all(torch.equal(a, b) for a, b in zip(_weights(poisoned), _weights(clean), strict=True))
    # A non-finite last micro-batch is discarded the same way.
    before = _weights(clean)
    assert not engine.update(clean, [0, 1], loss(clean, nan_at=1))[1]
    assert all(torch.equal(a, b) for a, b in zip(_weights(clean), before, strict=True))


def test_two_micro_batches_step_on_their_mean_loss():
    """DeepSpeed scales each micro-batch's loss by 1 / accumulation: one step of two
    micro-batches equals one step of their mean in a single batch."""
    (accumulated,) = _linear_engines(1, accumulation=2)
    (whole,) = _linear_engines(1, accumulation=1)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    assert engine.update(accumulated, [0, 1], lambda i: accumulated(x[i : i + 1]).pow(2).sum())[1]
    assert engine.update(whole, [None], lambda _: whole(x).pow(2).sum(1).mean())[1]
    for a, b in zip(_weights(accumulated), _weights(whole), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_run_of_two_micro_batches_resumes_to_the_uninterrupted_one(tmp_path, tiny_teacher_dir):
    """DeepSpeed's micro-step count starts again at a checkpoint (one per iteration): the
    resumed run accumulates the same micro-batches into the same steps."""
    cfg = _cfg(iterations=4, update_ratio=1, accumulation=2)
    straight, _ = _train(tmp_path / "straight", tiny_teacher_dir, cfg)
    _train(tmp_path / "resumed", tiny_teacher_dir, cfg, stop=2)
    resumed, _ = _train(tmp_path / "resumed", tiny_teacher_dir, cfg)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another run: the same weights with one micro-batch would be a coincidence.
    single, _ = _train(
        tmp_path / "single", tiny_teacher_dir, cfg.model_copy(update={"accumulation": 1})
    )
    assert not all(torch.equal(a[k], single.state_dict()[k]) for k in a)


def _bf16_sgd_engine(accumulation: int, stage: int, fp32_accumulation: bool):
    """A one-weight bf16 engine under SGD (lr 1): its step is exactly minus the accumulated
    gradient, so the accumulation's rounding shows in the fp32 master."""
    zero.init_distributed(torch.device("cpu"))
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    conf = zero.ds_config(1, stage, True, 0.0, {}, accumulation)
    if not fp32_accumulation:
        conf["data_types"] = {"grad_accum_dtype": "bf16"}  # DeepSpeed's default: the model's
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
    return eng


def test_bf16_accumulation_is_refused_where_deepspeed_cannot_sum_in_fp32(monkeypatch):
    assert zero._zero_accumulates_in_fp32()  # the pinned DeepSpeed can
    monkeypatch.setattr(zero, "_zero_accumulates_in_fp32", lambda: False)
    with pytest.raises(ValueError, match="sums gradients in fp32"):
        zero.ds_config(1, 2, True, 0.0, {}, 2)
    assert "data_types" not in zero.ds_config(1, 2, True, 0.0, {}, 1)  # one micro-batch: none


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_micro_batches_accumulate_in_fp32(stage, monkeypatch):
    """Each micro-batch's gradient is x / 2 (DeepSpeed scales the loss by 1 / accumulation),
    exact in bf16: 1/2 and 2^-10. Their fp32 sum 1/2 + 2^-10 is the step; in bf16 (8 bits of
    significand) the 2^-10 is below half an ulp of 1/2 (2^-9) and vanishes."""
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    assert zero.ds_config(1, stage, True, 0.0, {}, 2)["data_types"] == {"grad_accum_dtype": "fp32"}
    x = torch.tensor([[1.0], [2.0**-9]])

    def step(eng) -> float:
        loss = lambda i: eng(x[i : i + 1].to(torch.bfloat16)).sum()  # noqa: E731
        assert engine.update(eng, [0, 1], loss)[1]
        ((_, w),) = zero.full_fp32_params(eng)
        return w.item()

    assert step(_bf16_sgd_engine(2, stage, fp32_accumulation=True)) == -(0.5 + 2.0**-10)
    assert step(_bf16_sgd_engine(2, stage, fp32_accumulation=False)) == -0.5
