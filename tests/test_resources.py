"""What each rule asks SLURM for (cdm.resources) and the refusal, before any submission, of
a request its partition cannot hold (cdm.fits) (issue 34)."""

from __future__ import annotations

import pytest

from cdm import params as P
from cdm.fits import check, gpus_of, minutes, parse_sinfo
from cdm.overlay import apply
from cdm.resources import PROCESS_GIB, ResourcesError, rule_resources, scale, threads
from tests.conftest import ROOT

# The one-node cluster of workflow/scripts/local-slurm.sh: 2 nodes of 2 CPUs, 9039 MB, 2 GPUs.
SMALL = "gpu*|2|9039|gpu:2|2|infinite\n"


def _params(overlay: str | None = None) -> P.Params:
    base = ROOT / "params.yaml"
    if overlay is None:
        return P.load(base)
    return P.parse(P.parse_yaml(apply(ROOT / overlay, base, write=False)), overlay)


def test_a_one_gpu_lora_distill_asks_for_one_gpu():
    lora = rule_resources(_params("configs/sd3-medium-lora.yaml"), "distill")
    assert lora["gres"] == "gpu:1" and lora["cpus_per_task"] == 8 and lora["nodes"] == 1
    assert lora["mem_mb"] < 32000  # one process: the teacher read in bf16 (4 GB) + runtime
    full = rule_resources(_params("configs/sd3-medium.yaml"), "distill")
    assert full["gres"] == "gpu:8" and full["cpus_per_task"] == 64
    assert 100_000 < full["mem_mb"] < 480_000


