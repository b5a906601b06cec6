"""The sbatch lines the SLURM profile (workflow/profiles/slurm/) makes for every rule.

`snakemake --profile slurm` really submits here: the SLURM executor plugin builds each
command line with its own code and runs `sbatch`, which is a fake on PATH that records its
arguments and prints a job id; fake `sacct`/`squeue` report the jobs COMPLETED (no cluster).
The fake jobs write nothing, so each run ends on missing outputs after submitting; the test
makes the outputs a wave needs and runs the next wave, until every rule was submitted once.
A dry run (`snakemake -n --profile slurm`) never reaches this code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdm.overlay import apply
from tests.conftest import PYTHON, ROOT, copy_project

pytest.importorskip("snakemake_executor_plugin_slurm")

BIN = str(Path(PYTHON).parent)
ACCOUNT, PARTITION = "my-account", "gpu"  # the profile's placeholders

# Fake SLURM commands. sbatch (called with --parsable) prints the bare job id.
SBATCH = f"""#!{sys.executable}
import json, os, sys
log = os.environ["FAKE_SLURM_LOG"]
ids = log + ".ids"
job = 1000 + (sum(1 for _ in open(ids)) if os.path.exists(ids) else 0)
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": sys.stdin.read(), "id": job}}) + "\\n")
with open(ids, "a") as f:
    f.write(f"{{job}}\\n")
print(job)
"""
STATUS = f"""#!{sys.executable}
import os
ids = os.environ["FAKE_SLURM_LOG"] + ".ids"
for line in open(ids) if os.path.exists(ids) else []:
    print(f"{{line.strip()}}|COMPLETED")
