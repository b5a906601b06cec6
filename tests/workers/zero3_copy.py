"""Two-process check of zero.trainable_copy at ZeRO-3: each rank's host memory while it
builds the copy, and the copy's values.

Run by tests/test_zero_partitions.py under `accelerate launch --num_processes 2` (gloo on
CPU) with MALLOC_MMAP_THRESHOLD_ fixed, so each parameter is its own mapping and freeing it
gives its pages back (as a real model's tensors of tens of MB are). argv = output JSON path.
Rank 0 writes its peak resident growth, the copy's size, its partition's, and the largest
difference of the gathered copy from the teacher.
"""

from __future__ import annotations

import sys
import threading

import deepspeed
import psutil
import torch
from zero_partitions import write_result  # this script's folder is on sys.path

from cdm import zero

LAYERS, WIDTH = 16, 1024  # 4 MiB per fp32 weight, 64 MiB for the copy


class PeakRSS:
    """The largest resident set size seen while the block runs (sampled every 0.5 ms)."""

    def __enter__(self) -> PeakRSS:
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.0005)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def main() -> None:
    out = sys.argv[1]
    _, world, _ = zero.init_distributed(torch.device("cpu"))
    conf = zero.ds_config(4, 3, False, 1.0)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        *(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))
    ).requires_grad_(False)
    with PeakRSS() as rss:
        copy = zero.trainable_copy(teacher, torch.float32, conf)
    params = list(copy.parameters())
    worst = 0.0
    for mine, source in zip(params, teacher.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([mine]):
            worst = max(worst, (mine.detach() - source).abs().max().item())
    result = {
        "world": world,
        "copy_bytes": sum(p.ds_numel * 4 for p in params),
        "partition_bytes": sum(p.ds_tensor.numel() * 4 for p in params),
        "peak_growth": rss.peak - rss.start,
        "trainable": all(p.requires_grad for p in params) and copy.training,
        "worst": worst,
    }
    write_result(out, result)


if __name__ == "__main__":
    main()
