# DPG-Bench (the DPGBench column of Table 1), on a real run whose prompts.dpg_file is set:
# its prompts encoded once (cache_dpg), each Table 1 set sampled on them with the sample
# stage's code and seeding (sample_dpg), every set scored by the VQA runner (score_dpg).
# Nothing here exists for the shapes world or when dpg_file is null (cdm.params.dpg_sets).

DPG_SETS = P.dpg_sets(PARAMS)


def dpg_sample_sets():
    return [f"samples_dpg/{m}/{s}/index.parquet" for m, s in DPG_SETS]


if DPG_SETS:

    rule cache_dpg:
        input:
            teacher="models/teacher",
            code=stage_code("cache_dpg"),
            csv=PARAMS.prompts.dpg_file,
        output:
            "cache/dpg.safetensors",
        params:
            backend=config["teacher"]["backend"],
            dpg_file=PARAMS.prompts.dpg_file,
        threads: threads_for("cache_dpg", 1)
        resources:
            **slurm("cache_dpg"),
        log:
            "logs/cache_dpg.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/cache_teacher.py --dpg {output} --params {PARAMS_FILE} 2>&1 | tee -i {log}"

    rule sample_dpg:
        input:
            unpack(sample_inputs),
            dpg="cache/dpg.safetensors",
        output:
            "samples_dpg/{model}/{steps}/index.parquet",
        params:
            model=sample_params,
            resolution=RESOLUTION,
            batch=config["sample"]["batch_size"],
        threads: threads_for("sample_dpg", 1)
        resources:
            **slurm("sample_dpg"),
        benchmark:
            "benchmarks/sample_dpg_{model}_{steps}.tsv"
        log:
            "logs/sample/dpg_{model}_{steps}.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/sample.py --prompts dpg --model {wildcards.model}"
            " --steps {wildcards.steps} --params {PARAMS_FILE} 2>&1 | tee -i {log}"

    rule score_dpg:
        input:
            sets=dpg_sample_sets(),
            csv=PARAMS.prompts.dpg_file,
            code=stage_code("score_dpg"),
        output:
            "results/dpg.json",
        params:
            vqa=config["dpg"]["vqa"],
            n_boot=config["score"]["n_boot"],
        threads: threads_for("score_dpg", 1)
        resources:
            **slurm("score_dpg"),
        log:
            "logs/score_dpg.log",
        shell:
            "OMP_NUM_THREADS={threads} {PYTHON} src/score_dpg.py --params {PARAMS_FILE} 2>&1 | tee -i {log}"
