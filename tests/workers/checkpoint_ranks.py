"""Two-process checks of the checkpoint store under accelerate launch (gloo on CPU).

argv = mode, ZeRO stage, output JSON path, process-group timeout (s). Rank 0 writes the JSON.
- stale: rank 1's directory listing misses the newest checkpoint (a shared filesystem's
  stale view); resume and the final save_once must still follow rank 0, without a hang.
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


def main() -> None:
    mode, stage, out, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    zero.init_distributed(torch.device("cpu"), timeout)
    result = {"stale": stale}[mode](stage) | {"world": dist.get_world_size()}
    if zero.rank() == 0:
        Path(out).write_text(json.dumps(result))
    zero.barrier()


if __name__ == "__main__":
    main()
