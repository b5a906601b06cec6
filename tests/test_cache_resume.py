"""The training prompt cache in shards any process or job can write: a run stopped mid-way
resumes without encoding a finished shard again, and every way of splitting the work writes
the unsharded cache bit for bit. DVC keeps the cache out of its own cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from cdm.cache import SHARD, encode_shards, index_shards
from cdm.conditioning import Condition
from tests.conftest import PYTHON, ROOT, edit_params

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PROMPTS = [f"a prompt number {i}" for i in range(23)]
SHARD_PROMPTS, BATCH = 5, 2  # 5 shards, the last one short; batches cross no shard border


class Encoder:
    """A text encoder stand-in: embeddings from the prompt alone; counts what it encodes and
    fails (as a killed process stops) once `fail_after` prompts are done."""

    def __init__(self, fail_after: int | None = None):
        self.seen: list[str] = []
        self.fail_after = fail_after

    def __call__(self, prompts: list[str]) -> Condition:
        if self.fail_after is not None and len(self.seen) + len(prompts) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.seen += prompts
        gen = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        n = len(prompts)
        return Condition(torch.randn(n, 3, 4, generator=gen), torch.randn(n, 2, generator=gen))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _write(folder: Path, encoder: Encoder, part: tuple[int, int] = (0, 1)) -> list[int]:
    return encode_shards(folder, PROMPTS, SHARD_PROMPTS, encoder, BATCH, part)


def test_a_stopped_run_resumes_and_equals_the_unsharded_cache(tmp_path):
    whole = tmp_path / "whole"
    assert _write(whole, Encoder()) == [0, 1, 2, 3, 4]
    index_shards(whole, PROMPTS, SHARD_PROMPTS)

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _write(stopped, Encoder(fail_after=12))  # inside shard 2
    assert sorted(p.name for p in stopped.iterdir()) == [SHARD.format(0), SHARD.format(1)]
    with pytest.raises(FileNotFoundError, match=r"shards \[2, 3, 4\] of 5 are not written"):
        index_shards(stopped, PROMPTS, SHARD_PROMPTS)
    again = Encoder()
    assert _write(stopped, again) == [2, 3, 4]
    assert again.seen == PROMPTS[10:]  # shards 0 and 1 were not encoded again
    index_shards(stopped, PROMPTS, SHARD_PROMPTS)
    assert _files(stopped) == _files(whole)


def test_parts_and_a_torn_shard_give_the_same_cache(tmp_path):
    whole = tmp_path / "whole"
    _write(whole, Encoder())
    index_shards(whole, PROMPTS, SHARD_PROMPTS)
    parts = tmp_path / "parts"
    assert _write(parts, Encoder(), (0, 2)) == [0, 2, 4]
    assert _write(parts, Encoder(), (1, 2)) == [1, 3]
    # A shard cut short (a copy interrupted outside our writer) is found and written again.
    torn = parts / SHARD.format(3)
    torn.write_bytes(torn.read_bytes()[:100])
    redo = Encoder()
    assert _write(parts, redo) == [3]
    assert redo.seen == PROMPTS[15:20]
    index_shards(parts, PROMPTS, SHARD_PROMPTS)
    assert _files(parts) == _files(whole)


def _stage(cwd: Path, *args: str) -> str:
    cmd = [PYTHON, str(ROOT / "src" / "cache_teacher.py"), "--teacher", "tiny_teacher", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_cache_teacher_parts_then_the_finisher_equal_one_run(tmp_path, tiny_teacher_dir):
    shutil.copytree(tiny_teacher_dir, tmp_path / "tiny_teacher")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    judge = yaml.safe_load((ROOT / "params.yaml").read_text())["judge"]["path"]
    edit_params(
        tmp_path / "params.yaml", teacher={"path": "tiny_teacher"},
        judge={"path": str(ROOT / judge)}, cache_teacher={"batch_size": 16, "shard_prompts": 64},
    )  # fmt: skip

    log = _stage(tmp_path, "--out", "one")
    size = int(re.search(r"prompt cache: \d+ prompts x \d+ bytes = (\d+) bytes", log)[1])
    assert log.index("prompt cache:") < log.index("train: encoded shards")
    one = tmp_path / "one"
    files = [*(one / "train").glob("*.safetensors"), *one.glob("*.safetensors")]
    assert size == sum(
        _tensor_bytes(f) for f in files
    )  # the size printed before encoding is the cache's tensors

    part = _stage(tmp_path, "--out", "two", "--part", "0/2")
    assert "train: encoded shards [0, 2" in part and "prompt cache:" not in part
    assert not (tmp_path / "two").exists()  # a part leaves only the partial cache
    finish = _stage(tmp_path, "--out", "two")
    encoded = re.search(r"train: encoded shards \[([\d, ]+)\]", finish)[1]
    assert all(int(k) % 2 == 1 for k in encoded.split(", "))  # part 0's shards not again
    two = tmp_path / "two"
    assert not (tmp_path / "two.partial").exists()
    for name in ("train", "."):
        a, b = one / name, two / name
        assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}
        for p in a.iterdir():
            if p.is_file():
                assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def _tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def _outs(path: Path) -> list[tuple[str, dict]]:
    """(path, options) of every out of every stage (foreach/matrix bodies included)."""
    stages = yaml.safe_load(path.read_text())["stages"]
    found = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for out in body.get("outs", []):
            found += list(out.items()) if isinstance(out, dict) else [(out, {})]
    return found


@pytest.mark.parametrize("dvc", ["dvc.yaml", "workflow/ablation/dvc.yaml"])
def test_dvc_does_not_copy_the_prompt_cache_or_checkpoints(dvc):
    outs = _outs(ROOT / dvc)
    assert outs
    for path, options in outs:
        if path.startswith(("cache/", "checkpoints")):
            assert options.get("cache") is False, f"{dvc}: {path} would be copied into DVC's cache"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shard_is_written_batch_by_batch_with_one_batch_in_memory(tmp_path, dtype):
    """write_shard: the same file, byte for byte, as save_condition of the whole shard (what
    the cache wrote before), while the live tensor bytes peak at one batch's (the tracker of
    tests/test_activations.py), not the shard's twice."""
    from cdm.cache import save_condition, write_shard
    from tests.test_activations import LiveBytes

    names = [f"p{i}" for i in range(64)]
    batch = 4

    def batches():
        for j in range(0, len(names), batch):
            gen = torch.Generator().manual_seed(j)
            n = min(batch, len(names) - j)
            embeds = torch.randn(n, 77, 64, generator=gen, dtype=dtype)
            yield Condition(embeds, torch.randn(n, 32, generator=gen, dtype=dtype))

    tracker = LiveBytes()
    with tracker:
        write_shard(tmp_path / "streamed.safetensors", names, batches())
    one = batch * (77 * 64 + 32) * torch.finfo(dtype).bits // 8
    assert tracker.peak <= 2 * one < len(names) // batch * one
    save_condition(tmp_path / "whole.safetensors", Condition.cat(list(batches())), names)
    streamed = tmp_path / "streamed.safetensors"
    assert streamed.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    with safe_open(str(streamed), "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == names
