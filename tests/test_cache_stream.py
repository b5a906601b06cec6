"""The sharded training prompt cache: written shard by shard, read batch by batch.

`StreamedCondition.take` must give exactly the rows `Condition.take` gives on the whole
cache in memory, and reading batches must not grow memory with the size of the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cdm.cache import (
    INDEX,
    StreamedCondition,
    load_condition,
    open_condition,
    save_condition,
    save_sharded,
)
from cdm.conditioning import Condition
from tests.conftest import PYTHON, ROOT

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _parts(cond: Condition, prompts: list[str], batch: int):
    for i in range(0, len(cond), batch):
        yield cond.take(slice(i, i + batch)), prompts[i : i + batch]


def _sharded(folder: Path, n: int, shard: int, batch: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n)
    cond = Condition(
        torch.randn(n, 5, 3, generator=gen).to(dtype), torch.randn(n, 4, generator=gen).to(dtype)
    )
    prompts = [f"prompt {i}" for i in range(n)]
    index = save_sharded(folder, _parts(cond, prompts, batch), shard)
    return cond, prompts, index


def _same(a: Condition, b: Condition) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shard", "batch"), [(7, 3), (16, 16), (50, 64), (1, 5)])
def test_take_matches_the_in_memory_take(tmp_path, dtype, shard, batch):
    n = 50
    cond, prompts, index = _sharded(tmp_path / "train", n, shard, batch, dtype)
    assert [s["count"] for s in index["shards"]] == [shard] * (n // shard) + (
        [n % shard] if n % shard else []
    )
    assert len(list((tmp_path / "train").glob("shard-*.safetensors"))) == len(index["shards"])
    reader, names = load_condition(tmp_path / "train")
    assert isinstance(reader, StreamedCondition) and len(reader) == n and names == prompts
    gen = torch.Generator().manual_seed(0)
    for size in (1, 4, 16, 64, 200):  # repeats certain from 64 on; every shard boundary
        idx = torch.randint(n, (size,), generator=gen)
        assert _same(reader.take(idx), cond.take(idx))
    edges = torch.tensor([shard - 1, shard, shard - 1, 0, n - 1, n - 1, shard, 2 * shard]) % n
    assert _same(reader.take(edges), cond.take(edges))
    for index_ in (
        torch.tensor([-1, -n, 3, -1]),
        torch.arange(n).flip(0),
        torch.tensor([], dtype=torch.long),
    ):
        assert _same(reader.take(index_), cond.take(index_))
    two_d = torch.randint(n, (3, 4), generator=gen)
    assert _same(reader.take(two_d), cond.take(two_d))
    for sl in (slice(0, 4), slice(0, 1000), slice(3, 40, 3), slice(None)):
        assert _same(reader.take(sl), cond.take(sl))
    assert _same(reader.load(), cond)
    with pytest.raises(IndexError):
        reader.take(torch.tensor([n]))
    with pytest.raises(TypeError):
        reader.take(torch.tensor([0.0]))


def test_the_engines_draw_on_the_device_then_on_cpu_gives_the_same_batch(tmp_path):
    """The engine draws indices on its device and takes `idx.cpu()`: the same rows as before."""
    cond, _, _ = _sharded(tmp_path / "train", 30, 8, 5)
    reader = StreamedCondition(tmp_path / "train")
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(len(reader), (16,), generator=gen)
    assert _same(reader.take(idx.cpu()).to("cpu"), cond.to("cpu").take(idx))


def test_single_files_and_the_folder_both_load(tmp_path):
    cond, prompts, _ = _sharded(tmp_path / "train", 12, 5, 4)
    save_condition(tmp_path / "eval.safetensors", cond, prompts)
    evals, names = open_condition(tmp_path, "eval")
    assert isinstance(evals, Condition) and _same(evals, cond) and names == prompts
    train, names = open_condition(tmp_path, "train")  # the folder, under its old file name too
    assert isinstance(train, StreamedCondition) and _same(train.load(), cond)
    assert names == prompts
    with pytest.raises(FileNotFoundError, match="missing cache file .*null.safetensors"):
        open_condition(tmp_path, "null")
    index = json.loads((tmp_path / "train" / INDEX).read_text())
    assert index["count"] == 12 and index["embeds_shape"] == [5, 3] and index["dtype"] == "float32"


def test_cache_teacher_writes_shards_of_the_configured_size(tmp_path, tiny_teacher_dir):
    shutil.copytree(tiny_teacher_dir, tmp_path / "tiny_teacher")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["teacher"]["path"] = "tiny_teacher"
    data["judge"]["path"] = str(ROOT / data["judge"]["path"])
    data["cache_teacher"].update(batch_size=32, shard_prompts=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    cmd = [PYTHON, str(ROOT / "src" / "cache_teacher.py"), "--teacher", "tiny_teacher"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "cache" / "prompts"
    index = json.loads((cache / "train" / INDEX).read_text())
    counts = [s["count"] for s in index["shards"]]
    n = index["count"]
    assert n > 100 and counts == [50] * (n // 50) + ([n % 50] if n % 50 else [])
    files = sorted(p.name for p in (cache / "train").glob("*.safetensors"))
    assert files == [f"shard-{i:05d}.safetensors" for i in range(len(counts))]
    assert [s["file"] for s in index["shards"]] == files
    assert not (cache / "train.safetensors").exists()
    train, prompts = open_condition(cache, "train")
    evals, eval_prompts = open_condition(cache, "eval")  # the same prompts by default
    assert prompts == eval_prompts and len(train) == n
    assert _same(train.load(), evals)
    null, _ = open_condition(cache, "null")
    assert isinstance(null, Condition) and len(null) == 1


MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from cdm.cache import StreamedCondition

    def peak_kib():
        # This process's peak RSS (VmHWM). Not ru_maxrss: after fork + exec that starts at
        # the parent's peak (here pytest's, having just written the caches).
        status = open("/proc/self/status").read().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

    torch.set_num_threads(1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # the peak so far is the imports': reset it
        f.write("5")
    before = peak_kib()
    reader = StreamedCondition(sys.argv[1])
    if sys.argv[2] == "load":  # the control: the whole cache in memory
        total = float(reader.load().embeds.sum())
    else:
        gen = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(int(sys.argv[2])):
            idx = torch.randint(len(reader), (64,), generator=gen)
            total += float(reader.take(idx).embeds.sum())
    after = peak_kib()
    print(json.dumps({"delta_kib": after - before, "n": len(reader)}))
    """
)