def test_a_distill_jobs_memory_is_the_plans_host_memory_per_node():
    """Each process reads the teacher in bf16 (2 P), rank 0 gathers the fp32 EMA (4 P; a LoRA
    run only its adapter), plus each process's runtime: in MB, rounded up."""
    from cdm.plan import describe

    for overlay, ema in (("configs/sd3-medium.yaml", 4), ("configs/sd3-medium-lora.yaml", 0)):
        params = _params(overlay)
        p = describe(params.teacher.backend, params.teacher.path, params.teacher.resolution)[0]
        n = params.distill.num_processes
        want = n * 2 * p.params + ema * p.params + n * PROCESS_GIB * 1024**3
        assert rule_resources(params, "distill")["mem_mb"] == -(-want // 10**6), overlay


def test_cache_teacher_takes_the_nodes_gpus_and_memory_for_a_process_on_each():
    """One encoding process per GPU (cache_teacher's --processes default), each holding its
    text encoders, one batch of embeddings (the plan's cache bytes) and its runtime: a job
    of one GPU held LongCat's 200k prompts to one process, an hour of encoding (issue 36)."""
    from cdm.plan import cache_bytes, describe
    from cdm.resources import TEXT_GIB

    for overlay in ("configs/longcat-image.yaml", "configs/sd3-medium-lora.yaml"):
        params = _params(overlay)
        n, t = params.distill.num_processes, params.teacher
        res = rule_resources(params, "cache_teacher")
        assert res["gres"] == f"gpu:{n}" and res["cpus_per_task"] == 8 * n, overlay
        assert threads(params, "cache_teacher") == 8
        m = describe(t.backend, t.path, t.resolution)[0]
        per = (TEXT_GIB + PROCESS_GIB) * 1024**3 + cache_bytes(m, params.cache_teacher.batch_size)
        assert res["mem_mb"] == -(-n * int(per) // 10**6), overlay


def test_a_multi_node_distill_asks_per_node_one_task_each():
    res = rule_resources(_params("configs/sd35-large.yaml"), "distill")
    assert res["nodes"] == 2 and res["gres"] == "gpu:8" and res["tasks"] == 2
    assert res["mpi"] == "srun"


def test_the_shapes_world_asks_for_no_gpu_and_the_knob_scales_every_rule():
    world = _params()
    rules = ["prepare_teacher", "cache_teacher", "distill", "sample", "score", "report"]
    for rule in rules:
        assert "gres" not in rule_resources(world, rule)
        small = rule_resources(world, rule, size="small")
        assert small["cpus_per_task"] == 1 and small["mem_mb"] <= 4000
        assert threads(world, rule, size="small") == 1
    assert scale({"CDM_SLURM_SCALE": "small"}) == "small" and scale({}) == "full"
    with pytest.raises(ResourcesError, match="CDM_SLURM_SCALE='tiny': expected one of"):
        scale({"CDM_SLURM_SCALE": "tiny"})


def test_sinfo_fields():
    assert gpus_of("gpu:2") == 2 and gpus_of("gpu:a100:4(S:0-1)") == 4
    assert gpus_of("gpu:2,shard:8") == 2 and gpus_of("(null)") == 0
    assert minutes("infinite") is None and minutes("30:00") == 30
    assert minutes("2:00:00") == 120 and minutes("1-12:00:00") == 36 * 60 and minutes("60") == 60
    [nodes] = parse_sinfo(SMALL)
    assert (nodes.partition, nodes.cpus, nodes.mem_mb, nodes.gpus, nodes.count) == (
        "gpu",
        2,
        9039,
        2,
        2,
    )
    assert nodes.default


def test_a_request_the_partition_cannot_hold_is_refused_in_one_line():
    """The real-run distill on the small cluster: one line naming the rule, what it asks and
    what the partition has; the small knob's requests pass."""
    sd3 = _params("configs/sd3-medium.yaml")
    jobs = [(r, rule_resources(sd3, r) | {"slurm_partition": "gpu"}) for r in ("distill", "report")]
    [line] = check(jobs, SMALL)
    mem = jobs[0][1]["mem_mb"]
    assert line.startswith(f"rule distill asks for 1 node(s) of 64 CPUs, {mem} MB, 8 GPUs")
    assert "partition 'gpu' has 2 node(s), the largest 2 CPUs, 9039 MB, 2 GPUs" in line
    assert "\n" not in line
    small = [(r, rule_resources(sd3, r, size="small")) for r in ("prepare_teacher", "report")]
    assert check(small, SMALL) == []  # no partition named: sinfo's default (gpu*)
    two = rule_resources(_params("configs/sd35-large.yaml"), "distill", size="small")
    assert check([("distill", two)], SMALL)  # 8 GPUs per node: the nodes have 2


def test_a_missing_partition_and_a_time_limit_are_refused():
    res = {"slurm_partition": "gpus", "cpus_per_task": 1, "mem_mb": 100, "runtime": 10}
    [line] = check([("report", res)], SMALL)
    assert line == "rule report: partition 'gpus' does not exist (sinfo lists: gpu)"
    limited = "short*|2|9039|(null)|2|1:00:00\n"
    [line] = check([("distill", res | {"slurm_partition": "short", "runtime": 1440})], limited)
    assert "1440 min" in line and "time limit 60 min" in line


def test_a_job_slurm_ended_is_one_line_naming_the_rule_and_the_job():
    from cdm.jobends import ended_jobs

    log = (
        "Error in rule distill:\n"
        "    message: SLURM-job '12' failed, SLURM status is: 'CANCELLED'. For further ...\n"
        "    log: logs/distill_cdm.log, .snakemake/slurm_logs/rule_distill/cdm/12.log (check)\n"
        "Error in rule report:\n"
        "    message: SLURM-job '14' failed, SLURM status is: 'FAILED'\n"  # its own error line
        "SLURM-job '15' failed, SLURM status is: 'TIMEOUT'\n"
        "    log: .snakemake/slurm_logs/rule_score/15.log\n"
    )
    assert ended_jobs(log) == [
        "error: rule distill (SLURM job 12, cdm) was cancelled (scancel, or the scheduler); "
        "finished outputs are kept; rerun to resume from its last checkpoint",
        "error: rule score (SLURM job 15) reached its SLURM time limit; finished outputs are "
        "kept; rerun to run it again",
    ]


def test_without_sinfo_the_check_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: sbatch itself will say what is wrong
    assert check([("report", {"cpus_per_task": 1})]) == []
    assert "note: requests not checked against the partitions: sinfo:" in capsys.readouterr().err


def test_a_cancelled_job_reads_cancelled_to_the_slurm_plugin():
    """sacct says 'CANCELLED by 0'; the plugin (2.8) knows only 'CANCELLED' and would wait for
    ever. The wrapped query (the Snakefile installs it) drops the suffix, once."""
    import asyncio

    import snakemake_executor_plugin_slurm as plugin

    from cdm.slurmstate import patch_plugin, plain_states

    async def sacct(*args):
        return {"12": "CANCELLED by 0", "13": "COMPLETED", "14": "RUNNING"}, 0.1

    states, _ = asyncio.run(plain_states(sacct)())
    assert states == {"12": "CANCELLED", "13": "COMPLETED", "14": "RUNNING"}
    before = plugin.query_job_status
    try:
        assert patch_plugin() and patch_plugin()
        assert plugin.query_job_status.cdm_plain_states
        assert plugin.query_job_status is not before or before.cdm_plain_states
        patched = plugin.query_job_status
        patch_plugin()
        assert plugin.query_job_status is patched  # not wrapped twice
    finally:
        plugin.query_job_status = before


def test_status_checks_at_a_fixed_interval_when_asked(monkeypatch):
    """CDM_SLURM_STATUS_EVERY=2: every check 2 s after the last, where the plugin would add
    10 s after each check that finds nothing finished; a bad value is one line."""
    import snakemake_executor_plugin_slurm as plugin

    from cdm.slurmstate import patch_plugin, status_every

    executor = plugin.Executor.__new__(plugin.Executor)  # the property alone, no workflow
    executor._next_seconds_between_status_checks = None
    own = plugin.Executor.__dict__.get("next_seconds_between_status_checks")
    before = plugin.query_job_status
    monkeypatch.setenv("CDM_SLURM_STATUS_EVERY", "2")
    try:
        executor.next_seconds_between_status_checks = 52  # the plugin's back-off
        assert executor.next_seconds_between_status_checks == 52
        assert patch_plugin()
        executor.next_seconds_between_status_checks = 52
        assert executor.next_seconds_between_status_checks == 2.0
    finally:
        plugin.query_job_status = before
        if own is None:
            del plugin.Executor.next_seconds_between_status_checks
        else:
            plugin.Executor.next_seconds_between_status_checks = own
    assert status_every({}) is None
    for bad in ("0", "soon"):
        with pytest.raises(ValueError, match="CDM_SLURM_STATUS_EVERY=.*seconds > 0"):
            status_every({"CDM_SLURM_STATUS_EVERY": bad})
