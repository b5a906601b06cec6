"""The memory plan's activation rows against a measurement: the live tensor bytes at the peak of
one student iteration (cdm.engine.student_losses and its backward, gradient checkpointing on)
of an SD3 transformer at reduced width and depth, on the CPU in fp32, full and LoRA modes."""

from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from cdm import engine, lora, plan
from cdm import params as P
from cdm.conditioning import Condition
from cdm.rollout import rollout
from cdm.schedules import draw_anchor
from cdm.velocity import TransformerVelocity
from tests.conftest import ROOT

# SD3-Medium's depth (24 blocks: the stash weighs against the teacher's call as at full size)
# at width 128, 32x32 latents (256 image tokens) and 77 text tokens.
CONFIG = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
    caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=16,
)  # fmt: skip
TEXT_TOKENS, BATCH = 77, 2
TOLERANCE = 0.15


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops make (not views of their inputs), summed while any
    tensor on them lives; `peak` is the largest sum seen after an op."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage address: bytes
        self.refs: dict[int, int] = {}  # storage address: live tensors on it
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.live.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.live:
                if key in inputs:  # a view of a tensor made before the measurement
                    continue
                self.live[key] = t.untyped_storage().nbytes()
                self.refs[key] = 0
                self.now += self.live[key]
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


def _measure(lora_mode: bool) -> tuple[float, float]:
    """(measured peak bytes, the plan's activation + latent rows) of one iteration."""
    torch.manual_seed(0)
    teacher = TransformerVelocity(SD3Transformer2DModel(**CONFIG)).requires_grad_(False).eval()
    base = P.load(ROOT / "params.yaml")
    cfg = base.distill.model_copy(update={"batch_size": BATCH, "k_max": 2})
    if lora_mode:
        teacher, student, fake = lora.networks(teacher, P.Lora(), seed=0, checkpointing=True)
    else:
        student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
        student.requires_grad_(True).train().transformer.enable_gradient_checkpointing()
    for p in student.parameters():  # DeepSpeed takes each gradient into its bucket as it is
        if p.requires_grad:  # made (the plan's gradient rows): none is left on the module
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    gen = torch.Generator().manual_seed(1)
    width = CONFIG["joint_attention_dim"]
    cond = Condition(
        torch.randn(BATCH, TEXT_TOKENS, width, generator=gen),
        torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=gen),
    )
    null = Condition(torch.zeros(1, TEXT_TOKENS, width), torch.zeros(1, cond.pooled.shape[1]))
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    noise = torch.randn(BATCH, 16, 32, 32, generator=gen)
    roll = rollout(student, noise, sigmas, cond, draw_anchor(2, BATCH, gen))
    method = base.methods["cdm"]  # CA, DM and CDM: the teacher's call on 4 B samples
    assert method.ca and method.dm and method.cdm
    tracker = LiveBytes()
    # LoRA: the backward's recomputed blocks run the student adapter (engine.update's way)
    adapter_on = (
        lora.active(teacher.shared, lora.STUDENT) if lora_mode else contextlib.nullcontext()
    )
    with tracker:
        losses = engine.student_losses(student, teacher, fake, roll, cond, null, method, cfg, gen)
        with adapter_on:
            losses.total.backward()
    adapter = plan.adapter_parameters("sd3", CONFIG, P.Lora()) if lora_mode else 0
    params, block, blocks = plan.count_parameters("sd3", CONFIG)
    hidden = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    model = plan.Model(
        "reduced", params, block, blocks, hidden, 16 * 16, TEXT_TOKENS, width, 16 * 32 * 32,
        adapter,
    )  # fmt: skip
    rows = plan.estimate(model, BATCH, gpus=1, zero=2, weight_bytes=4)
    return tracker.peak, rows["activations"] + rows["latents and loss tensors (fp32)"]


@pytest.mark.parametrize("lora_mode", [False, True], ids=["full", "lora"])
def test_the_plans_activations_are_the_live_bytes_of_an_iteration(lora_mode):
    measured, planned = _measure(lora_mode)
    assert planned == pytest.approx(measured, rel=TOLERANCE), (measured / 2**20, planned / 2**20)
