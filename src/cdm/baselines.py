"""Published few-step models as sample sets (params `compare:`): the base SD3 pipeline with a
model's loading recipe (LoRA, scheduler, VAE, dropped text encoders), sampled by the
pipeline's own call, so that each runs as its authors run it.

Only stock classes load them: the pipeline's load_lora_weights / set_adapters / fuse_lora for
a diffusers- or kohya-format LoRA file, peft's PeftModel for a PEFT adapter folder, and
diffusers' scheduler and VAE classes by name. Pair j gets the same initial noise as in every
other set (seed NOISE_SEED_BASE + j, passed as `latents`), so sets compare image by image and
a set does not depend on its batches. Hub ids are read from the local cache only: `python -m
cdm.fetch weights` downloads them first.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cdm import params as P
from cdm.hub import HUB_ID, hub_commit
from cdm.samplefiles import COLUMNS, RECIPE, dtype_name, png_name, save_png
from cdm.world.evaluate import EvalPairs

ADAPTER = "compare"  # the adapter name a recipe's LoRA is loaded under


def local(path: str, what: str, file: str | None = None) -> Path:
    """A local file or folder, or the hub cache's copy of a hub id (never downloaded here)."""
    if Path(path).exists():
        folder = Path(path)
        return folder / file if file else folder
    if not HUB_ID.match(path):
        raise FileNotFoundError(f"{what} '{path}' is neither a local file or folder nor a hub id")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if file:
            return Path(hf_hub_download(path, file, local_files_only=True))
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not in the cache: the same input error whatever the hub says
        label = f"{path}/{file}" if file else path
        raise FileNotFoundError(
            f"{what} '{label}' is not in the hub cache; run `python -m cdm.fetch weights` first"
        ) from None


def diffusers_class(name: str, what: str) -> Any:
    import diffusers

    found = getattr(diffusers, name, None)
    if not isinstance(found, type):
        raise ValueError(f"{what}: diffusers has no class '{name}'; name a diffusers class")
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every safetensors file of a folder (by relative name)."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = sorted(path.rglob("*.safetensors"))
    return {str(f.relative_to(path)): sha256_file(f) for f in files}


def apply_lora(pipe: Any, lora: P.CompareLora) -> dict[str, Any]:
    """Load the recipe's LoRA into the pipeline's transformer at its scale (fused or not)."""
    if lora.format == "peft":
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        folder = local(lora.path, "compare LoRA")
        model = PeftModel.from_pretrained(pipe.transformer, str(folder))
        if lora.scale != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale("default", lora.scale)
        pipe.transformer = model.merge_and_unload() if lora.fuse else model
        source = folder
    else:
        source = local(lora.path, "compare LoRA", lora.file)
        pipe.load_lora_weights(str(source), adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], [lora.scale])
        if lora.fuse:  # scaled by set_adapters; fuse_lora's own lora_scale stays 1
            pipe.fuse_lora(adapter_names=[ADAPTER])
            pipe.unload_lora_weights()
    return {"path": lora.path, "commit": hub_commit(source), "sha256": weight_hashes(source)}


def load_pipeline(recipe: P.Compare, teacher: Path, dtype: torch.dtype) -> tuple[Any, dict]:
    """The recipe's pipeline (weights in `dtype`) and what it loaded, with weight hashes."""
    from diffusers import StableDiffusion3Pipeline

    base = local(recipe.path, "compare path") if recipe.path else teacher
    dropped = dict.fromkeys(recipe.drop)
    pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=dtype, **dropped)
    loaded: dict[str, Any] = {"base": recipe.path or "teacher", "dropped": recipe.drop}
    if recipe.lora is not None:
        loaded["lora"] = apply_lora(pipe, recipe.lora)
    if recipe.scheduler is not None:
        cls = diffusers_class(recipe.scheduler.cls, "compare scheduler")
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **recipe.scheduler.kwargs)
    if recipe.vae is not None:
        folder = local(str(recipe.vae.path), "compare VAE")  # params require the path
        cls = diffusers_class(recipe.vae.cls, "compare vae")
        vae = cls.from_pretrained(folder, dtype=dtype)
        if recipe.vae.kwargs:  # e.g. shift_factor, which AutoencoderTiny's config lacks
            vae.register_to_config(**recipe.vae.kwargs)
        pipe.vae = vae
        loaded["vae"] = {
            "path": recipe.vae.path,
            "commit": hub_commit(folder),
            "sha256": weight_hashes(folder),
        }
    loaded["scheduler"] = type(pipe.scheduler).__name__
    return pipe, loaded


@dataclass
class CompareJob:
    """One compare sample set with its pipeline loaded: running it only writes images."""

    name: str
    recipe: P.Compare
    pipe: Any
    loaded: dict[str, Any]
    pairs: EvalPairs
    latent_shape: tuple[int, int, int]
    factor: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def nfe(self) -> int:  # the pipeline runs CFG (two passes) only above guidance 1
        return self.recipe.steps * (2 if self.recipe.guidance > 1 else 1)

    @torch.no_grad()
    def run(self, out: Path) -> pd.DataFrame:
        pipe = self.pipe.to(self.device)
        size = self.latent_shape[-1] * self.factor
        rows = []
        for lo in range(0, len(self.pairs.seeds), self.batch_size):
            batch = EvalPairs(
                self.pairs.prompts[lo : lo + self.batch_size],
                self.pairs.seeds[lo : lo + self.batch_size],
            )
            start = time.perf_counter()
            images = pipe(
                prompt=batch.prompts, height=size, width=size,
                num_inference_steps=self.recipe.steps, guidance_scale=self.recipe.guidance,
                latents=batch.noise(self.latent_shape).to(self.device, self.dtype),
                output_type="np",
            ).images  # fmt: skip
            share = (time.perf_counter() - start) / len(batch.seeds)
            for k, (pair, seed) in enumerate(zip(batch.pairs, batch.seeds, strict=True)):
                save_png((images[k] * 255).round().astype("uint8"), out / png_name(pair))
                rows.append(
                    {
                        "prompt": batch.prompts[k], "pair": pair, "seed": seed,
                        "model": self.name, "steps": self.recipe.steps, "nfe": self.nfe,
                        "seconds": share, "file": png_name(pair), "dtype": dtype_name(self.dtype),
                    }
                )  # fmt: skip
        (out / RECIPE).write_text(json.dumps(self.loaded, indent=1) + "\n")
        return pd.DataFrame(rows, columns=COLUMNS)


def prepare(
    name: str,
    steps: int,
    params: P.Params,
    prompts: list[str],
    pairs: list[int],
    teacher: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> CompareJob:
    """Every input of compare set `name` loaded before anything is written: its pipeline, and
    the teacher's latent geometry (the same noise as the other sets)."""
    from cdm.backends import pipelines, sd3

    recipe = params.compare[name]
    if steps != recipe.steps:
        raise ValueError(
            f"compare.{name} samples at {recipe.steps} steps (its recipe), not {steps}; "
            f"run sample.py --model {name} --steps {recipe.steps}"
        )
    folder = pipelines.check(teacher, sd3.FAMILY, "teacher folder")
    _, shape, _ = sd3.geometry(folder, params.teacher.resolution)
    pipe, loaded = load_pipeline(recipe, folder, dtype)
    pipe.set_progress_bar_config(disable=True)
    return CompareJob(
        name, recipe, pipe, loaded | {"recipe": recipe.model_dump(by_alias=True)},
        EvalPairs.of(prompts, pairs), shape, pipelines.vae_factor(folder),
        params.sample.batch_size, device, dtype,
    )  # fmt: skip
