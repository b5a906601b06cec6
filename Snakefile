# The pipeline's DAG for Snakemake; dvc.yaml describes the same stages for DVC.
# Rules hold no logic: each calls one stage script in src/ with params.yaml.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/ablation.smk"


rule all:
    input:
        "results/teacher.json",
        ["results/metrics.json", "results/report.html"] if WORLD else sample_sets(),
