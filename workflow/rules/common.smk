# Shared settings of every rule.
from cdm import params as P

PARAMS_FILE = "params.yaml"
# The validated params (read as YAML 1.2, as the scripts and DVC read them).
PARAMS = P.load(PARAMS_FILE)
PYTHON = "python"
# Processes per distill job: 1 locally; a cluster profile sets NPROC via --config nproc=N
# to the GPUs of one node (one launcher per node starts them all).
NPROC = config.get("nproc", 1)
METHODS = config["distill"]["methods"]
# The world metrics (judge, score, report) exist only for the embedded shapes world; for
# sd3 / longcat the DAG ends at the sample sets, which external scorers read.
WORLD = config["teacher"]["backend"] == "shapes"
RESOLUTION = config["teacher"].get("resolution")
# Accelerate config variant: "" (1 process by default) locally; the SLURM profile sets
# accelerate_suffix=-8gpu (configs/accelerate/zero{2,3}-8gpu.yaml, bf16).
ACCELERATE_SUFFIX = config.get("accelerate_suffix", "")


wildcard_constraints:
    model=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9_]+",
    steps=r"\d+",
    i=r"\d+",
    n=r"\d+",
    seed=r"\d+",
