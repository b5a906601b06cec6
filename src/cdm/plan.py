"""Per-GPU memory plan of a distillation run: `python -m cdm.plan OVERLAY --gpus N --zero {2,3}`.

Example: `python -m cdm.plan configs/sd3-medium.yaml --gpus 8 --zero 2`; several nodes:
`python -m cdm.plan configs/sd35-large.yaml --gpus 8 --nodes 2 --zero 3` (N below is then
every GPU of the job, nodes x GPUs per node).

The overlay is merged onto params.yaml (nothing is written). The transformer's parameter
count P comes from its config, instantiated on the meta device (no weights): the config of
a local pipeline folder, or for a hub id the published config stored below. What each GPU
holds in a run of src/distill.py (cdm.engine; w = bytes per weight: 2 in bf16 on GPUs, 4
in fp32 on CPUs; N = GPUs):

- teacher: frozen, outside ZeRO, replicated: w P
- student and fake score, each its own DeepSpeed engine: weights w P (ZeRO-2) or w P / N
  (ZeRO-3; plus the gathered blocks of the layer running and the one prefetched)
- optimizer states per engine: fp32 master + AdamW m and v, partitioned: 12 P / N
- gradients per engine: w P / N partitioned, the reduce bucket, and a transient fp32 copy
  of the partition (4 P / N) while an engine steps (one at a time)
- student EMA: fp32, partitioned like the optimizer state (zero.PartitionedEMA): 4 P / N
- with accumulation > 1 in bf16, each engine sums its micro-batches' gradient partition in
  fp32 (zero.ds_config: data_types.grad_accum_dtype): 4 P / N per engine
- activations (live_activations), in the order the engine runs: the student's forward with
  gradient (B_s = 2 B samples with the CDM point, else B) keeps each checkpointed block's
  input while the teacher's no-grad batched call (4 B samples: CA cond + uncond, DM, CDM;
  ~10 values per token x hidden), then the fake score's (B_s), then the backward's one
  recomputed block run: stash + the largest of the three; without checkpointing every
  block keeps its values. The per-block constants are fitted to measurements on an H100
  (student_activations) and checked against live tensor bytes measured on the CPU
- prompt embeddings: only each batch's (B prompts + the null prompt); the training cache
  stays on disk in shards the engine reads batch by batch (its size is printed, not counted)
- latents and loss tensors (fp32): ~24 latent-sized tensors of B_s samples
Not counted: the CUDA context and allocator fragmentation (keep a few GiB free).

LoRA mode (`--lora`, or distill.lora set; cdm.lora): one frozen base w P shared by teacher,
student and fake score; each adapter's A parameters (rank r on every target linear,
r (in + out) each) take the place of P in the weights, EMA, optimizer and gradient rows.
Activations are the full mode's (the backward still runs through the frozen base). With
--lora the plan also prints the largest batch on one GPU of 24, 48 and 80 GiB, and the
preview / export peaks (lora_peaks: built on the CPU in the export dtype).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdm import params as P
from cdm.overlay import apply

if TYPE_CHECKING:  # the plan is arithmetic: torch only where a meta model is built
    import torch

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[2]
DS_REDUCE_BUCKET_DEFAULT = 500_000_000  # DeepSpeed's reduce_bucket_size when a config sets none


def _flux2_klein(double: int, single: int, heads: int, text_width: int) -> dict[str, Any]:
    """A FLUX.2 [klein] size: its blocks, heads and Qwen3 width (3 layers x hidden)."""
    transformer = {
        "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128,
        "num_layers": double, "num_single_layers": single, "attention_head_dim": 128,
        "num_attention_heads": heads, "joint_attention_dim": text_width,
        "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
        "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
    }  # fmt: skip
    return {"backend": "flux2-klein", "transformer": transformer, "vae_factor": 8}


# Published transformer configs (transformer/config.json of the hub repositories; LongCat-Image
# is a 6B Flux-style MMDiT of 10 double-stream and 20 single-stream blocks) with the pipeline
# facts the plan needs, so a plan needs no download.
PUBLISHED: dict[str, dict[str, Any]] = {
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "backend": "sd3",
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
        },  # fmt: skip
        "vae_factor": 8,
    },
    # SD3.5 (MMDiT with QK RMS-norm; served by StableDiffusion3Pipeline like SD3): Large is
    # depth 38 (38 heads x 64 = 2432 wide), Medium is MMDiT-X: depth 24 with a second,
    # image-only attention in blocks 0-12 and position embeddings up to 384 patches a side.
    "stabilityai/stable-diffusion-3.5-large": {
        "backend": "sd3",
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 38,
            "attention_head_dim": 64,
            "num_attention_heads": 38,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 2432,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
            "qk_norm": "rms_norm",
        },  # fmt: skip
        "vae_factor": 8,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "backend": "sd3",
        "transformer": {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "qk_norm": "rms_norm",
            "dual_attention_layers": list(range(13)),
        },  # fmt: skip
        "vae_factor": 8,
    },
    "meituan-longcat/LongCat-Image": {
        "backend": "longcat",
        "transformer": {
            "_class_name": "LongCatImageTransformer2DModel",
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 10,
            "num_single_layers": 20,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "pooled_projection_dim": 3584,
            "axes_dims_rope": [16, 56, 56],
        },  # fmt: skip
        "vae_factor": 8,
    },
    # Qwen-Image: a 20B MMDiT of 60 double-stream blocks (QwenImageTransformer2DModel's
    # defaults are this config); its VAE (AutoencoderKLQwenImage) downsamples 8x.
    "Qwen/Qwen-Image": {
        "backend": "qwen-image",
        "transformer": {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "guidance_embeds": False,
            "axes_dims_rope": [16, 56, 56],
        },  # fmt: skip
        "vae_factor": 8,
    },
    # FLUX.2 [klein] base: the transformer configs diffusers' scripts/convert_flux2_to_diffusers.py
    # builds for klein-4b and klein-9b (the [klein] base and distilled checkpoints share one
    # architecture per size); the VAE is FLUX.2's AutoencoderKLFlux2, 4 levels: factor 8.
    "black-forest-labs/FLUX.2-klein-base-4B": _flux2_klein(5, 20, 24, 7680),
    "black-forest-labs/FLUX.2-klein-base-9B": _flux2_klein(8, 24, 32, 12288),
}
# The activation model's constants, in bytes per (token, hidden unit) of a sample in 16-bit:
# a block's values for its backward, fitted to the H100 measurement without checkpointing
# (student_activations; the textbook 34 of Korthikanti et al. 2022 overestimated it 1.9x);
# a checkpointed block's input, its hidden and context states (1.1 values: measured live on
# the CPU, tests/test_activations.py; the H100 figure with checkpointing, 1.09, lay below
# that input's own size); and the teacher's no-grad working set.
BLOCK_UNITS = 18.1
STASH_UNITS = 2.2
TEACHER_UNITS = 20.0
ACCUMULATION_ROW = "fp32 gradient accumulation (2 engines)"
LORA_GPUS = (24, 48, 80)  # one-GPU sizes the LoRA plan reports (GiB)
SD3_TEXT_TOKENS = 77 + 256  # CLIP tokens + T5 max_sequence_length of StableDiffusion3Pipeline
LONGCAT_TEXT_TOKENS = 512  # LongCatImagePipeline.tokenizer_max_length
QWEN_TEXT_TOKENS = 512  # cdm.backends.qwenimage.TEXT_TOKENS: the cached (padded) prompt length
FLUX2_TEXT_TOKENS = 512  # Flux2KleinPipeline's max_sequence_length (the templated prompt)
# Text tokens of one cached prompt, per backend.
TEXT_TOKENS = {
    "sd3": SD3_TEXT_TOKENS,
    "longcat": LONGCAT_TEXT_TOKENS,
    "qwen-image": QWEN_TEXT_TOKENS,
    "flux2-klein": FLUX2_TEXT_TOKENS,
}
BACKENDS = tuple(TEXT_TOKENS)  # the backends the plan covers
# Backend -> transformer class (diffusers) of the models the plan covers.
TRANSFORMERS = {
    "sd3": "SD3Transformer2DModel",
    "longcat": "LongCatImageTransformer2DModel",
    "qwen-image": "QwenImageTransformer2DModel",
    "flux2-klein": "Flux2Transformer2DModel",
}


@dataclass(frozen=True)
class Model:
    """What the plan needs of a teacher: parameters and the shape of one forward."""

    name: str
    params: int  # P, the transformer's parameters
    block_params: int  # the largest block's (ZeRO-3 gathers a block at a time)
    blocks: int
    hidden: int
    image_tokens: int
    text_tokens: int
    text_width: int
    latent_numel: int  # C x h x w of one latent
    adapter: int = 0  # A, one LoRA adapter's parameters (0: full fine-tuning)


def _meta_model(backend: str, config: dict[str, Any]) -> torch.nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, TRANSFORMERS[backend])
    with init_empty_weights():
        return cls.from_config(config)


def count_parameters(backend: str, config: dict[str, Any]) -> tuple[int, int, int]:
    """(P, largest block's parameters, blocks) of the transformer built on the meta device."""
    return _counts(backend, json.dumps(config, sort_keys=True))


def adapter_parameters(backend: str, config: dict[str, Any], cfg: P.Lora) -> int:
    """A: one LoRA adapter's parameters, r (in + out) on each target linear (cdm.lora)."""
    return _adapter_count(backend, json.dumps(config, sort_keys=True), cfg.model_dump_json())


# Building a 20B model on the meta device takes seconds; a plan (and a test session) asks for
# the same config's counts many times.
@functools.lru_cache(maxsize=32)
def _counts(backend: str, config: str) -> tuple[int, int, int]:
    model = _meta_model(backend, json.loads(config))
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sum(p.numel() for p in model.parameters()), max(sizes), len(blocks)


@functools.lru_cache(maxsize=32)
def _adapter_count(backend: str, config: str, lora_json: str) -> int:
    from cdm.lora import targets

    cfg = P.Lora.model_validate_json(lora_json)
    model = _meta_model(backend, json.loads(config))
    linears = [model.get_submodule(name) for name in targets(model, cfg)]
    return sum(cfg.rank * (m.in_features + m.out_features) for m in linears)


def describe(
    backend: str, path: str, resolution: int | None, lora_cfg: P.Lora | None = None
) -> tuple[Model, str]:
    """The teacher's Model and where its config came from."""
    if backend not in BACKENDS:
        raise ValueError(
            f"the memory plan covers the {', '.join(BACKENDS)} backends, not '{backend}'"
        )
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        from cdm.backends.pipelines import config_vae_factor

        config = json.loads((folder / "transformer" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor, source = config_vae_factor(vae), f"config of {folder}"
    elif path in PUBLISHED:
        known = PUBLISHED[path]
        if known["backend"] != backend:
            raise ValueError(f"{path} is a {known['backend']} model, not {backend}")
        config, factor = known["transformer"], known["vae_factor"]
        source = f"published config of {path}"
    else:
        raise FileNotFoundError(
            f"teacher.path '{path}' is not a local pipeline folder and no published config is "
            f"stored for it; known: {', '.join(PUBLISHED)}"
        )
    params, block, blocks = count_parameters(backend, config)
    adapter = adapter_parameters(backend, config, lora_cfg) if lora_cfg is not None else 0
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    text = TEXT_TOKENS[backend]
    if backend == "sd3":
        size = resolution // factor if resolution else int(config["sample_size"])
        tokens, channels = (size // config["patch_size"]) ** 2, 16
    else:  # LongCat, Qwen-Image, FLUX.2: 2x2 latent patches per token (packed or patchified)
        size = (resolution or 1024) // factor
        tokens, channels = (size // 2) ** 2, config["in_channels"] // 4
    model = Model(
        config["_class_name"], params, block, blocks, hidden, tokens, text,
        int(config["joint_attention_dim"]), channels * size * size, adapter,
    )  # fmt: skip
    return model, source


def estimate(
    m: Model,
    batch: int,
    gpus: int,
    zero: int,
    checkpointing: bool = True,
    cdm: bool = True,
    weight_bytes: int = 2,
    reduce_bucket: int = DS_REDUCE_BUCKET_DEFAULT,
    accumulation: int = 1,
) -> dict[str, float]:
    """Bytes per GPU of each part of a run (see the module docstring for the formulas)."""
    w, p, n = weight_bytes, m.params, gpus
    gathered = 2 * m.block_params * w if zero == 3 else 0
    weights = (w * p if zero == 2 else w * p / n) + gathered
    grad_batch = 2 * batch if cdm else batch
    activations = live_activations(m, batch, checkpointing, cdm, w)
    if m.adapter:
        rows = _lora_rows(m, n, w, reduce_bucket)
    else:
        rows = _full_rows(m, n, w, reduce_bucket, weights)
    if accumulation > 1 and w == 2:
        rows[ACCUMULATION_ROW] = 2 * 4 * trained_parameters(m) / n
    rows |= {
        "activations": activations,
        "latents and loss tensors (fp32)": 24 * 4 * m.latent_numel * grad_batch,
    }
    rows["prompt embeddings (one batch + null; cache on disk)"] = cache_bytes(m, batch + 1, w)
    return rows


def reduce_bucket_numel(m: Model, reduce_bucket: int) -> int:
    """Elements of one engine's reduce bucket: in LoRA mode no more than the adapter it reduces."""
    return min(m.adapter, reduce_bucket) if m.adapter else reduce_bucket


def trained_parameters(m: Model) -> int:
    """Parameters each network's optimizer trains: the adapter in LoRA mode, else all."""
    return m.adapter or m.params


def _lora_rows(m: Model, n: int, w: int, reduce_bucket: int) -> dict[str, float]:
    a, bucket = m.adapter, reduce_bucket_numel(m, reduce_bucket)
    return {
        "base (frozen; teacher, student and fake score share it)": w * m.params,
        "adapter weights (student + fake score)": 2 * w * a,
        "student EMA (fp32 adapter, partitioned)": 4 * a / n,
        "optimizer states (fp32 master + AdamW m, v; 2 adapters)": 2 * 12 * a / n,
        "gradients (partitioned + bucket; 2 adapters)": 2 * (w * a / n + w * bucket) + 4 * a / n,
    }


def _full_rows(m: Model, n: int, w: int, reduce_bucket: int, weights: float) -> dict[str, float]:
    p = m.params
    return {
        "teacher (frozen, replicated)": w * p,
        "student weights": weights,
        "fake score weights": weights,
        "student EMA (fp32, partitioned)": 4 * p / n,
        "optimizer states (fp32 master + AdamW m, v; 2 engines)": 2 * 12 * p / n,
        "gradients (partitioned + bucket; 2 engines)": 2 * (w * p / n + w * reduce_bucket)
        + 4 * p / n,
    }


def peaks(
    m: Model, gpus: int, zero: int, weight_bytes: int = 2, per_node: int = 8
) -> dict[str, float]:
    """Bytes of the moments outside the steady state (cdm.engine, cdm.zero).

    Start-up, per GPU: the teacher (w P), then the student and the fake score each built on
    the CPU in bf16 and moved into its engine one at a time (ZeRO-2: w P each, plus w P while
    DeepSpeed flattens one engine's weights into its groups; ZeRO-3: partitioned as built,
    w P / N each plus one block whole) and their fp32 master partitions (2 x 4 P / N).
    Host, per process: the teacher read in the training dtype (w P; distill.load_teacher)
    before it moves to the GPU; per node, each of its `per_node` processes does.
    Preview (and export), rank 0 only: the EMA gathered parameter by parameter into an fp32
    CPU copy (4 P host) drawn on the GPU in bf16 (+w P); the other ranks hold one gathered
    tensor at a time (at most a block)."""
    w, p, n = weight_bytes, m.params, gpus
    block = m.block_params * w
    engines = 2 * w * p + w * p if zero == 2 else 2 * w * p / n + block
    return {
        "start-up peak per GPU (before the first step)": w * p + engines + 2 * 4 * p / n,
        "start-up host RAM per process (teacher read in bf16)": w * p,
        f"start-up host RAM per node ({per_node} processes)": per_node * w * p,
        "preview / export peak on rank 0: GPU (+bf16 EMA)": w * p,
        "preview / export peak on rank 0: host (fp32 EMA)": 4 * p,
        "preview / export peak on other ranks: GPU (one block)": 4 * m.block_params,
    }


def host_per_node(p: int, per_node: int, weight_bytes: int = 2, ema: bool = True) -> float:
    """Host bytes of one node's distill processes at their peak (the SLURM job's memory,
    cdm.resources): each reads the teacher in the training dtype (w P; distill.load_teacher);
    rank 0 gathers the fp32 EMA for a preview or the export (4 P; a LoRA run its adapter)."""
    return per_node * weight_bytes * p + (4 * p if ema else 0)


# The authors' global batch per backend: SD3's recipe 8 GPUs x 16 (docs/method.md), their
# LongCat-Image preset 8 x 8 (configs/longcat-image.yaml), carried over to Qwen-Image and
# FLUX.2 [klein] (the nearest recipe: a Qwen-conditioned MMDiT at 1024 px).
RECIPE_GLOBAL_BATCH = {"sd3": 128, "longcat": 64, "qwen-image": 64, "flux2-klein": 64}
HEADROOM = 0.8  # of a GPU's memory the plan may fill: the CUDA context and fragmentation


@dataclass(frozen=True)
class BatchWay:
    """One way to train a global batch: nodes x GPUs per node x accumulation x batch."""

    nodes: int
    batch: int  # per GPU, one micro-batch
    accumulation: int
    bytes: float  # per GPU (estimate's total)


def batch_ways(
    m: Model,
    global_batch: int,
    gpus_per_node: int,
    zero: int,
    checkpointing: bool = True,
    cdm: bool = True,
    reduce_bucket: int = DS_REDUCE_BUCKET_DEFAULT,
    max_nodes: int = 4,
) -> list[BatchWay]:
    """Every (nodes, per-GPU batch, accumulation) whose product with the GPUs per node is
    `global_batch`, with the memory per GPU of each: nodes divide the optimizer's partitions,
    accumulation multiplies the time per step but not the memory (its fp32 gradient sum
    aside), the per-GPU batch the activations."""
    ways = []
    for nodes in range(1, max_nodes + 1):
        gpus = nodes * gpus_per_node
        if global_batch % gpus:
            continue
        per_gpu = global_batch // gpus
        for accumulation in (a for a in range(1, per_gpu + 1) if per_gpu % a == 0):
            batch = per_gpu // accumulation
            rows = estimate(
                m, batch, gpus, zero, checkpointing, cdm, reduce_bucket=reduce_bucket,
                accumulation=accumulation,
            )  # fmt: skip
            ways.append(BatchWay(nodes, batch, accumulation, sum(rows.values())))
    return ways


def pick_way(ways: list[BatchWay], memory_gib: float) -> BatchWay | None:
    """The way an overlay takes: of those within HEADROOM of the GPU, the fewest nodes (each
    one more to schedule, and ZeRO-3 gathers across them), then the fewest micro-batches
    (each one more multiplies the time per step). None: no way fits."""
    fitting = [w for w in ways if w.bytes <= HEADROOM * memory_gib * GIB]
    return min(fitting, key=lambda w: (w.nodes, w.accumulation), default=None)


def lora_peaks(m: Model, weight_bytes: int = 2, export_bytes: int = 2) -> dict[str, float]:
    """Bytes of a LoRA run's preview and export on rank 0 (cdm.lora.student_module): the base
    read tensor by tensor into a CPU copy in the export dtype (the teacher's on disk: e bytes,
    2 for the published bf16 / fp16 checkpoints) with the fp32 EMA adapter; a preview then
    draws that copy on the GPU in bf16 (+w (P + A)); the export merges it on the CPU."""
    p, a = m.params, m.adapter
    return {
        "LoRA preview / export, rank 0 host (base + adapter)": export_bytes * p + 4 * a,
        "LoRA preview, rank 0 GPU (+bf16 copy drawn)": weight_bytes * (p + a),
    }


def checkpoint_bytes(m: Model, weight_bytes: int = 2) -> float:
    """One checkpoint on disk: per engine its weights (w P) and the fp32 master + AdamW m, v
    (12 P, the ranks' partitions together), and the EMA's partitions (4 P): 32 P in bf16."""
    return 2 * (weight_bytes * m.params + 12 * m.params) + 4 * m.params


def cache_bytes(m: Model, prompts: int, weight_bytes: int = 2) -> float:
    """Bytes of `prompts` prompts' token embeddings (the pooled vectors are negligible)."""
    return prompts * m.text_tokens * m.text_width * weight_bytes


def _unit(m: Model, weight_bytes: int) -> float:
    """Tokens x hidden of one sample, in bytes at 16 bits (scaled by w / 2 in fp32)."""
    return (m.image_tokens + m.text_tokens) * m.hidden * weight_bytes / 2


def live_activations(
    m: Model, batch: int, checkpointing: bool = True, cdm: bool = True, weight_bytes: int = 2
) -> float:
    """Bytes of activations live at an iteration's peak, in the order cdm.engine runs it: the
    student's forward with gradient (B_s = 2 B samples with the CDM point, else B) keeps its
    stash (each checkpointed block's input; without checkpointing every block's values) while
    the teacher's no-grad call (4 B samples: CA cond + uncond, DM, CDM) and then the fake
    score's (B_s: DM, CDM) run, and the backward recomputes one block at a time:
    stash + max(recomputed block, teacher set, fake set)."""
    w, student = weight_bytes, 2 * batch if cdm else batch
    unit = _unit(m, w)
    teacher_set = TEACHER_UNITS * unit * 4 * batch
    fake_set = TEACHER_UNITS * unit * student
    if not checkpointing:  # the backward needs nothing recomputed
        return student_activations(m, student, False, w) + max(teacher_set, fake_set)
    stash = m.blocks * STASH_UNITS * unit * student
    return stash + max(BLOCK_UNITS * unit * student, teacher_set, fake_set)


def student_activations(
    m: Model, samples: int, checkpointing: bool, weight_bytes: int = 2
) -> float:
    """Bytes the student's forward with gradient keeps for its backward, `samples` samples.

    Calibrated on one H100 (bf16, SDPA, SD3-Medium's config at 1024 px, random weights):
    2.75 GiB per sample without gradient checkpointing. Per (token, hidden unit), a block
    keeps BLOCK_UNITS bytes for its backward; a checkpointed block keeps only its input
    (STASH_UNITS bytes, measured on the CPU), plus one block recomputed at a time."""
    unit = _unit(m, weight_bytes) * samples
    if checkpointing:
        return m.blocks * STASH_UNITS * unit + BLOCK_UNITS * unit
    return m.blocks * BLOCK_UNITS * unit


def _reduce_bucket(zero: int) -> int:
    config = json.loads((ROOT / "configs" / "deepspeed" / f"zero{zero}.json").read_text())
    return int(
        config.get("zero_optimization", {}).get("reduce_bucket_size", DS_REDUCE_BUCKET_DEFAULT)
    )


def _count_lines(path: str | None) -> int | None:
    if path is None or not Path(path).is_file():
        return None
    return len({line.strip() for line in Path(path).read_text().splitlines() if line.strip()})


def plan(
    overlay: str,
    params_path: str,
    gpus: int | None,
    zero: int | None,
    memory_gib: float,
    train_prompts: int | None = None,
    nodes: int | None = None,
    lora: bool = False,
) -> str:
    """The table for `gpus` GPUs on each of `nodes` nodes (default: distill.nodes); ZeRO
    partitions over all of them."""
    merged = P.parse_yaml(apply(overlay, params_path, write=False))
    params = P.parse(merged, f"{params_path} + {overlay}")
    cfg, teacher = params.distill, params.teacher
    zero, nodes = zero or cfg.zero_stage, nodes or cfg.nodes
    lora_cfg = cfg.lora or (P.Lora() if lora else None)  # --lora: the authors' settings
    per_node = gpus or (cfg.num_processes if lora_cfg is not None else 8)
    gpus = per_node * nodes
    model, source = describe(teacher.backend, teacher.path, teacher.resolution, lora_cfg)
    cdm = any(params.methods[m].cdm for m in cfg.methods)
    # The training prompts: the file's where it is here, else the count given (--train-prompts).
    prompts = _count_lines(params.prompts.train_file) or train_prompts
    rows = estimate(
        model, cfg.batch_size, gpus, zero, cfg.gradient_checkpointing, cdm,
        reduce_bucket=_reduce_bucket(zero), accumulation=cfg.accumulation,
    )  # fmt: skip
    total = sum(rows.values())
    side = int(model.image_tokens**0.5)
    lines = [
        f"memory plan: {teacher.backend} {teacher.path}",
        f"  {model.name}: {model.params:,} parameters ({source}, built on the meta device)",
        f"  {f'{nodes} nodes x {per_node} = ' if nodes > 1 else ''}{gpus} GPUs, ZeRO-{zero}, "
        f"bf16; batch {cfg.batch_size} per GPU"
        f"{f' x {cfg.accumulation} micro-batches' if cfg.accumulation > 1 else ''} "
        f"(global {cfg.batch_size * cfg.accumulation * gpus}); "
        f"{model.image_tokens} image tokens ({side}x{side}) + {model.text_tokens} text tokens; "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
        "",
        f"  {'per GPU':<58}{'GiB':>8}",
    ]
    if lora_cfg is not None:
        lines.insert(
            3,
            f"  LoRA: rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, include_ff "
            f"{str(lora_cfg.include_ff).lower()}; {model.adapter:,} parameters per adapter "
            f"({model.adapter / model.params:.2%} of the transformer)",
        )
    lines += [f"  {name:<58}{value / GIB:>8.2f}" for name, value in rows.items()]
    disk = "-" if prompts is None else f"{cache_bytes(model, prompts) / GIB:.2f}"
    label = f"train prompt cache, {prompts or '?'} prompts (disk; not counted)"
    lines.append(f"  {label:<58}{disk:>8}")
    verdict = "fits" if total / GIB <= memory_gib else "does NOT fit"

    def largest(gib: float) -> int | str:
        fitting = [
            b
            for b in range(1, 257)
            if sum(estimate(model, b, gpus, zero, cfg.gradient_checkpointing, cdm,
                            reduce_bucket=_reduce_bucket(zero),
                            accumulation=cfg.accumulation).values())
            <= gib * GIB
        ]  # fmt: skip
        return max(fitting) if fitting else "none"

    lines += [
        f"  {'total':<58}{total / GIB:>8.2f}",
        f"  {verdict} in {memory_gib:g} GiB (not counted: CUDA context, fragmentation); "
        f"largest batch per GPU that fits: {largest(memory_gib)}",
    ]
    if lora_cfg is None:  # the ways to the recipe's global batch that fit
        recipe = RECIPE_GLOBAL_BATCH[teacher.backend]
        ways = batch_ways(
            model, recipe, per_node, zero, cfg.gradient_checkpointing, cdm, _reduce_bucket(zero)
        )
        lines += [
            "",
            f"  ways to the authors' global batch {recipe} "
            f"(nodes x {per_node} GPUs x batch x accumulation; GiB per GPU):",
        ]
        chosen = pick_way(ways, memory_gib)
        for way in ways:
            fits = way.bytes <= HEADROOM * memory_gib * GIB
            mark = f"{'within' if fits else 'over'} {HEADROOM:.0%} of {memory_gib:g} GiB"
            mark += "; the pick: fewest nodes, then micro-batches" if way == chosen else ""
            lines.append(
                f"    {way.nodes} x {per_node} x {way.batch} x {way.accumulation}: "
                f"{way.bytes / GIB:.2f} ({mark})"
            )
    if lora_cfg is None:  # full fine-tuning: start-up, preview and checkpoint peaks
        lines += [""] + [
            f"  {k:<58}{v / GIB:>8.2f}"
            for k, v in peaks(model, gpus, zero, per_node=per_node).items()
        ]
        one = checkpoint_bytes(model)
        alive = cfg.keep_checkpoints + 1  # the kept ones and the one being written
        lines += [
            f"  {'one checkpoint (disk)':<58}{one / GIB:>8.2f}",
            f"  {f'checkpoint disk per method ({alive} alive at a time)':<58}{alive * one / GIB:>8.2f}",
            f"  {f'checkpoint disk, {len(cfg.methods)} methods':<58}"
            f"{len(cfg.methods) * alive * one / GIB:>8.2f}",
        ]
    if lora_cfg is not None:
        sizes = ", ".join(f"{g} GiB: {largest(g)}" for g in LORA_GPUS)
        lines.append(f"  largest batch per GPU on {gpus} GPU(s) of {sizes}")
        lines += [""] + [f"  {k:<58}{v / GIB:>8.2f}" for k, v in lora_peaks(model).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", help="params overlay, e.g. configs/sd3-medium.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--gpus", type=int, help="GPUs per node (default: 8; with LoRA distill.num_processes)"
    )
    parser.add_argument("--nodes", type=int, help="default: distill.nodes of the overlay")
    parser.add_argument(
        "--lora", action="store_true", help="LoRA mode, the authors' settings unless set"
    )
    parser.add_argument("--zero", type=int, choices=(2, 3), help="default: distill.zero_stage")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (H100: 80)")
    parser.add_argument(
        "--train-prompts", type=int, help="training prompts, where prompts.train_file is not here"
    )
    args = parser.parse_args(argv)
    try:
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        if args.train_prompts is not None and args.train_prompts < 1:
            raise ValueError(f"--train-prompts must be >= 1, got {args.train_prompts}")
        if args.nodes is not None and args.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
        print(
            plan(
                args.overlay, args.params, args.gpus, args.zero, args.gpu_memory,
                args.train_prompts, args.nodes, args.lora,
            )
        )  # fmt: skip
    except (P.ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
