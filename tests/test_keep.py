"""cdm.keep: a Snakemake run's finished outputs linked aside, and what a failed job removed
put back as it was, without mixing old files into a folder a job replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cdm import keep
from tests.conftest import PYTHON, ROOT


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


def test_snakemakes_records_come_back_with_their_outputs(tmp_path):
    """A failed job leaves Snakemake's record of itself (its new params) on its outputs; an
    output put back with that record looks up to date, so the changed job never reruns. The
    output's own record comes back with it (copied: Snakemake rewrites records in place); a
    record of an output a job replaced stays the new one."""
    from base64 import urlsafe_b64encode

    root = _project(tmp_path)
    records = root / ".snakemake/metadata"
    records.mkdir(parents=True)
    long_name = "samples/" + "/".join(["x" * 100] * 3) + "/index.parquet"  # record: @ folders
    (root / long_name).parent.mkdir(parents=True)
    (root / long_name).write_bytes(b"long")
    record = {}
    for output in ("models/students/cdm", "results/metrics.json", long_name):
        b64 = urlsafe_b64encode(output.encode()).decode()
        parts = [b64[i : i + 254] for i in range(0, len(b64), 254)]
        record[output] = records.joinpath(*["@" + c for c in parts[:-1]], parts[-1])
        record[output].parent.mkdir(parents=True, exist_ok=True)
        record[output].write_text('{"params": "old"}')
    keep.snapshot(root)
    # distill (new params) failed: its outputs removed, its record rewritten in place; the
    # long-named set's job failed too; score succeeded with a new output and record.
    shutil.rmtree(root / "models/students/cdm")
    (root / long_name).unlink()
    for output in record:
        with record[output].open("w") as f:
            f.write('{"params": "new"}')
    (root / "results/metrics.json").unlink()
    (root / "results/metrics.json").write_text('{"cdm": 2}')
    assert sorted(keep.restore(root)) == sorted(["models/students/cdm", long_name])
    assert record["models/students/cdm"].read_text() == '{"params": "old"}'
    assert record[long_name].read_text() == '{"params": "old"}'
    assert record["results/metrics.json"].read_text() == '{"params": "new"}'


# The Snakefile's hooks around one rule whose params pick success (1) or failure (2).
SNAKEFILE = """
from cdm import keep
onstart:
    keep.snapshot()
onerror:
    print("back:", keep.restore())
onsuccess:
    keep.discard()
rule a:
    output: "results/out.txt"
    params: p=config["p"]
    shell: "test {params.p} = 1 && echo {params.p} > {output}"
"""


def test_a_failed_job_of_new_params_is_planned_again_under_snakemake(tmp_path):
    """Snakemake itself: the job of changed params fails, its old output comes back, and the
    next run still plans it (params changed) instead of calling the old output up to date."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    bin_dir = str(Path(PYTHON).parent)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src")}

    def snakemake(p: int, *args: str) -> subprocess.CompletedProcess:
        (tmp_path / "config.yaml").write_text(f"p: {p}\n")
        cmd = ["snakemake", "--cores", "1", "--configfile", "config.yaml", *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    assert snakemake(1).returncode == 0
    failed = snakemake(2)
    assert failed.returncode != 0 and "back: ['results']" in failed.stdout
    assert (tmp_path / "results/out.txt").read_text() == "1\n"  # the old result, kept
    plan = snakemake(2, "-n")
    assert "Params have changed since last execution" in plan.stdout, plan.stdout[-2000:]
