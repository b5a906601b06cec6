"""DeepSpeed ZeRO plumbing: engines, full-precision parameter access, the in-ZeRO blend.

Under ZeRO the module's parameters are not the weights the optimizer updates: the fp32
master copies live in the optimizer (sharded across ranks), and at stage 3 the module's
own parameters are shards too. Writing into the module alone would be overwritten at
the next optimizer step, so the fake-score blend writes both the master and the module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_local_fp32_param,
    safe_set_full_fp32_param,
)

from cdm.nodes import free_port


def init_distributed(
    device: torch.device, timeout_s: float = 1800
) -> tuple[int, int, dict[str, Any] | None]:
    """Join the process group accelerate launched (NCCL on GPU, gloo on CPU), or create a
    one-process group when run alone. Returns (rank, world size, accelerate's DeepSpeed
    config if it launched with one).

    `timeout_s` (distill.process_group_timeout): how long a collective waits for a rank
    busy alone, e.g. rank 0 writing a checkpoint's manifest, before the run fails."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    plugin = None
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # started by a launcher
        kwargs = InitProcessGroupKwargs(backend=backend, timeout=timeout)
        plugin = getattr(Accelerator(kwargs_handlers=[kwargs]).state, "deepspeed_plugin", None)
    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), plugin.deepspeed_config if plugin else None


def ds_config(
    micro_batch: int,
    stage: int,
    bf16: bool,
    grad_clip: float,
    base: dict[str, Any] | None = None,
    accumulation: int = 1,
) -> dict[str, Any]:
    """DeepSpeed config: the file's settings (configs/deepspeed/) overridden by params.

    bf16 checks its gradients for overflow: a step over accumulated micro-batches with a
    non-finite one is discarded by DeepSpeed (`cdm.engine.update`), and sums them in fp32
    (data_types.grad_accum_dtype; DeepSpeed's default is the model's dtype, where a
    micro-batch's gradient under half an ulp of the running sum is lost): 4 P / N bytes
    per engine (cdm.plan)."""
    config = dict(base or {})
    config |= {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no fused-kernel build
        "steps_per_print": 2**31 - 1,
    }
    config["zero_optimization"] = dict(config.get("zero_optimization", {})) | {"stage": stage}
    if bf16 and accumulation > 1:
        if not _bf16_checks_overflow():
            raise ValueError(
                "distill.accumulation > 1 in bf16 needs a DeepSpeed whose bf16 config has "
                "check_grad_overflow (to discard a step with a non-finite micro-batch); upgrade "
                "deepspeed or set distill.accumulation: 1"
            )
        config["bf16"]["check_grad_overflow"] = True
        if not _zero_accumulates_in_fp32():
            raise ValueError(
                "distill.accumulation > 1 in bf16 needs a DeepSpeed whose ZeRO-2/3 sums "
                "gradients in fp32 (data_types.grad_accum_dtype); upgrade deepspeed or set "
                "distill.accumulation: 1"
            )
        config["data_types"] = dict(config.get("data_types", {})) | {"grad_accum_dtype": "fp32"}
    return config


def _bf16_checks_overflow() -> bool:
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:  # older releases: no such check
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields


def _zero_accumulates_in_fp32() -> bool:
    """Whether this DeepSpeed's ZeRO optimizers take a gradient-accumulation dtype other than
    the model's (older releases refuse bf16 weights with fp32 accumulation at ZeRO-2/3)."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    check = inspect.getsource(DeepSpeedEngine._do_optimizer_sanity_check)
    takes = "gradient_accumulation_dtype" in inspect.signature(DeepSpeedZeroOptimizer).parameters
    return takes and "must be equal to use ZeRO" not in check


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


def local_partitions(engine: deepspeed.DeepSpeedEngine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group: what its optimizer
    updates (ZeRO-1/2: single_partition_of_fp32_groups; ZeRO-3: fp32_partitioned_groups_flat)."""
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        parts = getattr(opt, attr, None)
        if parts:
            return list(parts)
    raise RuntimeError(f"{type(opt).__name__} holds no fp32 partitions; expected a ZeRO optimizer")


