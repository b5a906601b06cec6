"""The checkpoint store of distillation runs: where a run's checkpoints live, how one is
written (atomically, with a manifest) and trusted (checked before a resume), and pruning.

`checkpoints/<method>-<fingerprint>/` holds one run's `it-<iteration>` folders; the
fingerprint hashes the params its student depends on (`cdm.params.student_inputs`) and
distill's code (`cdm.stagecode`), so a rerun with the same inputs and code resumes there. One writer at a time: rank 0 holds the run
folder's `.writer.lock` (`claim_run`), so a second distill of the same params stops in one
line instead of sharing its checkpoints. A folder is written as `.tmp-it-<iteration>-<writer
pid>` and renamed when complete; its manifest records every file's size (and the sha256 of
the small ones), and a resume skips a folder that disagrees with it. Nothing removes a run automatically:
`python -m cdm.checkpoints prune` deletes the runs that no method of the current
params.yaml would resume (add --dry-run to list them first).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from cdm import manifest, stagecode
from cdm import params as P
from cdm.lock import ProjectBusy
from cdm.manifest import damage

if TYPE_CHECKING:
    from cdm.zero import PartitionedEMA

log = logging.getLogger(__name__)
HASHED_BYTES = 256 * 2**20  # files up to this size are hashed too; larger ones by size only


# --- naming -----------------------------------------------------------------------------


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]


def run_name(method: str, inputs: dict) -> str:
    """`<method>-<fingerprint of the params its student depends on and of distill's code>`:
    one run's folder. A rerun with the same inputs and code resumes there; runs of other
    params stay (`prune` removes them), so switching back to an earlier setting resumes it
    too. The code (dvc.yaml's deps of distill, cdm.stagecode) is in it because a change to it
    reruns distill in both DAGs, and that rerun must train with the new code, not finish
    from the old code's checkpoints."""
    code = stagecode.digest("distill")
    return f"{method}-{fingerprint(inputs | {'code': code} if code else inputs)}"


def completed(root: Path) -> list[Path]:
    """A run's complete `it-*` checkpoints (state.json is written last), oldest first."""
    done = [p for p in root.glob("it-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[3:]))


# --- one writer per run ------------------------------------------------------------------

WRITER = ".writer.lock"
_held: dict[Path, int] = {}  # run folder -> the open, locked writer file (held until exit)


class RunBusy(ProjectBusy):
    """Another live process writes this run's checkpoints."""


def claim_run(root: Path) -> None:
    """Make this process (rank 0; other ranks return) the one writer of `root` until it exits.
    The kernel drops the lock with the process, so a killed run never leaves it held."""
    if int(os.environ.get("RANK", "0")) != 0 or root in _held:
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / WRITER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunBusy(
            f"another distill (pid {holder}) is writing {root}; wait for it to finish "
            "(two runs of the same params would share its checkpoints)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[root] = fd


def writer(root: Path) -> str:
    """The pid of the run's writer (every rank reads it: their temporaries share one name)."""
    try:
        return (root / WRITER).read_text().strip() or str(os.getpid())
    except OSError:
        return str(os.getpid())


def _stale(tmp: Path) -> bool:
    """A temporary folder of a writer that no longer runs (an unnamed one is an old crash's)."""
    parts = tmp.name.split("-")  # .tmp, it, <iteration>, <writer pid>
    return not (len(parts) == 4 and parts[3].isdigit() and psutil.pid_exists(int(parts[3])))


# --- trust: the manifest ----------------------------------------------------------------


def write_manifest(folder: Path) -> None:
    """Every file's size (and the sha256 of the small ones), recorded at save time."""
    manifest.write(folder, HASHED_BYTES)


# --- save and resume (collective: every rank calls them) --------------------------------
# They import safetensors and cdm.zero (DeepSpeed) when called, so that `prune` stays light.


def save(
    root: Path, iteration: int, student, fake, ema: PartitionedEMA, keep: int, rank: int
) -> None:
    """One atomic folder: both engines (weights, optimizer, scheduler), the EMA (one file of
    partitions per rank: a resume needs the same number of processes), the step and a
    manifest of every file's size and hash (checked before a resume); keeps the newest `keep`
    checkpoints."""
    from safetensors.torch import save_file

    from cdm import zero

    # Unique per writer, one name for all ranks: rank 0's (its lock's pid, or its own).
    tmp = root / f".tmp-it-{iteration:07d}-{zero.from_rank0(writer(root))}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    zero.barrier()
    try:
        student.save_checkpoint(str(tmp / "student"), tag="state")
        fake.save_checkpoint(str(tmp / "fake"), tag="state")
        # The EMA as each rank holds it: its own partitions (nothing gathered).
        (tmp / "ema").mkdir(parents=True, exist_ok=True)
        save_file(ema.partitions(), tmp / "ema" / f"rank-{rank:05d}.safetensors")
        zero.barrier()
        if rank == 0:
            state = {"iteration": iteration, "world_size": zero.world_size()}
            (tmp / "state.json").write_text(json.dumps(state))
            write_manifest(tmp)
    except BaseException:
        if rank == 0:  # a full disk: give the space of the partial folder back
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        final = root / f"it-{iteration:07d}"
        shutil.rmtree(final, ignore_errors=True)  # a damaged one of the same step, if any
        tmp.rename(final)
        for old in completed(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    zero.barrier()


def save_once(
    root: Path, iteration: int, student, fake, ema: PartitionedEMA, keep: int, rank: int
) -> None:
    """Checkpoint `iteration` unless the newest checkpoint already is that iteration (as rank
    0 lists them: every rank then saves, or none)."""
    from cdm import zero

    done = completed(root)
    if zero.from_rank0(not done or done[-1].name != f"it-{iteration:07d}"):
        save(root, iteration, student, fake, ema, keep, rank)


def load_latest(root: Path, student, fake, ema: PartitionedEMA) -> int:
    """Resume from the newest intact checkpoint (rank 0 chooses it, every rank loads it);
    returns the iteration to start from."""
    from safetensors.torch import load_file

    from cdm import zero

    if zero.rank() == 0:  # a crash while saving leaves a temporary folder: never resume from it
        for stale in filter(_stale, root.glob(".tmp-it-*")):
            shutil.rmtree(stale, ignore_errors=True)
    zero.barrier()
    folder = zero.from_rank0(newest_intact(root) if zero.rank() == 0 else None)
    if folder is None:
        return 0
    state = json.loads((folder / "state.json").read_text())
    legacy = folder / "ema.safetensors"  # the full EMA, as checkpoints before per-rank files
    if not legacy.is_file() and state.get("world_size") != zero.world_size():
        from cdm.cli import StageFailure

        raise StageFailure(
            f"{folder} was written by {state.get('world_size')} processes and this run has "
            f"{zero.world_size()}: its optimizer and EMA partitions are per rank; rerun with "
            f"distill.num_processes = {state.get('world_size')}, or remove {folder.parent} "
            "to start afresh"
        )
    from cdm.safeload import weights_only_loads

    with weights_only_loads(student, fake):  # data only: a planted pickle never runs
        student.load_checkpoint(str(folder / "student"), tag="state")
        fake.load_checkpoint(str(folder / "fake"), tag="state")
    if legacy.is_file():
        ema.load_state_dict(load_file(legacy))
    else:
        ema.load_partitions(load_file(folder / "ema" / f"rank-{zero.rank():05d}.safetensors"))
    return state["iteration"]


def newest_intact(root: Path) -> Path | None:
    """The newest checkpoint whose files agree with its manifest; a damaged one is skipped
    with a one-line warning naming it, and left in place for inspection."""
    for folder in reversed(completed(root)):
        problem = damage(folder)
        if problem is None:
            return folder
        log.warning("skipping damaged checkpoint %s: %s", folder, problem)
    return None


# --- prune ------------------------------------------------------------------------------


def current_runs(params: P.Params) -> set[str]:
    """Folder names of the runs the current params resume: every preset, the params' seed."""
    return {run_name(m, P.student_inputs(params, m)) for m in params.methods}


def stale_runs(root: Path, params: P.Params) -> list[Path]:
    keep = current_runs(params)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Remove checkpoints of other params.")
    parser.add_argument("command", choices=["prune"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default="checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list, do not delete")
    args = parser.parse_args(argv)
    try:
        params = P.load(args.params)
    except P.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.root)
    stale = stale_runs(root, params) if root.is_dir() else []
    for run in stale:
        print(("would remove " if args.dry_run else "removing ") + str(run))
        if not args.dry_run:
            shutil.rmtree(run)
    if not stale:
        print(f"nothing to prune under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
