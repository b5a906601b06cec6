"""`python -m cdm.fetch`: prompts only from a copy with the pinned sha256, written atomically;
weights requested by the right ids, and after a (faked, offline) fetch the scorers load."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import yaml

from cdm import fetch
from cdm import params as P
from cdm.metrics.aesthetic import HEAD_FILE, AestheticScorer
from cdm.metrics.clip_score import ClipScorer
from cdm.metrics.pickscore import PickScorer
from tests.test_scorers import (
    IMAGES,
    PROMPTS,
    TINY_CLIP,
    put_in_hub_cache,
    random_head,
)

SHARED = Path("/work/shared/data/pickscore_test_prompts.txt")
needs_shared = pytest.mark.skipif(not SHARED.is_file(), reason=f"{SHARED} is not here")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """fetch's command line in this process: (exit code, stderr)."""

    def call(argv: list[str], hub: fetch.Hub | None = None) -> tuple[int, str]:
        capsys.readouterr()
        try:
            fetch.cli(argv, hub)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, capsys.readouterr().err

    return call


def params_file(folder: Path, **prompts: str | None) -> str:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"prompts": prompts}))
    return str(path)


# ---------------------------------------------------------------- prompts


def test_pinned_hash_is_the_shared_copy() -> None:
    assert len(fetch.PROMPTS_SHA256) == 64
    if SHARED.is_file():
        data = SHARED.read_bytes()
        assert hashlib.sha256(data).hexdigest() == fetch.PROMPTS_SHA256
        assert data.count(b"\n") == fetch.PROMPTS_LINES == 2048


def test_wrong_hash_is_refused_and_nothing_written(cli, tmp_path: Path) -> None:
    source = tmp_path / "src" / "prompts.txt"
    source.parent.mkdir()
    source.write_text("a cat\na dog\n")
    out = tmp_path / "data" / "eval.txt"
    out.parent.mkdir()
    code, err = cli(["prompts", "--params", params_file(tmp_path, eval_file=str(out)),
                     "--source", str(source)])  # fmt: skip
    assert code == 2
    line = err.strip()
    assert "\n" not in line and line.startswith("error: ")
    got = hashlib.sha256(source.read_bytes()).hexdigest()
    assert got in line and fetch.PROMPTS_SHA256 in line and str(source) in line
    assert list(out.parent.iterdir()) == []  # no file, no temporary left behind


