"""The DPG-Bench VQA model in its own environment, spoken to over JSON lines.

    <env>/bin/python -m cdm.metrics.dpg_vqa [--model ID] [--device cuda]

reads one request per line on stdin, {"images": [path, ...], "questions": [str, ...]}, and
writes one reply per line on stdout, {"answers": [str, ...]} (answers[i] to questions[i] on
images[i]) or {"error": "one line"}. modelscope's mPLUG pins an older transformers than this
project's, so the model never loads into our process: `SubprocessVQA` starts the runner with the
environment's interpreter (`cdm.metrics.dpg_env`) and is the `VQA` the scorer uses. This
module imports only the standard library at the top: the runner's environment has no torch of
ours, no pandas, nothing of this project but this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

MODEL_ID = "damo/mplug_visual-question-answering_coco_large_en"  # = cdm.metrics.dpg.MODEL_ID
SRC = Path(__file__).resolve().parents[2]  # the folder holding the cdm package


class Answerer(Protocol):
    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]: ...


# ---------------------------------------------------------------- the runner (its own env)


class MPlugVQA:
    """modelscope's visual-question-answering pipeline, as ELLA's and the authors' code call it:
    {'image': PIL image, 'question': str} -> result['text']."""

    def __init__(self, model_id: str = MODEL_ID, device: str = "cuda") -> None:
        from modelscope.pipelines import pipeline  # only in the runner's environment
        from modelscope.utils.constant import Tasks

        self.pipe = pipeline(Tasks.visual_question_answering, model=model_id, device=device)

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        from PIL import Image

        out, path, image = [], None, None
        for p, question in zip(images, questions, strict=True):
            if p != path:  # the questions of one image arrive together: decode it once
                with Image.open(p) as raw:
                    path, image = p, raw.convert("RGB")
            out.append(str(self.pipe({"image": image, "question": question})["text"]))
        return out


def reply(vqa: Answerer, line: str) -> dict[str, Any]:
    """The answer to one request line, or its one-line error."""
    try:
        request = json.loads(line)
        images, questions = request["images"], request["questions"]
        if len(images) != len(questions):
            return {"error": f"{len(images)} images but {len(questions)} questions"}
        return {"answers": vqa.answer([Path(p) for p in images], list(questions))}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"error": f"{type(exc).__name__}: {reason}"}


def serve(vqa: Answerer, lines: Iterable[str], out: IO[str]) -> None:
    """Answer request lines until the input ends; one reply line each, flushed."""
    for line in lines:
        if line.strip():
            out.write(json.dumps(reply(vqa, line)) + "\n")
            out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cdm.metrics.dpg_vqa")
    parser.add_argument("--model", default=MODEL_ID)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    vqa = MPlugVQA(args.model, args.device)
    print(json.dumps({"ready": args.model}), flush=True)
    serve(vqa, sys.stdin, sys.stdout)


# ---------------------------------------------------------------- the client (our env)


class SubprocessVQA:
    """The `VQA` of cdm.metrics.dpg over a runner process (its stdout carries replies only)."""

    def __init__(self, command: Sequence[str], chunk: int = 512) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.chunk = chunk
        self.proc = subprocess.Popen(
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        first = self._read()
        if "ready" not in first:
            raise RuntimeError(f"the DPG VQA runner did not start: {first.get('error', first)}")

    @classmethod
    def in_env(cls, python: Path, model_id: str = MODEL_ID, device: str = "cuda") -> SubprocessVQA:
        return cls(
            [str(python), "-m", "cdm.metrics.dpg_vqa", "--model", model_id, "--device", device]
        )

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the DPG VQA runner exited ({code}); see its stderr above")
        return json.loads(line)

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        assert self.proc.stdin is not None
        out: list[str] = []
        for lo in range(0, len(questions), self.chunk):
            request = {
                "images": [str(p) for p in images[lo : lo + self.chunk]],
                "questions": list(questions[lo : lo + self.chunk]),
            }
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            got = self._read()
            if "error" in got:
                raise RuntimeError(f"the DPG VQA runner failed: {got['error']}")
            out.extend(got["answers"])
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def __enter__(self) -> SubprocessVQA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
