"""DeepSpeed ZeRO plumbing: engines, full-precision parameter access, the in-ZeRO blend.

Under ZeRO the module's parameters are not the weights the optimizer updates: the fp32
master copies live in the optimizer (sharded across ranks), and at stage 3 the module's
own parameters are shards too. Writing into the module alone would be overwritten at
the next optimizer step, so the fake-score blend writes both the master and the module.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_local_fp32_param,
    safe_set_full_fp32_param,
    safe_set_local_fp32_param,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int, dict[str, Any] | None]:
    """Join the process group accelerate launched (NCCL on GPU, gloo on CPU), or create a
    one-process group when run alone. Returns (rank, world size, accelerate's DeepSpeed
    config if it launched with one)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    backend = "nccl" if device.type == "cuda" else "gloo"
    plugin = None
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # started by a launcher
        kwargs = InitProcessGroupKwargs(backend=backend)
        plugin = getattr(Accelerator(kwargs_handlers=[kwargs]).state, "deepspeed_plugin", None)
    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size(), plugin.deepspeed_config if plugin else None


def ds_config(
    micro_batch: int, stage: int, bf16: bool, grad_clip: float, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """DeepSpeed config: the file's settings (configs/deepspeed/) overridden by params."""
    config = dict(base or {})
    config |= {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no fused-kernel build
        "steps_per_print": 2**31 - 1,
    }
    config["zero_optimization"] = dict(config.get("zero_optimization", {})) | {"stage": stage}
    return config


def make_engine(
    model: torch.nn.Module,
    lr: float,
    warmup: int,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    config: dict[str, Any],
) -> deepspeed.DeepSpeedEngine:
    """One DeepSpeed engine per trained model, with its own AdamW and warm-up schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def full_fp32_params(engine: deepspeed.DeepSpeedEngine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 master weight) of every trained parameter; collective under ZeRO."""
    for name, p in engine.module.named_parameters():
        value = safe_get_full_fp32_param(p)
        yield name, (p.detach().float() if value is None else value)


@torch.no_grad()
def blend_engines_(
    target: deepspeed.DeepSpeedEngine, source: deepspeed.DeepSpeedEngine, keep: float
) -> None:
    """target <- keep * target + (1 - keep) * source, in the optimizer's fp32 masters and the module.

    The two engines hold the same architecture with the same ZeRO partitioning, so at
    stage 3 the blend runs shard against shard with no communication.
    """
    for pt, ps in zip(target.module.parameters(), source.module.parameters(), strict=True):
        if is_zero3(pt):
            new = safe_get_local_fp32_param(pt).lerp(safe_get_local_fp32_param(ps), 1 - keep)
            safe_set_local_fp32_param(pt, new)
            pt.ds_tensor.data.copy_(new.to(pt.ds_tensor.dtype))
            continue
        full_t, full_s = safe_get_full_fp32_param(pt), safe_get_full_fp32_param(ps)
        if full_t is None:  # not managed by a ZeRO optimizer
            pt.data.lerp_(ps.data.to(pt.dtype), 1 - keep)
            continue
        new = full_t.lerp(full_s, 1 - keep)
        safe_set_full_fp32_param(pt, new)
        pt.data.copy_(new.to(pt.dtype))


def all_reduce_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank: all ranks then skip or take a step together."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (a signal may reach one process first)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