@needs_shared
def test_good_source_is_written_atomically(cli, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "data" / "eval.txt"
    params = params_file(tmp_path, eval_file=str(out))
    code, err = cli(["prompts", "--params", params, "--source", str(SHARED)])
    assert (code, err) == (0, "")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2048 and all(line.strip() for line in lines)
    assert out.read_bytes() == SHARED.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["eval.txt"]
    # A verified copy already in place is left alone (the source is not even read).
    assert fetch.fetch_prompts(str(tmp_path / "absent.txt"), out) is False
    # --out wins over prompts.eval_file; a wrong copy there is replaced.
    other = tmp_path / "other.txt"
    other.write_text("stale\n")
    assert (
        cli(["prompts", "--params", params, "--source", str(SHARED), "--out", str(other)])[0] == 0
    )
    assert other.read_bytes() == SHARED.read_bytes()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # the server's log would land on stderr
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local http server (no internet needed) serving a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_source(cli, tmp_path: Path, http_root: tuple[Path, str]) -> None:
    root, url = http_root
    data = b"a cat\na dog\n"
    (root / "prompts.txt").write_bytes(data)
    out = tmp_path / "eval.txt"
    assert fetch.fetch_prompts(f"{url}/prompts.txt", out, hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data
    params = params_file(tmp_path, eval_file=str(tmp_path / "x.txt"))
    code, err = cli(["prompts", "--params", params, "--source", f"{url}/missing.txt"])
    assert code == 2 and "could not download prompts" in err and err.count("\n") == 1
    code, err = cli(["prompts", "--params", params, "--source", f"{url}/prompts.txt"])
    assert code == 2 and fetch.PROMPTS_SHA256 in err and not (tmp_path / "x.txt").exists()
    if SHARED.is_file():
        shutil.copy(SHARED, root / "pickscore.txt")
        assert cli(["prompts", "--params", params, "--source", f"{url}/pickscore.txt"]) == (0, "")
        assert (tmp_path / "x.txt").read_bytes() == SHARED.read_bytes()


def test_prompts_need_a_destination_and_a_source(cli, tmp_path: Path) -> None:
    code, err = cli(["prompts", "--params", params_file(tmp_path)])
    assert code == 2 and "prompts.eval_file is null" in err and err.count("\n") == 1
    params = params_file(tmp_path, eval_file=str(tmp_path / "eval.txt"))
    code, err = cli(["prompts", "--params", params, "--source", str(tmp_path / "nope.txt")])
    assert code == 2 and "nope.txt does not exist" in err and fetch.PROMPTS_SHA256 in err


@needs_shared
def test_missing_train_prompts_say_what_to_put_there(cli, tmp_path: Path) -> None:
    train = tmp_path / "data" / "train.txt"
    params = params_file(tmp_path, eval_file=str(tmp_path / "eval.txt"), train_file=str(train))
    code, err = cli(["prompts", "--params", params, "--source", str(SHARED)])
    assert code == 2 and err.count("\n") == 1
    assert f"prompts.train_file {train} does not exist" in err and "one per line" in err
    assert (tmp_path / "eval.txt").is_file()  # the eval prompts are in place regardless
    train.parent.mkdir()
    train.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        fetch.check_train_prompts(P.load(params))
    train.write_text("a red cube\n")
    assert fetch.check_train_prompts(P.load(params)) == train
    assert fetch.check_train_prompts(P.parse({})) is None  # the shapes world's prompts


# ---------------------------------------------------------------- weights


class Recorder:
    """A Hub whose downloads only record what they were asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.hub = fetch.Hub(
            snapshot=lambda repo, **kw: self.log("snapshot", repo, kw),
            file=lambda repo, name, **kw: self.log("file", repo, name, kw),
            open_clip=lambda model, tag, cache: self.log("open_clip", model, tag, cache),
        )

    def log(self, *call: object) -> str:
        self.calls.append(
            tuple(tuple(sorted(c.items())) if isinstance(c, dict) else c for c in call)
        )
        return "/fake/path"


SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"


def sd3_params(tmp_path: Path) -> str:
    path = tmp_path / "params.yaml"
    data = {
        "teacher": {"backend": "sd3", "path": SD3},
        "prompts": {"train_file": "data/train.txt", "eval_file": "data/eval.txt"},
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_default_weights_request_the_right_ids(cli, tmp_path: Path) -> None:
    rec = Recorder()
    code, err = cli(["weights", "--params", sd3_params(tmp_path)], rec.hub)
    assert (code, err) == (0, "")
    none = (("cache_dir", None),)
    assert [tuple(c) for c in rec.calls] == [
        ("snapshot", SD3, none),
        ("open_clip", "ViT-H-14", "laion2b_s32b_b79k", None),
        (
            "snapshot",
            "openai/clip-vit-large-patch14",  # config, tokenizer, safetensors weights only
            (("allow_patterns", ["*.json", "*.txt", "*.safetensors"]), ("cache_dir", None)),
        ),
        ("snapshot", "yuvalkirstain/PickScore_v1", none),
        (
            "snapshot",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            (("allow_patterns", ["*.json", "*.txt"]), ("cache_dir", None)),
        ),
        ("file", "camenduru/improved-aesthetic-predictor", HEAD_FILE, none),
        ("open_clip", "ViT-L-14", "openai", None),
        ("file", "MizzenAI/HPSv3", "HPSv3.safetensors", none),  # every HPSv3 weight
        (
            "snapshot",
            "Qwen/Qwen2-VL-7B-Instruct",  # only its config and processor files
            (("allow_patterns", ["*.json", "*.txt"]), ("cache_dir", None)),
        ),
    ]
    _, skipped = fetch.weights_plan(P.load(sd3_params(tmp_path)))
    assert skipped == {}


def test_score_models_and_local_paths(tmp_path: Path) -> None:
    """score.models when params has it; local files and folders are not fetched; the shapes
    teacher is local; an open_clip tag two scorers share is fetched once."""
    head = tmp_path / HEAD_FILE
    head.write_bytes(b"")
    models = {
        "clip": {"model": "ViT-L-14", "pretrained": "openai", "cache_dir": "/c"},
        "aesthetic": {"head": str(head), "cache_dir": "/c"},
        "pickscore": {"model": str(tmp_path), "processor": "org/proc"},
    }
    params = SimpleNamespace(teacher=P.Teacher(), score=SimpleNamespace(models=models))
    plan, skipped = fetch.weights_plan(params)  # type: ignore[arg-type]
    assert skipped == {}
    assert plan == [
        fetch.Download("open_clip", "clip", "ViT-L-14", "openai", "/c"),
        fetch.Download(
            "snapshot", "pickscore processor", "org/proc", None, None, ("*.json", "*.txt")
        ),
    ]
    with pytest.raises(ValueError, match="unknown metric 'hps'"):
        fetch.weights_plan(
            SimpleNamespace(teacher=P.Teacher(), score=SimpleNamespace(models={"hps": {}}))
        )  # type: ignore[arg-type]


def test_failed_download_is_one_line(cli, tmp_path: Path) -> None:
    def offline(repo: str, **kw: object) -> str:
        raise ConnectionError("Max retries exceeded with url\nmore detail")

    hub = fetch.Hub(snapshot=offline)
    code, err = cli(["weights", "--params", sd3_params(tmp_path)], hub)
    assert code == 1 and err.count("\n") == 1
    assert f"could not fetch teacher '{SD3}' (Max retries exceeded with url)" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"teacher": {"backend": "sd3", "path": "no/such/x"},
                                   "prompts": {"train_file": "a", "eval_file": "b"}}))  # fmt: skip
    code, err = cli(["weights", "--params", str(bad)], Recorder().hub)
    assert code == 2 and "neither a local folder nor a hub id" in err


class FakeHub:
    """The hub, offline: repos are local folders, downloads lay files out as the cache does."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos

    def file(self, repo_id: str, filename: str, *, cache_dir: str, **kw: object) -> str:
        src = self.repos[repo_id] / filename
        if not src.is_file():
            raise FileNotFoundError(f"404: {repo_id}/{filename}")
        put_in_hub_cache(Path(cache_dir), repo_id, filename, src)
        return str(next(Path(cache_dir).glob(f"models--*/snapshots/*/{filename}")))

    def snapshot(self, repo_id: str, *, cache_dir: str, allow_patterns=None, **kw: object) -> str:
        for src in self.repos[repo_id].iterdir():
            if allow_patterns is None or any(src.match(p) for p in allow_patterns):
                put_in_hub_cache(Path(cache_dir), repo_id, src.name, src)
        return str(Path(cache_dir) / f"models--{repo_id.replace('/', '--')}")


def test_fetched_weights_load_offline(
    tiny_clip: Path,  # noqa: F811
    tiny_pick: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fetch into an empty cache through open_clip's own download and the hub functions;
    the scorers then load from that cache offline and score as the local weights do."""
    tag = {"hf_hub": "cdm-test/tiny-clip/"}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda m, t: tag if t == "tiny" else {})
    repos = {name: tmp_path / "hub" / name for name in ("tiny-clip", "aesthetic")}
    for folder in repos.values():
        folder.mkdir(parents=True)
    processor = shutil.copytree(tiny_pick[1], tmp_path / "hub" / "processor")
    # Like the real laion repo: a model config (AutoTokenizer reads it) beside weights.
    shutil.copy(tiny_pick[0] / "config.json", processor)
    (processor / "open_clip_model.safetensors").write_bytes(b"weights the processor never reads")
    shutil.copy(tiny_clip, repos["tiny-clip"] / "open_clip_pytorch_model.bin")
    torch.save(random_head(16), repos["aesthetic"] / HEAD_FILE)
    hub = FakeHub({
        "cdm-test/tiny-clip": repos["tiny-clip"],
        "cdm-test/aesthetic": repos["aesthetic"],
        "cdm-test/pickscore": tiny_pick[0],
        "cdm-test/processor": processor,
    })  # fmt: skip
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hub.file)  # open_clip's fetch
    cache = str(tmp_path / "cache")
    models = {
        "clip": {"model": TINY_CLIP, "pretrained": "tiny", "cache_dir": cache},
        "pickscore": {"model": "cdm-test/pickscore", "processor": "cdm-test/processor",
                      "cache_dir": cache},
        "aesthetic": {"head": f"cdm-test/aesthetic/{HEAD_FILE}", "clip_model": TINY_CLIP,
                      "clip_pretrained": "tiny", "cache_dir": cache},
    }  # fmt: skip
    build = {
        "clip": lambda: ClipScorer(**models["clip"]),
        "pickscore": lambda: PickScorer(**models["pickscore"]),
        "aesthetic": lambda: AestheticScorer(**models["aesthetic"]),
    }
    for make in build.values():
        with pytest.raises(FileNotFoundError, match="fetch them with"):
            make()

    teacher = P.Teacher(backend="sd3", path=str(tmp_path))  # a local teacher: not fetched
    params = SimpleNamespace(teacher=teacher, score=SimpleNamespace(models=models))
    done = fetch.fetch_weights(params, fetch.Hub(snapshot=hub.snapshot, file=hub.file))  # type: ignore[arg-type]
    assert len(done) == 4  # tiny-clip once for both CLIP users, pickscore x2, the head
    processor_files = {
        p.name for p in Path(cache).glob("models--cdm-test--processor/snapshots/*/*")
    }
    assert (
        "tokenizer.json" in processor_files and "open_clip_model.safetensors" not in processor_files
    )

    local = {
        "clip": ClipScorer(TINY_CLIP, str(tiny_clip)),
        "pickscore": PickScorer(str(tiny_pick[0]), str(tiny_pick[1])),
        "aesthetic": AestheticScorer(str(repos["aesthetic"]), TINY_CLIP, str(tiny_clip)),
    }
    for name, make in build.items():
        scores = make().score(IMAGES, PROMPTS)
        np.testing.assert_allclose(scores, local[name].score(IMAGES, PROMPTS), rtol=1e-5, atol=1e-5)


def test_the_published_baselines_are_fetched_with_the_weights(tmp_path):
    """compare: each hub LoRA (one file when named, else the repo) and VAE; local ones not."""
    import yaml

    from cdm.overlay import apply
    from tests.conftest import ROOT

    data = yaml.safe_load(
        apply(ROOT / "configs/sd3-medium.yaml", ROOT / "params.yaml", write=False)
    )
    data["compare"]["mine"] = {"steps": 4, "lora": {"path": str(tmp_path)}}  # a local folder
    data["dpg"]["sets"]["mine"] = 4  # Table 1's sets, which DPG-Bench samples too
    plan, _ = fetch.weights_plan(P.parse(data))
    got = {(d.kind, d.repo, d.name) for d in plan if d.what.startswith("compare")}
    assert got == {
        ("file", "ByteDance/Hyper-SD", "Hyper-SD3-8steps-CFG-lora.safetensors"),
        ("snapshot", "jasperai/flash-sd3", None),
        ("snapshot", "Luo-Yihong/TDM_sd3_lora", None),
        ("snapshot", "madebyollin/taesd3", None),
    }