"""
FAKES = {
    "sbatch": SBATCH,
    "sacct": STATUS,
    "squeue": STATUS,
    "sacctmgr": f"#!/bin/sh\necho {ACCOUNT}\n",  # account check
    "sshare": f"#!/bin/sh\necho {ACCOUNT}\n",
    "scontrol": "#!/bin/sh\necho 'MaxArraySize = 1001'\necho 'MinJobAge = 300 sec'\n",
    # `sinfo -o %P` (the plugin), or the partition's nodes for cdm.fits: 4 nodes of 8 GPUs.
    "sinfo": f"#!/bin/sh\ncase \"$*\" in *%c*) echo '{PARTITION}*|128|1000000|gpu:8|4|infinite' ;;"
    f" *) echo {PARTITION} ;; esac\n",
    "scancel": "#!/bin/sh\nexit 0\n",
    "srun": "#!/bin/sh\necho 'srun runs inside a job, not on the submit host' >&2\nexit 1\n",
}

# What each rule's sbatch line must hold, beside the per-run --job-name, --output, -D,
# --comment and --wrap: one task (GPU jobs: no --ntasks*, sbatch's default of one task per
# node; CPU jobs: --ntasks=1), the GPUs as --gres, the CPUs as --cpus-per-task.
COMMON = {"--parsable", "--export=ALL", "--requeue", "--open-mode=append", f"-A {ACCOUNT}"}
COMMON |= {f"-p {PARTITION}"}
EXPECTED = {  # cdm.resources for configs/sd3-medium.yaml (P = 2,028,328,000) and the world
    "prepare_teacher": {"-t 60", "--mem 42474", "--cpus-per-task=8", "--gres=gpu:1"},
    # The node's 8 GPUs, one encoding process on each: 8 x (32 GiB of text encoders as they
    # load + one batch of embeddings + 8 GiB)
    "cache_teacher": {"-t 60", "--mem 344296", "--cpus-per-task=64", "--gres=gpu:8"},
    "distill": {  # 8 processes: 8 x (2 P + 8 GiB) + rank 0's fp32 EMA (4 P)
        "-t 1440",
        "--mem 109287",
        "--nodes=1",
        "--cpus-per-task=64",
        "--gres=gpu:8",
    },
    "sample_part": {"-t 240", "--mem 42474", "--cpus-per-task=8", "--gres=gpu:1"},
    "sample": {"-t 30", "--mem 8000", "--ntasks=1", "--cpus-per-task=2"},  # merge of parts
    # The shapes world runs on CPUs: its score and report ask for no GPU.
    "score": {"-t 240", "--mem 4000", "--ntasks=1", "--cpus-per-task=2"},
    "report": {"-t 30", "--mem 4000", "--ntasks=1", "--cpus-per-task=2"},
}
GPUS = {"prepare_teacher": 1, "cache_teacher": 8, "distill": 8, "sample_part": 1}
PER_RUN = ("--job-name", "--output", "-D", "--comment")


def _options(argv: list[str]) -> tuple[str, set[str]]:
    """(rule, options): the sbatch options as 'flag value' / 'flag=value' strings, without
    the per-run ones and the wrapped command."""
    rule, options, i = None, set(), 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--wrap") or arg == "/dev/stdin":
            i += 2 if arg == "--wrap" else 1
            continue
        takes_value = arg in PER_RUN or arg in ("-A", "-p", "-t", "--mem", "--mem-per-cpu")
        if arg == "--comment":
            rule = argv[i + 1].removeprefix("rule_").split("_wildcards_")[0]
        elif arg not in PER_RUN:
            options.add(f"{arg} {argv[i + 1]}" if takes_value else arg)
        i += 2 if takes_value else 1
    assert rule, argv
    return rule, options


PLACEHOLDER = {".json": b"{}\n", ".parquet": b"PAR1PAR1"}


def _make(root: Path, *paths: str) -> None:
    """Outputs of jobs the fake cluster 'ran': a folder, or a file if it has a suffix; a .json
    holds an empty object and a .parquet its magic bytes, which `cdm.validate` checks of the
    finished results before every run."""
    for name in paths:
        path = root / name
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PLACEHOLDER.get(path.suffix, b""))
        else:
            path.mkdir(parents=True, exist_ok=True)


class FakeCluster:
    def __init__(self, tmp: Path):
        self.bin = tmp / "fake-slurm"
        self.bin.mkdir()
        for name, text in FAKES.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.log = tmp / "sbatch.jsonl"
        self.env = os.environ | {
            "PATH": f"{self.bin}:{BIN}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "FAKE_SLURM_LOG": str(self.log),
        }
        self.env = {k: v for k, v in self.env.items() if not k.startswith("SLURM_")}

    def submit(self, work: Path, *targets: str) -> list[tuple[str, set[str]]]:
        """Run the profile on `targets`; the (rule, options) of each sbatch call it made."""
        before = len(self.log.read_text().splitlines()) if self.log.exists() else 0
        cmd = [
            "snakemake", "--cores", "all", "--profile", "slurm", *targets,
            # the fake jobs write nothing: no waiting for their outputs, no second attempt
            "--latency-wait", "0", "--retries", "0",
            "--slurm-init-seconds-before-status-checks", "1",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=work, env=self.env, capture_output=True, text=True, timeout=180
        )
        out = proc.stdout + proc.stderr
        calls = [json.loads(line) for line in self.log.read_text().splitlines()[before:]]
        assert calls and "sbatch failed" not in out, out[-4000:]
        assert out.count("has been submitted with SLURM jobid") == len(calls), out[-4000:]
        for call in calls:
            print("sbatch", *(a for a in call["argv"] if not a.startswith("--wrap")))
        return [_options(call["argv"]) for call in calls]


@pytest.fixture(scope="module")
def submissions(tmp_path_factory) -> dict[str, list[set[str]]]:
    """rule -> the options of its sbatch calls, over the sd3 DAG (every GPU rule) and the
    shapes DAG's world metrics (score, report)."""
    tmp = tmp_path_factory.mktemp("slurm")
    cluster = FakeCluster(tmp)
    calls = []

    # SD3 overlay, the real run's DAG (every GPU rule), in waves along it: prepare_teacher;
    # cache_teacher; distill, a sample_part and (its parts made) a sample merge.
    sd3 = copy_project(tmp / "sd3")
    apply(sd3 / "configs/sd3-medium.yaml", sd3 / "params.yaml")
    params = yaml.safe_load((sd3 / "params.yaml").read_text())
    methods, steps, shards = params["distill"]["methods"], params["sample"]["teacher_steps"], 4
    cfg, nocfg = f"samples/teacher_cfg/{steps[0]}", f"samples/teacher_nocfg/{steps[0]}"
    # fetch_weights and fetch_prompts: local rules (the login node), never sbatch; the
    # training prompts are the user's (onstart's validation checks they are there).
    _make(sd3, "models/weights.json", params["prompts"]["eval_file"])
    (sd3 / params["prompts"]["train_file"]).write_text("a cat\n")
    calls += cluster.submit(sd3, "results/teacher.json")
    _make(sd3, "models/teacher", "results/teacher.json", "logs/timings/prepare_teacher.json")
    calls += cluster.submit(sd3, "cache/prompts")
    _make(sd3, "cache/prompts")
    _make(sd3, *(f"{nocfg}/part-{i}-of-{shards}/index.parquet" for i in range(shards)))
    students = [f"models/students/{m}" for m in methods]
    calls += cluster.submit(
        sd3, *students, f"{cfg}/part-0-of-{shards}/index.parquet", f"{nocfg}/index.parquet"
    )

    # Shapes world: score and report exist only here; everything before them is made.
    world = copy_project(tmp / "world")
    params = yaml.safe_load((world / "params.yaml").read_text())
    methods, sample = params["distill"]["methods"], params["sample"]
    sets = [(m, s) for m in ("teacher_cfg", "teacher_nocfg") for s in sample["teacher_steps"]]
    sets += [(m, s) for m in methods for s in sample["student_steps"]]
    _make(world, "models/teacher", "results/teacher.json", "cache/prompts")
    _make(world, "logs/timings/prepare_teacher.json")
    _make(world, *(f"models/students/{m}" for m in methods))
    _make(world, *(f"logs/{m}/train.csv" for m in methods))
    _make(world, *(f"samples/{m}/{s}/index.parquet" for m, s in sets))
    calls += cluster.submit(world, "results/metrics.json")
    _make(world, "results/metrics.json", "results/scores.parquet", "logs/timings/score.json")
    calls += cluster.submit(world, "results/report.html")

    by_rule: dict[str, list[set[str]]] = {}
    for rule, options in calls:
        by_rule.setdefault(rule, []).append(options)
    return by_rule


