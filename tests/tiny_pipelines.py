"""Tiny random SD3, LongCat-Image, Qwen-Image and FLUX.2 [klein] pipelines, built offline and
saved with save_pretrained.

Tokenizers come from files shipped by installed packages or from vocabularies made here:
CLIP's BPE merges from open_clip's `bpe_simple_vocab_16e6.txt.gz` (cut to the first
MERGES), a T5 unigram vocabulary of single characters, and a byte-level Qwen2 vocabulary
(the 256 byte symbols plus the chat-template special tokens).
"""

from __future__ import annotations

import gzip
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

MERGES = 1000  # of CLIP's 48,894 BPE merges: a small vocabulary that still spells any word
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


def clip_tokenizer():
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77
    )


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tokenizer


def tiny_vae(scaling: float, shift: float) -> AutoencoderKL:
    """16 latent channels like SD3's and Flux's VAE; 2x downsampling instead of 8x."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), norm_num_groups=4, sample_size=16,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: 1-layer MMDiT (16 px images = 8x8 latents), two CLIPs, T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip, t5 = clip_tokenizer(), t5_tokenizer()

    def clip_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip),
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=8,
                max_position_embeddings=77,
                bos_token_id=clip.bos_token_id,
                eos_token_id=clip.eos_token_id,
                pad_token_id=clip.pad_token_id,
            )  # fmt: skip
        )

    encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )  # fmt: skip
    )
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(1.5305, 0.0609),
        text_encoder=clip_encoder(),
        tokenizer=clip,
        text_encoder_2=clip_encoder(),
        tokenizer_2=clip,
        text_encoder_3=encoder_3,
        tokenizer_3=t5,
    )


def qwen_vl_encoder(tokenizer):
    """A 1-layer Qwen2.5-VL (text and vision towers) for the byte-level Qwen2 `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
        fullatt_block_indexes=[0],
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )  # fmt: skip
    )


def longcat_pipeline(seed: int = 0):
    """LongCatImagePipeline: 1 double + 1 single block, a 1-layer Qwen2.5-VL text encoder."""
    from diffusers import LongCatImagePipeline, LongCatImageTransformer2DModel
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template="{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}",
    )
    encoder = qwen_vl_encoder(tokenizer)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return LongCatImagePipeline(
        scheduler=scheduler,
        vae=tiny_vae(0.3611, 0.1159),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_processor=processor,
        transformer=transformer,
    )


def qwen_vae():
    """AutoencoderKLQwenImage (a causal video VAE) with Qwen-Image's 16 latent channels and
    their published latents_mean / latents_std (its defaults); 2x downsampling, not 8x."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]
    )


def qwen_pipeline(seed: int = 0):
    """QwenImagePipeline: 1 double-stream block, a 1-layer Qwen2.5-VL text encoder, the
    published scheduler config (dynamic shift to 8192 tokens, shift_terminal 0.02)."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
    )  # fmt: skip
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=qwen_vae(),
        text_encoder=qwen_vl_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


# Qwen3's chat template as Flux2KleinPipeline uses it (one user turn, the generation prompt,
# thinking switched off by an empty think block), over the byte-level vocabulary.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
FLUX2_TEXT_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27: 27 layers at least


def flux2_pipeline(seed: int = 0):
    """Flux2KleinPipeline (base: is_distilled false): 1 double + 1 single block, a 27-layer
    Qwen3 of width 8, a 2x AutoencoderKLFlux2 with random batch-norm statistics (so that
    decoding checks them)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = QWEN3_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=8,
            intermediate_size=16,
            head_dim=4,
            num_hidden_layers=FLUX2_TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        )  # fmt: skip
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=3 * 8, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        latent_channels=8, layers_per_block=1, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    vae.bn.running_mean.normal_(std=0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=False,
    )  # fmt: skip


def save(pipeline, path: Path) -> Path:
    pipeline.save_pretrained(path)
    return path


# ---------------------------------------------------------------- published-model stand-ins

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_transformer(folder: Path, rank: int, seed: int):
    """The tiny SD3 transformer of `folder` with a LoRA of random (non-zero) A and B."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False
    )
    torch.manual_seed(seed)
    return get_peft_model(transformer, config)


def diffusers_lora(folder: Path, out: Path, rank: int = 2, seed: int = 1) -> Path:
    """A diffusers-format LoRA file (`transformer.<module>.lora_A.weight`, as Hyper-SD and TDM
    ship theirs) for the tiny SD3 pipeline in `folder`."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    model = _lora_transformer(folder, rank, seed)
    state = {
        k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()
    }
    StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=state)
    return out / "pytorch_lora_weights.safetensors"


def peft_lora(folder: Path, out: Path, rank: int = 2, seed: int = 2) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, as Flash-SD3
    ships its LoRA) for the tiny SD3 transformer in `folder`."""
    _lora_transformer(folder, rank, seed).save_pretrained(out)
    return out


def tiny_taesd(out: Path, seed: int = 3) -> Path:
    """An AutoencoderTiny with SD3's 16 latent channels and the tiny VAE's 2x factor."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        latent_channels=16, encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), upsampling_scaling_factor=2,
    )  # fmt: skip
    vae.save_pretrained(out)
    return out


def compare_stand_ins(sd3: Path, root: Path) -> dict[str, Path]:
    """A diffusers LoRA file, a PEFT adapter folder and an AutoencoderTiny for `sd3`."""
    return {
        "lora": diffusers_lora(sd3, root / "lora"),
        "peft": peft_lora(sd3, root / "peft"),
        "taesd": tiny_taesd(root / "taesd"),
    }


# The three published SD3 recipes of configs/sd3-medium.yaml on the stand-ins, at 2 steps.
COMPARE_RECIPES = {
    # Hyper-SD's shape: a fused LoRA file, CFG above 1 (two passes a step).
    "hyper_sd": lambda s: {"steps": 2, "guidance": 5.0,
                        "lora": {"path": str(s["lora"]), "scale": 0.125, "fuse": True}},
    # Flash-SD3's: a PEFT adapter, another scheduler, no T5.
    "flash_sd3": lambda s: {"steps": 2, "lora": {"path": str(s["peft"]), "format": "peft"},
                        "scheduler": {"class": "FlowMatchLCMScheduler"},
                        "drop": ["text_encoder_3", "tokenizer_3"]},
    # TDM's: a LoRA at scale 0.125, the tiny VAE, DPM-Solver with flow shift 6.
    "tdm": lambda s: {"steps": 2, "lora": {"path": str(s["lora"]), "scale": 0.125},
                      "vae": {"class": "AutoencoderTiny", "path": str(s["taesd"]),
                              "kwargs": {"shift_factor": 0.0}},
                      "scheduler": {"class": "DPMSolverMultistepScheduler",
                                    "kwargs": {"use_flow_sigmas": True, "flow_shift": 6.0,
                                               "prediction_type": "flow_prediction"}}},
}  # fmt: skip
