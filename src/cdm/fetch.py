"""Fetch what the real runs need before they go offline: model weights and prompt files.

    python -m cdm.fetch weights --params params.yaml   # on a login node, with internet
    python -m cdm.fetch prompts --params params.yaml [--source PATH_OR_URL] [--out FILE]

`weights` downloads the teacher when `teacher.path` is a hub id (snapshot_download into the
hub cache) and every scorer's weights (`score.models`, name -> constructor kwargs, or the
scorers' defaults), and the published models of `compare:` (base pipeline, LoRA, VAE):
open_clip tags through open_clip's own download, transformers ids with
snapshot_download, the LAION aesthetic head with hf_hub_download. Gated repos need a token
(`huggingface-cli login` or HF_TOKEN). The scorers then load them offline from the same caches.

`prompts` puts the paper's evaluation prompts at `prompts.eval_file` (or --out): the 2,048
Pick-a-Pic test prompts, the unique captions of the Pick-a-Pic v1 test split
(yuvalkirstain/pickapic_v1) the paper evaluates on, one per line, UTF-8. Any copy is accepted
only if its bytes hash to the pinned sha256 below (2,048 lines); the shared data folder holds
one such copy (DEFAULT_SOURCE). It also checks that `prompts.train_file`, when set, exists.

`dpg` puts DPG-Bench's question graphs (ELLA's dpg_bench/dpg_bench.csv: 1,065 prompts and
their questions) at `prompts.dpg_file` (or --out), from `prompts.dpg_source`, --source or
ELLA's repository at a fixed commit. A copy is accepted only if its git blob id (SHA-1 of
"blob <size>\\0" + bytes, what `git hash-object` prints) is the pinned one: the id ELLA's and
the CDM authors' repositories both list for the file; its sha256 is logged once verified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdm import params as P
from cdm.cli import StageFailure, run_stage
from cdm.hub import HUB_ID
from cdm.io import atomic_file

log = logging.getLogger("fetch")

PROMPTS_SHA256 = "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262"
PROMPTS_LINES = 2048
DEFAULT_SOURCE = "../shared/data/pickscore_test_prompts.txt"  # relative to the project root
# The processor's files only: the laion CLIP-H repo also holds four copies of the weights.
PROCESSOR_FILES = ["*.json", "*.txt"]
# A transformers model's config, tokenizer and safetensors weights, not its TF/Flax/.bin copies.
SAFETENSORS_MODEL_FILES = [*PROCESSOR_FILES, "*.safetensors"]
URL_TIMEOUT_S = 60
DPG_GIT_BLOB = "98457fc9901943f51ff9a30367250fc292533bed"
DPG_SOURCE = (
    "https://raw.githubusercontent.com/TencentQQGYLab/ELLA/"
    "3c228f1dc6c4d3cad0a47493816151a419f14db3/dpg_bench/dpg_bench.csv"
)


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class Download:
    """One thing to fetch: a hub repo, one file of a repo, or an open_clip tag."""

    kind: str  # "snapshot" | "file" | "open_clip"
    what: str = field(compare=False)  # who needs it, for messages (not part of identity)
    repo: str  # hub repo id, or the open_clip model name
    name: str | None = None  # file in the repo, or the open_clip tag
    cache_dir: str | None = None
    allow_patterns: tuple[str, ...] | None = None


def open_clip_download(model: str, tag: str, cache_dir: str | None) -> str:
    """open_clip's own download of a tag (hub or URL), to where the scorers look offline."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ValueError(f"open_clip knows no pretrained tag '{tag}' for model {model}")
    path = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    if not path:
        raise ValueError(f"open_clip gives no download for {model}/{tag}")
    return path


def _snapshot(repo: str, **kwargs: Any) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, **kwargs)


def _file(repo: str, name: str, **kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, name, **kwargs)


@dataclass
class Hub:
    """The download functions (injected in tests: there is no internet there)."""

    snapshot: Callable[..., str] = _snapshot
    file: Callable[..., str] = _file
    open_clip: Callable[[str, str, str | None], str] = open_clip_download
    done: list[Download] = field(default_factory=list)


def is_hub_id(text: str) -> bool:
    return not Path(text).exists() and bool(HUB_ID.match(text))


def open_clip_plan(what: str, model: str, tag: str, cache_dir: str | None) -> list[Download]:
    if Path(tag).is_file():  # a local checkpoint: nothing to fetch
        return []
    return [Download("open_clip", what, model, tag, cache_dir)]


def repo_plan(what: str, model_id: str, cache_dir: str | None, **kw: Any) -> list[Download]:
    return (
        [Download("snapshot", what, model_id, None, cache_dir, **kw)] if is_hub_id(model_id) else []
    )


