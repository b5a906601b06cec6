# Fetch what real runs need while there is a network: local rules, so on a cluster they run
# on the login node; every compute job after them reads the caches offline. The shapes world
# needs nothing (its teacher and judge are committed): fetch_weights then records an empty list.

localrules:
    fetch_weights,


rule fetch_weights:
    output:
        "models/weights.json",
    params:
        teacher=config["teacher"]["path"],
        models=config["score"]["models"],
        compare=config.get("compare") or {},
    log:
        "logs/fetch_weights.log",
    shell:
        "{PYTHON} -m cdm.fetch weights --params {PARAMS_FILE} --record {output} 2>&1 | tee -i {log}"


if not WORLD and PARAMS.prompts.eval_file:

    localrules:
        fetch_prompts,

    rule fetch_prompts:
        output:
            PARAMS.prompts.eval_file,
        params:
            source=PARAMS.prompts.eval_source,
        log:
            "logs/fetch_prompts.log",
        shell:
            "{PYTHON} -m cdm.fetch prompts --params {PARAMS_FILE} 2>&1 | tee -i {log}"


if not WORLD and PARAMS.prompts.dpg_file:

    localrules:
        fetch_dpg,

    rule fetch_dpg:
        output:
            PARAMS.prompts.dpg_file,
        params:
            source=PARAMS.prompts.dpg_source,
        log:
            "logs/fetch_dpg.log",
        shell:
            "{PYTHON} -m cdm.fetch dpg --params {PARAMS_FILE} 2>&1 | tee -i {log}"
