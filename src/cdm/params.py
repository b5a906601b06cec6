"""Typed schema of params.yaml: the one place where parameters and their defaults live.

Every stage validates the whole file on load; a wrong key, type or value stops it
before any work with one line naming the key and what is allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml problem, with a one-line message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Teacher(Section):
    """The pretrained teacher every stage distils or compares against."""

    backend: Literal["shapes", "sd3", "longcat"] = "shapes"
    path: str = "src/cdm/world/pretrained/teacher"  # local folder or hub id
    cfg_scale: float = Field(4.0, ge=1.0)  # the teacher's own CFG when it is sampled
    steps: int = Field(28, gt=0)  # the teacher's own Euler steps


class Judge(Section):
    """The shapes world's attribute classifier (its features feed the world metrics)."""

    path: str = "src/cdm/world/pretrained/judge"


class PrepareTeacher(Section):
    n_pairs: int = Field(512, gt=0)  # held-out prompt/seed pairs of the teacher check
    batch_size: int = Field(256, gt=0)
    judge_renders: int = Field(2048, gt=0)  # fresh renders of the judge accuracy check


class WorldTeacher(Section):
    """The `make world-teacher` target: trains the world's teacher once (committed)."""

    out: str = "src/cdm/world/pretrained/teacher"
    steps: int = Field(20_000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(500, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    p_uncond: float = Field(0.1, ge=0, le=1)  # prompts dropped to the null prompt, for CFG
    shift: float = Field(2.0, gt=0)  # SD3 time shift
    seed: int = 0
    num_layers: int = Field(4, gt=0)
    heads: int = Field(2, gt=0)
    head_dim: int = Field(32, gt=0)
    text_width: int = Field(64, gt=0)
    eval_every: int = Field(2500, gt=0)  # steps between alignment checks in the log
    eval_pairs: int = Field(256, gt=0)


class WorldJudge(Section):
    """The `make world-judge` target: trains the judge once (committed)."""

    out: str = "src/cdm/world/pretrained/judge"
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class Params(Section):
    seed: int = 0
    teacher: Teacher = Teacher()
    judge: Judge = Judge()
    prepare_teacher: PrepareTeacher = PrepareTeacher()
    world_teacher: WorldTeacher = WorldTeacher()
    world_judge: WorldJudge = WorldJudge()


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = Params
        for part in err["loc"][:-1]:
            parent = parent.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(parent.model_fields)  # type: ignore[union-attr]
        return f"{source}: unknown key '{key}'; allowed keys here: {allowed}"
    got = err.get("input")
    return f"{source}: {key}: {err['msg'].lower()} (got {got!r}); fix it in {source}"


def parse(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raises ParamsError with one line on the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors()[0], source)) from None


def load(path: str | Path = DEFAULT_PATH) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file; run from the project root or pass --params")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}; fix the syntax") from None
    return parse(data, str(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m cdm.params [params.yaml]`: validate and exit non-zero with one line if bad."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        load(argv[0] if argv else DEFAULT_PATH)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
