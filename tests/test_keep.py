"""cdm.keep: a Snakemake run's finished outputs linked aside, and what a failed job removed
put back as it was, without mixing old files into a folder a job replaced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cdm import keep


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and keep.STORE not in p.parts
    }


def _project(root: Path) -> Path:
    (root / "results").mkdir(parents=True)
    (root / "results/metrics.json").write_text('{"cdm": 1}')
    (root / "results/scores.parquet").write_bytes(b"PAR1")
    student = root / "models/students/cdm"
    student.mkdir(parents=True)
    (student / "weights.bin").write_bytes(b"w" * 10)
    for j in range(3):
        (root / f"samples/cdm/4/{j:05d}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / f"samples/cdm/4/{j:05d}.png").write_bytes(bytes([j]))
    (root / "samples/cdm/4/index.parquet").write_bytes(b"old index")
    (root / "checkpoints").mkdir()  # not an output: never linked
    return root


def test_what_failed_jobs_removed_comes_back_with_its_bytes_and_times(tmp_path):
    root = _project(tmp_path)
    before = _tree(root)
    mtime = (root / "results/metrics.json").stat().st_mtime_ns
    assert keep.snapshot(root) == 7
    # Snakemake starts score and distill, removing their outputs, and both fail.
    (root / "results/metrics.json").unlink()
    (root / "results/scores.parquet").unlink()
    shutil.rmtree(root / "models/students/cdm")
    (root / "samples/cdm/4/index.parquet").unlink()  # a sample job's declared output
    back = keep.restore(root)
    assert sorted(back) == [
        "models/students/cdm", "results/metrics.json", "results/scores.parquet",
        "samples/cdm/4/index.parquet",
    ]  # fmt: skip
    assert _tree(root) == before
    assert (root / "results/metrics.json").stat().st_mtime_ns == mtime
    assert not (root / keep.STORE).exists()


def test_a_folder_a_job_replaced_keeps_only_its_new_files(tmp_path):
    root = _project(tmp_path)
    keep.snapshot(root)
    # A sample job finished a new, smaller set (a fresh folder, as cdm.io.atomic_dir makes
    # it); then another job failed. No old image may slip into the new set.
    new = root / "samples/cdm/4.new"
    new.mkdir()
    (new / "00000.png").write_bytes(b"new")
    (new / "index.parquet").write_bytes(b"new index")
    shutil.rmtree(root / "samples/cdm/4")
    os.replace(new, root / "samples/cdm/4")
    (root / "results/metrics.json").write_text('{"cdm": 2}')  # rewritten: new, stays
    (root / "results/new.json").write_text("{}")  # not there at the start: stays
    assert keep.restore(root) == []
    assert sorted(p.name for p in (root / "samples/cdm/4").iterdir()) == [
        "00000.png", "index.parquet",
    ]  # fmt: skip
    assert (root / "samples/cdm/4/00000.png").read_bytes() == b"new"
    assert (root / "results/metrics.json").read_text() == '{"cdm": 2}'
    assert (root / "results/new.json").exists()


def test_links_take_no_copy_and_a_second_snapshot_replaces_the_first(tmp_path):
    root = _project(tmp_path)
    keep.snapshot(root)
    kept = root / keep.STORE / "models/students/cdm/weights.bin"
    assert kept.stat().st_ino == (root / "models/students/cdm/weights.bin").stat().st_ino
    (root / "results/metrics.json").unlink()
    keep.snapshot(root)  # the next run's start: what is gone now is no finished output
    assert keep.restore(root) == []
    assert not (root / "results/metrics.json").exists()


def test_without_a_snapshot_nothing_is_restored(tmp_path):
    root = _project(tmp_path)
    (root / "results/metrics.json").unlink()
    assert keep.restore(root) == []
    keep.discard(root)  # nothing to drop: no error