def scorer_plan(name: str, config: Mapping[str, Any] | None) -> list[Download]:
    """What scorer `name` loads, as downloads (local files and folders are skipped)."""
    # The scorers' modules load open_clip and transformers (6 s): only when a plan needs them.
    from cdm.metrics.aesthetic import HUB_FILE
    from cdm.metrics.scorers import resolved_config

    cfg = resolved_config(name, config)
    cache = cfg.get("cache_dir")
    if name == "clip":
        return open_clip_plan("clip", cfg["model"], cfg["pretrained"], cache)
    if name == "clip_vitl14":
        return repo_plan(
            "clip ViT-L/14", cfg["model"], cache, allow_patterns=tuple(SAFETENSORS_MODEL_FILES)
        )
    if name == "pickscore":
        return repo_plan("pickscore", cfg["model"], cache) + repo_plan(
            "pickscore processor", cfg["processor"], cache, allow_patterns=tuple(PROCESSOR_FILES)
        )
    if name == "aesthetic":
        head = HUB_FILE.match(cfg["head"])
        plan = []
        if not Path(cfg["head"]).exists() and head:
            plan.append(Download("file", "aesthetic head", head[1], head[2], cache))
        return plan + open_clip_plan(
            "aesthetic CLIP", cfg["clip_model"], cfg["clip_pretrained"], cache
        )
    if name == "hpsv3":
        # The checkpoint holds every weight; of the base repo only config and processor files.
        ckpt = cfg["checkpoint"]
        plan = []
        if is_hub_id(ckpt):
            plan.append(Download("file", "hpsv3", ckpt, cfg["checkpoint_file"], cache))
        return plan + repo_plan(
            "hpsv3 base processor", cfg["base"], cache, allow_patterns=tuple(PROCESSOR_FILES)
        )
    raise ValueError(f"no download recipe for scorer '{name}'; add one to cdm.fetch")


def compare_plan(name: str, recipe: P.Compare) -> list[Download]:
    """A published model's base pipeline, LoRA and VAE (local paths are skipped)."""
    plan = repo_plan(f"compare {name}", recipe.path, None) if recipe.path else []
    lora = recipe.lora
    if lora is not None and is_hub_id(lora.path):
        if lora.file:
            plan.append(Download("file", f"compare {name} LoRA", lora.path, lora.file, None))
        else:
            plan += repo_plan(f"compare {name} LoRA", lora.path, None)
    if recipe.vae is not None and recipe.vae.path:
        plan += repo_plan(f"compare {name} VAE", recipe.vae.path, None)
    return plan


def scorer_configs(params: P.Params) -> dict[str, Any]:
    """`score.models` (name -> constructor kwargs) when params has it, else the defaults."""
    from cdm.metrics.scorers import DEFAULT_SCORER_CONFIGS

    models = getattr(params.score, "models", None)
    if models is None:
        return dict(DEFAULT_SCORER_CONFIGS)
    return {name: dict(_plain(c) or {}) for name, c in _plain(models).items()}


def _plain(value: Any) -> Any:
    """A pydantic section as a dict (score.models may become one), anything else as is."""
    return value.model_dump() if hasattr(value, "model_dump") else value


def weights_plan(params: P.Params) -> tuple[list[Download], dict[str, str]]:
    """(downloads, {metric: why it is skipped}) of the teacher and every configured scorer."""
    plan: list[Download] = []
    if params.teacher.backend != "shapes":
        path = params.teacher.path
        if not Path(path).exists() and not HUB_ID.match(path):
            raise FileNotFoundError(
                f"teacher.path '{path}' is neither a local folder nor a hub id; fix it in params"
            )
        plan += repo_plan("teacher", path, None)
    for name, recipe in getattr(params, "compare", {}).items():  # as score.models: optional
        plan += compare_plan(name, recipe)
    from cdm.metrics.scorers import unavailable_reason

    skipped = {}
    for name, config in scorer_configs(params).items():
        reason = unavailable_reason(name)
        if reason is not None:
            skipped[name] = reason
        else:
            plan += scorer_plan(name, config)
    unique = list(dict.fromkeys(plan))  # e.g. one open_clip tag named by two scorers
    return unique, skipped


def fetch(item: Download, hub: Hub) -> str:
    """Run one download; any failure is one line naming what and why."""
    kw: dict[str, Any] = {"cache_dir": item.cache_dir}
    try:
        if item.kind == "snapshot":
            if item.allow_patterns:
                kw["allow_patterns"] = list(item.allow_patterns)
            path = hub.snapshot(item.repo, **kw)
        elif item.kind == "file":
            path = hub.file(item.repo, item.name, **kw)
        else:
            path = hub.open_clip(item.repo, item.name or "", item.cache_dir)
    except Exception as exc:  # network, auth (gated repo), missing file: the same one line
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        label = f"{item.repo}/{item.name}" if item.name else item.repo
        raise StageFailure(
            f"could not fetch {item.what} '{label}' ({reason}); check the network and, for "
            "gated repos, HF_TOKEN"
        ) from None
    hub.done.append(item)
    return path


