"""Shared entry-point plumbing of the stage scripts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from cdm.params import ParamsError

# Errors that mean "the input is wrong", reported as one line rather than a traceback.
INPUT_ERRORS = (ParamsError, FileNotFoundError, ValueError)


class StageFailure(RuntimeError):
    """A stage that cannot go on (e.g. a diverged run): one line on stderr, exit 1."""


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    return parser


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); an input error exits 2 with `error: <one line>` on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except INPUT_ERRORS as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except StageFailure as exc:  # the run went wrong, not its input: still one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
