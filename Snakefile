# The pipeline's DAG for Snakemake; dvc.yaml describes the same stages for DVC.
# Rules hold no logic: each calls one stage script in src/ with params.yaml.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/teacher.smk"


rule all:
    input:
        "results/teacher.json",
