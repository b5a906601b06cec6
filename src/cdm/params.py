"""Typed schema of params.yaml: the one place where parameters and their defaults live.

Every stage validates the whole file on load; a wrong key, type or value stops it
before any work with one line naming the key and what is allowed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from cdm import safeyaml
from cdm.places import inside_project
from cdm.safeyaml import YAMLRefused

DEFAULT_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml problem, with a one-line message."""


class Section(BaseModel):
    # allow_inf_nan: a .inf or .nan (YAML's spellings) is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TeacherLora(Section):
    """Your fine-tune as the teacher: a LoRA fused into the teacher's transformer by
    prepare_teacher (cdm.teacherlora), before caching and distillation."""

    # A diffusers/peft LoRA .safetensors file (transformer.<module>.lora_A/lora_B keys)
    path: str = Field(min_length=1)
    scale: float = 1.0  # the LoRA's weight, as fuse_lora(lora_scale=...) takes it

    @model_validator(mode="after")
    def _usable(self) -> TeacherLora:
        if self.scale == 0:
            raise ValueError(
                "scale 0 fuses nothing; set teacher.lora: null to distill the base model"
            )
        if not self.path.endswith(".safetensors"):
            raise ValueError(
                f"path '{self.path}' is not a .safetensors file; give the LoRA's weight file "
                "(e.g. pytorch_lora_weights.safetensors)"
            )
        return self


class Teacher(Section):
    """The pretrained teacher every stage distils or compares against."""

    backend: Literal["shapes", "sd3", "longcat", "qwen-image", "flux2-klein"] = "shapes"
    path: str = "src/cdm/world/pretrained/teacher"  # local folder or hub id
    cfg_scale: float = Field(3.0, ge=1.0)  # the teacher's own CFG when it is sampled
    steps: int = Field(28, gt=0)  # the teacher's own Euler steps
    # Square image size in pixels of distillation and sampling (the diffusers backends);
    # None: the model's default (SD3: transformer sample_size x VAE factor; LongCat,
    # Qwen-Image and FLUX.2 [klein]: 1024). The backend checks it against the VAE factor and
    # patch size when it loads the model.
    resolution: int | None = Field(None, gt=0)
    lora: TeacherLora | None = None  # None: the teacher as published

    @model_validator(mode="after")
    def _lora_backend(self) -> Teacher:
        if self.lora is not None and self.backend == "shapes":
            raise ValueError(
                "lora: the shapes world's teacher takes no LoRA; set teacher.lora: null, or "
                "choose a diffusers-pipeline backend"
            )
        return self


class Judge(Section):
    """The shapes world's attribute classifier (its features feed the world metrics)."""

    path: str = "src/cdm/world/pretrained/judge"


class PrepareTeacher(Section):
    n_pairs: int = Field(512, gt=0)  # held-out prompt/seed pairs of the teacher check
    batch_size: int = Field(256, gt=0)
    judge_renders: int = Field(2048, gt=0)  # fresh renders of the judge accuracy check


class Prompts(Section):
    """Which prompts train and evaluate (shared by cache_teacher, sample, score)."""

    train_file: str | None = None  # one prompt per line; None: every shapes-world prompt
    eval_file: str | None = None  # None: the shapes world's prompts, cycled to eval_pairs
    # Where `python -m cdm.fetch prompts` gets eval_file (a file or URL; sha256-checked)
    eval_source: str | None = None
    eval_pairs: int = Field(2048, gt=0)  # prompt/seed pairs of the evaluation
    # DPG-Bench's question graphs (dpg_bench.csv); None: no DPG sample sets nor dpg_score
    dpg_file: str | None = None
    dpg_source: str | None = None  # where `python -m cdm.fetch dpg` gets dpg_file (pinned)


class CacheTeacher(Section):
    batch_size: int = Field(64, gt=0)
    # Prompts per shard of cache/prompts/train/ (distillation reads the shards batch by batch)
    shard_prompts: int = Field(4096, gt=0)


