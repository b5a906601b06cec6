"""What each rule asks SLURM for, from the params and the memory plan (cdm.plan).

The SLURM profile (workflow/profiles/slurm/) names only the partition, the account and the
plugin's settings; each rule's request comes from here, so it follows the run it is for:

- distill (and ablation_distill): `distill.num_processes` GPUs on each of `distill.nodes`
  nodes (one launcher per node starts them), CPUS_PER_GPU CPUs per GPU process, and host
  memory per node from the plan (cdm.plan.host_per_node): each process reads the teacher in
  bf16 (2 P bytes, P its transformer's parameters; distill.load_teacher) before moving it to
  its GPU, rank 0 gathers the fp32 EMA (4 P) for previews and the export, plus PROCESS_GIB
  for each process's runtime. A one-GPU LoRA
  run asks for one GPU; a 2-node SD3.5-Large run for 8 GPUs on each of 2 nodes.
- cache_teacher: a node's GPUs (`distill.num_processes`, the GPUs per node the run is sized
  for; cache_teacher starts one encoding process per GPU it sees), CPUS_PER_GPU CPUs each,
  and per process its text encoders as they load (TEXT_GIB), the batch of embeddings in hand
  (cdm.plan.cache_bytes of `cache_teacher.batch_size` prompts: cdm.cache.write_shard streams
  each shard to disk batch by batch) and PROCESS_GIB. LongCat's 200k prompts take about an
  hour on one GPU, minutes on eight.
- every other GPU rule (the teacher's and the samplers' one-GPU jobs): one GPU, CPUS_PER_GPU
  CPUs, the teacher read in fp32 plus TEXT_GIB for its text encoders; the scorers' memory is
  their own models' (SCORER_MB), not the teacher's.
- the CPU rules (a sample merge, report) and every rule of the shapes world, which runs on
  CPUs: no GPU.

One knob scales every rule to a small node: CDM_SLURM_SCALE=small (1 CPU and at most
SMALL_MB each; the GPUs stay as derived). It is an environment variable, not a `--config`
key: a `--config` on the command line replaces the profile's whole `config:` list.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

from cdm import params as P

SCALE = "CDM_SLURM_SCALE"
SCALES = ("full", "small")
CPUS_PER_GPU = 8
PROCESS_GIB = 8  # a process's own runtime beside the weights: torch, CUDA host buffers, data
TEXT_GIB = 32  # the teacher's text encoders (SD3: CLIP-L, CLIP-G, T5-XXL) as they load
SMALL_MB = 4000
WORLD_MB = 4000  # any job of the shapes world (its models are a few MB)
# Minutes per rule (their longest expected job at the real-run sizes).
RUNTIME = {
    "prepare_teacher": 60, "cache_teacher": 60, "distill": 1440, "sample_part": 240,
    "sample": 240, "score": 240, "cache_dpg": 60, "sample_dpg": 240, "score_dpg": 480,
    "report": 30, "ablation_distill": 1440, "ablation_sample": 240, "ablation_score": 240,
}  # fmt: skip
# The scorers' own memory: HPSv3 (Qwen2-VL-7B) held on the host while it loads; mPLUG.
SCORER_MB = {"score": 96000, "ablation_score": 96000, "score_dpg": 64000}
DISTILL = ("distill", "ablation_distill")
# And `sample` when it merges shards; the shapes world's own training rules run on CPUs.
CPU_RULES = ("report", "ablation", "world_judge", "world_teacher")
MERGE_MB, MERGE_MINUTES = 8000, 30  # a merge of a set's shards: a CPU job


class ResourcesError(ValueError):
    """A request that cannot be made; the message is one line."""


def scale(env: dict[str, str] | None = None) -> str:
    value = (os.environ if env is None else env).get(SCALE, "full") or "full"
    if value not in SCALES:
        raise ResourcesError(f"{SCALE}={value!r}: expected one of {', '.join(SCALES)}")
    return value


@lru_cache(maxsize=4)
def _teacher(backend: str, path: str, resolution: int | None):
    """The plan's model of the teacher's transformer (built on the meta device: no weights)."""
    from cdm.plan import describe

    return describe(backend, path, resolution)[0]


def _teacher_parameters(backend: str, path: str, resolution: int | None) -> int:
    return _teacher(backend, path, resolution).params


def cache_process_bytes(params: P.Params) -> int:
    """Host memory of one cache_teacher process: its text encoders as they load, one batch
    of embeddings (bf16 on a GPU: cdm.backends.pipelines.text_device; a shard is streamed to
    disk batch by batch) and its runtime."""
    from cdm.plan import cache_bytes

    teacher = params.teacher
    model = _teacher(teacher.backend, teacher.path, teacher.resolution)
    batch = cache_bytes(model, params.cache_teacher.batch_size, 2)
    return int(TEXT_GIB * 1024**3 + batch + PROCESS_GIB * 1024**3)


def rule_resources(params: P.Params, rule: str, shards: int = 1, size: str = "full") -> dict:
    """The SLURM resources of `rule`'s jobs: gres, nodes, cpus_per_task, mem_mb, runtime."""
    cfg, teacher = params.distill, params.teacher
    world = teacher.backend == "shapes"
    merge = rule == "sample" and shards > 1
    gpus = 0 if world or merge or rule in CPU_RULES else 1
    nodes, cpus = 1, CPUS_PER_GPU
    if world:
        mem = WORLD_MB
        cpus = cfg.num_processes if rule in DISTILL else 2
    elif merge or rule in CPU_RULES:
        mem, cpus = MERGE_MB, 2
    else:
        count = _teacher_parameters(teacher.backend, teacher.path, teacher.resolution)
        fp32 = 4 * count
        if rule == "cache_teacher":
            gpus = cfg.num_processes
            cpus = CPUS_PER_GPU * gpus
            mem = gpus * cache_process_bytes(params)
        elif rule in DISTILL:
            from cdm.plan import host_per_node

            gpus, nodes = cfg.num_processes, cfg.nodes
            cpus = CPUS_PER_GPU * gpus
            # bf16 teachers on each process, rank 0's fp32 EMA (LoRA: an adapter only).
            host = host_per_node(count, gpus, 2, ema=cfg.lora is None)
            mem = host + gpus * PROCESS_GIB * 1024**3
        else:
            mem = fp32 + TEXT_GIB * 1024**3
        mem = SCORER_MB.get(rule, math.ceil(mem / 1e6))
    if size == "small":
        cpus, mem = 1, min(mem, SMALL_MB)
    runtime = MERGE_MINUTES if merge else RUNTIME.get(rule, 60)
    out = {"cpus_per_task": cpus, "mem_mb": mem, "runtime": runtime}
    if gpus:
        out["gres"] = f"gpu:{gpus}"
    if rule in DISTILL:
        out["nodes"] = nodes
        if nodes > 1:  # one task per node, the rule's shell in the batch shell (its srun)
            out |= {"tasks": nodes, "mpi": "srun"}
    return out


def threads(params: P.Params, rule: str, shards: int = 1, size: str = "full") -> int:
    """OMP threads of each process of `rule`'s job: its CPUs, shared by a distill job's
    processes on each node."""
    res = rule_resources(params, rule, shards, size)
    per_node = params.distill.num_processes if rule in (*DISTILL, "cache_teacher") else 1
    return max(1, res["cpus_per_task"] // per_node)
