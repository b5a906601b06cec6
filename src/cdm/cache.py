"""Cached text conditioning: safetensors files the later stages read instead of a text encoder.

eval and null are one file each (`<name>.safetensors`, loaded into memory). The training set
is sharded (`train/shard-00000.safetensors`, ... plus `train/index.json`): with ~200k prompts
SD3's embeddings are hundreds of GB, so the engine reads only each batch's rows from disk
(`StreamedCondition`) and moves only that batch to the GPU.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cdm.conditioning import Condition
from cdm.io import atomic_file

CACHE_DIR = Path("cache/prompts")
FILES = ("train", "eval", "null")
SHARDED = ("train",)  # sets written as a folder of shards; the others are one file each
INDEX = "index.json"
SHARD = "shard-{:05d}.safetensors"
KEYS = ("embeds", "pooled")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def save_condition(path: Path, cond: Condition, prompts: list[str]) -> None:
    tensors = {"embeds": cond.embeds.contiguous(), "pooled": cond.pooled.contiguous()}
    save_file(tensors, path, metadata={"prompts": json.dumps(prompts)})


def save_sharded(
    folder: Path, parts: Iterable[tuple[Condition, list[str]]], shard_prompts: int
) -> dict:
    """Write `parts` (conditions with their prompts, in order) as shards of at most
    `shard_prompts` prompts plus `index.json`; holds at most one shard in memory."""
    if shard_prompts <= 0:
        raise ValueError(f"shard_prompts must be > 0, got {shard_prompts}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    prompts: list[str] = []
    pending: list[Condition] = []
    pending_prompts: list[str] = []
    spec: tuple | None = None  # dtype and row shapes, the same in every batch

    def flush(final: bool) -> None:
        nonlocal pending, pending_prompts
        while len(pending_prompts) >= shard_prompts or (final and pending_prompts):
            cond = Condition.cat(pending)
            head, tail = cond.take(slice(0, shard_prompts)), cond.take(slice(shard_prompts, None))
            name = SHARD.format(len(shards))
            save_condition(folder / name, head, pending_prompts[:shard_prompts])
            shards.append({"file": name, "count": len(head)})
            pending_prompts = pending_prompts[shard_prompts:]
            pending = [tail.to(copy=True)] if len(tail) else []  # not a view of the old batch

    for cond, names in parts:
        if len(cond) != len(names):
            raise ValueError(f"{len(cond)} embeddings for {len(names)} prompts")
        shape = (cond.embeds.dtype, cond.pooled.dtype, cond.embeds.shape[1:], cond.pooled.shape[1:])
        if spec is not None and shape != spec:
            raise ValueError(f"a batch of {shape} after batches of {spec}")
        spec = shape
        pending.append(cond)
        pending_prompts += names
        prompts += names
        flush(final=False)
    flush(final=True)
    if spec is None:
        raise ValueError(f"no prompts to write to {folder}")
    return _write_index(folder, prompts, shard_prompts, spec, shards)


def _write_index(folder: Path, prompts: list[str], shard_prompts: int, spec: tuple, shards: list):
    index = {
        "format": "cdm-condition-shards",
        "version": 1,
        "count": len(prompts),
        "shard_prompts": shard_prompts,
        "dtype": str(spec[0]).removeprefix("torch."),
        "pooled_dtype": str(spec[1]).removeprefix("torch."),
        "embeds_shape": list(spec[2]),
        "pooled_shape": list(spec[3]),
        "shards": shards,
        "prompts": prompts,
    }
    (folder / INDEX).write_text(json.dumps(index))
    return index


# Resumable sharded writing: shard k always holds prompts[k S : (k + 1) S] (S = shard_prompts),
# so any process or job can encode any shard, a finished shard is never encoded again, and
# the result is the same file for file whoever wrote which shard.


def shard_count(prompts: int, shard_prompts: int) -> int:
    if shard_prompts <= 0:
        raise ValueError(f"shard_prompts must be > 0, got {shard_prompts}")
    return -(-prompts // shard_prompts)


def finished_shard(path: Path, prompts: list[str]) -> bool:
    """Whether `path` is a whole shard of exactly `prompts` (a killed write leaves only its
    temporary: shards are renamed into place once written)."""
    try:
        with safe_open(str(path), "pt") as f:
            held = json.loads((f.metadata() or {}).get("prompts", "null"))
            rows = {k: f.get_slice(k).get_shape()[0] for k in KEYS if k in f.keys()}
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError):  # absent or truncated
        return False
    return held == prompts and rows == dict.fromkeys(KEYS, len(prompts))


def encode_shards(
    folder: Path,
    prompts: list[str],
    shard_prompts: int,
    encode: Callable[[list[str]], Condition],
    batch_size: int,
    part: tuple[int, int] = (0, 1),
) -> list[int]:
    """Encode the shards k with k % n == i (part (i, n)) that are not finished yet, in
    batches of `batch_size` from each shard's start; returns the shards it encoded."""
    folder.mkdir(parents=True, exist_ok=True)
    i, n = part
    done = []
    for k in range(i, shard_count(len(prompts), shard_prompts), n):
        names = prompts[k * shard_prompts : (k + 1) * shard_prompts]
        path = folder / SHARD.format(k)
        if finished_shard(path, names):
            continue
        batches = (encode(names[j : j + batch_size]) for j in range(0, len(names), batch_size))
        with atomic_file(path) as tmp:
            write_shard(tmp, names, batches)
        done.append(k)
    return done