@torch.no_grad()
def blend_engines_(
    target: deepspeed.DeepSpeedEngine, source: deepspeed.DeepSpeedEngine, keep: float
) -> None:
    """target <- keep * target + (1 - keep) * source, in the optimizer's fp32 masters and the module.

    The two engines hold the same architecture with the same ZeRO partitioning, so the blend
    runs partition against partition on each rank: one lerp per parameter group, no
    communication. The module then follows the blended masters (`_refresh_module_`).
    """
    for t, s in zip(local_partitions(target), local_partitions(source), strict=True):
        t.lerp_(s, 1 - keep)
    _refresh_module_(target, source, keep)


def _refresh_module_(
    target: deepspeed.DeepSpeedEngine, source: deepspeed.DeepSpeedEngine, keep: float
) -> None:
    """The module's weights after the masters were blended.

    In bf16 a lerp by 1 - keep = 0.001 is below the weights' rounding: the module is
    rewritten from the blended fp32 masters instead, as an optimizer step does (ZeRO-1/2:
    each rank's partition cast, then all-gathered; ZeRO-3: each shard cast, parameters held
    whole read back from the gathered master). In fp32 the module whole on every rank
    (ZeRO-1/2, ZeRO-3's persistent parameters) is lerped the masters' way, locally."""
    first = next(target.module.parameters())
    bit16 = first.dtype != torch.float32
    if bit16 and not is_zero3(first):  # ZeRO-1/2: the module is views of its flat bf16 groups
        target.optimizer.update_lp_params()
        return
    for pt, ps in zip(target.module.parameters(), source.module.parameters(), strict=True):
        if is_zero3(pt):
            pt.ds_tensor.data.copy_(safe_get_local_fp32_param(pt).to(pt.ds_tensor.dtype))
            if pt.data.numel() == 0:
                continue  # partitioned: the next gather reads the blended shard
            if bit16 or ps.data.shape != pt.data.shape:
                # Whole here (persistent, or still gathered; the same parameters on every
                # rank): the blended master, gathered.
                pt.data.copy_(safe_get_full_fp32_param(pt).to(pt.dtype))
                continue
        pt.data.lerp_(ps.data.to(pt.dtype), 1 - keep)


class PartitionedEMA:
    """The student's EMA, held as its optimizer holds the master weights: each rank keeps only
    its own fp32 partitions (P / N floats instead of P), updated partition against partition.

    Full tensors exist only while a checkpoint, a preview or the export needs them
    (state_dict / module: collective, every rank calls them)."""

    def __init__(self, engine: deepspeed.DeepSpeedEngine) -> None:
        self.engine = engine
        self.parts = [t.detach().clone() for t in local_partitions(engine)]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """EMA <- decay EMA + (1 - decay) G, G the student's fp32 master weights."""
        for e, g in zip(self.parts, local_partitions(self.engine), strict=True):
            e.lerp_(g, 1 - decay)

    @contextlib.contextmanager
    def _in_engine(self) -> Iterator[list[torch.Tensor]]:
        """The engine's partitions hold the EMA for a moment (DeepSpeed's own mapping from
        partitions to parameters then reads or writes it); the student's come back after."""
        live = local_partitions(self.engine)
        saved = [t.clone() for t in live]
        for t, e in zip(live, self.parts, strict=True):
            t.copy_(e)
        try:
            yield live
        finally:
            for t, s in zip(live, saved, strict=True):
                t.copy_(s)

    def partitions(self) -> dict[str, torch.Tensor]:
        """This rank's EMA partitions on the CPU, what a checkpoint stores per rank (4 P / N
        bytes; nothing gathered); local."""
        return {f"group-{i}": p.detach().cpu().clone() for i, p in enumerate(self.parts)}

    @torch.no_grad()
    def load_partitions(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's partitions back from `partitions()` of a run of the same world size."""
        if len(state) != len(self.parts):
            raise ValueError(f"{len(state)} EMA partitions saved, {len(self.parts)} expected")
        for i, part in enumerate(self.parts):
            part.copy_(state[f"group-{i}"])

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: full fp32 tensor on the CPU}; collective."""
        with self._in_engine():
            return {name: full.cpu().clone() for name, full in full_fp32_params(self.engine)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Partition full tensors (a checkpoint's) into this rank's EMA; collective."""
        with self._in_engine() as live:
            for name, p in self.engine.module.named_parameters():
                value = state[name].to(live[0].device, torch.float32)
                if is_zero3(p):  # this rank's slice (DeepSpeed's setter fails on the last rank)
                    local = safe_get_local_fp32_param(p)
                    flat = value.flatten()[rank() * local.numel() :][: local.numel()]
                    local[: flat.numel()].copy_(flat)
                else:
                    safe_set_full_fp32_param(p, value)
            self.parts = [t.clone() for t in live]

    @torch.no_grad()
    def module(self, template: torch.nn.Module) -> torch.nn.Module | None:
        """The EMA weights in an fp32 copy of `template` on the CPU, on rank 0 only (preview,
        export); None on the other ranks. Collective: parameter by parameter, so no rank
        holds more than one full tensor on its device at a time, and only rank 0 keeps any
        (4 P bytes of its host memory)."""
        out = cpu_fp32_copy(template).requires_grad_(False).eval() if rank() == 0 else None
        into = dict(out.named_parameters()) if out is not None else {}
        with self._in_engine():
            for name, full in full_fp32_params(self.engine):
                if out is not None:
                    into[name].copy_(full)
        return out


