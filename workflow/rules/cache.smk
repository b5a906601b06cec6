# Stage cache_teacher: encode train, eval and null prompts once; later stages read only these.


rule cache_teacher:
    input:
        teacher="models/teacher",
        code=stage_code("cache_teacher"),
        prompts=[] if WORLD or not PARAMS.prompts.eval_file else PARAMS.prompts.eval_file,
    output:
        directory("cache/prompts"),
    params:
        backend=config["teacher"]["backend"],
        prompts=config["prompts"],
        stage=config["cache_teacher"],
    threads: threads_for("cache_teacher", 1)
    resources:
        **slurm("cache_teacher"),
    benchmark:
        "benchmarks/cache_teacher.tsv"
    log:
        "logs/cache_teacher.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/cache_teacher.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"