class Method(Section):
    """A named distillation variant: which schedule and which student losses."""

    schedule: Literal["fixed", "dynamic"]
    ca: bool = True  # CFG augmentation
    dm: bool = True  # distribution matching
    cdm: bool = False  # off-trajectory continuous-time matching

    @model_validator(mode="after")
    def _some_loss(self) -> Method:
        if not (self.ca or self.dm or self.cdm):
            raise ValueError("a method needs at least one of ca, dm, cdm")
        return self


DEFAULT_METHODS = {
    "dmd2": Method(schedule="fixed", ca=True, dm=True, cdm=False),
    "dynamic": Method(schedule="dynamic", ca=True, dm=True, cdm=False),
    "cdm": Method(schedule="dynamic", ca=True, dm=True, cdm=True),
    "dm_only": Method(schedule="dynamic", ca=False, dm=True, cdm=False),
}


MIXED_KEYS = ("student_only", "fake_only", "student", "fake_score", "fake", "networks")


class Lora(Section):
    """LoRA distillation (cdm.lora): the student and the fake score are two adapters on one
    frozen copy of the teacher. The authors' settings are the defaults."""

    rank: int = Field(64, gt=0)
    alpha: float = Field(128.0, gt=0)  # adapter scale alpha / rank
    include_ff: bool = True  # the feed-forward linears too, beside the attention's
    targets: list[str] | None = Field(None, min_length=1)  # name suffixes; None: the family's
    init: Literal["gaussian"] = "gaussian"  # A ~ N(0, 1/rank), B = 0: starts at the teacher

    @model_validator(mode="before")
    @classmethod
    def _not_mixed(cls, data: Any) -> Any:
        mixed = [k for k in MIXED_KEYS if isinstance(data, dict) and k in data]
        if mixed:
            raise ValueError(
                f"'{mixed[0]}': a mixed LoRA/full setting is not supported; LoRA trains both "
                "the student and the fake score as adapters (set distill.lora: null for full "
                "fine-tuning of both)"
            )
        return data

    def describe(self) -> str:
        """The training mode in words, as the report names it."""
        where = "attention and feed-forward" if self.include_ff else "attention"
        targets = f"targets {', '.join(self.targets)}" if self.targets else f"{where} linears"
        return f"LoRA adapters (rank {self.rank}, alpha {self.alpha:g}, {targets})"


def training_mode(lora: Lora | None) -> str:
    """How distill trained the students: full fine-tuning (the paper's) or LoRA adapters."""
    return "full fine-tuning" if lora is None else lora.describe()