def cpu_fp32_copy(template: torch.nn.Module) -> torch.nn.Module:
    """A copy of `template` on the CPU with fp32 parameters left to fill (its buffers copied)."""
    return _cpu_copy(template, torch.float32, values=False)


def cpu_copy(template: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `template` with its values on the CPU in `dtype`, read tensor by tensor from
    wherever `template` lives (nothing duplicated on its device)."""
    return _cpu_copy(template, dtype, values=True)


def trainable_copy(
    teacher: torch.nn.Module, dtype: torch.dtype, config: dict[str, Any]
) -> torch.nn.Module:
    """A trainable copy of the teacher (the student, the fake score), built on the CPU in
    `dtype`: bf16 on GPUs, the dtype DeepSpeed casts the module to anyway, so no device ever
    holds an fp32 copy (DeepSpeed's fp32 masters come from these bf16 weights, as before).

    At ZeRO-3 no rank holds it whole, on its device or its host: the parameters are allocated
    unwritten (a large tensor's untouched pages take no host memory), then each is filled
    and partitioned in turn, in the order deepspeed.zero.Init(module=) would take them, so a
    rank holds its partitions and one full parameter. Eight ranks of a node each building a
    whole copy first would need 8 x 2 x 12.5 GB of host memory for LongCat-Image's two."""
    if config["zero_optimization"]["stage"] != 3:
        return _cpu_copy(teacher, dtype, values=True).requires_grad_(True).train()
    model = _cpu_copy(teacher, dtype, values=False).requires_grad_(True).train()
    # mem_efficient_linear=False: leave torch's linear alone (the teacher runs outside ZeRO).
    init = functools.partial(
        deepspeed.zero.Init, config_dict_or_path=config, mem_efficient_linear=False
    )
    with torch.no_grad():
        for param, source in zip(model.parameters(), teacher.parameters(), strict=True):
            param.copy_(source)
            holder = torch.nn.Module()
            holder.register_parameter("weight", param)
            init(module=holder)
    init(module=model)  # converts nothing more; keeps the buffers it names in fp32
    return model


def _cpu_copy(template: torch.nn.Module, dtype: torch.dtype, values: bool) -> torch.nn.Module:
    """`template` copied onto the CPU in `dtype`, its weights wherever they live (maybe a
    GPU) never duplicated there; `values=False` leaves the parameters to fill."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        kind = dtype if t.is_floating_point() else t.dtype
        return t.detach().to("cpu", kind, copy=True) if values else torch.empty(t.shape, dtype=kind)

    memo: dict[int, Any] = {id(p): torch.nn.Parameter(cast(p)) for p in template.parameters()}
    for b in template.buffers():
        memo[id(b)] = b.detach().to("cpu", dtype if b.is_floating_point() else b.dtype, copy=True)
    return copy.deepcopy(template, memo)


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


T = TypeVar("T")


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank. Decisions read from a shared filesystem (which
    checkpoint to resume, whether one is still to write) are rank 0's alone: another rank's
    listing may be stale, and ranks that disagree on a collective hang in it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
