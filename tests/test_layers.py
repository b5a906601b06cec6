"""The import graph of src/cdm runs one way: no module imports from a layer above its own
(the layers of the cdm package docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cdm

SRC = Path(cdm.__file__).parent
# Lowest first; a package name covers its submodules. Same order as cdm/__init__.py.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cdm", "cdm.params", "cdm.io", "cdm.hub", "cdm.conditioning", "cdm.places", "cdm.safeyaml"),
    (
        "cdm.flow", "cdm.velocity", "cdm.losses", "cdm.schedules", "cdm.rollout", "cdm.sampling",
        "cdm.ema", "cdm.guidance", "cdm.lorafactors",
    ),
    ("cdm.metrics",),
    ("cdm.world",),
    ("cdm.backends",),
    (
        "cdm.engine", "cdm.lora", "cdm.checkpoints", "cdm.zero", "cdm.preemption", "cdm.runlog",
        "cdm.cache", "cdm.sampler", "cdm.baselines", "cdm.preview", "cdm.cli", "cdm.lock",
        "cdm.lifeline", "cdm.launch", "cdm.nodes", "cdm.overlay", "cdm.plan", "cdm.fetch",
        "cdm.validate", "cdm.publish", "cdm.stagecode", "cdm.keep", "cdm.safeload",
        "cdm.requeue", "cdm.resources", "cdm.fits", "cdm.jobends",
        "cdm.slurmstate", "cdm.teacherlora", "cdm.loralayout",
    ),
    ("cdm.report",),
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """Index of the layer holding `module` (the longest listed prefix wins)."""
    best, rank = "", -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, i
    if rank < 0:
        raise KeyError(f"{module} is in no layer; add it to LAYERS here and to cdm/__init__.py")
    return rank


def imports(path: Path) -> set[str]:
    """The cdm modules a file imports (`from cdm.x import y` names cdm.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cdm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "cdm":
                continue
            found.add(node.module)
            for alias in node.names:
                sub = SRC.parent / (node.module + "." + alias.name).replace(".", "/")
                if sub.with_suffix(".py").is_file() or sub.is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


FILES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in FILES:
        layer(module_name(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_import_from_a_higher_layer(path: Path) -> None:
    own = layer(module_name(path))
    upward = sorted(m for m in imports(path) if layer(m) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports {upward} from above"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule bites: a metrics module importing the world would be reported."""
    fake = tmp_path / "probe.py"
    fake.write_text("from cdm.world.judge import Judge\nfrom cdm.metrics import frechet\n")
    assert imports(fake) == {"cdm.world.judge", "cdm.metrics", "cdm.metrics.frechet"}
    assert layer("cdm.world.judge") > layer("cdm.metrics.preference")
    assert layer("cdm.world.metrics") == layer("cdm.world")
