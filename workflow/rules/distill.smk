# Stage distill: one run per method preset, under accelerate + DeepSpeed ZeRO.
# Checkpoints live in checkpoints/<method>-<params fingerprint>/, outside the rule's outputs,
# so a rerun after a crash finds them and resumes instead of starting over.


def distill_port(wildcards):
    """A fixed rendezvous port per method, so two runs on one node do not collide."""
    return 29500 + sum(map(ord, wildcards.method)) % 400


rule distill:
    input:
        cache="cache/prompts",
        teacher="models/teacher",
        code=stage_code("distill"),
    output:
        student=directory("models/students/{method}"),
        log_csv="logs/{method}/train.csv",
    params:
        # Only what the method's student depends on: a bookkeeping key, or one the method
        # does not read (k_max for dmd2), must not rerun it.
        inputs=lambda wc: P.student_inputs(PARAMS, wc.method),
        zero=config["distill"]["zero_stage"],
        resolution=RESOLUTION,
        port=distill_port,
    # Per process (locally 1: the other cores sample the teacher meanwhile).
    threads: threads_for("distill", 1)
    resources:
        **slurm("distill"),
        nodes=NODES,
        **MULTINODE,
    benchmark:
        "benchmarks/distill_{method}.tsv"
    log:
        "logs/distill_{method}.log",
    # tee -i (every rule): a Ctrl-C reaches tee with the job's process group, and a tee that
    # died of it would swallow the stage's one `error:` line saying so.
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} -m cdm.launch {NODES_ARG}--config_file configs/accelerate/zero{params.zero}{ACCELERATE_SUFFIX}.yaml"
        " --num_processes {NPROC} --main_process_port {params.port}"
        " src/distill.py --method {wildcards.method} --params {PARAMS_FILE} 2>&1 | tee -i {log}"