def fetch_weights(params: P.Params, hub: Hub | None = None) -> list[Download]:
    if params.teacher.backend == "shapes":  # the world's teacher and judge are committed
        log.info("shapes backend: no weights to fetch")
        return []
    hub = hub or Hub()
    plan, skipped = weights_plan(params)
    for name, reason in skipped.items():
        log.warning("%s: skipped (%s)", name, reason)
    for item in plan:
        label = f"{item.repo}/{item.name}" if item.name else item.repo
        log.info("%s: %s -> %s", item.what, label, fetch(item, hub))
    return plan


# ---------------------------------------------------------------- prompts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


Digest = Callable[[bytes], str]


def read_source(source: str, expected: str = PROMPTS_SHA256, digest: Digest = sha256) -> bytes:
    """The bytes of a local file or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:
                return response.read()
        except OSError as exc:  # URLError, HTTPError, timeouts
            raise FileNotFoundError(f"could not download prompts from {source} ({exc})") from None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts source {source} does not exist; pass --source PATH_OR_URL of a copy "
            f"with {digest.__name__} {expected}"
        )
    return path.read_bytes()


def verified(
    data: bytes, source: str, expected: str = PROMPTS_SHA256, digest: Digest = sha256
) -> bytes:
    got = digest(data)
    if got != expected:
        raise ValueError(
            f"prompts from {source} have {digest.__name__} {got}, expected {expected}; not written"
        )
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then os.replace: never a half-written prompts file."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def eval_prompts_path(params: P.Params, out: str | None) -> Path:
    target = out or params.prompts.eval_file
    if target is None:
        raise ValueError(
            "prompts.eval_file is null (the shapes world's prompts); set it in params or pass --out"
        )
    return Path(target)


def fetch_prompts(
    source: str, out: Path, expected: str = PROMPTS_SHA256, digest: Digest = sha256
) -> bool:
    """Put the verified prompts at `out`; False when a verified copy is already there."""
    if out.is_file() and digest(out.read_bytes()) == expected:
        log.info("%s: already the pinned prompts (%s %s)", out, digest.__name__, expected)
        return False
    data = verified(read_source(source, expected, digest), source, expected, digest)
    write_atomic(out, data)
    log.info("%s: %d prompts from %s", out, data.count(b"\n"), source)
    if digest is not sha256:  # a pin by another digest: say the sha256 too
        log.info("%s: sha256 %s", out, sha256(data))
    return True


def dpg_path(params: P.Params, out: str | None) -> Path:
    target = out or params.prompts.dpg_file
    if target is None:
        raise ValueError("prompts.dpg_file is null (no DPG-Bench); set it in params or pass --out")
    return Path(target)


def check_train_prompts(params: P.Params) -> Path | None:
    """The training prompts file, checked to exist and hold prompts (None: world prompts)."""
    name = params.prompts.train_file
    if name is None:
        return None
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts.train_file {path} does not exist; put the training prompts there, one per "
            "line (e.g. a caption dump of the Pick-a-Pic train split, or your own prompts)"
        )
    if not path.read_text(encoding="utf-8").strip():
        raise ValueError(f"prompts.train_file {path} holds no prompts; one prompt per line")
    return path


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    top = argparse.ArgumentParser(prog="python -m cdm.fetch", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="what", required=True)
    weights = sub.add_parser("weights", parents=[common], help="teacher and scorer weights")
    weights.add_argument("--record", help="write what was fetched, as JSON, to this file")
    prompts = sub.add_parser("prompts", parents=[common], help="the evaluation prompts file")
    prompts.add_argument(
        "--source",
        help=f"a local file or http(s) URL (default: prompts.eval_source, else {DEFAULT_SOURCE})",
    )
    prompts.add_argument("--out", help="where to write them (default: prompts.eval_file)")
    dpg = sub.add_parser("dpg", parents=[common], help="the DPG-Bench questions (dpg_bench.csv)")
    dpg.add_argument("--source", help="a local file or http(s) URL (default: prompts.dpg_source, "
                     "else ELLA's file at a fixed commit)")  # fmt: skip
    dpg.add_argument("--out", help="where to write it (default: prompts.dpg_file)")
    return top


def main(argv: list[str] | None = None, hub: Hub | None = None) -> None:
    args = parser().parse_args(argv)
    params = P.load(args.params)
    if args.what == "weights":
        plan = fetch_weights(params, hub)
        if args.record:  # the orchestrators' marker that the weights are in the caches
            record = {"backend": params.teacher.backend, "fetched": [asdict(d) for d in plan]}
            with atomic_file(Path(args.record)) as tmp:
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    elif args.what == "dpg":
        source = args.source or params.prompts.dpg_source or DPG_SOURCE
        fetch_prompts(source, dpg_path(params, args.out), DPG_GIT_BLOB, git_blob_id)
    else:
        source = args.source or params.prompts.eval_source or DEFAULT_SOURCE
        fetch_prompts(source, eval_prompts_path(params, args.out))
        check_train_prompts(params)


def cli(argv: list[str] | None = None, hub: Hub | None = None) -> None:
    run_stage(lambda: main(argv, hub))


if __name__ == "__main__":
    cli()
