"""Two-process check of the partition-local blend and EMA against full-gather references.

Run by tests/test_zero_partitions.py under `accelerate launch --num_processes 2` (gloo on
CPU): argv = ZeRO stage, output JSON path[, "bf16"]. Rank 0 writes the largest differences.
With bf16 the module runs in bf16 (fp32 masters in the optimizer), as on a GPU.
"""

from __future__ import annotations

import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param

from cdm import zero


def tiny() -> torch.nn.Module:
    # Odd sizes, so the flat partitions split tensors across the two ranks.
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def full(engine) -> dict[str, torch.Tensor]:
    """The reference: every parameter's full fp32 master (one collective per tensor)."""
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def step(engine, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 100 * zero.rank())
    x = torch.randn(4, 7, generator=gen).to(next(engine.module.parameters()).dtype)
    engine.backward(engine(x).float().square().mean())
    engine.step()


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    bf16 = sys.argv[3:] == ["bf16"]
    device = torch.device("cpu")
    _, world, _ = zero.init_distributed(device)
    conf = zero.ds_config(4, stage, bf16, 1.0)
    opt = dict(warmup=1, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    torch.manual_seed(0)
    model = tiny()
    student = zero.make_engine(model, 1e-2, config=conf, **opt)
    torch.manual_seed(0)
    fake = zero.make_engine(tiny(), 1e-2, config=conf, **opt)
    ema = zero.PartitionedEMA(student)
    reference = full(student)
    result: dict[str, float] = {"world": world}

    diffs = {"blend": 0.0, "blend_module": 0.0, "ema": 0.0}
    for i in range(3):
        step(fake, 2 * i)
        step(student, 2 * i + 1)
        # Blend: the old full-gather formula, then the partition-local one.
        keep = 0.999 if bf16 else 0.7  # bf16: the recipe's blend, below bf16's rounding
        want = {k: v.lerp(full(student)[k], 1 - keep) for k, v in full(fake).items()}
        zero.blend_engines_(fake, student, keep)
        diffs["blend"] = max(diffs["blend"], worst(full(fake), want))
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(fake.module.parameters())):
                module = {n: p.detach().clone() for n, p in fake.module.named_parameters()}
        else:
            module = {n: p.detach().clone() for n, p in fake.module.named_parameters()}
        # The module holds the blended masters at its own precision (bf16: cast from fp32).
        want_module = {k: v.to(module[k].dtype) for k, v in want.items()}
        diffs["blend_module"] = max(diffs["blend_module"], worst(module, want_module))
        # EMA: the old replicated update, then the partitioned one.
        decay = 0.9 - 0.1 * i
        current = full(student)
        reference = {k: v.lerp(current[k], 1 - decay) for k, v in reference.items()}
        ema.update(decay)
        diffs["ema"] = max(diffs["ema"], worst(ema.state_dict(), reference))
    # A checkpoint round trip: full tensors in, the same partitions out.
    again = zero.PartitionedEMA(student)
    again.load_state_dict(ema.state_dict())
    diffs["ema_reload"] = max(
        (a - b).abs().max().item() for a, b in zip(again.parts, ema.parts, strict=True)
    )
    # The student's own masters came back after each gather.
    diffs["student_untouched"] = worst(full(student), current)
    result |= diffs
    result["partition_floats"] = sum(p.numel() for p in ema.parts)
    result["model_floats"] = sum(p.numel() for p in model.parameters())
    write_result(out, result)


def write_result(out: str, result: dict) -> None:
    """Rank 0 writes the JSON; every rank waits for it (collective)."""
    if zero.rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    zero.barrier()


if __name__ == "__main__":
    main()
