"""Shared entry-point plumbing of the stage scripts: arguments, and every failure as one line.

A stage that fails prints `error: <one line>` naming the file and the cause and exits
non-zero: 2 for wrong input, 1 for anything else. The traceback goes to
logs/tracebacks/<stage>.txt (printed instead with --verbose or CDM_VERBOSE=1).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from cdm.lock import ProjectBusy, claim, watch
from cdm.params import ParamsError

# Errors that mean "the input is wrong", reported as one line rather than a traceback.
INPUT_ERRORS = (ParamsError, FileNotFoundError, ValueError)
TRACEBACKS = Path("logs/tracebacks")
# Writes that fail this close to a full disk are reported as the full disk they are
# (torch and safetensors say "iostream error" or "file write failed", not ENOSPC).
LOW_SPACE = 16 * 2**20
UNREADABLE_WEIGHTS = re.compile(r"Unable to load weights from checkpoint file for '([^']+)'")
PATH_NAMES = ("path", "filename", "file", "checkpoint_file", "folder")


class StageFailure(RuntimeError):
    """A stage that cannot go on (e.g. a diverged run): one line on stderr, exit `code`."""

    code = 1


def parse_shard(text: str | None, flag: str = "--shard") -> tuple[int, int] | None:
    """'i/n' with 0 <= i < n -> (i, n); None -> None. `flag` names the option in errors."""
    if text is None:
        return None
    parts = text.split("/")
    try:
        i, n = (int(p) for p in parts) if len(parts) == 2 else (-1, 0)
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{flag} must be i/n with 0 <= i < n (e.g. 0/2), got {text!r}")
    return i, n


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print the traceback of a failure (CDM_VERBOSE=1)"
    )
    return parser


def verbose() -> bool:
    return os.environ.get("CDM_VERBOSE") == "1" or "--verbose" in sys.argv


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); any failure ends in `error: <one line>` on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        claim()  # one orchestrator per project: a dvc repro beside a snakemake run stops here
    except ProjectBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    watch()  # no orphan: the stage ends when the orchestrator that started it ends
    try:
        main()
    except INPUT_ERRORS as exc:
        if verbose():
            raise
        print(f"error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (StageFailure, ProjectBusy) as exc:  # the run went wrong, not its input: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "code", 1))
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank of a launched run: one line (rank 0's), no traceback each.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {interrupted()}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:
        if verbose():
            raise
        where = save_traceback(exc)
        hint = f" (traceback: {where})" if where else " (rerun with --verbose for the traceback)"
        print(f"error: {fault_line(exc)}{hint}", file=sys.stderr)
        sys.exit(1)


def interrupted() -> str:
    stage = Path(sys.argv[0]).stem or "stage"
    if stage == "distill":
        return (
            "distill interrupted (Ctrl-C); its checkpoints stay: rerun to resume from the "
            "newest one"
        )
    return f"{stage} interrupted (Ctrl-C); rerun it to finish"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def fault_line(exc: BaseException) -> str:
    """The cause of an unexpected failure, in the user's terms where it is a known fault."""
    for e in chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # A write through an open file (PIL, torch) carries no name: the innermost path
            # the failing frames were writing, else the fullest of the outputs' filesystems.
            name = e.filename or path_in(e.__traceback__, "")
            return no_space(Path(name) if name else fullest()[1])
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return f"{e.filename or 'an output'} is not writable ({e.strerror})"
        image = image_in(e.__traceback__) if isinstance(e, OSError) else None
        if image is not None:  # Pillow names no file ("image file is truncated")
            return (
                f"{image}: {first_line(e)}; delete it and rerun "
                "the stage that wrote it (for a sample, delete its set's folder)"
            )
        match = UNREADABLE_WEIGHTS.search(str(e))
        if match or type(e).__name__ == "SafetensorError":
            name = match[1] if match else path_in(e.__traceback__, ".safetensors")
            cause = first_line(list(chain(e))[-1])  # safetensors' own words, under diffusers'
            return (
                f"{name or 'a weights file'} is truncated or not a safetensors file ({cause}); "
                "rerun the stage that wrote it"
            )
    free, folder = fullest()
    if free < LOW_SPACE:
        return no_space(folder, f": {first_line(exc)}")
    return f"{type(exc).__name__}: {first_line(exc)}"


def fullest() -> tuple[int, Path]:
    """(free bytes, folder) of the output folder with the least space left."""
    return min((shutil.disk_usage(p).free, p) for p in output_folders())


def mount_of(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (or of its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def no_space(path: Path, cause: str = "") -> str:
    """The full filesystem by its mount point, and what was written there: the project's
    root says nothing when samples/ or checkpoints/ is a disk of its own."""
    mount = mount_of(path)
    free = shutil.disk_usage(mount).free // 2**10
    return (
        f"no space left on the device holding {path} (the filesystem mounted at {mount}, "
        f"{free} KiB free{cause}); free space there or point that output at a larger disk"
    )


def output_folders() -> list[Path]:
    """The project folder and its subfolders: any may be a mount of its own (checkpoints on
    a cluster's scratch space)."""
    cwd = Path.cwd()
    return [cwd, *(p for p in cwd.iterdir() if p.is_dir() and not p.name.startswith("."))]


def path_in(tb: TracebackType | None, suffix: str) -> str | None:
    """The innermost file path ending in `suffix` ("": any) among the failing frames' usual
    names."""
    found = None
    while tb is not None:
        for name in PATH_NAMES:
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value).endswith(suffix):
                found = str(value)
        tb = tb.tb_next
    return found


def image_in(tb: TracebackType | None) -> str | None:
    """The file of the innermost Pillow image the failing frames were decoding."""
    found = None
    while tb is not None:
        image = tb.tb_frame.f_locals.get("self")
        name = getattr(image, "filename", None)
        if type(image).__module__.startswith("PIL.") and isinstance(name, (str, os.PathLike)):
            found = str(name) or found
        tb = tb.tb_next
    return found


def save_traceback(exc: BaseException) -> Path | None:
    """Write the traceback beside the logs (best effort: the fault may be a full disk)."""
    stage = Path(sys.argv[0]).stem or "stage"
    path = TRACEBACKS / f"{stage}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path