def test_every_rule_is_submitted(submissions):
    assert set(submissions) == set(EXPECTED)
    assert len(submissions["distill"]) == 2  # dmd2 and cdm of configs/sd3-medium.yaml
    assert all(len(v) == 1 for k, v in submissions.items() if k != "distill")


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_sbatch_line_of_each_rule(submissions, rule):
    for options in submissions[rule]:
        assert sorted(options) == sorted(COMMON | EXPECTED[rule])


def test_distill_is_one_task_with_all_the_node_gpus(submissions):
    for options in submissions["distill"]:
        # one task: no --ntasks* at all, one node: sbatch's default of one task per node
        assert not any(o.startswith(("--ntasks", "-n ")) for o in options), options
        assert "--nodes=1" in options
        assert "--gres=gpu:8" in options and "--cpus-per-task=64" in options
        assert not any(o.startswith(("--gpus", "--cpus-per-gpu")) for o in options), options
        assert not any(o.startswith("--signal") for o in options)  # see the profile's note


@pytest.mark.parametrize("rule", [r for r, n in GPUS.items() if n == 1])
def test_single_gpu_rules_are_one_task_with_one_gpu(submissions, rule):
    for options in submissions[rule]:
        # --ntasks-per-gpu with --cpus-per-task: srun fails on SLURM_TRES_PER_TASK
        assert not any(o.startswith(("--ntasks", "-n ")) for o in options), options
        assert "--gres=gpu:1" in options and "--cpus-per-task=8" in options
        assert not any(o.startswith(("--gpus", "--cpus-per-gpu")) for o in options), options


