"""Benchmark: images/s of the 4-step student (guidance 1, one transformer call per step) against
the teacher at 28 steps with CFG (cond + uncond in one batched call per step), both including
the VAE decode, side by side in one run on the synthetic SD3 (or LongCat) size. Writes JSON.

    python bench/sampling.py --model sd3 --layers 2 --width 64 --heads 2 --resolution 64 \\
        --vae-div 8 --images 2 --repeats 2 --out bench/results/sampling-sd3-cpu-tiny.json

The transformer comes from the published config stored in `cdm.plan.PUBLISHED` with random
weights (`--layers/--width/--heads` cut it; bench/scale.py builds it), the student is a copy of
the same architecture (an exported student is the teacher's transformer retrained), the VAE is
SD3's published AutoencoderKL config (16 latent channels, 8x; `--vae-div` divides its channels)
with random weights. Sampling is the sample stage's code at the stage's precision:
`cdm.sampler.sampling_dtype` (the transformer in bf16 on a GPU, fp32 on the CPU),
`cdm.sampler.Sampler` (its sigmas and NFE), `cdm.sampling.sample_euler` (CFG as one batched
call), `cdm.backends.pipelines.VaeDecoder` in fp32 and `cdm.samplefiles.save_png`. Reports
per-image seconds split into transformer, decode and PNG encoding, transformer calls and
sample-evaluations per image, images/s and the speed-up of the student (total and transformer
alone). One untimed warm-up run of each model precedes the timed repeats. `--compare-decode`
also times the decode in bf16 on the same latents and counts the uint8 levels it moves.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from cdm import params as P
from cdm.backends.pipelines import VaeDecoder
from cdm.samplefiles import dtype_name, save_png
from cdm.sampler import Sampler, sampling_device, sampling_dtype
from cdm.sampling import sample_euler

ROOT = Path(__file__).resolve().parents[1]
# SD3-Medium's vae/config.json (FLUX's VAE has the same layout): 16 channels, 8x downsampling.
SD3_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
    "use_post_quant_conv": False,
}  # fmt: skip
# The real-run overlay of each model: the teacher's CFG comes from its teacher.cfg_scale.
OVERLAYS = {"sd3": ROOT / "configs/sd3-medium.yaml", "longcat": ROOT / "configs/longcat-image.yaml"}


def _scale_module():
    """bench/scale.py (not a package): the cut teacher is built there."""
    spec = importlib.util.spec_from_file_location(
        "bench_scale", Path(__file__).with_name("scale.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_vae(div: int, seed: int) -> AutoencoderKL:
    config = dict(SD3_VAE)
    channels = [max(1, c // div) for c in config["block_out_channels"]]
    config["block_out_channels"] = channels
    config["norm_num_groups"] = min(32, min(channels))
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(config)


class Counter(torch.nn.Module):
    """velocity(x, sigma, cond) passing through, counting calls and samples."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.samples = 0

    def forward(self, x, sigma, cond):
        self.calls += 1
        self.samples += x.shape[0]
        return self.inner(x, sigma, cond)