class Distill(Section):
    """CDM distillation (docs/method.md); the defaults fit the shapes world on a CPU."""

    methods: list[str] = ["dmd2", "cdm"]  # which presets of `methods` the pipeline runs
    iterations: int = Field(400, gt=0)  # fake-score updates; the student gets 1/update_ratio
    batch_size: int = Field(32, gt=0)  # per process and micro-batch
    # Micro-batches per process and update (virtual ranks, docs/method.md): a process draws and
    # accumulates what `accumulation` processes would; global batch = nodes x num_processes x
    # accumulation x batch_size.
    accumulation: int = Field(1, gt=0)
    num_processes: int = Field(1, gt=0)  # accelerate processes (GPUs) on each node of the job
    nodes: int = Field(1, gt=0)  # SLURM nodes of the distill job, one launcher on each
    update_ratio: int = Field(2, gt=0)  # fake-score updates per student update
    lr_student: float = Field(1e-5, gt=0)
    lr_fake: float = Field(1e-3, gt=0)
    warmup: int = Field(20, ge=0)  # optimizer steps of linear warm-up, then constant
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2)
    weight_decay: float = Field(1e-4, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    guidance: float = Field(1.0, ge=0)  # g of the CA loss, (alpha - 1) of Decoupled DMD
    fake_blend: float = Field(0.999, ge=0, le=1)  # F <- fake_blend F + (1 - fake_blend) G
    ema_max: float = Field(0.999, ge=0, lt=1)  # student EMA decay min((1+n)/(10+n), ema_max)
    normaliser_floor: float = Field(0.1, gt=0)
    tau_min: float = Field(0.02, gt=0, lt=1)  # re-noising range of every loss
    tau_max: float = Field(0.98, gt=0, lt=1)
    inference_sigmas: list[float] = [1.0, 0.75, 0.5, 0.25]  # raw; the fixed schedule too
    k_min: int = Field(1, gt=0)  # dynamic schedule: K ~ U{k_min..k_max}
    k_max: int = Field(28, gt=0)
    u_min: float = Field(0.25, gt=0, lt=1)  # inner raw sigmas ~ U[u_min, u_max]
    u_max: float = Field(0.95, gt=0, lt=1)
    zero_stage: Literal[2, 3] = 2
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, gt=0)  # student steps between checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    # Consecutive iterations with a non-finite loss (their updates skipped) before the run stops.
    max_nonfinite: int = Field(20, gt=0)
    # Seconds before a SLURM job's end time at which distill checkpoints and exits for a retry.
    stop_before_limit: int = Field(600, ge=0)
    # Seconds a collective waits for ranks busy alone (rank 0 writing a checkpoint: 8 P bytes,
    # 64 GB at 8B parameters, takes ~11 min at 100 MB/s) before the run fails.
    process_group_timeout: int = Field(1800, gt=0)
    preview_every: int = Field(50, gt=0)  # student steps between logs/<method>/previews/ grids
    preview_images: int = Field(8, gt=0)  # fixed training prompts (and noise) per grid
    lora: Lora | None = None  # None: full fine-tuning of student and fake score (the paper's)

    @model_validator(mode="after")
    def _ranges(self) -> Distill:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        if self.u_min > self.u_max:
            raise ValueError(f"u_min ({self.u_min}) must be <= u_max ({self.u_max})")
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be < tau_max ({self.tau_max})")
        raw = self.inference_sigmas
        if not raw or raw[0] != 1.0 or any(not 0 < s <= 1 for s in raw):
            raise ValueError(f"inference_sigmas must start at 1.0 and lie in (0, 1], got {raw}")
        if any(b >= a for a, b in zip(raw, raw[1:], strict=False)):
            raise ValueError(f"inference_sigmas must be strictly decreasing, got {raw}")
        if self.lora is not None and self.zero_stage != 2:
            raise ValueError(
                "lora: LoRA distillation runs under ZeRO-2 (its adapters are small); "
                "set distill.zero_stage: 2"
            )
        return self


StepCount = Annotated[int, Field(gt=0)]


class Sample(Section):
    """Which step counts the sample stage runs (one sample set per model and count)."""

    student_steps: list[StepCount] = Field([1, 2, 4], min_length=1)  # every distilled method
    teacher_steps: list[StepCount] = Field([4, 28], min_length=1)  # teacher_cfg, teacher_nocfg
    batch_size: int = Field(256, gt=0)


