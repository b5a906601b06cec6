"""The student LoRA in the kohya/ComfyUI key layout (cdm.loralayout): for Qwen-Image and FLUX.2,
diffusers' own non-diffusers conversion reads our file back to our adapter tensor for tensor,
and on a tiny transformer of the real class the converted adapter's forward is the diffusers
file's; SD3 keeps diffusers' keys (what ComfyUI maps for SD3)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from cdm import lora, lorafactors, loralayout

RANK, ALPHA = 4, 6.0  # scaling 1.5: the export must fold it in


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    x = torch.randn(1, 16, 16)  # 4 x 4 patches of 2 x 2 latents, 4 channels
    text = torch.randn(1, 5, 16)
    inputs = {
        "hidden_states": x, "encoder_hidden_states": text,
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]), "img_shapes": [(1, 4, 4)],
    }  # fmt: skip
    top = ["img_in", "txt_in", "proj_out", "norm_out.linear"]
    top += [f"time_text_embed.timestep_embedder.linear_{i}" for i in (1, 2)]
    return model, inputs, top


def _flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    )  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(1, 16, 8), "encoder_hidden_states": torch.randn(1, 5, 16),
        "timestep": torch.tensor([0.5]), "img_ids": torch.randint(0, 4, (1, 16, 4)),
        "txt_ids": torch.zeros(1, 5, 4, dtype=torch.long),
    }  # fmt: skip
    return model, inputs, list(loralayout.FLUX2_TOP)


# family -> (tiny model builder, pipeline class whose lora_state_dict converts the layout)
FAMILIES = {
    "qwen-image": (_qwen, "QwenImagePipeline"),
    "flux2-klein": (_flux2, "Flux2KleinPipeline"),
}


def _block_linears(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and name.split(".")[0] in lora.BLOCKS
        and not any(name.endswith(s) for s in skip)
    ]


def _student(model: torch.nn.Module, targets: list[str]) -> SimpleNamespace:
    """`model` with a random student adapter on `targets` (as distill leaves the EMA)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=lora.STUDENT)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    return SimpleNamespace(transformer=model)


def _forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("partial", [False, True], ids=["all", "no-k"])
def test_diffusers_converts_our_kohya_file_back_to_our_adapter(family, partial, tmp_path):
    import diffusers

    build, pipeline = FAMILIES[family]
    model, inputs, top = build()
    base = copy.deepcopy(model)
    # "no-k": the key projections without adapter (a fused qkv then holds a zero block).
    skip = ("attn.to_k", "attn.add_k_proj") if partial else ()
    targets = _block_linears(model, skip) + top
    student = _student(model, targets)
    ours = lorafactors.from_peft(model, lora.STUDENT)
    saved = lora.save_diffusers_lora(student, tmp_path)
    path = loralayout.export(family, saved)
    assert path == tmp_path / loralayout.FILE

    converted = getattr(diffusers, pipeline).lora_state_dict(str(path))
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in converted}
    assert set(ours) <= modules
    for name in modules:
        a = converted[f"transformer.{name}.lora_A.weight"]
        b = converted[f"transformer.{name}.lora_B.weight"]
        if name in ours:  # tensor for tensor: A as trained, B with alpha / rank folded in
            assert torch.equal(a, ours[name][0]) and torch.equal(b, ours[name][1]), name
        else:  # a part of a fused projection that had no adapter
            assert partial and not b.any(), name

    want = _forward(model, inputs)  # the student (peft adapter on)
    via_kohya, via_diffusers = copy.deepcopy(base), copy.deepcopy(base)
    via_kohya.load_lora_adapter(converted, prefix="transformer")
    via_diffusers.load_lora_adapter(tmp_path, prefix="transformer", weight_name=lora.LORA_FILE)
    got = _forward(via_kohya, inputs)
    torch.testing.assert_close(got, _forward(via_diffusers, inputs), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - _forward(base, inputs)).abs().max().item() > 1e-3  # the adapter matters


def test_a_module_without_a_kohya_name_is_refused_in_one_line():
    a, b = torch.zeros(2, 4), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="'norm_out.linear' has no kohya/ComfyUI name") as err:
        loralayout.LAYOUTS["flux2-klein"]({"norm_out.linear": (a, b)})
    assert "\n" not in str(err.value)


def test_sd3_and_longcat_keep_the_diffusers_file_alone(tmp_path, tiny_dirs):
    """SD3: ComfyUI maps diffusers' SD3 keys (transformer.<diffusers module>) onto its MMDiT,
    so the diffusers file is its file; diffusers has no other SD3 layout to convert. The file's
    keys name modules of the SD3 transformer, each with its lora_A/lora_B pair."""
    from cdm.backends import sd3

    transformer = sd3.load_velocity(tiny_dirs["sd3"])[0].transformer
    student = _student(transformer, lora.targets(transformer, lora.Lora(rank=RANK)))
    saved = lora.save_diffusers_lora(student, tmp_path)
    assert loralayout.export("sd3", saved) is None and loralayout.export("longcat", saved) is None
    assert [p.name for p in tmp_path.iterdir()] == [lora.LORA_FILE]
    from safetensors.torch import load_file

    keys = load_file(str(saved))
    modules = {n for n, _ in transformer.named_modules()}
    for key in keys:
        prefix, _, rest = key.partition(".")
        name, _, kind = rest.rpartition(".lora_")
        assert prefix == "transformer" and name in modules and kind in ("A.weight", "B.weight")


def test_read_diffusers_folds_alpha_over_rank(tmp_path):
    model, _, _ = _qwen()
    student = _student(model, ["transformer_blocks.0.attn.to_q"])
    saved = lora.save_diffusers_lora(student, tmp_path)
    a, b = loralayout.read_diffusers(saved)["transformer_blocks.0.attn.to_q"]
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    ours = (layer.lora_A[lora.STUDENT].weight, layer.lora_B[lora.STUDENT].weight * ALPHA / RANK)
    assert torch.equal(a, ours[0]) and torch.allclose(b, ours[1])
