# Shared settings of every rule.
PARAMS_FILE = "params.yaml"
PYTHON = "python"
# Processes per distill job: 1 locally; a cluster profile sets NPROC via --config nproc=N
# to the GPUs of one node (one launcher per node starts them all).
NPROC = config.get("nproc", 1)
METHODS = config["distill"]["methods"]


wildcard_constraints:
    model=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9_]+",
    steps=r"\d+",
    i=r"\d+",
    n=r"\d+",