PAPER_SCORERS: dict[str, dict[str, Any]] = {
    "clip": {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"},
    "clip_vitl14": {"model": "openai/clip-vit-large-patch14"},  # the paper's code's CLIPScore
    "pickscore": {
        "model": "yuvalkirstain/PickScore_v1",
        "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    },
    "aesthetic": {
        "head": "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
        "clip_model": "ViT-L-14",
        "clip_pretrained": "openai",
    },
    "hpsv3": {  # a 7B VLM: its own batch, not score.batch_size
        "checkpoint": "MizzenAI/HPSv3",
        "base": "Qwen/Qwen2-VL-7B-Instruct",
        "batch_size": 8,
    },
}


class CompareLora(Section):
    """A published LoRA: a diffusers/kohya safetensors file (`format: diffusers`, loaded with
    the pipeline's load_lora_weights) or a PEFT adapter folder (`format: peft`, PeftModel)."""

    path: str  # hub id or local file / folder
    file: str | None = None  # the weight file inside `path` (diffusers format)
    format: Literal["diffusers", "peft"] = "diffusers"
    scale: float = 1.0  # the LoRA's weight (set_adapters); fused at this scale when `fuse`
    fuse: bool = False  # fuse_lora into the transformer (then the adapter is unloaded)


class Component(Section):
    """A diffusers class in place of the base pipeline's: a scheduler (built from the base's
    scheduler config and `kwargs`) or a VAE (from `path`, its config updated by `kwargs`)."""

    cls: str = Field(alias="class", pattern=r"^[A-Za-z][A-Za-z0-9_]*$")  # in `diffusers`
    path: str | None = None  # hub id or local folder (a VAE); a scheduler takes none
    kwargs: dict[str, Any] = {}


class Compare(Section):
    """A published model sampled and scored beside our students: the base pipeline with its
    loading recipe, sampled with the pipeline's own call at `steps` and `guidance`."""

    path: str | None = None  # the base pipeline (hub id or folder); None: the teacher
    lora: CompareLora | None = None
    scheduler: Component | None = None
    vae: Component | None = None
    steps: int = Field(gt=0)
    guidance: float = Field(1.0, ge=0)  # the pipeline's guidance_scale (> 1: CFG)
    # Pipeline components loaded as None, e.g. [text_encoder_3, tokenizer_3] (no T5)
    drop: list[str] = []

    @model_validator(mode="after")
    def _vae_weights(self) -> Compare:
        if self.vae is not None and self.vae.path is None:
            raise ValueError("a compare vae needs `path` (hub id or folder of its weights)")
        return self


class Score(Section):
    """Metrics of every sample set: the world's judge (shapes), the paper's scorers (sd3,
    longcat; their weights fetched by `python -m cdm.fetch weights`)."""

    batch_size: int = Field(512, gt=0)  # judge / scorer batch
    k: int = Field(3, gt=0)  # nearest neighbours of precision/recall (shapes)
    n_boot: int = Field(1000, gt=0)  # bootstrap resamples of the 95% intervals (sd3, longcat)
    # name -> constructor arguments of its scorer (cdm.metrics.scorers); ids, tags, local paths
    models: dict[str, dict[str, Any]] = PAPER_SCORERS


class DPG(Section):
    """DPG-Bench (prompts.dpg_file) on a real run: which sets DVC plans, which VQA answers.

    DVC cannot derive stages from a null/non-null key, so the sets are spelled out here and
    checked against `dpg_sets`; Snakemake derives them itself."""

    sets: dict[str, StepCount] = {}  # model -> steps of each DPG sample set (dpg_sets)
    bench: list[str] = []  # [] or [dpg_bench]: DVC's switch of cache_dpg and score_dpg
    # The VQA runner's command (JSON lines, cdm.metrics.dpg_vqa); null: .venv-dpg's mPLUG runner
    vqa: list[str] | None = None


class Report(Section):
    grid_prompts: int = Field(8, gt=0)  # pairs 0..grid_prompts-1 shown for every sample set
    steps: str = Field("4", pattern=r"^[1-9][0-9]*$")  # student step count the findings compare


class Ablation(Section):
    """`make ablation`: every preset x several distillation seeds, each sampled and scored."""

    methods: list[str] = Field(["dmd2", "dynamic", "cdm", "dm_only"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=2)  # at least two: the rule needs a spread
    steps: list[StepCount] = Field([1, 2, 4], min_length=1)


# An output folder a rule replaces: inside the project, never its root or outputs (cdm.places).
ProjectFolder = Annotated[str, AfterValidator(inside_project)]


class WorldTeacher(Section):
    """The `make world-teacher` target: trains the world's teacher once (committed)."""

    out: ProjectFolder = "src/cdm/world/pretrained/teacher"
    steps: int = Field(3_000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(300, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    p_uncond: float = Field(0.1, ge=0, le=1)  # prompts dropped to the null prompt, for CFG
    caption_noise: float = Field(0.3, ge=0, le=1)  # captions naming one attribute wrongly
    shift: float = Field(2.0, gt=0)  # SD3 time shift
    seed: int = 0
    num_layers: int = Field(4, gt=0)
    heads: int = Field(2, gt=0)
    head_dim: int = Field(32, gt=0)
    text_width: int = Field(64, gt=0)
    eval_every: int = Field(1000, gt=0)  # steps between alignment checks in the log
    eval_pairs: int = Field(128, gt=0)


class WorldJudge(Section):
    """The `make world-judge` target: trains the judge once (committed)."""

    out: ProjectFolder = "src/cdm/world/pretrained/judge"
    steps: int = Field(500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


METHOD_NAME = re.compile(r"[A-Za-z0-9_]+")  # what the rules' {method} wildcard accepts


class Params(Section):
    seed: int = 0
    teacher: Teacher = Teacher()
    judge: Judge = Judge()
    prepare_teacher: PrepareTeacher = PrepareTeacher()
    prompts: Prompts = Prompts()
    cache_teacher: CacheTeacher = CacheTeacher()
    methods: dict[str, Method] = DEFAULT_METHODS
    distill: Distill = Distill()
    sample: Sample = Sample()
    score: Score = Score()
    report: Report = Report()
    dpg: DPG = DPG()
    ablation: Ablation = Ablation()
    world_teacher: WorldTeacher = WorldTeacher()
    world_judge: WorldJudge = WorldJudge()
    # name -> published model sampled beside our students (sd3); empty in the embedded world
    compare: dict[str, Compare] = {}

    @model_validator(mode="after")
    def _known_methods(self) -> Params:
        if self.teacher.backend != "shapes":
            for key in ("train_file", "eval_file"):
                if getattr(self.prompts, key) is None:
                    raise ValueError(
                        f"prompts.{key} must name a prompts file for teacher.backend "
                        f"'{self.teacher.backend}' (null means the shapes world's prompts)"
                    )
        bad = [m for m in self.methods if not METHOD_NAME.fullmatch(m)]
        if bad:
            raise ValueError(
                f"methods: the name '{bad[0]}' is not usable in file and rule names; use "
                "letters, digits and underscores (e.g. cdm_v2)"
            )
        if not self.distill.methods:
            raise ValueError(
                "distill.methods is empty; name at least one preset of `methods` to distil "
                "(e.g. [cdm]): every stage after cache_teacher compares students"
            )
        # Precision/recall count each sample's k nearest neighbours among the others.
        if self.teacher.backend == "shapes" and self.prompts.eval_pairs <= self.score.k:
            raise ValueError(
                f"prompts.eval_pairs ({self.prompts.eval_pairs}) must be above score.k "
                f"({self.score.k}): precision/recall take each sample's k nearest neighbours"
            )
        self._check_compare()
        self._check_dpg()
        unknown = [m for m in self.distill.methods if m not in self.methods]
        ablated = [m for m in self.ablation.methods if m not in self.methods]
        if ablated:
            raise ValueError(
                f"ablation.methods names unknown method '{ablated[0]}'; "
                f"define it under `methods` or choose one of {', '.join(self.methods)}"
            )
        if len(set(self.ablation.seeds)) != len(self.ablation.seeds):
            raise ValueError(f"ablation.seeds must be distinct, got {self.ablation.seeds}")
        if unknown:
            raise ValueError(
                f"distill.methods names unknown method '{unknown[0]}'; "
                f"define it under `methods` or choose one of {', '.join(self.methods)}"
            )
        if int(self.report.steps) not in self.sample.student_steps:
            raise ValueError(
                f"report.steps ({self.report.steps}) must be one of sample.student_steps "
                f"{self.sample.student_steps}"
            )
        return self

    def _check_compare(self) -> None:
        if self.compare and self.teacher.backend != "sd3":
            raise ValueError(
                f"compare: published models are sampled with the sd3 pipeline only (teacher."
                f"backend is '{self.teacher.backend}'); remove the compare section"
            )
        for name in self.compare:
            if not METHOD_NAME.fullmatch(name):
                raise ValueError(
                    f"compare: the name '{name}' is not usable in file and rule names; use "
                    "letters, digits and underscores (e.g. hyper_sd)"
                )
            if name in self.methods or name in TEACHER_SETS:
                raise ValueError(
                    f"compare: the name '{name}' is already a method or teacher sample set; "
                    "choose another"
                )

    def _check_dpg(self) -> None:
        sets = dict(dpg_sets(self))
        bench = ["dpg_bench"] if sets else []
        if self.dpg.sets != sets or self.dpg.bench != bench:
            why = (
                "prompts.dpg_file is set"
                if sets
                else "no DPG-Bench run (prompts.dpg_file null or shapes)"
            )
            raise ValueError(
                f"dpg: sets must be {sets} and bench {bench} ({why}; DVC plans the DPG stages "
                "from them); set them so in the dpg section"
            )


TEACHER_SETS = ("teacher_cfg", "teacher_nocfg")  # the teacher's sample sets (cdm.sampler)

# distill keys that shape no student: which methods run, how often to checkpoint, when to
# give up. Changing them must not restart a finished or half-finished run.
BOOKKEEPING = frozenset(
    {
        "methods", "checkpoint_every", "keep_checkpoints", "max_nonfinite", "preview_every",
        "preview_images", "stop_before_limit", "process_group_timeout",
    }
)  # fmt: skip
DYNAMIC_ONLY = frozenset({"k_min", "k_max", "u_min", "u_max"})  # the fixed schedule ignores them


TEACHER_SETS = ("teacher_cfg", "teacher_nocfg")


def sample_sets(
    params: Params, methods: list[str] | None = None, steps: list[int] | None = None
) -> list[tuple[str, int]]:
    """(model, steps) of every sample set the params define: the teacher with and without
    CFG at sample.teacher_steps, then each method (default distill.methods) at `steps`
    (default sample.student_steps), then (by default) each published model of `compare` at its
    own steps. Score and report read these and nothing else on disk."""
    compared = [(n, c.steps) for n, c in params.compare.items()] if methods is None else []
    methods = params.distill.methods if methods is None else methods
    steps = params.sample.student_steps if steps is None else steps
    teacher = [(m, s) for m in TEACHER_SETS for s in params.sample.teacher_steps]
    return teacher + [(m, s) for m in methods for s in steps] + compared


def dpg_sets(params: Params) -> list[tuple[str, int]]:
    """(model, steps) of every DPG-Bench sample set: Table 1's sets (the teacher's Base row at
    teacher.steps, each student at report.steps, each published model at its recipe), on a
    real run whose prompts.dpg_file is set; none otherwise."""
    if params.teacher.backend == "shapes" or not params.prompts.dpg_file:
        return []
    students = [(m, int(params.report.steps)) for m in params.distill.methods]
    compared = [(n, c.steps) for n, c in params.compare.items()]
    return [("teacher_cfg", params.teacher.steps), *students, *compared]


def student_inputs(params: Params, method: str, seed: int | None = None) -> dict[str, Any]:
    """The params one method's student depends on: its preset, the distill keys it reads and
    the seed. Its checkpoints are keyed by these, and the orchestrators rerun it on them."""
    preset = params.methods[method]
    drop = set(BOOKKEEPING)
    if preset.schedule == "fixed":
        drop |= DYNAMIC_ONLY
    if not preset.ca:
        drop.add("guidance")
    if params.distill.lora is None:
        drop.add("lora")  # full fine-tuning keeps the fingerprints it had before LoRA existed
    if params.distill.accumulation == 1:
        drop.add("accumulation")  # likewise one micro-batch per process
    distill = {k: v for k, v in params.distill.model_dump().items() if k not in drop}
    # The student depends on the world size, not on its split over nodes: 2 nodes of 1
    # process resume 1 node of 2 (and one node keeps its fingerprint).
    distill["num_processes"] = distill.pop("nodes") * distill["num_processes"]
    seed = params.seed if seed is None else seed
    inputs = {"method": preset.model_dump(), "distill": distill, "seed": seed}
    if params.teacher.lora is not None:  # without one: the fingerprints from before it existed
        inputs["teacher_lora"] = teacher_lora_inputs(params.teacher.lora)
    return inputs


def teacher_lora_inputs(cfg: TeacherLora) -> dict[str, Any]:
    """The fused teacher LoRA as a student depends on it: its scale and its file's content
    (a file replaced under the same name is another teacher; None while it is missing).
    Hashed on every call: a cache by size and mtime misses a rewrite within one clock tick."""
    from cdm.manifest import sha256

    path = Path(cfg.path)
    return {"scale": cfg.scale, "sha256": sha256(path) if path.is_file() else None}


def ablation_inputs(params: Params) -> dict[str, Any]:
    """The params the seeded findings (results/ablation.json) depend on: the teacher, every
    ablation preset's student inputs but the seed (the ablation sets its own), and how the
    students are evaluated. A run compares with the ablation only when these agree."""
    students = {}
    for method in params.ablation.methods:
        inputs = student_inputs(params, method)
        students[method] = {k: v for k, v in inputs.items() if k != "seed"}
    prompts = params.prompts
    return {
        "teacher": params.teacher.model_dump(),
        "students": students,
        "evaluation": {
            "train_file": prompts.train_file, "eval_file": prompts.eval_file,
            "eval_pairs": prompts.eval_pairs, "teacher_steps": params.sample.teacher_steps,
            "judge": params.judge.path, "k": params.score.k,
        },
    }  # fmt: skip


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The section a key path lands in, through named entries (methods.<name>,
    compare.<name>) and optional subsections (compare.<name>.lora)."""
    node: Any = Params
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = {f.alias or n: f for n, f in node.model_fields.items()}
            node = fields[str(part)].annotation
        else:  # a dict[str, Section]: `part` is an entry's name
            node = get_args(node)[-1]
        models = [a for a in get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)]
        if get_origin(node) is not dict and models:  # Section | None
            node = models[0]
    return node


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _section_at(err["loc"][:-1])
        allowed = ", ".join(f.alias or n for n, f in parent.model_fields.items())
        return f"{source}: unknown key '{key}'; allowed keys here: {allowed}"
    if kind == "value_error":  # a cross-field rule: its message names the keys
        where = f"{key}: " if key else ""
        return f"{source}: {where}{err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    return f"{source}: {key}: {err['msg'].lower()} (got {got!r}); fix it in {source}"


def parse(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raises ParamsError with one line on the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors()[0], source)) from None


def load(path: str | Path = DEFAULT_PATH) -> Params:
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path} is a folder; pass the params file (e.g. {path}/params.yaml)")
    if not path.is_file():
        raise ParamsError(
            f"{path}: no such params file; run from the project root or pass --params"
        )
    try:
        data = read_yaml(path)
    except YAMLRefused as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except YAMLError as exc:
        raise ParamsError(yaml_problem(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ParamsError(not_utf8(path, exc)) from None
    return parse(data, str(path))


def not_utf8(path: str | Path, exc: UnicodeDecodeError) -> str:
    return (
        f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
        "save it as UTF-8"
    )


def yaml_problem(path: str | Path, exc: YAMLError) -> str:
    """One line for a YAML syntax error: the file, the line and what to do."""
    mark = exc.problem_mark if isinstance(exc, MarkedYAMLError) else None
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{path}: not valid YAML{where}; fix the syntax"


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain Python, read as YAML 1.2 (as DVC writes and reads params):
    2e-5, 2e-05 and 1E4 are numbers, where YAML 1.1 (PyYAML) reads them as text.
    A file over the size bound is refused before it is read (cdm.safeyaml)."""
    return safeyaml.read(path)


def parse_yaml(text: str) -> Any:
    """YAML 1.2 text as plain Python (see read_yaml); anchors, aliases and object tags are
    refused first (YAMLRefused, cdm.safeyaml)."""
    return safeyaml.parse(text)


def main(argv: list[str] | None = None) -> int:
    """`python -m cdm.params [params.yaml]`: validate and exit non-zero with one line if bad."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        load(argv[0] if argv else DEFAULT_PATH)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every non-mapping value by its dotted key path: {'distill.batch_size': 16, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out |= leaves(value, f"{path}.") if isinstance(value, dict) else {path: value}
    return out
