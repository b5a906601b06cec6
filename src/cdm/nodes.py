"""One distill run over N SLURM nodes: the `srun` step that starts one launcher per node.

`python -m cdm.launch --nodes N <accelerate launch arguments>` (distill.nodes > 1), run in
the job's batch shell (Snakemake's SLURM profile) or in an `salloc` shell (DVC), becomes

    srun --nodes=N --ntasks=N --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
      exec <python> -m cdm.launch --num_machines N --machine_rank "$SLURM_NODEID"
        --main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        --deepspeed_multinode_launcher standard --num_processes <N x per node> ...'

The node rank and the first host are expanded by each task's own shell, never by the batch
shell (which runs on node 0 only, and whose SLURM variables Snakemake's job step drops).
DeepSpeed's `standard` launcher is torchrun per node: no pdsh, no ssh between nodes.
`--kill-on-bad-exit=1`: a node that dies ends the step instead of leaving the others
waiting in a collective. `--cpus-per-task`: since Slurm 22.05 srun no longer inherits it
from the allocation, and the SLURM executor's job step drops every SLURM_* variable, so
without it each node's launcher and all its workers would share one core; the value is the
job's CPUs per node (one task per node), read from the allocation.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys

from cdm.requeue import IN_STEP, show_job

# The first host of the allocation: the rendezvous of every node's torchrun.
FIRST_HOST = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'


def free_port() -> int:
    """A port nothing on this host listens on: the rendezvous of a run on one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodesError(ValueError):
    """A multi-node launch that cannot run here; the message is one line."""


def split_nodes(argv: list[str]) -> tuple[int, list[str]]:
    """(nodes, the accelerate arguments): a leading `--nodes N` taken off (default 1)."""
    if not argv or argv[0] != "--nodes":
        return 1, argv
    if len(argv) < 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        raise NodesError("--nodes needs a whole number of nodes >= 1 (distill.nodes)")
    return int(argv[1]), argv[2:]


def total_processes(argv: list[str], nodes: int) -> list[str]:
    """The arguments with `--num_processes` (per node, as in params) made the world size,
    which is what accelerate's `--num_processes` means on several machines."""
    from accelerate.commands.launch import launch_command_parser

    script = launch_command_parser().parse_args(argv).training_script
    end, out = argv.index(script), list(argv)  # what follows the script is the script's
    for i, arg in enumerate(out[:end]):
        flag, eq, value = arg.partition("=")
        if flag == "--num_processes" and eq:
            out[i] = f"--num_processes={int(value) * nodes}"
            return out
        if flag == "--num_processes":
            out[i + 1] = str(int(out[i + 1]) * nodes)
            return out
    raise NodesError("a multi-node launch needs --num_processes (the GPUs of each node)")


def cpus_per_node(env: dict[str, str] | None = None) -> int | None:
    """The job's CPUs on each node (the fewest, on a mixed allocation): SLURM_JOB_CPUS_PER_NODE
    ("64(x2)" or "64,32") where the shell still has it (salloc), else `scontrol show job`'s
    NumCPUs / NumNodes (the SLURM executor's job step drops SLURM_* but keeps SLURM_JOB_ID);
    None when neither tells."""
    env = os.environ if env is None else env
    counts = re.findall(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_JOB_CPUS_PER_NODE", ""))
    if counts:
        return min(int(c) for c in counts)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    out = show_job(job, timeout=30)
    if out is None:
        return None
    cpus, nodes = re.search(r"\bNumCPUs=(\d+)", out), re.search(r"\bNumNodes=(\d+)", out)
    if cpus is None or nodes is None or int(nodes[1]) < 1:
        return None
    return max(1, int(cpus[1]) // int(nodes[1]))


def srun_command(nodes: int, argv: list[str], cpus: int | None = None) -> list[str]:
    """The job step: one `cdm.launch` per node, its rank and the first host expanded there,
    with `cpus` CPUs (the node's share of the job) for the launcher and its workers."""
    per_node = (
        f"{IN_STEP}=1 exec {shlex.quote(sys.executable)} -m cdm.launch --num_machines {nodes}"
        f' --machine_rank "$SLURM_NODEID" --main_process_ip {FIRST_HOST}'
        " --deepspeed_multinode_launcher standard " + shlex.join(total_processes(argv, nodes))
    )
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
        "--kill-on-bad-exit=1", *([f"--cpus-per-task={cpus}"] if cpus else []),
        "bash", "-c", per_node,
    ]  # fmt: skip


def require_allocation(nodes: int) -> None:
    """Refuse a multi-node launch outside a SLURM job (no srun to start the other nodes)."""
    if "SLURM_JOB_ID" not in os.environ:
        raise NodesError(
            f"distill.nodes is {nodes}, which needs a SLURM allocation of {nodes} nodes "
            f"(sbatch via `--profile slurm`, or `salloc -N {nodes}` then `dvc repro`); "
            "outside SLURM set distill.nodes: 1"
        )
