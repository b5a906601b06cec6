# Shared settings of every rule.
import os
import secrets

from cdm import params as P
from cdm import resources as R
from cdm import slurmstate
from cdm.lock import RUN
from cdm.lock import release as release_lock
from cdm.stagecode import stage_code

# This run's token (cdm.lock): onstart's claim records it, and every job inherits it, on a
# SLURM node too (sbatch and srun export the environment), so the lock knows its own jobs
# whatever their host. A job's own snakemake parses this file again and keeps the token.
os.environ.setdefault(RUN, secrets.token_hex(8))

PARAMS_FILE = "params.yaml"
# The validated params (read as YAML 1.2, as the scripts and DVC read them).
PARAMS = P.load(PARAMS_FILE)
# The rules' `config`: the same file as plain data (never through Snakemake's own loader,
# which templates); --config keys that are not params (shards, accelerate_suffix) stay.
for _key, _value in P.read_yaml(PARAMS_FILE).items():
    config.setdefault(_key, _value)
PYTHON = "python"
# Processes per distill job: distill.num_processes (8 GPUs of one node in the real-run
# overlays; one launcher per node starts them all).
NPROC = PARAMS.distill.num_processes
# Nodes per distill job (distill.nodes): above one, cdm.launch starts one launcher per node
# under srun, and the job is a multi-task one: the SLURM plugin's `mpi` resource runs the
# rule in the batch shell (no `srun -n1` around it) and asks for one task per node.
NODES = PARAMS.distill.nodes
NODES_ARG = f"--nodes {NODES} " if NODES > 1 else ""
MULTINODE = {"mpi": "srun", "tasks": NODES} if NODES > 1 else {}
# What each rule asks SLURM for, derived from the params (cdm.resources; CDM_SLURM_SCALE=small
# scales every rule to a small node), and only on SLURM: the executor is known when a job's
# resources are evaluated, not while this file is read.
SLURM_SIZE = R.scale()
# A scancel'ed job reads 'CANCELLED by <uid>' in sacct, which the plugin (2.8) counts as
# running for ever: cdm.slurmstate makes it read 'CANCELLED'.
slurmstate.patch_plugin()


def on_slurm():
    plugin = workflow.executor_plugin
    return plugin is not None and plugin.name.startswith("slurm")  # or its job step


def slurm(rule):
    """The rule's gres, cpus_per_task, mem_mb and runtime on SLURM; elsewhere none (0 for the
    sized ones, which Snakemake wants as numbers: no local run constrains them)."""

    def get(key):
        def value(wildcards):
            if not on_slurm():
                return 0 if key in ("mem_mb", "runtime") else None
            shards = int(config.get("shards", 1))
            return R.rule_resources(PARAMS, rule, shards, SLURM_SIZE).get(key)

        return value

    return {key: get(key) for key in ("gres", "cpus_per_task", "mem_mb", "runtime")}


def threads_for(rule, local=None):
    """OMP threads: the job's CPUs per process on SLURM, `local` elsewhere (None: every core
    of the run, asked when a job is planned, see all_cores)."""
    return lambda wildcards: (
        R.threads(PARAMS, rule, int(config.get("shards", 1)), SLURM_SIZE)
        if on_slurm()
        else (all_cores(wildcards) if local is None else local)
    )


METHODS = config["distill"]["methods"]


def all_cores(wildcards) -> int:
    """Every core of the run, for the rules that use them all. Asked only when a job is
    planned: a bare `workflow.cores` is read at parse time and makes `snakemake --unlock`
    (which plans nothing and takes no --cores) fail with "requires a total number of cores"."""
    return workflow.cores

# The shapes world is scored by its judge; sd3 / longcat by the paper's preference scorers,
# whose weights (and a hub teacher) fetch_weights downloads first on the login node.
WORLD = config["teacher"]["backend"] == "shapes"
RESOLUTION = config["teacher"].get("resolution")
# Accelerate config variant: "" (1 process by default) locally; the SLURM profile sets
# accelerate_suffix=-8gpu (configs/accelerate/zero{2,3}-8gpu.yaml, bf16).
ACCELERATE_SUFFIX = config.get("accelerate_suffix") or ""  # `--config accelerate_suffix=`: None
# The ablation's stages for DVC: their code deps are its rules' code inputs (stage_code).
ABLATION_DVC = "workflow/ablation/dvc.yaml"


wildcard_constraints:
    model=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9_]+",
    steps=r"\d+",
    i=r"\d+",
    n=r"\d+",
    seed=r"\d+",
