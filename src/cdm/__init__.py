"""Continuous-Time Distribution Matching (CDM) distillation of text-to-image flow models.

The package is layered; a module imports only from its own layer or lower ones (checked by
tests/test_layers.py), so each layer reads without the ones above it:

1. foundations: `params` (the schema), `io` (atomic outputs), `hub` (hub ids and hub-cache
   paths), `conditioning` (the text-conditioning tensors every network takes), `places`
   (where a user-named output may go), `safeyaml` (the YAML a params file may use).
2. the method's numerics: `flow`, `velocity`, `losses`, `schedules`, `rollout`, `sampling`,
   `ema`, `guidance` (a family's CFG combination), `lorafactors` (LoRA factors: read, stack,
   save): tensors in, tensors out.
3. `metrics`: statistics of features (Fréchet distance, precision/recall, bootstrap) and the
   preference scorers of images and prompts; they know no model family and no world.
4. `world`: the embedded shapes domain (prompts, renders, its judge and teacher, and its
   metrics of sample sets, built on the statistics of `metrics`).
5. `backends`: the model families behind one interface (shapes wraps the world's teacher;
   sd3, longcat, qwen-image and flux2-klein load diffusers pipelines and export students).
6. the run machinery: `engine` (the iteration and the loop), `lora` (LoRA mode: two
   adapters on one frozen base), `checkpoints` (the checkpoint store), `preemption` (signals
   and the SLURM deadline), `runlog`, `zero`, `cache`, `sampler`, `baselines` (the published
   models of `compare:`), `preview`, `cli`, `lock`, `lifeline`, `launch`, `nodes` (one
   launcher per node under srun), `requeue` (a run stopped to resume comes back as its SLURM
   job), `resources` (what each rule asks SLURM for), `fits` (a request checked against the
   partition), `jobends` (a SLURM job the scheduler ended, in one line),
   `slurmstate` (a cancelled job seen as cancelled by the SLURM plugin), `teacherlora` (your
   fine-tune's LoRA fused into the teacher), `loralayout` (a LoRA in the kohya / ComfyUI key
   layout), `overlay`, `plan`, `fetch`, `validate`, `publish`,
   `stagecode` (each stage's code, read from dvc.yaml for both orchestrators), `keep` (a
   Snakemake run's finished outputs, put back when a job fails), `safeload` (DeepSpeed
   checkpoints read as data only).
7. `report`: findings, tables, plots and pages from the measured metrics.

The stage scripts (`src/*.py`) sit on top and may import any layer.
"""

__version__ = "0.1.0"
