"""An open_clip model loaded offline, encoding images and prompts to L2-normalised features.

`pretrained` is a weights file or an open_clip tag. A tag is resolved here against the local
caches only (open_clip would download a missing file), trying the files open_clip itself
would fetch, in its order; the tag's preprocessing and QuickGELU setting are then applied,
which open_clip skips when it is handed a file path. The URL fallback (`~/.cache/clip`, where
the `clip` package keeps OpenAI's TorchScript archives such as ViT-L-14.pt) is taken only when
the file there is a plain checkpoint: open_clip loads under weights_only, which refuses a
TorchScript archive, so such a file counts as absent and `cdm.fetch weights` fetches the tag's
hub weights instead.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from PIL import Image

from cdm.metrics.base import missing_weights

HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order


def _hub_names(name: str) -> Sequence[str]:
    """The files open_clip tries for an hf_hub entry: a safetensors twin first."""
    if not name or name == HF_WEIGHTS[1]:
        return HF_WEIGHTS
    if name.endswith((".bin", ".pth")):
        return (name[:-4] + ".safetensors", name)
    return (name,)


def _cached_hub_file(repo: str, names: Sequence[str], cache_dir: str | None) -> str | None:
    for name in names:
        try:
            return hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True)
        except FileNotFoundError:  # LocalEntryNotFoundError: not in the cache
            continue
    return None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding `<name>/constants.pkl` and compiled code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def resolve_weights(
    model: str, pretrained: str, cache_dir: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(checkpoint path, the tag's pretrained config or {}) without touching the network."""
    if Path(pretrained).is_file():
        return pretrained, {}
    what, model_id = "open_clip", f"{model}/{pretrained}"
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:  # neither a file nor a tag open_clip knows for this model
        raise missing_weights(what, pretrained if os.sep in pretrained else model_id)
    path = None
    if cfg.get("hf_hub"):  # 'org/repo/' (default file names) or 'org/repo/file'
        repo, name = os.path.split(cfg["hf_hub"])
        path = _cached_hub_file(repo, _hub_names(name), cache_dir)
    if path is None and cfg.get("url"):  # open_clip's own download folder for URL weights
        local = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if local.is_file() and is_torchscript(local):
            raise missing_weights(
                what, model_id, f"{local} is a TorchScript archive open_clip refuses"
            )
        path = str(local) if local.is_file() else None
    if path is None:
        raise missing_weights(what, model_id)
    return path, cfg


def architecture(model: str) -> str:
    """open_clip's name for `model`: a registered name as is, or a local `<name>.json` config
    (an architecture open_clip does not ship), registered here under its file stem."""
    if model.endswith(".json") and Path(model).is_file():
        open_clip.add_model_config(model)
        return Path(model).stem
    return model


class OpenClipEncoder:
    """open_clip model + eval transform + tokenizer, with normalised image and text features."""

    def __init__(
        self,
        model: str,
        pretrained: str,
        device: torch.device,
        cache_dir: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        model = architecture(model)
        checkpoint, cfg = resolve_weights(model, pretrained, cache_dir)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=checkpoint,
            device=device,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
        )
        self.model.to(dtype).eval()
        self.dtype = dtype
        self.tokenizer = open_clip.get_tokenizer(model)  # context length from the model config
        self.device = device
        self.embed_dim = int(open_clip.get_model_config(model)["embed_dim"])

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        pixels = pixels.to(self.device, self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
