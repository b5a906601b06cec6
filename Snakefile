# The pipeline's DAG for Snakemake; dvc.yaml describes the same stages for DVC.
# Rules hold no logic: each calls one stage script in src/ with params.yaml.

import sys

from snakemake.exceptions import WorkflowError

from cdm import keep

# No `configfile:`: Snakemake's loader evaluates YTE templates in a file that sets
# `__use_yte__: true`, so a key of params.yaml could run code. common.smk fills `config` from
# the project's own reader (cdm.params: plain YAML only, validated) instead.
include: "workflow/rules/common.smk"


# Every script reads params.yaml: a --configfile overlay (or --config on a params key) would
# change what Snakemake plans but not what the jobs run, so refuse it in one line.
_OVERRIDDEN = sorted(
    k for k in workflow.config_settings.overwrite_config if k in P.Params.model_fields
)
if _OVERRIDDEN or workflow.config_settings.configfiles:
    raise WorkflowError(
        f"params come from params.yaml only (overridden here: {', '.join(_OVERRIDDEN)}); "
        "apply an overlay with `python -m cdm.overlay <file>` instead of --configfile/--config"
    )


# Validate the params and the inputs they name, and take the project lock (cdm.lock), before
# any job runs: Snakemake removes a job's old outputs when it starts it, so a bad input
# found by the job itself would cost the previous results.
# Then link the finished outputs aside (cdm.keep): what a job that fails anyway had removed
# is put back, so no failure costs a finished result.
_KEPT = {}  # set once this run holds the lock and its links: only then are they its own


# On SLURM, first every job's request against its partition (cdm.fits): a request no node
# can hold would pend for ever (PartitionConfig); refused here, before any submission.
onstart:
    if on_slurm():
        from cdm.fits import check

        jobs = workflow.dag.needrun_jobs()
        misfits = check((j.rule.name, dict(j.resources.items())) for j in jobs if not j.is_local)
        if misfits:
            raise WorkflowError("\n".join(misfits))
    shell(f"{PYTHON} -m cdm.validate {PARAMS_FILE}")
    _KEPT["files"] = keep.snapshot()


onsuccess:
    keep.discard()
    release_lock()


onerror:
    back = keep.restore() if _KEPT else []
    if back:
        print(f"kept: the previous {', '.join(back)} put back (its job failed)", file=sys.stderr)
    if on_slurm():  # a job SLURM ended (scancel, time limit): which rule's, in one line
        from pathlib import Path

        from cdm.jobends import ended_jobs

        logs = [Path(f) for f in (log if isinstance(log, (list, tuple)) else [log]) if f]
        text = "".join(f.read_text(errors="replace") for f in logs if f.is_file())
        for line in ended_jobs(text):
            print(line, file=sys.stderr)
    release_lock()


include: "workflow/rules/fetch.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/dpg.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/ablation.smk"


# Every output the report depends on is a target, not only the report: Snakemake does not
# rebuild a missing file whose consumers are up to date, so a deleted student, training log
# or sample set (its index.parquet), or one a Ctrl-C removed with the failed job's outputs,
# would never be rebuilt ("Nothing to be done") while DVC reruns its stage.
rule all:
    input:
        rules.report.output,
        rules.score.output,
        rules.prepare_teacher.output,
        rules.cache_teacher.output,
        [] if WORLD else "models/weights.json",
        expand("models/students/{method}", method=METHODS),
        expand("logs/{method}/train.csv", method=METHODS),
        sample_sets(),
        ["results/dpg.json", "cache/dpg.safetensors", *dpg_sample_sets()] if DPG_SETS else [],
