"""What the diffusers-pipeline backends (sd3, longcat, flux2-klein) share on the teacher's side: the family
description, resolving a folder or hub id, checking it holds the expected family, linking it,
decoding with its VAE, counting its parameters, the text encoders' device and the teacher's
sanity check. Exporting a student as a pipeline folder with a model card: cdm.backends.export."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL

from cdm.conditioning import Condition
from cdm.hub import HUB_ID

DECODE_PIXELS = 2 * 1024 * 1024  # per VAE call (two 1024 px images): decoding is memory-hungry


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline family as a backend sees it."""

    backend: str  # teacher.backend
    pipeline: str  # model_index.json `_class_name`
    parts: tuple[str, ...]  # subfolders the velocity, shift, geometry and decoder need
    # (raw sigmas, shift, teacher scheduler config) -> the scheduler config under which a stock
    # default call runs our sigmas at every step count, or None when raw needs sigmas=raw
    default_call: Callable[[list[float], float, dict], dict | None]
    explicit: Callable[[float, dict], dict]  # (shift, teacher config) -> config for sigmas=raw
    call: str  # the stock call shown in the model card, with {steps} and {extra}
    license: dict[str, str]  # model card license fields when the teacher's card declares none
    # VAE latent pixels per side of one cell of the flow's latent (2: FLUX.2's 2x2 patchified)
    latent_patch: int = 1
    # model_index.json entries the export sets (FLUX.2 [klein]: is_distilled, no CFG)
    index: dict[str, Any] = field(default_factory=dict)

    def expected(self) -> str:
        return (
            f"a {self.pipeline} folder (diffusers format) or hub id "
            f"for teacher.backend '{self.backend}'"
        )


def passing_family(backend: str, pipeline: str, call: str, license: dict[str, str]) -> Family:
    """A family whose stock call passes linspace(1, 1/n, n) and a dynamic-shift mu itself
    (LongCat, Qwen-Image): few_step pins mu to ln(shift), or passes sigmas=raw."""
    from cdm.backends import few_step

    return Family(
        backend=backend,
        pipeline=pipeline,
        parts=("transformer", "scheduler", "vae"),
        default_call=few_step.passing_default_call,
        explicit=lambda shift, base: base | few_step.constant_mu(shift),
        call=call,
        license=license,
    )


def resolve(path: str | Path, family: Family) -> Path:
    """A local folder, or a hub id downloaded to the hub cache; checked to be the family."""
    text = str(path)
    folder = Path(text)
    if not folder.exists():
        if not HUB_ID.match(text):
            raise FileNotFoundError(
                f"teacher.path '{text}' does not exist; expected {family.expected()}"
            )
        from diffusers import DiffusionPipeline

        try:
            folder = Path(DiffusionPipeline.download(text))
        except Exception as exc:  # any hub failure is the same input error
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise FileNotFoundError(
                f"teacher.path '{text}' is not a local folder and could not be fetched from the "
                f"hub ({reason}); expected {family.expected()}"
            ) from None
    return check(folder, family)