def write_shard(path: Path, prompts: list[str], batches: Iterator[Condition]) -> None:
    """A shard of `prompts` as a safetensors file written batch by batch: the header first
    (the rows are known, the row shape and dtype from the first batch), then each batch's
    embeddings and pooled vectors into their places. One batch in memory at a time, where
    holding the shard's batches and their concatenation took twice the shard (SD3: 22 GB a
    process at 4096 prompts) and save_file's bytes a third copy."""
    first = next(batches)
    names = {dtype: name for name, dtype in _DTYPES.items()}
    header: dict = {"__metadata__": {"prompts": json.dumps(prompts)}}  # save_file's order
    start = 0
    for key in KEYS:
        t = getattr(first, key)
        shape = [len(prompts), *t.shape[1:]]
        end = start + math.prod(shape) * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": shape, "data_offsets": [start, end]}
        start = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    written = dict.fromkeys(KEYS, 0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        base = f.tell()
        batch: Condition | None = first
        del first
        while batch is not None:
            for key in KEYS:
                t = getattr(batch, key).detach().to("cpu").contiguous()
                f.seek(base + header[key]["data_offsets"][0] + written[key])
                f.write(t.reshape(-1).view(torch.uint8).numpy())
                written[key] += t.numel() * t.element_size()
            batch = t = None  # freed before the next batch is encoded
            batch = next(batches, None)
    for key in KEYS:
        lo, hi = header[key]["data_offsets"]
        if written[key] != hi - lo:
            raise ValueError(f"{path}: {written[key]} bytes of {key} for {hi - lo} expected")


def index_shards(folder: Path, prompts: list[str], shard_prompts: int) -> dict:
    """index.json over the finished shards of `prompts`; names the missing ones."""
    count = shard_count(len(prompts), shard_prompts)
    names = [prompts[k * shard_prompts : (k + 1) * shard_prompts] for k in range(count)]
    missing = [k for k in range(count) if not finished_shard(folder / SHARD.format(k), names[k])]
    if missing:
        raise FileNotFoundError(
            f"{folder}: shards {missing[:5]}{' ...' if len(missing) > 5 else ''} of {count} are "
            "not written; run cache_teacher again (it encodes only the missing shards)"
        )
    specs = set()
    for k in range(count):
        _, header = _header(str(folder / SHARD.format(k)))
        e, p = header["embeds"], header["pooled"]
        specs.add(
            (_DTYPES[e["dtype"]], _DTYPES[p["dtype"]], tuple(e["shape"][1:]), tuple(p["shape"][1:]))
        )
    if len(specs) != 1:
        raise ValueError(
            f"{folder}: shards differ in dtype or shape ({specs}); rerun cache_teacher"
        )
    shards = [{"file": SHARD.format(k), "count": len(names[k])} for k in range(count)]
    return _write_index(folder, prompts, shard_prompts, specs.pop(), shards)


def row_bytes(cond: Condition) -> int:
    """Bytes one prompt takes in the cache (embeds and pooled)."""
    return sum(t[0].numel() * t.element_size() for t in cond)


def _header(path: str) -> tuple[int, dict]:
    """Start of the data and the tensor entries of a safetensors file (already validated)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class StreamedCondition:
    """A sharded prompt cache read row by row from disk: `take` returns the same rows as
    `Condition.take` on the whole cache in memory, reading only those rows (positioned reads,
    no whole shard and no mapping of it in this process), so memory stays flat however large
    the cache is. `take(idx).to(device)` moves only the batch."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index_file = folder / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(
                f"missing cache index {index_file}; run the cache_teacher stage first"
            )
        index = json.loads(index_file.read_text())
        self.folder = folder
        self.prompts: list[str] = index["prompts"]
        self.dtypes = {
            "embeds": getattr(torch, index["dtype"]),
            "pooled": getattr(torch, index.get("pooled_dtype", index["dtype"])),
        }
        self.shapes = {
            "embeds": tuple(index["embeds_shape"]),
            "pooled": tuple(index["pooled_shape"]),
        }
        self._files: list[str] = []
        self._data: list[dict[str, int]] = []  # byte offset of each tensor's first row
        self._fds: list[int | None] = []
        starts = [0]
        for shard in index["shards"]:
            path = str(folder / shard["file"])
            with safe_open(path, "pt") as f:  # a truncated or foreign file fails here, named
                keys = set(f.keys())
            if not set(KEYS) <= keys:
                raise ValueError(f"{path} holds {sorted(keys)}, not {list(KEYS)}")
            begin, header = _header(path)
            offsets = {}
            for key in KEYS:
                entry = header[key]
                shape = (shard["count"], *self.shapes[key])
                dtype = self.dtypes[key]
                if _DTYPES.get(entry["dtype"]) != dtype or tuple(entry["shape"]) != shape:
                    raise ValueError(
                        f"{path}: {key} is {entry['dtype']} {entry['shape']}, "
                        f"the index says {dtype} {list(shape)}"
                    )
                offsets[key] = begin + entry["data_offsets"][0]
            self._files.append(path)
            self._data.append(offsets)
            self._fds.append(None)
            starts.append(starts[-1] + shard["count"])
        if starts[-1] != index["count"] or starts[-1] != len(self.prompts):
            raise ValueError(f"{index_file}: shard counts do not add up to {index['count']}")
        self._starts = torch.tensor(starts)
        self._row_bytes = {
            k: torch.empty((), dtype=self.dtypes[k]).element_size() * math.prod(self.shapes[k])
            for k in KEYS
        }

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        for i, fd in enumerate(getattr(self, "_fds", [])):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None

    def take(self, index: torch.Tensor | slice) -> Condition:
        """The rows `index` (integer tensor, repeats and negatives allowed, or a slice) on CPU."""
        n = len(self)
        if isinstance(index, slice):
            rows = torch.arange(n)[index]
        else:
            rows = torch.as_tensor(index).cpu()
            if rows.dtype in (torch.bool, torch.uint8) or rows.is_floating_point():
                raise TypeError(f"take needs integer indices, got {rows.dtype}")
            rows = rows.long()
            if rows.numel() and (rows.min() < -n or rows.max() >= n):
                bad = rows[(rows < -n) | (rows >= n)][0].item()
                raise IndexError(f"index {bad} is out of bounds for a cache of {n} prompts")
            rows = torch.where(rows < 0, rows + n, rows)
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        out = {k: torch.empty((len(unique), self._row_bytes[k]), dtype=torch.uint8) for k in KEYS}
        for shard, first, j, count in self._runs(unique):
            for key in KEYS:
                size = self._row_bytes[key]
                offset = self._data[shard][key] + first * size
                self._read_into(shard, out[key][j : j + count], offset)
        parts = [
            out[k].view(self.dtypes[k]).view(len(unique), *self.shapes[k])[inverse.view(rows.shape)]
            for k in KEYS
        ]
        return Condition(*parts)

    def load(self) -> Condition:
        """The whole cache in memory."""
        return self.take(slice(None))

    def _runs(self, unique: torch.Tensor) -> Iterator[tuple[int, int, int, int]]:
        """(shard, first row in the shard, first output row, rows) for each contiguous run."""
        shards = (torch.searchsorted(self._starts, unique, right=True) - 1).tolist()
        rows = unique.tolist()
        starts = self._starts.tolist()
        j = 0
        while j < len(rows):
            count = 1
            while (
                j + count < len(rows)
                and shards[j + count] == shards[j]
                and rows[j + count] == rows[j] + count
            ):
                count += 1
            yield shards[j], rows[j] - starts[shards[j]], j, count
            j += count

    def _read_into(self, shard: int, buf: torch.Tensor, offset: int) -> None:
        fd = self._fds[shard]
        if fd is None:
            fd = self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):  # pread may return less than asked (large reads, network FS)
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self._files[shard]} ended early; rerun the cache_teacher stage")
            done += got


def cached_prompts(path: str | Path) -> list[str]:
    """The prompts of a cache file or sharded folder, without reading its tensors."""
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["prompts"])
    return load_condition(path)[1]  # a sharded folder streams: its tensors stay on disk


def load_condition(path: str | Path) -> tuple[Condition | StreamedCondition, list[str]]:
    """A cache file in memory, or a sharded cache folder streamed from disk (also where `path`
    names `<name>.safetensors` and only the folder `<name>/` exists)."""
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        tensors = load_file(path)
        return Condition(tensors["embeds"], tensors["pooled"]), prompts
    folder = path if path.is_dir() else path.with_suffix("")
    if (folder / INDEX).is_file():
        reader = StreamedCondition(folder)
        return reader, reader.prompts
    raise FileNotFoundError(f"missing cache file {path}; run the cache_teacher stage first")


def open_condition(cache: str | Path, name: str) -> tuple[Condition | StreamedCondition, list[str]]:
    """Set `name` of a cache folder: `<name>/` (sharded, streamed) or `<name>.safetensors`."""
    return load_condition(Path(cache) / f"{name}.safetensors")
