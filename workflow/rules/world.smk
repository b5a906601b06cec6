# The shapes world's pretrained models: trained once on request and committed, like a
# downloaded checkpoint. Not part of `rule all`; run with `make world-judge` / `make world-teacher`.


rule world_judge:
    output:
        directory(config["world_judge"]["out"]),
    params:
        cfg=config["world_judge"],
    resources:
        **slurm("world_judge"),
    log:
        "logs/world_judge.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/train_world.py judge --params {PARAMS_FILE} 2>&1 | tee -i {log}"


rule world_teacher:
    output:
        directory(config["world_teacher"]["out"]),
    params:
        cfg=config["world_teacher"],
        judge=config["judge"]["path"],
    resources:
        **slurm("world_teacher"),
    log:
        "logs/world_teacher.log",
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} src/train_world.py teacher --params {PARAMS_FILE} 2>&1 | tee -i {log}"
