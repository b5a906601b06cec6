# The README's two commands: `make run` (the pipeline on the embedded default) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The embedded default's exact versions; `make install LOCK=` installs against pyproject.toml's
# ranges alone (beside a cluster's own torch).
LOCK   ?= constraints.txt
export PATH := $(abspath $(VENV))/bin:$(PATH)
# DeepSpeed's CPU extension (multi-process runs on CPU) built per environment: checkouts that
# share ~/.cache/torch_extensions rebuild it in turn, a minute each (tests/conftest.py agrees).
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: install run ablation test test-fast test-min min-tests cpu-ops browser lint format world-judge \
	world-teacher dry-run clean slurm-up slurm-down

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(LOCK),-c $(LOCK)) -e '.[dev]'
	echo "lock: $(LOCK)" > $(STAMP)

run: $(STAMP)
	$(PY) -m cdm.validate params.yaml
	snakemake --cores all

# The paper's findings over distillation seeds (params: ablation.*): results/ablation.json,
# then the report again, which reads it.
ablation: $(STAMP)
	$(PY) -m cdm.validate params.yaml
	snakemake --cores all ablation
	snakemake --cores all --forcerun report results/report.html

# Two workers (pytest-xdist; the costly runs are built once and shared, tests/conftest.py);
# the 30 slowest tests' timings close every log, so the next slow test is seen.
XDIST := -n 2 --dist loadgroup --durations=30

test: $(STAMP) browser cpu-ops
	$(PY) -m pytest $(XDIST)

# The fast tier (minutes): no whole DAGs, trainings or multi-process runs.
test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not e2e and not multiproc"

# The declared lower bounds (pyproject.toml's >=): every requirement at its minimum
# (constraints-min.txt) in a second environment, .venv-min, and the tests that touch those
# packages (docs/testing.md, "Lower bounds"). Not part of `make test` or CI.
test-min:
	$(MAKE) VENV=.venv-min LOCK=constraints-min.txt min-tests

# One test or a few per package, each using the API the code uses (make test-min runs them).
MIN_TESTS := tests/test_install.py tests/test_params.py tests/test_hpsv3.py \
	tests/test_scorers.py tests/test_frechet.py tests/test_report.py \
	tests/test_sampling_dtype.py tests/test_zero_partitions.py \
	tests/test_pipeline_backends.py::test_export_is_a_stock_pipeline_that_samples_like_our_sampler \
	tests/test_export.py::test_stock_pipeline_runs_our_sigmas_at_1_2_4_8_steps \
	tests/test_lora.py::test_only_adapter_weights_train_and_the_base_stays_bitwise \
	tests/test_lora.py::test_the_plans_adapter_count_is_what_peft_builds \
	tests/test_lora.py::test_the_exported_lora_loads_on_the_stock_sd3_pipeline_and_gives_the_student \
	tests/test_engine.py::test_two_micro_batches_step_on_their_mean_loss \
	tests/test_security.py::test_snakemake_plans_the_unmodified_params \
	tests/test_security.py::test_an_overlay_changes_only_its_own_lines \
	tests/test_resources.py::test_a_cancelled_job_reads_cancelled_to_the_slurm_plugin \
	tests/test_slurm.py::test_every_rule_is_submitted \
	tests/test_stagecode.py tests/test_lock.py

min-tests: $(STAMP) cpu-ops
	$(PY) -m pytest $(XDIST) $(MIN_TESTS)

# DeepSpeed's CPU communication extension (gloo runs on CPU) compiles on first use, about a
# minute, once per environment ($(VENV)/torch_extensions): built here, before the tests start.
cpu-ops: $(STAMP)
	@DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; \
	  ShareMemCommBuilder().load(verbose=False)" >/dev/null 2>&1 || \
	  echo "note: DeepSpeed's CPU extension did not build here; the first multi-process test builds it"

# The report's browser test (tests/test_browser.py) renders it in Debian's chromium: installed
# here where apt can (as root); elsewhere that test is skipped and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "note: chromium could not be installed; tests/test_browser.py will be skipped"

lint: $(STAMP)
	ruff check src tests bench
	ruff format --check src tests bench

format: $(STAMP)
	ruff format src tests bench
	ruff check --fix src tests bench

# The shapes world's pretrained models (committed): retrain them on purpose only.
world-judge: $(STAMP)
	snakemake --cores all --force world_judge

world-teacher: $(STAMP)
	snakemake --cores all --force world_teacher

# A real Slurm on this machine (root, Debian): munge, MariaDB + slurmdbd, slurmctld and two
# slurmd as hosts node1 and node2, for `snakemake --cores all --profile slurm` (docs/cluster.md).
slurm-up:
	workflow/scripts/local-slurm.sh up

slurm-down:
	workflow/scripts/local-slurm.sh down

dry-run: $(STAMP)
	snakemake --cores all -n

clean:
	rm -rf models cache samples logs .snakemake
