# Target `ablation` (make ablation): every preset of `ablation.methods` distilled once per
# seed of `ablation.seeds`, sampled at `ablation.steps` on the evaluation pairs, scored with
# the pipeline's teacher sets, and summarised over seeds in results/ablation.json. Not part
# of `rule all`; everything but results/ablation.json lives under ablation/ (not committed).

ABLATION = config["ablation"]


def ablation_sets(wildcards):
    return [
        f"ablation/samples/seed{wildcards.seed}/{m}/{s}/index.parquet"
        for m in ABLATION["methods"]
        for s in ABLATION["steps"]
    ]


rule ablation_distill:
    input:
        cache="cache/prompts",
        teacher="models/teacher",
        code=stage_code("ablation_distill", ABLATION_DVC),
    output:
        student=directory("ablation/models/seed{seed}/{method}"),
        log_csv="ablation/logs/seed{seed}/{method}/train.csv",
    params:
        inputs=lambda wc: P.student_inputs(PARAMS, wc.method, int(wc.seed)),
        zero=config["distill"]["zero_stage"],
        port=lambda wc: 29100 + (sum(map(ord, wc.method)) + 37 * int(wc.seed)) % 400,
    threads: threads_for("ablation_distill", 1)
    resources:
        **slurm("ablation_distill"),
        nodes=1,
    log:
        "logs/ablation/distill_{method}_seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m cdm.launch --config_file configs/accelerate/zero{params.zero}{ACCELERATE_SUFFIX}.yaml"
        " --num_processes {NPROC} --main_process_port {params.port}"
        " src/distill.py --method {wildcards.method} --seed {wildcards.seed} --params {PARAMS_FILE}"
        " --out ablation/models/seed{wildcards.seed} --checkpoints ablation/checkpoints/seed{wildcards.seed}"
        " --logs ablation/logs/seed{wildcards.seed} 2>&1 | tee -i {log}"


rule ablation_sample:
    input:
        cache="cache/prompts",
        teacher="models/teacher",
        student="ablation/models/seed{seed}/{method}",
        code=stage_code("ablation_sample", ABLATION_DVC),
    output:
        "ablation/samples/seed{seed}/{method}/{steps}/index.parquet",
    params:
        pairs=config["prompts"]["eval_pairs"],
    threads: threads_for("ablation_sample", 1)
    resources:
        **slurm("ablation_sample"),
    log:
        "logs/ablation/sample_{method}_{steps}_seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/sample.py --model {wildcards.method} --steps {wildcards.steps}"
        " --students ablation/models/seed{wildcards.seed} --out ablation/samples/seed{wildcards.seed}"
        " --params {PARAMS_FILE} 2>&1 | tee -i {log}"


rule ablation_score:
    input:
        sets=ablation_sets,
        teachers=[s for s in sample_sets() if s.startswith("samples/teacher")],
        code=stage_code("ablation_score", ABLATION_DVC),
    output:
        metrics="ablation/scores/seed{seed}/metrics.json",
        timings="ablation/scores/seed{seed}/timings.json",
    params:
        judge=config["judge"],
        score=config["score"],
    threads: threads_for("ablation_score")
    resources:
        **slurm("ablation_score"),
    log:
        "logs/ablation/score_seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/score.py --samples ablation/samples/seed{wildcards.seed}"
        " --teachers samples --out ablation/scores/seed{wildcards.seed} --timings {output.timings}"
        " --params {PARAMS_FILE} 2>&1 | tee -i {log}"


rule ablation:
    input:
        expand("ablation/scores/seed{seed}/metrics.json", seed=ABLATION["seeds"]),
        teacher="results/teacher.json",  # with the params: what the ablation ran on
        code=stage_code("ablation", ABLATION_DVC),
    output:
        "results/ablation.json",
    params:
        ablation=ABLATION,
        inputs=lambda wc: P.ablation_inputs(PARAMS),
    resources:
        **slurm("ablation"),
    log:
        "logs/ablation/summary.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/ablation.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"