def check(folder: str | Path, family: Family, what: str = "teacher.path") -> Path:
    """`folder` is a pipeline folder of the family with the parts the backend reads."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} '{folder}' is not a folder; expected {family.expected()}")
    if not index.is_file():
        raise ValueError(
            f"{what} '{folder}' has no model_index.json, so it is not a diffusers pipeline; "
            f"expected {family.expected()}"
        )
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        found = None
    if found != family.pipeline:
        raise ValueError(f"{what} '{folder}' holds a {found}, expected {family.expected()}")
    missing = [p for p in family.parts if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{what} '{folder}' lacks {', '.join(missing)}/; expected a complete {family.pipeline}"
        )
    return folder


def link_tree(src: Path, dst: Path, fallback: str = "symlink", skip: tuple[str, ...] = ()) -> None:
    """Mirror `src` into `dst` with hard links to the real files (hub caches hold symlinks);
    across filesystems fall back to a symlink (a resolved reference) or a copy (self-contained).

    Hidden entries are left out: an orchestrator's marker such as Snakemake's
    .snakemake_timestamp, hard-linked into an export, would tie the two folders' timestamps
    (touching the student's would make the teacher look updated)."""
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(src)
        if rel.parts and rel.parts[0] in skip:
            continue
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith(".") or (not rel.parts and name in skip):
                continue
            real = (Path(root) / name).resolve()
            try:
                os.link(real, dst / rel / name)
            except OSError:
                if fallback == "symlink":
                    os.symlink(real, dst / rel / name)
                else:
                    shutil.copy2(real, dst / rel / name)


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters of every component with safetensors weights, read from the file headers."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = 0
        for file in sorted(part.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    total += int(torch.Size(f.get_slice(key).get_shape()).numel())
        if total:
            counts[part.name] = total
    return counts


def vae_factor(folder: Path) -> int:
    return config_vae_factor(AutoencoderKL.load_config(folder / "vae"))


def config_vae_factor(config: dict[str, Any]) -> int:
    """Pixels per latent of a VAE config: AutoencoderKL halves per block after the first;
    AutoencoderKLQwenImage (Qwen-Image) per entry of temperal_downsample, the factor
    QwenImagePipeline takes."""
    if "temperal_downsample" in config:
        return 2 ** len(config["temperal_downsample"])
    return 2 ** (len(config["block_out_channels"]) - 1)


def packed_geometry(
    folder: Path, resolution: int | None, in_channels: int, backend: str, default_size: int = 128
) -> tuple[float, tuple[int, int, int], int]:
    """(shift, unpacked latent shape (C, h, w), image tokens) of a family whose transformer
    reads 2x2-packed latents (LongCat, Qwen-Image): `in_channels` = 4 C, the square
    `resolution` (None: `default_size` latents, the pipeline's default_sample_size) a multiple
    of the VAE factor x 2, the shift the scheduler's at the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdm.backends.few_step import effective_shift

    factor = vae_factor(folder)
    resolution = default_size * factor if resolution is None else resolution
    if resolution % (2 * factor):
        raise ValueError(
            f"teacher.resolution ({resolution}) must be a multiple of {2 * factor} "
            f"(VAE factor {factor} x packing 2) for this {backend} model"
        )
    size = resolution // factor
    tokens = (size // 2) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")
    return effective_shift(dict(scheduler), tokens), (in_channels // 4, size, size), tokens


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded like diffusers' postprocess."""
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


class VaeDecoder:
    """Latents -> uint8 images with the pipeline's VAE and its scaling and shift factors."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell

    def vae_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The flow's latents as the VAE's decoder reads them."""
        config = self.vae.config
        return z / float(config.scaling_factor) + float(config.shift_factor or 0.0)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae.to(latents.device)
        pixels = latents.shape[-2] * latents.shape[-1] * self.factor**2
        out = []
        for chunk in latents.split(max(1, DECODE_PIXELS // pixels)):
            z = self.vae_latents(chunk.to(vae.dtype))
            out.append(to_uint8(vae.decode(z, return_dict=False)[0]))
        return torch.cat(out)


def load_vae_decoder(path: str | Path, family: Family) -> VaeDecoder:
    """The VAE alone of a `family` folder: latents / scaling_factor + shift_factor -> decode
    -> uint8 (B, H, W, 3)."""
    folder = check(path, family, "model folder")
    return VaeDecoder(AutoencoderKL.from_pretrained(folder / "vae"))


class PipelineTeacher:
    """What the diffusers teachers (sd3, longcat, qwen-image, flux2-klein) share; a subclass
    sets `family` and `folder` and encodes prompts its pipeline's way."""

    family: Family
    folder: Path
    resolution: int | None
    shift: float
    latent_shape: tuple[int, int, int]
    device: torch.device
    pipe: Any
    # Tokenizer attribute -> the tokens the pipeline's encode_prompt keeps of a prompt.
    token_limits: ClassVar[dict[str, int]] = {}

    def encode(self, prompts: list[str]) -> Condition:
        raise NotImplementedError

    def open_text(
        self, folder: Path, resolution: int | None, geometry: Callable, pipeline: Any
    ) -> None:
        """Set folder, geometry (shift, latent shape) and `pipe`: the `pipeline` class read
        without transformer and VAE, its one text encoder frozen on the text device."""
        self.folder, self.resolution = folder, resolution
        self.shift, self.latent_shape, _ = geometry(folder, resolution)
        self.device, dtype = text_device()
        self.pipe = pipeline.from_pretrained(folder, transformer=None, vae=None, dtype=dtype)
        self.pipe.text_encoder.to(self.device).eval().requires_grad_(False)

    def truncated(self, prompts: list[str]) -> int:
        """How many prompts some text encoder sees cut (longer than its token limit)."""
        cut: set[int] = set()
        for attr, limit in self.token_limits.items():
            tokenizer = getattr(self.pipe, attr, None)
            if tokenizer is None:
                continue
            ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
            cut |= {i for i, row in enumerate(ids) if len(row) > limit}
        return len(cut)

    def null_condition(self) -> Condition:
        """The empty prompt, as the pipeline encodes its default negative prompt for CFG."""
        return self.encode([""])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return load_vae_decoder(self.folder, self.family)(latents)

    def save_teacher(self, path: Path) -> None:
        link_tree(self.folder, path)


class TextEncoderTeacher(PipelineTeacher):
    """A teacher whose pipeline has one text encoder and no pooled input (longcat,
    flux2-klein): the pipeline loaded without its transformer and VAE; a subclass gives its
    `geometry` and the pipeline's own prompt embeddings (`embeds`)."""

    def __init__(self, folder: Path, resolution: int | None = None):
        import diffusers

        self.open_text(folder, resolution, self.geometry, getattr(diffusers, self.family.pipeline))

    @staticmethod
    def geometry(folder: Path, resolution: int | None) -> tuple[float, tuple[int, ...], int]:
        raise NotImplementedError

    def embeds(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Condition:
        """The pipeline's prompt embeddings; no pooled input: a (B, 1) zero keeps the form."""
        embeds = self.embeds(prompts)
        return Condition(embeds.cpu(), embeds.new_zeros(len(prompts), 1).cpu())


def load_transformer(
    path: str | Path,
    family: Family,
    geometry: Callable[[Path, int | None], tuple[float, tuple[int, int, int], int]],
    resolution: int | None,
    dtype: torch.dtype | None,
) -> tuple[Any, float, tuple[int, int, int]]:
    """(transformer, shift, latent shape) of a `family` folder: the transformer alone, its
    weights read in `dtype` (None: fp32)."""
    folder = check(path, family, "model folder")
    shift, shape, _ = geometry(folder, resolution)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(folder / "transformer", torch_dtype=dtype), shift, shape


def text_device() -> tuple[torch.device, torch.dtype]:
    """Where cache_teacher runs the text encoders: bf16 on a GPU, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def sanity_check(
    velocity: torch.nn.Module,
    decode: Callable[[torch.Tensor], torch.Tensor],
    null: Any,
    shape: tuple[int, int, int],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """One forward at sigma = 1 on seeded noise (null prompt) and the decode of its clean
    estimate: both must be finite."""
    velocity = velocity.to(device).eval()
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    v = velocity(x, torch.ones(1, device=device), null.to(device))
    image = decode(x - v)
    if not torch.isfinite(v).all():
        raise ValueError("the teacher's velocity is not finite on seeded noise; check the weights")
    return {
        "velocity_shape": list(v.shape),
        "velocity_mean": round(v.mean().item(), 6),
        "velocity_std": round(v.std().item(), 6),
        "image_shape": list(image.shape),
        "image_mean": round(image.float().mean().item(), 3),
    }
