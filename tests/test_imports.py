"""Light imports, an architecture rule: a stage script loads at start only what every run of
it needs, and a backend's libraries load only when that backend is used. Each stage script's
imports are measured in a fresh interpreter with `-X importtime` (its module body, not its
main()): which heavy packages it loads, and its total import time against `import torch`
measured the same way, so the budget holds on a quiet or a loaded machine alike."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT

HEAVY = ("torch", "diffusers", "transformers", "peft", "open_clip", "deepspeed", "matplotlib")
# script -> (heavy packages it may load at start, budget as a multiple of `import torch`).
# Measured here (2 cores, under the suite's load, torch 2.8 s): report 0.55x, score, ablation
# and score_dpg 0.35x, sample 1.36x, distill 1.06x, cache_teacher 1.13x, prepare_teacher
# 0.90x; before this rule: report 4.4x, sample 3.9x, distill 6.1x, prepare_teacher 5.3x.
STAGES = {
    "report.py": ({"matplotlib"}, 0.9),
    "score.py": (set(), 0.7),
    "score_dpg.py": (set(), 0.7),
    "ablation.py": (set(), 0.7),
    "sample.py": ({"torch"}, 1.8),
    "cache_teacher.py": ({"torch"}, 1.8),
    "prepare_teacher.py": ({"torch"}, 1.8),
    "train_world.py": ({"torch"}, 1.8),
    "distill.py": ({"torch", "deepspeed"}, 1.8),
}
# The script's module body (its imports), not its main().
LOAD = (
    "import importlib.util as u, sys; sys.argv = ['stage']; "
    "s = u.spec_from_file_location('stage', {path!r}); s.loader.exec_module(u.module_from_spec(s))"
)


def imports(code: str) -> tuple[float, set[str]]:
    """(seconds, top-level packages) of the imports `code` makes in a fresh interpreter."""
    proc = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", proc.stderr, re.M)
    return sum(int(us) for us, _ in rows) / 1e6, {name.split(".")[0] for _, name in rows}


_torch_seconds: list[float] = []  # `import torch` as first measured in this module


def against_torch(code: str, budget: float, tries: int = 3) -> tuple[float, set[str]]:
    """(the smallest ratio of `code`'s import time to `import torch`, packages loaded). The
    first try uses this module's first measurement of torch; a try over budget measures both
    back to back, so a load that comes and goes (the other xdist worker) weighs on both; up
    to `tries`, until one is within budget."""
    best, loaded = float("inf"), set()
    for attempt in range(tries):
        if attempt or not _torch_seconds:
            _torch_seconds[:] = [imports("import torch")[0]]
        seconds, loaded = imports(code)
        best = min(best, seconds / _torch_seconds[0])
        if best <= budget:
            break
    return best, loaded


@pytest.mark.parametrize("script", list(STAGES))
def test_a_stage_script_imports_only_what_it_needs(script):
    allowed, budget = STAGES[script]
    ratio, loaded = against_torch(LOAD.format(path=str(ROOT / "src" / script)), budget)
    heavy = {p for p in HEAVY if p in loaded}
    assert heavy <= allowed, f"{script} imports {sorted(heavy - allowed)} at start"
    print(f"{script}: {ratio:.2f}x torch")
    assert ratio <= budget, f"{script}: {ratio:.2f}x torch's import time, budget {budget}x"


# The stages started as modules (dvc.yaml, workflow/rules: `python -m ...`). cdm.fetch loaded
# every scorer (open_clip, transformers: 6.3 s) in the shapes world, which fetches nothing.
MODULE_STAGES = {"cdm.fetch": (set(), 0.7), "cdm.validate": (set(), 0.7)}


@pytest.mark.parametrize("module", list(MODULE_STAGES))
def test_a_stage_module_imports_only_what_it_needs(module):
    allowed, budget = MODULE_STAGES[module]
    ratio, loaded = against_torch(f"import {module}", budget)
    heavy = {p for p in HEAVY if p in loaded}
    assert heavy <= allowed, f"{module} imports {sorted(heavy - allowed)} at start"
    assert ratio <= budget, f"{module}: {ratio:.2f}x torch's import time, budget {budget}x"


def test_the_validator_and_the_params_load_without_torch():
    _, loaded = imports("import cdm.validate, cdm.overlay, cdm.plan")
    assert not {p for p in HEAVY if p in loaded}


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run(
        [PYTHON, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(proc.stdout.split())


def test_the_registry_names_backends_without_importing_them():
    """Naming or choosing a backend loads that backend's module only: the shapes world never
    imports the SD3, LongCat, Qwen-Image or FLUX.2 modules (nor the pipeline helpers they
    need)."""
    loaded = _modules_after("from cdm import backends; backends.backend_module('shapes')")
    assert "cdm.backends.shapes" in loaded
    pipelines = {"sd3", "longcat", "qwenimage", "flux2", "pipelines"}
    assert not loaded & {f"cdm.backends.{name}" for name in pipelines}
    loaded = _modules_after("from cdm.backends import BACKENDS")
    assert not {m for m in loaded if m.startswith("cdm.backends.")}
    with pytest.raises(
        ValueError, match="choose one of shapes, sd3, longcat, qwen-image, flux2-klein$"
    ):
        from cdm.backends import backend_module

        backend_module("flux")


def test_peft_loads_in_lora_mode_only():
    """cdm.lora itself imports no peft; asking whether a plain module has adapters does not
    import it either (no adapter can exist before peft is loaded)."""
    loaded = _modules_after(
        "import torch\nfrom cdm import lora\n"
        "assert not lora.is_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)))"
    )
    assert "cdm.lora" in loaded and "peft" not in loaded


def test_no_import_circle_between_the_samplers():
    """cdm.baselines (a published model's set) takes the PNG and index writer from
    cdm.samplefiles, below both samplers, not from cdm.sampler."""
    loaded = _modules_after("import cdm.baselines")
    assert "cdm.samplefiles" in loaded and "cdm.sampler" not in loaded
    assert "torch" not in _modules_after("import cdm.samplefiles, cdm.report.table1")
