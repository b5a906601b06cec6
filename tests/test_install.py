"""pyproject.toml's ranges and constraints.txt's exact versions (the embedded default, which
`make install` installs): the ranges admit the lock, and this environment holds the lock."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")


def lock(path: Path = ROOT / "constraints.txt") -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_requirement_is_a_range_that_admits_its_lock_pin():
    pins = lock()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), (str(req), str(pins[name]))
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not exact, f"pyproject.toml pins {req} exactly; declare a range"


def test_the_minimum_constraints_pin_each_lower_bound():
    """constraints-min.txt (`make test-min`) pins every requirement at its declared lower bound,
    but torch and torchvision: their lowest pair cannot run on this machine (PyPI's torchvision
    0.28 fails to import beside the CPU build of torch 2.13 on disk), so they stay at the lock."""
    pins, locked = lock(ROOT / "constraints-min.txt"), lock()
    names = {canonicalize_name(req.name) for req in requirements()}
    assert set(pins) == names, set(pins) ^ names
    for req in requirements():
        name = canonicalize_name(req.name)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        want = locked[name] if name in ("torch", "torchvision") else lower[0]
        assert pins[name] == want, (str(req), f"constraints-min.txt: {pins[name]}")


def _installed_lock() -> Path | None:
    """The file `make install` constrained this environment with, from its stamp ('lock:
    constraints.txt'; `make test-min`'s .venv-min: constraints-min.txt); None where it ran
    with LOCK= (the ranges alone, e.g. a cluster's torch)."""
    stamp = Path(sys.prefix) / ".installed"
    if not stamp.is_file():
        return ROOT / "constraints.txt"
    name = stamp.read_text().strip().removeprefix("lock:").strip()
    return ROOT / name if name else None


@pytest.mark.skipif(_installed_lock() is None, reason="installed without the lock (LOCK=)")
def test_this_environment_holds_the_lock():
    moved = {}
    for name, version in lock(_installed_lock()).items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # another platform's package (a constraint installs nothing)
        if installed != version:
            moved[name] = (str(version), str(installed))
    assert not moved, (
        f"installed versions differ from {_installed_lock().name} (pinned, installed): {moved}"
    )


def test_the_installed_torch_is_in_range():
    for req in requirements():
        if canonicalize_name(req.name) in ("torch", "torchvision"):
            installed = importlib.metadata.version(req.name)
            assert req.specifier.contains(installed), (str(req), installed)
