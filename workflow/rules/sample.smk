# Stage sample: one image per evaluation pair for every sample set (model x steps).
# Locally each set is one job; with `--config shards=N` (a cluster) each set is split over
# N jobs whose parts a merge job joins. Targets are index.parquet files, written last.

SHARDS = int(config.get("shards", 1))
TEACHER_MODELS = ["teacher_cfg", "teacher_nocfg"]


# Published models sampled beside the students, each at its recipe's steps (params compare:).
COMPARE = config.get("compare") or {}


def sample_sets():
    """samples/<model>/<steps>/index.parquet of every set the pipeline evaluates."""
    teacher = [(m, s) for m in TEACHER_MODELS for s in config["sample"]["teacher_steps"]]
    students = [(m, s) for m in METHODS for s in config["sample"]["student_steps"]]
    published = [(m, c["steps"]) for m, c in COMPARE.items()]
    return [f"samples/{m}/{s}/index.parquet" for m, s in teacher + students + published]


# Each kind of set's code (dvc.yaml read once, not once per job).
SAMPLE_CODE = {k: stage_code(f"sample_{k}") for k in ("teacher", "student", "compare")}


def sample_inputs(wildcards):
    inputs = {"cache": "cache/prompts", "teacher": "models/teacher"}
    if wildcards.model in COMPARE:  # its LoRA and VAE: fetched on the login node
        inputs["weights"] = "models/weights.json"
        inputs["code"] = SAMPLE_CODE["compare"]
    elif wildcards.model not in TEACHER_MODELS:
        inputs["student"] = f"models/students/{wildcards.model}"
        inputs["code"] = SAMPLE_CODE["student"]
    else:
        inputs["code"] = SAMPLE_CODE["teacher"]
    return inputs


def sample_params(wildcards):
    """The params a set depends on: the teacher's CFG, the student's own method, or a
    published model's recipe."""
    if wildcards.model in TEACHER_MODELS:
        return {"cfg_scale": config["teacher"]["cfg_scale"]}
    if wildcards.model in COMPARE:
        return {"compare": COMPARE[wildcards.model]}
    return {"method": config["methods"][wildcards.model]}


if SHARDS == 1:

    rule sample:
        input:
            unpack(sample_inputs),
        output:
            "samples/{model}/{steps}/index.parquet",
        params:
            model=sample_params,
            resolution=RESOLUTION,
            pairs=config["prompts"]["eval_pairs"],
            batch=config["sample"]["batch_size"],
        threads: threads_for("sample", 1)
        resources:
            **slurm("sample"),
        benchmark:
            "benchmarks/sample_{model}_{steps}.tsv"
        log:
            "logs/sample/{model}_{steps}.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/sample.py --model {wildcards.model} --steps {wildcards.steps}"
            " --params {PARAMS_FILE} 2>&1 | tee -i {log}"

else:

    rule sample_part:
        input:
            unpack(sample_inputs),
        output:
            temp("samples/{model}/{steps}/part-{i}-of-{n}/index.parquet"),
        params:
            model=sample_params,
            resolution=RESOLUTION,
            pairs=config["prompts"]["eval_pairs"],
            batch=config["sample"]["batch_size"],
        threads: threads_for("sample_part", 1)
        resources:
            **slurm("sample_part"),
        log:
            "logs/sample/{model}_{steps}_part{i}of{n}.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/sample.py --model {wildcards.model} --steps {wildcards.steps}"
            " --shard {wildcards.i}/{wildcards.n} --params {PARAMS_FILE} 2>&1 | tee -i {log}"

    rule sample:
        input:
            [f"samples/{{model}}/{{steps}}/part-{i}-of-{SHARDS}/index.parquet" for i in range(SHARDS)],
        output:
            "samples/{model}/{steps}/index.parquet",
        threads: threads_for("sample", 1)
        resources:
            **slurm("sample"),
        log:
            "logs/sample/{model}_{steps}_merge.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/sample.py merge --model {wildcards.model} --steps {wildcards.steps}"
            " --parts {SHARDS} --params {PARAMS_FILE} 2>&1 | tee -i {log}"
