"""Shared fixtures: tiny models built offline, finished tiny runs, and paths of the project.

Whatever costs more than a few seconds is built once per test session, whichever xdist
worker asks first (`shared`: a file lock beside the workers' temp folders), and tests copy it
(`clone`) rather than rebuild it; "the uninterrupted run" a test compares with comes from a
cache keyed by what makes it (`reference`). Families of costly
tests carry markers (`e2e`: whole DAGs or stage chains; `multiproc`: several processes of one
run); `make test-fast` deselects them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The environment's own tools first for every subprocess, as `make test` has them: one ninja
# (the venv's, not /usr/bin's 1.11) builds DeepSpeed's CPU extension, which two ninja
# versions would otherwise rebuild in turn (a minute each) in a shared cache.
os.environ["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# DeepSpeed's CPU extension built per environment (the Makefile's setting): two checkouts'
# environments sharing ~/.cache/torch_extensions rebuild it in turn, and a test that loads it
# while another environment rebuilds it fails.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


def shared(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`name` built by `build(path)` once per test session: the first xdist worker to ask
    builds it under a file lock, the others wait and reuse it. Read it, or `clone` it."""
    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if path.exists():  # a build that failed in another worker
                shutil.rmtree(path)
            path.mkdir(parents=True)
            build(path)
            done.touch()
    return path


def clone(src: Path, dst: Path) -> Path:
    """A working copy of a shared run, links kept as links. Copied, not hard-linked: fault
    tests truncate and overwrite files in place, which would reach the shared original."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`reference(key, build)`: the run `build(path)` makes, once per session for equal `key`s
    (a JSON-able record of everything that makes it: method, params, launcher). Read only."""

    def get(key: dict, build: Callable[[Path], None]) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        name = "reference-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        return shared(tmp_path_factory, name, build)

    return get


def copy_project(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The project's files (tracked and new, links kept as links) into `dst`, without
    results/, tests/ and the names in `skip`: a scratch checkout for orchestrator tests."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        src = ROOT / name
        if name.startswith(("results/", "tests/")) or name in skip:
            continue
        if src.is_file() or src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    return dst


def edit_params(path: Path, **changes: dict) -> None:
    """Update sections of a params file (each section's keys merged with `changes`)."""
    import yaml

    data = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        data[section] = data[section] | values
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# A shapes-world run small enough for the orchestrator tests: the tiny teacher, 8 pairs.
TINY_WORLD = {
    "teacher": {"path": "tiny_teacher", "steps": 2},
    "prepare_teacher": {"n_pairs": 8, "judge_renders": 512},
    "prompts": {"eval_pairs": 8},
    "distill": {"iterations": 4, "batch_size": 2, "k_max": 4, "checkpoint_every": 1},
    "sample": {"student_steps": [1], "teacher_steps": [2], "batch_size": 8},
    "report": {"grid_prompts": 2, "steps": "1"},
}


def tiny_world_project(dst: Path, teacher: Path, **changes: dict) -> Path:
    """A scratch copy of the project (no dvc.lock) with the tiny teacher and TINY_WORLD
    params, each section further updated by `changes`."""
    copy_project(dst, skip=("dvc.lock",))
    shutil.copytree(teacher, dst / "tiny_teacher")
    merged = {k: TINY_WORLD.get(k, {}) | changes.get(k, {}) for k in {*TINY_WORLD, *changes}}
    edit_params(dst / "params.yaml", **merged)
    return dst


def call_stage(cwd: Path, script: str, *args: str) -> tuple[int, str]:
    """Run a stage script of src/ as __main__ in this process: (exit code, stderr).

    Saves the ~8 s start of a Python with torch that a subprocess per call would cost.
    """
    old_cwd, old_argv, err = os.getcwd(), sys.argv, io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = [script, *args]
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / "src" / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return code, err.getvalue()


def call_main(main: Callable[[list[str]], int], *argv: str) -> tuple[int, str, str]:
    """A module's `main(argv)` in this process, from the project root: (exit code, stdout,
    stderr). A CLI's parsing and printing without the start of a Python with torch."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def _tiny_teacher(path: Path) -> None:
    from cdm.world.teacher import WorldTeacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = WorldTeacher.new(shift=2.0, num_layers=1, heads=2, head_dim=8, text_width=16)
    teacher.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised world teacher (one layer), saved diffusers-style."""
    return shared(tmp_path_factory, "tiny_teacher", _tiny_teacher)


def _tiny_pipelines(root: Path) -> None:
    from tests import tiny_pipelines

    for name, build in TINY_PIPELINES.items():
        tiny_pipelines.save(getattr(tiny_pipelines, build)(), root / name)


# teacher.backend -> the tests.tiny_pipelines builder of its tiny pipeline
TINY_PIPELINES = {
    "sd3": "sd3_pipeline", "longcat": "longcat_pipeline", "qwen-image": "qwen_pipeline",
    "flux2-klein": "flux2_pipeline",
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random SD3, LongCat-Image, Qwen-Image and FLUX.2 [klein] pipelines saved with
    save_pretrained (offline), by teacher.backend."""
    root = shared(tmp_path_factory, "tiny_pipelines", _tiny_pipelines)
    return {name: root / name for name in TINY_PIPELINES}


# ------------------------------------------------------------- tiny scorers (test_scorers, hpsv3)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered tiny open_clip architecture; its random weights saved as a state dict."""
    from tests import test_scorers as S

    return S.build_tiny_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="session")
def tiny_pick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, processor folder) of a tiny random CLIPModel and a CLIP processor."""
    from tests import test_scorers as S

    return S.build_tiny_pick(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="session")
def tiny_l14(tiny_pick: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import test_scorers as S

    return S.l14_folder(tiny_pick[0], tmp_path_factory.mktemp("clip_vitl14"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The tiny HPSv3: (base folder, checkpoint folder, reference model with the same
    weights, tokenizer, rm_head state)."""
    from tests import test_hpsv3 as H

    return H.build_tiny(tmp_path_factory.mktemp("hpsv3"))


