"""The DPG-Bench VQA runner's own Python environment: created once, reused while its
requirements are unchanged.

    python -m cdm.metrics.dpg_env [--env .venv-dpg] [--requirements workflow/envs/dpg-vqa.txt]

modelscope's mPLUG needs an older transformers (and numpy < 2) than this project, so it lives
in a venv of its own; the score stage talks to it through `cdm.metrics.dpg_vqa`. A marker file
holds the requirements' sha256: a changed requirements file rebuilds the venv, an unchanged one
is a no-op. Run it on a login node (it downloads packages).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import venv
from collections.abc import Callable, Sequence
from pathlib import Path

ENV = Path(".venv-dpg")
REQUIREMENTS = Path("workflow/envs/dpg-vqa.txt")
MARKER = ".requirements.sha256"

Run = Callable[[Sequence[str]], None]


def python_of(env: Path) -> Path:
    return Path(env) / "bin" / "python"


def run(command: Sequence[str]) -> None:
    subprocess.run(list(command), check=True)


def create(env: Path) -> None:
    venv.EnvBuilder(with_pip=True, clear=True).create(env)


def ensure_env(
    env: Path = ENV,
    requirements: Path = REQUIREMENTS,
    runner: Run = run,
    make: Callable[[Path], None] = create,
) -> bool:
    """Create `env` with `requirements` unless it already has them; True when (re)built."""
    if not Path(requirements).is_file():
        raise FileNotFoundError(f"{requirements}: no requirements for the DPG VQA environment")
    digest = hashlib.sha256(Path(requirements).read_bytes()).hexdigest()
    marker = Path(env) / MARKER
    if marker.is_file() and marker.read_text().strip() == digest and python_of(env).exists():
        return False
    marker.unlink(missing_ok=True)  # a half-built env is never taken for a finished one
    make(Path(env))
    runner([str(python_of(env)), "-m", "pip", "install", "-r", str(requirements)])
    marker.write_text(digest + "\n")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cdm.metrics.dpg_env")
    parser.add_argument("--env", type=Path, default=ENV)
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    args = parser.parse_args(argv)
    built = ensure_env(args.env, args.requirements)
    print(
        f"{args.env}: {'built' if built else 'up to date'} ({python_of(args.env)})", file=sys.stderr
    )


if __name__ == "__main__":
    main()
