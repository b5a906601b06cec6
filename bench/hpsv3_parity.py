"""HPSv3Scorer against the `hpsv3` package's own HPSv3RewardInferencer on a tiny random model.

    python bench/hpsv3_parity.py --hpsenv /tmp/hpsenv/bin/python

The package pins transformers==4.45.2, so it runs in a separate venv (`--hpsenv`: hpsv3 1.0.0
with --no-deps, transformers 4.45.2, torch, torchvision, trl 0.11, peft, rich, ...). There,
with 4.45's classes, a subprocess writes a tiny Qwen2-VL base folder (4.x formats, like the
hub's), a full-model `HPSv3.safetensors` of a random Qwen2VLRewardModelBT (<|Reward|> added,
embeddings resized) and the package's yaml with model_name_or_path pointing at it (fp32, no
deepspeed), then scores PNGs with the inferencer. This project's scorer then loads the same
files and scores the same pairs. Writes bench/results/hpsv3_parity.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

PROMPTS = ["a red cube", "two cats on a sofa, oil painting", "a lighthouse at night"]
SIZES = [(64, 64), (80, 48), (33, 90)]

PACKAGE_SIDE = r"""
import json, sys
from pathlib import Path
import torch, yaml
from safetensors.torch import save_file
import hpsv3
from hpsv3 import HPSv3RewardInferencer
from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
from transformers import Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

work, template, images, prompts = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
base, ckpt = work / "base", work / "ckpt"
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
(work / "vocab.json").write_text(json.dumps(vocab))
(work / "merges.txt").write_text("#version: 0.2\n")
tok = Qwen2TokenizerFast(vocab_file=str(work / "vocab.json"), merges_file=str(work / "merges.txt"))
tok.add_special_tokens({"additional_special_tokens": specials[1:]})
Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, chat_template=template).save_pretrained(base)
ids = tok.convert_tokens_to_ids
def config(vocab_size):
    return Qwen2VLConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
# The package also loads the base weights (then overwritten by the checkpoint): random ones.
Qwen2VLForConditionalGeneration(config(len(tok))).save_pretrained(base)
# What the package trains and saves: <|Reward|> added, embeddings resized, rm_head "ranknet".
torch.manual_seed(0)
model = Qwen2VLRewardModelBT(config(len(tok) + 1), output_dim=2, reward_token="special",
                             special_token_ids=[len(tok)], rm_head_type="ranknet")
for p in model.parameters():
    p.data.normal_(0, 0.2)
ckpt.mkdir()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "HPSv3.safetensors")
cfg = yaml.safe_load((Path(hpsv3.__file__).parent / "config/HPSv3_7B.yaml").read_text())
cfg |= {"model_name_or_path": str(base), "bf16": False, "torch_dtype": "float32", "deepspeed": None,
        "output_dir": str(work / "out"), "report_to": "none", "dataloader_num_workers": 0}
(work / "HPSv3_tiny.yaml").write_text(yaml.safe_dump(cfg))
inf = HPSv3RewardInferencer(str(work / "HPSv3_tiny.yaml"), str(ckpt / "HPSv3.safetensors"), device="cpu")
with torch.no_grad():
    rewards = inf.reward(images, prompts)
json.dump({"mu": rewards[:, 0].tolist(), "sigma": rewards[:, 1].tolist(),
           "keys": sorted(model.state_dict())[:3]}, sys.stdout)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hpsenv", default="/tmp/hpsenv/bin/python")
    parser.add_argument("--out", default=str(ROOT / "bench/results/hpsv3_parity.json"))
    args = parser.parse_args()

    from PIL import Image
    from tests.test_hpsv3 import CHAT_TEMPLATE

    from cdm.metrics.hpsv3 import HPSv3Scorer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gen = np.random.default_rng(0)
        paths = []
        for i, (w, h) in enumerate(SIZES):
            path = work / f"{i}.png"
            Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        run = subprocess.run(
            [args.hpsenv, "-c", PACKAGE_SIDE, tmp, CHAT_TEMPLATE, json.dumps(paths),
             json.dumps(PROMPTS)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            sys.exit(f"package side failed:\n{run.stderr[-4000:]}")
        package = json.loads(run.stdout.strip().splitlines()[-1])
        ims = [Image.open(p) for p in paths]
        ours = HPSv3Scorer(str(work / "ckpt"), base=str(work / "base"), device="cpu", batch_size=3)
        mu = ours.score(ims, PROMPTS)
        ver = subprocess.run(
            [args.hpsenv, "-c", "import transformers, torch; print(transformers.__version__, "
             "torch.__version__)"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    import torch
    import transformers

    result = {
        "what": "HPSv3Scorer (this project's transformers) vs hpsv3 1.0.0 HPSv3RewardInferencer "
        "on a tiny random Qwen2-VL reward model, fp32 on CPU, same PNGs and prompts",
        "package_env": {"transformers": ver[0], "torch": ver[1]},
        "project_env": {"transformers": transformers.__version__, "torch": torch.__version__},
        "prompts": PROMPTS,
        "image_sizes_wh": SIZES,
        "package_mu": package["mu"],
        "package_sigma": package["sigma"],
        "ours_mu": mu.tolist(),
        "max_abs_diff": float(np.max(np.abs(mu - np.array(package["mu"])))),
        "spread_of_mu": float(np.ptp(mu)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