@pytest.fixture(scope="module", params=[1, 2], ids=["1-node", "2-nodes"])
def distill_job(request, tmp_path_factory) -> tuple[int, set[str]]:
    """(nodes, distill's sbatch options) for the sd3 overlay with distill.nodes set."""
    nodes, tmp = request.param, tmp_path_factory.mktemp(f"nodes{request.param}")
    cluster = FakeCluster(tmp)
    work = copy_project(tmp / "sd3")
    apply(work / "configs/sd3-medium.yaml", work / "params.yaml")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["distill"]["nodes"] = nodes
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    _make(work, "models/weights.json", params["prompts"]["eval_file"])
    _make(work, "models/teacher", "results/teacher.json", "cache/prompts")
    (work / params["prompts"]["train_file"]).write_text("a cat\n")
    [(rule, options)] = cluster.submit(work, "models/students/cdm")
    assert rule == "distill"
    return nodes, options


def test_distill_asks_for_one_task_per_node(distill_job):
    """N nodes: --nodes=N --ntasks=N (the plugin's `mpi` job: its step runs the rule in the
    batch shell, whose cdm.launch runs srun), the node's GPUs and CPUs per task."""
    nodes, options = distill_job
    assert f"--nodes={nodes}" in options and "--gres=gpu:8" in options
    assert "--cpus-per-task=64" in options  # per task: one task, one launcher per node
    ntasks = {o for o in options if o.startswith(("--ntasks", "-n "))}
    assert ntasks == (set() if nodes == 1 else {f"--ntasks={nodes}"})
    assert sorted(options - ntasks) == sorted(
        (COMMON | EXPECTED["distill"]) - {"--nodes=1"} | {f"--nodes={nodes}"}
    )


# ---------------------------------------------------------------- the job's side (issue 34)

SCONTROL_JOB = """#!/bin/sh
echo "$@" >> "$FAKE_SCONTROL_LOG"
[ "$1" = show ] && echo "JobId=77 JobState=${FAKE_STATE:-RUNNING} NumNodes=2 NumCPUs=128"
[ "$1" = show ] && echo "   BatchFlag=$FAKE_BATCH Requeue=1"
exit 0
"""


@pytest.fixture
def scontrol(tmp_path) -> dict[str, str]:
    """A job's environment with a fake `scontrol` that logs its calls."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/scontrol").write_text(SCONTROL_JOB)
    (tmp_path / "bin/scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CDM_"))}
    return env | {
        "PATH": f"{tmp_path / 'bin'}:{BIN}:{os.environ['PATH']}",
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "FAKE_BATCH": "1",
        "SLURM_JOB_ID": "77",
    }


def test_the_srun_step_gets_the_jobs_cpus_per_node(scontrol, monkeypatch):
    """srun (Slurm >= 22.05) does not inherit --cpus-per-task, and the plugin's job step drops
    SLURM_*: the step asks for the node's share of the job itself."""
    from cdm.nodes import cpus_per_node, srun_command

    assert cpus_per_node({"SLURM_JOB_CPUS_PER_NODE": "64(x2)"}) == 64
    assert cpus_per_node({"SLURM_JOB_CPUS_PER_NODE": "64,32(x3)"}) == 32
    monkeypatch.setenv("PATH", scontrol["PATH"])
    monkeypatch.setenv("FAKE_SCONTROL_LOG", scontrol["FAKE_SCONTROL_LOG"])
    assert cpus_per_node({"SLURM_JOB_ID": "77"}) == 64  # scontrol: NumCPUs / NumNodes
    assert cpus_per_node({}) is None
    argv = ["--num_processes", "8", "src/distill.py", "--method", "cdm"]
    step = srun_command(2, argv, 64)
    assert "--cpus-per-task=64" in step[: step.index("bash")]
    assert "--cpus-per-task" not in " ".join(srun_command(2, argv, None))


def test_the_profile_retries_nothing():
    """A failed job fails once, with its line: distill's stop before its time limit comes
    back as a Slurm requeue of the same job (cdm.requeue), not as a Snakemake retry."""
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile.get("retries", 0) == 0
    assert profile.get("slurm-requeue") is True  # sbatch --requeue: the job may come back