def _now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def measure(
    sampler: Sampler, steps: int, decode: VaeDecoder, cond, null, images: int, repeats: int,
    seed: int, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Per-image seconds of sampling (transformer) and decoding, over `repeats` timed runs."""
    cuda = device.type == "cuda"
    counter = Counter(sampler.velocity)
    sigmas = sampler.sigmas(steps).to(device)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images, *sampler.latent_shape, generator=gen).to(device)
    c, n = cond.take(slice(0, images)).to(device), null.to(device)

    def once() -> tuple[float, float, float]:
        t0 = _now(cuda)
        x = sample_euler(counter, noise, sigmas, c, n, sampler.guidance)
        t1 = _now(cuda)
        out = decode(x).cpu().numpy()
        t2 = _now(cuda)
        for image in out:  # what the stage writes, into memory
            save_png(image, io.BytesIO())
        t3 = time.perf_counter()
        assert out.dtype == np.uint8 and out.shape[0] == images
        return t1 - t0, t2 - t1, t3 - t2

    once()  # warm-up
    counter.calls = counter.samples = 0
    runs = [once() for _ in range(repeats)]
    transformer, decoding, png = (sum(r[i] for r in runs) / (repeats * images) for i in range(3))
    return {
        "steps": steps,
        "guidance": sampler.guidance,
        "nfe": sampler.nfe(steps),
        "transformer_calls_per_batch": counter.calls / repeats,
        "sample_evaluations_per_image": counter.samples / (repeats * images),
        "seconds_per_image": {
            "transformer": round(transformer, 5),
            "decode": round(decoding, 5),
            "png": round(png, 5),
            "total": round(transformer + decoding + png, 5),
        },
        "images_per_s": round(1 / (transformer + decoding + png), 4),
    }


@torch.no_grad()
def compare_decode(
    vae: AutoencoderKL, shape: tuple[int, ...], images: int, repeats: int, seed: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """The VAE decode in fp32 (the stage's) against bf16 on the same latents: seconds per
    image of each, and how many uint8 levels bf16 moves (fraction of values moved, largest)."""
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, *shape, generator=gen).to(device)
    result: dict[str, Any] = {}
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        decode = VaeDecoder(copy.deepcopy(vae).to(device, dtype))
        decode(x)  # warm-up
        t0 = _now(cuda)
        for _ in range(repeats):
            outs[dtype] = decode(x).cpu().to(torch.int16)
        result[f"seconds_per_image_{dtype_name(dtype)}"] = round(
            (_now(cuda) - t0) / (repeats * images), 5
        )
    moved = (outs[torch.float32] - outs[torch.bfloat16]).abs()
    result["bf16_levels_moved_fraction"] = round(float((moved > 0).float().mean()), 5)
    result["bf16_levels_moved_max"] = int(moved.max())
    # PSNR of the bf16 images against fp32's, 10 log10(255^2 / MSE): inf where none moved.
    mse = float(moved.double().pow(2).mean())
    result["bf16_psnr_db"] = round(10 * math.log10(255**2 / mse), 2) if mse else math.inf
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd3", "longcat"), default="sd3")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--single-layers", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--vae-div", type=int, default=1, help="divide the VAE's channels")
    parser.add_argument("--images", type=int, default=4, help="images per batch")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per model")
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, help="teacher CFG (default: the overlay's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare-decode", action="store_true", help="also time the decode in bf16, count moves"
    )
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--out", help="JSON (default: bench/results/sampling-<model>.json)")
    args = parser.parse_args(argv)

    device = sampling_device()
    cuda = device.type == "cuda"
    dtype = sampling_dtype(device)
    scale = _scale_module()
    config = scale.teacher_config(
        args.model, args.layers, args.width, args.heads, args.single_layers
    )
    velocity, shift, shape, cond, null, tokens = scale.build_teacher(
        args.model, config, args.resolution, args.seed
    )
    if args.images > len(cond):
        cond = _cycle(cond, args.images)
    teacher_v = velocity.to(device, dtype).eval().requires_grad_(False)
    student_v = copy.deepcopy(teacher_v)
    vae = build_vae(args.vae_div, args.seed)
    decode = VaeDecoder(copy.deepcopy(vae).to(device))  # fp32, as the stage decodes
    raw = list(P.load(args.params).distill.inference_sigmas)
    overlay = P.parse_yaml(OVERLAYS[args.model].read_text())
    cfg_scale = overlay["teacher"]["cfg_scale"] if args.cfg is None else args.cfg
    student = Sampler(student_v, shift, shape, 1.0, raw if len(raw) == args.student_steps else None)
    teacher = Sampler(teacher_v, shift, shape, cfg_scale)

    common = (decode, cond, null, args.images, args.repeats, args.seed, device)
    s = measure(student, args.student_steps, *common)
    t = measure(teacher, args.teacher_steps, *common)
    result = {
        "what": "images/s of the few-step student (guidance 1) vs the teacher with CFG, "
        "VAE decode included; per-image seconds split into transformer and decode",
        "command": "python bench/sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "model": args.model,
            "hub_config": scale.HUB[args.model],
            "transformer": config,
            "resolution": args.resolution,
            "latent_shape": list(shape),
            "image_tokens": tokens,
            "text_tokens": int(cond.embeds.shape[1]),
            "vae_block_out_channels": [
                max(1, c // args.vae_div) for c in SD3_VAE["block_out_channels"]
            ],
            "images_per_batch": args.images,
            "repeats": args.repeats,
            "shift": shift,
            "dtype": dtype_name(dtype),
            "decode_dtype": "float32",
        },  # fmt: skip
        "device": scale._device(cuda),
        "student": s,
        "teacher": t,
        "speedup": round(t["seconds_per_image"]["total"] / s["seconds_per_image"]["total"], 3),
        "speedup_transformer_only": round(
            t["seconds_per_image"]["transformer"] / s["seconds_per_image"]["transformer"], 3
        ),
        "evaluation_ratio": round(
            t["sample_evaluations_per_image"] / s["sample_evaluations_per_image"], 3
        ),
    }
    if args.compare_decode:
        result["decode_fp32_vs_bf16"] = compare_decode(
            vae, shape, args.images, args.repeats, args.seed, device
        )
    out = Path(args.out or ROOT / "bench" / "results" / f"sampling-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in (("student", s), ("teacher", t)):
        sp = r["seconds_per_image"]
        print(
            f"{name:<8} {r['steps']:>2} steps x {r['sample_evaluations_per_image'] / r['steps']:.0f}"
            f" evals: transformer {sp['transformer']:.4f} s + decode {sp['decode']:.4f} s "
            f"+ png {sp['png']:.4f} s per image = {r['images_per_s']} images/s"
        )
    print(f"speed-up {result['speedup']} (transformer alone {result['speedup_transformer_only']})")
    return result


def _cycle(cond, n: int):
    """`cond` rows cycled to at least n rows."""
    index = torch.arange(n) % len(cond)
    return cond.take(index)


if __name__ == "__main__":
    main()