# ------------------------------------------------------------- finished tiny runs, shared


@pytest.fixture(scope="session")
def distill_project(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    """A scratch project with the tiny teacher prepared and its prompts cached (test_distill,
    test_lora, test_multinode: each clones it)."""
    from tests import test_distill as D

    def build(path: Path) -> None:
        shutil.copytree(tiny_teacher_dir, path / "tiny_teacher")
        D._write_params(path / "params.yaml")
        D._run(path, "prepare_teacher.py")
        D._run(path, "cache_teacher.py")

    return shared(tmp_path_factory, "distill_project", build)


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    """A tiny shapes project with a teacher, a prompt cache, a distilled `cdm` student (and
    its checkpoints), a sample set, and the committed results/ (the fault tests' subject)."""
    from tests import test_faults as F

    def build(path: Path) -> None:
        tiny_world_project(
            path, tiny_teacher_dir, distill={"methods": ["cdm"], "checkpoint_every": 2}
        )
        shutil.copytree(ROOT / "results", path / "results")
        for proc in (
            F._stage(path, "prepare_teacher.py"),
            F._stage(path, "cache_teacher.py"),
            F._distill(path),
            F._stage(path, "sample.py", "--model", "teacher_cfg", "--steps", "2"),
        ):
            assert proc.returncode == 0, proc.stderr[-2000:]

    return shared(tmp_path_factory, "finished", build)


@pytest.fixture(scope="session")
def snakemade(tmp_path_factory: pytest.TempPathFactory, finished: Path) -> Path:
    """The finished project, brought up to date by Snakemake: it has nothing left to do, and
    its metadata of distill (the params a params change is compared with), as after `make`."""
    from tests import test_faults as F

    def build(path: Path) -> None:
        clone(finished, path / "p")
        proc = F._run(path / "p", "snakemake", "--cores", "1", "--forcerun", "distill")
        assert proc.returncode == 0, proc.stderr[-3000:]

    return shared(tmp_path_factory, "snakemade", build) / "p"


# teacher.backend of the real-run families, each run once to the report by Snakemake
REAL_BACKENDS = ["sd3", "longcat", "qwen-image", "flux2-klein"]


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory, tiny_dirs, tiny_clip, tiny_pick, tiny) -> Callable[[str], Path]:
    """`real_runs(backend)`: a scratch project on the backend's tiny pipeline and tiny scorers,
    run to the report by Snakemake, distill and sample under the text-encoder guard (test_real_run_orchestration reads
    its plan, test_pipeline_backends its stages). Read only; the tests that take it are grouped by backend on
    one xdist worker, which builds it."""
    from tests import test_real_run_orchestration as R

    def get(backend: str) -> Path:
        def build(path: Path) -> None:
            R.real_run(path, backend, tiny_dirs, tiny_clip, tiny_pick, tiny)

        return shared(tmp_path_factory, f"real_run_{backend}", build) / "p"

    return get