def test_a_stop_to_resume_exits_75(tmp_path):
    code = (
        "from cdm.cli import run_stage; from cdm.preemption import Preempted\n"
        "def main(): raise Preempted('the SLURM time limit at iteration 3: checkpointed')\n"
        "run_stage(main)"
    )
    env = {k: v for k, v in os.environ.items() if k != "CDM_RUN"}
    proc = subprocess.run(
        [PYTHON, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 75
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the SLURM time limit")


@pytest.mark.parametrize("code", [75, 2], ids=["resume", "other-failure"])
def test_a_stop_to_resume_requeues_the_batch_job(tmp_path, scontrol, code):
    """cdm.launch of a worker that exits 75 (resume) in a batch job: `scontrol requeue` of
    that job, once; any other failure fails as it is."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"import sys; sys.exit({code})\n")
    proc = subprocess.run(
        [PYTHON, "-m", "cdm.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(worker)],
        cwd=tmp_path, env=scontrol, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr[-2000:]
    calls = (tmp_path / "scontrol.log").read_text().splitlines() if code == 75 else []
    assert ("requeue 77" in calls) == (code == 75), calls
    assert ("SLURM job 77 requeued" in proc.stderr) == (code == 75), proc.stderr[-2000:]


@pytest.mark.parametrize("case", ["salloc", "node-task", "outside", "cancelled"])
def test_no_requeue_outside_a_batch_job_or_from_a_node_task(scontrol, monkeypatch, case):
    """An salloc shell cannot be requeued (the user reruns); a task of the multi-node step
    leaves it to the launcher that ran the step; outside SLURM there is no job; a job
    scancel'ed (whose SIGTERM made distill checkpoint and stop) stays ended."""
    from cdm.requeue import IN_STEP, requeue

    monkeypatch.setenv("PATH", scontrol["PATH"])
    monkeypatch.setenv("FAKE_SCONTROL_LOG", scontrol["FAKE_SCONTROL_LOG"])
    monkeypatch.setenv("FAKE_BATCH", "0" if case == "salloc" else "1")
    monkeypatch.setenv("FAKE_STATE", "CANCELLED" if case == "cancelled" else "RUNNING")
    env = {"SLURM_JOB_ID": "77"} if case != "outside" else {}
    env |= {IN_STEP: "1"} if case == "node-task" else {}
    assert requeue(env) is False
    log = Path(scontrol["FAKE_SCONTROL_LOG"])
    assert "requeue 77" not in (log.read_text() if log.exists() else "")


def test_a_request_the_partition_cannot_hold_is_refused_before_submission(tmp_path):
    """The real-run distill (8 GPUs, 64 CPUs) on nodes of 2 CPUs and 2 GPUs (sinfo): one line
    naming the rule, its request and the partition, and nothing submitted."""
    cluster = FakeCluster(tmp_path)
    (cluster.bin / "sinfo").write_text(
        "#!/bin/sh\ncase \"$*\" in *%c*) echo 'gpu*|2|9039|gpu:2|2|infinite' ;; *) echo gpu ;; esac\n"
    )
    work = copy_project(tmp_path / "sd3")
    apply(work / "configs/sd3-medium.yaml", work / "params.yaml")
    params = yaml.safe_load((work / "params.yaml").read_text())
    _make(work, "models/weights.json", params["prompts"]["eval_file"])
    _make(work, "models/teacher", "results/teacher.json", "cache/prompts")
    (work / params["prompts"]["train_file"]).write_text("a cat\n")
    cmd = ["snakemake", "--cores", "all", "--profile", "slurm", "models/students/cdm"]
    proc = subprocess.run(
        cmd, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not cluster.log.exists(), out[-3000:]
    assert (
        "rule distill asks for 1 node(s) of 64 CPUs, 109287 MB, 8 GPUs, 1440 min; partition "
        "'gpu' has 2 node(s), the largest 2 CPUs, 9039 MB, 2 GPUs, no time limit" in out
    ), out[-3000:]
    assert not (work / ".cdm-run.lock").exists()  # refused before the lock was taken
