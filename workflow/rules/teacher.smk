# Stage prepare_teacher: resolve and check the teacher, measure it with and without CFG.
# The teacher and judge paths are params, not inputs: like a hub id they name a given
# checkpoint, and as inputs they would tie this rule to the world_* training rules.


rule prepare_teacher:
    input:
        code=stage_code("prepare_teacher"),  # dvc.yaml's code deps: a change reruns it
        weights=[] if WORLD else "models/weights.json",  # a hub teacher: fetched on the login node
        # Your fine-tune's LoRA (teacher.lora): a new file content reruns the teacher's stages.
        lora=[] if PARAMS.teacher.lora is None else PARAMS.teacher.lora.path,
    output:
        teacher=directory("models/teacher"),
        report="results/teacher.json",
        timings="logs/timings/prepare_teacher.json",  # not in teacher.json: cdm.metrics.timings
    params:
        seed=config["seed"],
        teacher=config["teacher"],
        judge=config["judge"],
        stage=config["prepare_teacher"],
    threads: threads_for("prepare_teacher")
    resources:
        **slurm("prepare_teacher"),
    benchmark:
        "benchmarks/prepare_teacher.tsv"
    log:
        "logs/prepare_teacher.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/prepare_teacher.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"
