"""Two-process checks of the checkpoint store under accelerate launch (gloo on CPU).

argv = mode, ZeRO stage, output JSON path, process-group timeout (s). Rank 0 writes the JSON.
- stale: rank 1's directory listing misses the newest checkpoint (a shared filesystem's
  stale view); resume and the final save_once must still follow rank 0, without a hang.
- resume: a checkpoint at step 3 resumed by fresh engines gives, after steps 4-6, the
  student, fake score and EMA of the uninterrupted run, bit for bit; saving gathers no EMA.
  The checkpoints stay under <out>.ckpt for the `refuse` mode.
- refuse: one process resuming that two-process checkpoint (run without a launcher).
- gather: the EMA module for a preview or the export exists on rank 0 only, equal to the
  full EMA; the other rank keeps nothing and sees one parameter at a time.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from cdm import checkpoints, zero


def tiny() -> torch.nn.Module:
    # Odd sizes, so the flat partitions split tensors across the two ranks.
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def engines(stage: int):
    conf = zero.ds_config(4, stage, False, 1.0)
    opt = dict(warmup=1, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    torch.manual_seed(0)
    student = zero.make_engine(tiny(), 1e-2, config=conf, **opt)
    torch.manual_seed(1)
    fake = zero.make_engine(tiny(), 1e-2, config=conf, **opt)
    return student, fake, zero.PartitionedEMA(student)


def step(student, fake, ema, i: int) -> None:
    for n, engine in enumerate((fake, student)):
        gen = torch.Generator().manual_seed(1000 * i + 10 * n + zero.rank())
        engine.backward(engine(torch.randn(4, 7, generator=gen)).square().mean())
        engine.step()
    zero.blend_engines_(fake, student, 0.9)
    ema.update(0.8)


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shared_root() -> Path:
    root = Path(tempfile.mkdtemp()) if zero.rank() == 0 else None
    return Path(zero.from_rank0(str(root)))


def stale(stage: int) -> dict:
    student, fake, ema = engines(stage)
    root = shared_root()
    for it in (5, 10):
        step(student, fake, ema, it)
        checkpoints.save(root, it, student, fake, ema, 3, zero.rank())
    if zero.rank() == 1:  # this rank's listing has not seen it-10 yet
        listing = checkpoints.completed
        checkpoints.completed = lambda r: [p for p in listing(r) if p.name < "it-0000010"]
    start = checkpoints.load_latest(root, student, fake, ema)
    checkpoints.save_once(root, 10, student, fake, ema, 3, zero.rank())
    return {
        "starts": gathered(start),
        "folders": sorted(p.name for p in root.iterdir()),
    }


def state(student, fake, ema) -> list[torch.Tensor]:
    """Everything a step reads, this rank's part: masters of both engines and the EMA."""
    return [t.clone() for t in zero.local_partitions(student) + zero.local_partitions(fake)] + [
        p.clone() for p in ema.parts
    ]


def resume(stage: int, out: str) -> dict:
    root = Path(out + ".ckpt")
    student, fake, ema = engines(stage)
    gathers = 0
    full = zero.full_fp32_params

    def counted(engine):
        nonlocal gathers
        gathers += 1
        return full(engine)

    zero.full_fp32_params = counted
    for i in range(1, 7):
        step(student, fake, ema, i)
        if i == 3:
            checkpoints.save(root, 3, student, fake, ema, 2, zero.rank())
    zero.full_fp32_params = full
    straight = state(student, fake, ema)
    student, fake, ema = engines(stage)
    start = checkpoints.load_latest(root, student, fake, ema)
    for i in range(start + 1, 7):
        step(student, fake, ema, i)
    again = state(student, fake, ema)
    equal = all(torch.equal(a, b) for a, b in zip(straight, again, strict=True))
    files = sorted(p.name for p in (root / "it-0000003" / "ema").iterdir())
    return {
        "start": start, "bitwise": gathered(equal), "gathers_in_save": gathered(gathers),
        "ema_files": files, "partition_floats": sum(p.numel() for p in ema.parts),
        "model_floats": sum(p.numel() for p in tiny().parameters()),
    }  # fmt: skip


def refuse(stage: int, out: str) -> dict:
    from cdm.cli import StageFailure

    student, fake, ema = engines(stage)
    try:
        checkpoints.load_latest(Path(out + ".ckpt"), student, fake, ema)
    except StageFailure as exc:
        return {"error": str(exc)}
    return {"error": None}


def gather(stage: int) -> dict:
    student, fake, ema = engines(stage)
    for i in range(1, 4):
        step(student, fake, ema, i)
    reference = ema.state_dict()  # the full EMA (every rank gathers it: the reference only)
    largest = max(p.numel() for p in tiny().parameters())
    seen: list[int] = []
    full = zero.full_fp32_params

    def counted(engine):
        for name, value in full(engine):
            seen.append(value.numel())
            yield name, value

    zero.full_fp32_params = counted
    module = ema.module(tiny())
    zero.full_fp32_params = full
    kept = None if module is None else {n: p for n, p in module.named_parameters()}
    equal = kept is not None and all(torch.equal(kept[k], v) for k, v in reference.items())
    return {
        "has_module": gathered(module is not None),
        "equal_on_rank0": equal if zero.rank() == 0 else None,
        "cpu_fp32": kept is not None
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in kept.values()),
        "largest_seen": gathered(max(seen)),
        "largest_param": largest,
    }


def main() -> None:
    mode, stage, out, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    zero.init_distributed(torch.device("cpu"), timeout)
    if mode == "stale":
        result = stale(stage)
    elif mode in ("resume", "refuse"):
        result = {"resume": resume, "refuse": refuse}[mode](stage, out)
    elif mode == "gather":
        result = gather(stage)
    result["world"] = dist.get_world_size()
    if zero.rank() == 0:
        Path(out).write_text(json.dumps(result))
    zero.barrier()


if __name__ == "__main__":
    main()
