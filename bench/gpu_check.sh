#!/usr/bin/env bash
# The one prepared GPU check (issue on real scale), for the device tool's lent machine:
# about 10 minutes (each step under its own timeout), JSON under OUT (the device tool's
# $OUT, else bench/results/gpu/).
#
#   1. bench/scale.py at SD3-Medium's width (1536, 24 heads), 1024 px, ZeRO-2, gradient
#      checkpointing, with as many of its 24 blocks as fit (24, else 12); its JSON holds the
#      start-up peak (peak.startup_measured_bytes, before the first step) beside the plan's
#      (peak.startup_plan_bytes, cdm.plan.peaks);
#      the same in LoRA mode (rank 64, alpha 128, the authors'): phases, peak, trained fraction;
#   2. bench/sampling.py at SD3-Medium's full size: 4-step student vs 28 steps with CFG, at
#      the sample stage's precision (transformer bf16, VAE decode fp32), and the decode in
#      bf16 against fp32 (seconds, uint8 levels moved: whether the decode may go bf16);
#   3. the embedded distill (shapes world, params.yaml's cdm and dmd2) for its it/s, and
#      cdm with two micro-batches per update (distill.accumulation 2, bf16: DeepSpeed's bf16
#      overflow check is what discards a non-finite accumulated step);
#   4. bench/scorers.py: the five scorers one at a time at their real sizes (HPSv3 at
#      Qwen2-VL-2B size), random weights, bf16 on the GPU: images/s and peak memory each.
#
# On the device machine (no diffusers/deepspeed/pydantic there; ../shared/gpu/wheels.sh .whl
# builds them here, carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=$PWD/src:$PWD:/tmp/site; bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
python3 - > "$out/device.json" <<'PY'
import json, torch
print(json.dumps({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "cuda": torch.version.cuda}))
PY
for layers in 24 12; do
  if timeout 180 python3 bench/scale.py --model sd3 --layers "$layers" --resolution 1024 \
      --iterations 6 --batch 2 --zero 2 --gradient-checkpointing \
      --out "$out/scale-sd3-${layers}layers.json" > "$out/scale-${layers}.log" 2>&1; then
    break
  fi
done
timeout 120 python3 bench/scale.py --model sd3 --layers 24 --resolution 1024 --iterations 2 \
  --batch 1 --zero 2 --out "$out/scale-sd3-nockpt.json" > "$out/scale-nockpt.log" 2>&1
timeout 150 python3 bench/scale.py --model sd3 --layers 24 --resolution 1024 --iterations 6 \
  --batch 2 --zero 2 --gradient-checkpointing --lora 64 \
  --out "$out/scale-sd3-lora64.json" > "$out/scale-lora.log" 2>&1
timeout 150 python3 bench/sampling.py --model sd3 --resolution 1024 --images 8 --repeats 2 \
  --compare-decode --out "$out/sampling-sd3.json" > "$out/sampling.log" 2>&1
for method in cdm dmd2; do  # distill_seconds over 400 iterations: the engine's it/s
  timeout 90 python3 bench/distill_probe.py --method "$method" --pairs 64 \
    --set distill.iterations=400 --out "$out/probe-$method.json" > "$out/probe-$method.log" 2>&1
done
timeout 60 python3 bench/distill_probe.py --method cdm --pairs 64 --set distill.iterations=100 \
  --set distill.accumulation=2 --out "$out/probe-cdm-accumulation2.json" > "$out/probe-acc.log" 2>&1
timeout 240 python3 bench/scorers.py --size full --device cuda --dtype bfloat16 --images 64 \
  --out "$out/scorers-bf16.json" > "$out/scorers.log" 2>&1
ls -la "$out"
