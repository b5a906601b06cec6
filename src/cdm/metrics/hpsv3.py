"""HPSv3 (Ma et al., 2025): a Qwen2-VL-7B-Instruct reward model of human preference.

Re-implements the `hpsv3` package's `HPSv3RewardInferencer` (hpsv3/inference.py, the model
`Qwen2VLRewardModelBT` in hpsv3/model/qwen2vl_trainer.py, config hpsv3/config/HPSv3_7B.yaml)
on this project's transformers, since the package pins transformers==4.45.2:

- the image is resized like its `fetch_image` (hpsv3/dataset/utils.py): RGB, `smart_resize` to
  multiples of 28 with min = max = 256 * 28 * 28 pixels, PIL bicubic;
- one user turn [image, INSTRUCTION(prompt) + "...ratings of this image: <|Reward|>\\n\\nEND\\n"]
  (hpsv3/dataset/data_collator_qwen.py) through the processor's chat template with the
  generation prompt, right padding; `<|Reward|>` is a special token added to the tokenizer;
- the language model runs with plain sequential positions 0..L-1 on all three M-RoPE axes
  (the package calls the decoder directly with position_ids=None, bypassing `get_rope_index`);
- score = rm_head(final-norm hidden state at the `<|Reward|>` token)[0], rm_head in fp32 being
  Linear(D, 1024)-ReLU-Dropout-Linear(1024, 16)-ReLU-Linear(16, 2) -> (mu, sigma); mu is the
  score (the package's own example reads `rewards[i][0]`).

`HPSv3.safetensors` holds the whole model (4.45 key names `model.*`, `visual.*`, `lm_head.*`,
`rm_head.*`, embeddings resized to the tokenizer with `<|Reward|>`), so only the base repo's
config and processor files are read; its 7B weights are never loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import hf_hub_download
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLModel, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cdm.hub import HUB_ID
from cdm.metrics.base import Scorer, load_pretrained, missing_weights

CHECKPOINT_FILE = "HPSv3.safetensors"
REWARD_TOKEN = "<|Reward|>"
FACTOR = 28  # patch 14 x spatial merge 2
PIXELS = 256 * 28 * 28  # the inferencer's min_pixels and max_pixels alike
MAX_RATIO = 200

# Verbatim from hpsv3/dataset/data_collator_qwen.py (INSTRUCTION + prompt_with_special_token).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 (the trailing spaces are part of the trained prompt)
RATING = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def smart_resize(height: int, width: int) -> tuple[int, int]:
    """hpsv3's smart_resize: multiples of FACTOR, PIXELS pixels at most/least, aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio above {MAX_RATIO}: {width}x{height}")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > PIXELS:
        beta = math.sqrt(height * width / PIXELS)
        h = math.floor(height / beta / FACTOR) * FACTOR
        w = math.floor(width / beta / FACTOR) * FACTOR
    elif h * w < PIXELS:
        beta = math.sqrt(PIXELS / (height * width))
        h = math.ceil(height * beta / FACTOR) * FACTOR
        w = math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


def fetch_image(image: Image.Image) -> Image.Image:
    """hpsv3's fetch_image of a PIL image: the processor's own resize is then the identity."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width)
    return image.resize((w, h), Image.BICUBIC)


class RewardHead(nn.Sequential):
    """Qwen2VLRewardModelBT's "ranknet" rm_head without rm_head_kwargs; indices match its
    state dict (rm_head.{0,3,5}.*; 2 and 4 hold no weights)."""

    def __init__(self, hidden: int, width: int = 1024, inner: int = 16, out: int = 2) -> None:
        super().__init__(
            nn.Linear(hidden, width),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(width, inner),
            nn.ReLU(),
            nn.Linear(inner, out),
        )


def resolve_checkpoint(checkpoint: str, file: str, cache_dir: str | None = None) -> Path:
    """The checkpoint file: a path, a folder holding `file`, or a hub repo in the cache."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / file
    if path.is_file():
        return path
    if HUB_ID.match(checkpoint):
        try:
            return Path(
                hf_hub_download(checkpoint, file, cache_dir=cache_dir, local_files_only=True)
            )
        except FileNotFoundError:  # LocalEntryNotFoundError: not in the cache
            pass
    raise missing_weights("HPSv3", f"{checkpoint}/{file}" if not path.suffix else checkpoint)


