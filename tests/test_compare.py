"""Published few-step models (params `compare:`) on tiny offline stand-ins of each recipe: a
diffusers-format LoRA file (fused or set by set_adapters), a PEFT adapter folder, an
AutoencoderTiny and the DPM-Solver scheduler, each loaded by the stock classes and sampled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("peft")

from cdm import baselines as C  # noqa: E402
from cdm import params as P  # noqa: E402
from cdm.cache import save_condition  # noqa: E402
from cdm.conditioning import Condition  # noqa: E402
from cdm.samplefiles import COLUMNS, RECIPE  # noqa: E402
from cdm.sampler import prepare_set  # noqa: E402
from tests import tiny_pipelines as T  # noqa: E402

PROMPTS = ["a red cube", "two blue spheres on grass", "a cat"]


@pytest.fixture(scope="module")
def stand_ins(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    sd3 = tiny_dirs["sd3"]
    cache = root / "cache"
    cache.mkdir()  # the sample stage reads only the eval prompts of a compare set
    save_condition(
        cache / "eval.safetensors", Condition(torch.zeros(3, 1, 1), torch.zeros(3, 1)), PROMPTS
    )
    return {"sd3": sd3, "cache": cache, **T.compare_stand_ins(sd3, root)}


def _params(**compare) -> P.Params:
    return P.parse(
        {
            "teacher": {"backend": "sd3"},
            "prompts": {"train_file": "t.txt", "eval_file": "e.txt"},
            "sample": {"batch_size": 2},
            "compare": compare,
        }
    )


def _lora_delta(folder: Path, module: str = "transformer_blocks.0.attn.to_q") -> torch.Tensor:
    """B @ A of one layer of the stand-in LoRA (alpha = rank: PEFT's scaling is 1)."""
    model = T._lora_transformer(folder, 2, 1)
    layer = model.base_model.model.get_submodule(module)
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def _to_q(pipe) -> torch.nn.Module:
    transformer = pipe.transformer
    base = getattr(transformer, "base_model", None)
    root = base.model if base is not None else transformer
    return root.get_submodule("transformer_blocks.0.attn.to_q")


@pytest.mark.parametrize("scale", [0.125, 1.0])
def test_a_fused_diffusers_lora_adds_scale_times_its_update(stand_ins, scale):
    base, _ = C.load_pipeline(_params(x={"steps": 1}).compare["x"], stand_ins["sd3"], torch.float32)
    recipe = {"steps": 1, "lora": {"path": str(stand_ins["lora"]), "scale": scale, "fuse": True}}
    pipe, loaded = C.load_pipeline(_params(x=recipe).compare["x"], stand_ins["sd3"], torch.float32)
    fused = _to_q(pipe)
    assert isinstance(fused, torch.nn.Linear)  # fused and unloaded: a plain layer again
    delta = fused.weight - _to_q(base).weight
    torch.testing.assert_close(delta, scale * _lora_delta(stand_ins["sd3"]), atol=1e-6, rtol=1e-4)
    digest = hashlib.sha256(stand_ins["lora"].read_bytes()).hexdigest()
    assert loaded["lora"]["sha256"] == {stand_ins["lora"].name: digest}


def test_an_unfused_lora_is_set_at_its_scale(stand_ins):
    recipe = {"steps": 1, "lora": {"path": str(stand_ins["lora"]), "scale": 0.125}}
    pipe, _ = C.load_pipeline(_params(x=recipe).compare["x"], stand_ins["sd3"], torch.float32)
    layer = _to_q(pipe)
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        lora_out = layer(x)
        pipe.set_adapters([C.ADAPTER], [0.0])
        plain = layer(x)
    want = 0.125 * x @ _lora_delta(stand_ins["sd3"]).T
    torch.testing.assert_close(lora_out - plain, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_peft_adapter_folder_loads_on_the_transformer(stand_ins, fuse):
    recipe = {"steps": 1, "lora": {"path": str(stand_ins["peft"]), "format": "peft", "scale": 0.5,
                                   "fuse": fuse}}  # fmt: skip
    base, _ = C.load_pipeline(_params(x={"steps": 1}).compare["x"], stand_ins["sd3"], torch.float32)
    pipe, _ = C.load_pipeline(_params(x=recipe).compare["x"], stand_ins["sd3"], torch.float32)
    model = T._lora_transformer(stand_ins["sd3"], 2, 2)  # the PEFT stand-in's own A and B
    ref = model.base_model.model.get_submodule("transformer_blocks.0.attn.to_q")
    delta = ref.lora_B["default"].weight @ ref.lora_A["default"].weight
    layer, x = _to_q(pipe), torch.randn(4, 16)
    with torch.no_grad():
        got = layer(x) - _to_q(base)(x)
    torch.testing.assert_close(got, 0.5 * x @ delta.T, atol=1e-5, rtol=1e-4)


RECIPES = T.COMPARE_RECIPES


def _sample(stand_ins, params, name, out: Path) -> pd.DataFrame:
    job = prepare_set(
        name, params.compare[name].steps, params, [0, 1, 2, 3], stand_ins["sd3"], Path("none"),
        stand_ins["cache"], torch.device("cpu"), torch.float32,
    )  # fmt: skip
    out.mkdir()
    return job.run(out)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_loads_and_samples_a_set(stand_ins, name, tmp_path):
    params = _params(**{name: RECIPES[name](stand_ins), "plain": {"steps": 2}})
    index = _sample(stand_ins, params, name, tmp_path / name)
    recipe = params.compare[name]
    assert list(index.columns) == COLUMNS and index["pair"].tolist() == [0, 1, 2, 3]
    assert index["prompt"].tolist() == [PROMPTS[j % 3] for j in range(4)]
    assert set(index["nfe"]) == {recipe.steps * (2 if recipe.guidance > 1 else 1)}
    images = [np.asarray(Image.open(tmp_path / name / f)) for f in index["file"]]
    assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for im in images)
    loaded = json.loads((tmp_path / name / RECIPE).read_text())
    assert loaded["recipe"]["steps"] == 2 and loaded["scheduler"] == (
        recipe.scheduler.cls if recipe.scheduler else "FlowMatchEulerDiscreteScheduler"
    )
    # The recipe changes the images: the base pipeline alone, same noise, differs.
    plain = _sample(stand_ins, params, "plain", tmp_path / "plain")
    base = [np.asarray(Image.open(tmp_path / "plain" / f)) for f in plain["file"]]
    assert any((a != b).any() for a, b in zip(images, base, strict=True))


def test_a_set_is_independent_of_its_batches(stand_ins, tmp_path):
    params = _params(tdm=RECIPES["tdm"](stand_ins))
    whole = _sample(stand_ins, params, "tdm", tmp_path / "a")
    one = _params(tdm=RECIPES["tdm"](stand_ins)).model_copy(
        update={"sample": P.Sample(batch_size=1)}
    )
    single = _sample(stand_ins, one, "tdm", tmp_path / "b")
    assert single["seed"].tolist() == whole["seed"].tolist()
    for f in whole["file"]:
        a = np.asarray(Image.open(tmp_path / "a" / f), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b" / f), dtype=int)
        assert np.abs(a - b).max() <= 1  # batched matmuls may round differently, by 1/255


def test_the_recipe_steps_and_missing_weights_are_one_line_errors(stand_ins, tmp_path):
    params = _params(x={"steps": 2, "lora": {"path": str(tmp_path / "absent.safetensors")}})
    with pytest.raises(ValueError, match="samples at 2 steps"):
        prepare_set("x", 4, params, [0], stand_ins["sd3"], Path("none"), stand_ins["cache"])
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        prepare_set("x", 2, params, [0], stand_ins["sd3"], Path("none"), stand_ins["cache"])
    hub = _params(x={"steps": 2, "lora": {"path": "nobody/absent-lora", "file": "a.safetensors"}})
    with pytest.raises(FileNotFoundError, match="cdm.fetch weights"):
        prepare_set("x", 2, hub, [0], stand_ins["sd3"], Path("none"), stand_ins["cache"])