# ------------------------------------------------------------- markers of the costly families

# Whole DAGs, stage chains and trainings: a test is `e2e` when it takes one of these fixtures
# or lives in one of these modules; `multiproc` when it starts several processes of one run.
E2E_FIXTURES = {"finished", "snakemade", "distill_project", "reference", "tiny_dirs", "real_runs"}
E2E_MODULES = {
    "test_orchestration", "test_real_run_orchestration", "test_pipeline_backends",
    "test_eval_stages", "test_dpg_stages", "test_stages", "test_cache_resume",
}  # fmt: skip
MULTIPROC_MODULES = {"test_multinode", "test_checkpoint_ranks", "test_zero_partitions"}
# Modules whose module-scoped fixtures cost a run each: their tests stay on one xdist worker
# (`--dist loadgroup`), so the fixture is built once. The costliest are session-wide instead.
GROUPED_MODULES = {
    "test_compare", "test_eval_stages", "test_export", "test_flux2", "test_plan", "test_preference", "test_slurm",
}  # fmt: skip


# Whole DAGs (minutes each) first, then the other costly families, then the rest: two workers
# take tests in this order, so the longest start early and the quick ones fill the end,
# instead of one worker finishing a DAG alone while the other idles.
DAG_MODULES = ("test_orchestration", "test_real_run_orchestration")


def _cost_rank(item: pytest.Item) -> int:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in DAG_MODULES:
        return 0
    return 1 if item.get_closest_marker("e2e") or item.get_closest_marker("multiproc") else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in E2E_MODULES or fixtures & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if (
            module in MULTIPROC_MODULES
            or "two_process" in item.name
            or "num_processes" in (item.function.__doc__ or "")
        ):
            item.add_marker(pytest.mark.multiproc)
        if module in GROUPED_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
        elif "real_runs" in fixtures:  # one worker per backend's run, whichever module
            backend = next(v for v in item.callspec.params.values() if v in REAL_BACKENDS)
            item.add_marker(pytest.mark.xdist_group(f"real_{backend}"))
    if getattr(config.option, "loadgroup", False):
        _group_ids(items)
    items.sort(key=_cost_rank)  # stable: the order within each rank is kept


def _group_ids(items: list[pytest.Item]) -> None:
    """`--dist loadgroup`'s "@group" suffix on each grouped test's id, which is how xdist's
    scheduler keeps a group on one worker. xdist 3.8 writes it to `item._nodeid`, which
    pytest 9 no longer reads (the id is `item._id`): every group was split across the
    workers, module fixtures built twice and the real Slurm tests run side by side."""
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest 8: xdist's own suffix works
        return
    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}  # fmt: skip
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(sorted(names))}")


# ------------------------------------------------------------------------ the suite's timeline

TIMELINE = "CDM_TEST_TIMELINE"  # a file: one JSON line per test phase (worker, start, seconds)
_cpu_seen = [0.0]  # this worker's CPU seconds (its own and its finished children's) so far


def _cpu_seconds() -> float:
    import resource

    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With CDM_TEST_TIMELINE set, where each worker spent the run: a gap between one test's
    end and the next one's start, a setup that waits on another worker's shared build, or a
    phase whose CPU seconds (the worker's and its subprocesses') fall short of its wall
    seconds is a core left idle (python bench/suite_timeline.py reads it)."""
    path = os.environ.get(TIMELINE)
    if not path or getattr(report, "node", None) is not None:  # xdist's controller: a copy
        return
    cpu = _cpu_seconds()
    line = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "test": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "start": getattr(report, "start", None),
        "seconds": round(report.duration, 3),
        "cpu": round(cpu - _cpu_seen[0], 3),
    }
    _cpu_seen[0] = cpu
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