def split_checkpoint(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Qwen2VLModel state, rm_head state) from the package's Qwen2VLRewardModelBT keys
    (transformers 4.45 names; 5.x names are accepted too); lm_head is unused and dropped."""
    model, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith("visual."):
            model[key] = value
        elif key.startswith("model."):
            rest = key.removeprefix("model.")
            if not rest.startswith(("language_model.", "visual.")):
                rest = "language_model." + rest  # 4.45: model.* is the decoder
            model[rest] = value
        else:
            raise KeyError(f"unexpected key '{key}' in the HPSv3 checkpoint")
    return model, head


class HPSv3Scorer(Scorer):
    """HPSv3's mu of each (image, prompt): Qwen2-VL built from `base`'s config and processor,
    every weight from `checkpoint` (a hub repo, a folder or the file itself)."""

    name = "hpsv3"
    cuda_dtype = torch.bfloat16  # the package runs the model in bf16 (its head in fp32)

    def __init__(
        self,
        checkpoint: str = "MizzenAI/HPSv3",
        checkpoint_file: str = CHECKPOINT_FILE,
        base: str = "Qwen/Qwen2-VL-7B-Instruct",
        *,
        cache_dir: str | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size, device, dtype)
        path = resolve_checkpoint(checkpoint, checkpoint_file, cache_dir)  # fail fast
        self.processor = load_pretrained(Qwen2VLProcessor, base, "HPSv3 processor", cache_dir)
        # The PIL backend is the 4.45 "slow" processor the package used (numpy rescale/normalise).
        self.processor.image_processor = load_pretrained(
            Qwen2VLImageProcessorPil, base, "HPSv3 image processor", cache_dir
        )
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"  # the package's choice; the causal reward token ignores it
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)

        config = load_pretrained(Qwen2VLConfig, base, "HPSv3 base config", cache_dir)
        model_state, head_state = split_checkpoint(load_file(path, device="cpu"))
        # The checkpoint's embeddings were resized to the tokenizer with <|Reward|> added.
        vocab = model_state["language_model.embed_tokens.weight"].shape[0]
        if self.reward_id >= vocab:
            raise ValueError(
                f"{REWARD_TOKEN} is token {self.reward_id}, past the {vocab} embeddings"
            )
        config.text_config.vocab_size = vocab
        with init_empty_weights():  # parameters on meta: the checkpoint supplies them all
            model = Qwen2VLModel(config)
        model.load_state_dict(model_state, strict=True, assign=True)
        self.model = model.to(self.device, self.dtype).eval()

        w0, w3, w5 = (head_state[f"{i}.weight"] for i in (0, 3, 5))
        head = RewardHead(w0.shape[1], w0.shape[0], w3.shape[0], w5.shape[0])
        head.load_state_dict(head_state, strict=True)
        self.head = head.to(self.device, torch.float32).eval()  # the package keeps it in fp32

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's batch of the package's messages (right padded)."""
        messages = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + RATING},
                    ],
                }
            ]
            for p in prompts
        ]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        batch = self.processor(
            text=text,
            images=[fetch_image(im) for im in images],
            padding=True,
            return_tensors="pt",
        )
        return {
            k: batch[k].to(self.device)
            for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        }

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        batch = self.inputs(images, prompts)
        ids = batch["input_ids"]
        at_reward = ids == self.reward_id
        if not bool((at_reward.sum(1) == 1).all()):
            raise ValueError(f"each prompt must hold exactly one {REWARD_TOKEN} token")
        # Sequential positions on all three M-RoPE axes, as the package's forward gets them.
        positions = torch.arange(ids.shape[1], device=self.device).expand(3, *ids.shape)
        hidden = self.model(
            **batch, position_ids=positions, use_cache=False
        ).last_hidden_state  # final-normed
        mu_sigma = self.head(hidden[at_reward].float())  # (B, 2), rows in batch order
        return mu_sigma[:, 0]
