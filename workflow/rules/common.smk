# Shared settings of every rule.
PARAMS_FILE = "params.yaml"
PYTHON = "python"
