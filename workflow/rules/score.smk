# Stages score and report: metrics of every sample set, then the report. The report also
# reads results/ablation.json when it exists, without a DAG edge: an edge would make every
# run redo the ablation whose working files (ablation/) are not committed. Its verdicts are
# shown only when it ran on this run's teacher and params (cdm.params.ablation_inputs).


rule score:
    input:
        sets=sample_sets(),
        code=stage_code("score"),
        weights=[] if WORLD else "models/weights.json",  # the scorers, fetched beforehand
    output:
        scores="results/scores.parquet",
        metrics="results/metrics.json",
        timings="logs/timings/score.json",  # not in metrics.json: cdm.metrics.timings
    params:
        judge=config["judge"],
        score=config["score"],
    threads: threads_for("score")
    resources:
        **slurm("score"),
    benchmark:
        "benchmarks/score.tsv"
    log:
        "logs/score.log",
    shell:
        "HF_HUB_OFFLINE=1 OMP_NUM_THREADS={threads} {PYTHON} src/score.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"


rule report:
    input:
        metrics="results/metrics.json",
        teacher="results/teacher.json",
        timings=["logs/timings/prepare_teacher.json", "logs/timings/score.json"],
        curves=expand("logs/{method}/train.csv", method=METHODS),
        sets=sample_sets(),
        dpg=["results/dpg.json"] if DPG_SETS else [],  # Table 1's DPGBench column
        code=stage_code("report"),
    output:
        md="results/report.md",
        html="results/report.html",
        provenance="results/provenance.json",
        plots=directory("results/plots"),
    params:
        report=config["report"],
        compare=COMPARE,  # Table 1's protocol names each published model's recipe
        # What results/ablation.json must have run on for its verdicts to be shown.
        ablation_inputs=lambda wc: P.ablation_inputs(PARAMS),
    threads: threads_for("report", 1)
    resources:
        **slurm("report"),
    log:
        "logs/report.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/report.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"