def _write_big(folder: Path, n: int) -> int:
    """n prompts of 77 x 64 float32 token embeddings, written chunk by chunk."""
    gen = torch.Generator().manual_seed(n)

    def parts():
        for i in range(0, n, 1000):
            m = min(1000, n - i)
            cond = Condition(
                torch.randn(m, 77, 64, generator=gen), torch.randn(m, 64, generator=gen)
            )
            yield cond, [f"p{j}" for j in range(i, i + m)]

    save_sharded(folder, parts(), 1024)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _peak_delta(folder: Path, batches: int | str) -> dict:
    env = ENV | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [PYTHON, "-c", MEASURE, str(folder), str(batches)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_memory_stays_flat_with_ten_times_the_cache(tmp_path):
    n = 2000  # 1x: 39 MB of embeddings; 10x: 394 MB
    sizes = {k: _write_big(tmp_path / f"x{k}", k * n) for k in (1, 10)}
    # Enough batches to touch most rows of the large cache (64 x 300 = 19,200 draws).
    got = {k: _peak_delta(tmp_path / f"x{k}", 300) for k in (1, 10)}
    # The control: the measurement sees a cache read whole into memory.
    whole = _peak_delta(tmp_path / "x1", "load")["delta_kib"] * 1024
    small, large = (got[k]["delta_kib"] * 1024 for k in (1, 10))
    print(f"peak RSS growth: 1x {small / 2**20:.1f} MiB ({sizes[1] / 2**20:.0f} MiB cache), "
          f"10x {large / 2**20:.1f} MiB ({sizes[10] / 2**20:.0f} MiB cache), "
          f"1x loaded whole {whole / 2**20:.1f} MiB")  # fmt: skip
    assert got[10]["n"] == 10 * n
    assert whole > 0.9 * sizes[1], (whole, sizes[1])
    assert large <= 1.5 * small + 16 * 2**20, (small, large)
    assert large < sizes[10] / 10, (large, sizes[10])


def test_embeds_and_pooled_may_differ_in_dtype(tmp_path):
    cond = Condition(torch.randn(9, 4, 2).to(torch.bfloat16), torch.randn(9, 3))
    prompts = [str(i) for i in range(9)]
    save_sharded(tmp_path / "train", _parts(cond, prompts, 2), 4)
    reader = StreamedCondition(tmp_path / "train")
    idx = torch.tensor([8, 0, 4, 4, 3])
    assert _same(reader.take(idx), cond.take(idx))
    with pytest.raises(ValueError, match="after batches of"):
        save_sharded(
            tmp_path / "mixed", iter([(cond, prompts), (cond.to(torch.float16), prompts)]), 4
        )
