"""Test guard: with this folder on PYTHONPATH and CDM_FORBID_TEXT_ENCODERS set, building any
transformers model (every text encoder of SD3 and LongCat is one: CLIP, T5, Qwen2.5-VL)
raises, whichever way it is built (from_pretrained, from_config or a constructor).

CDM_FORBID_TEXT_ENCODERS=1 guards every process; a comma-separated list of script names
guards only the processes started as those scripts (`distill.py`), or as a script with that
`--model` (`sample.py:cdm`), so a whole Snakemake run can carry it: cache_teacher, which must
build the encoders, and the published baselines' sample jobs (whole pipelines) run unguarded."""

import os
import sys


def _guarded(which: str, argv: list[str]) -> bool:
    if which == "1":
        return True
    script = os.path.basename(argv[0]) if argv else ""
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None
    for entry in filter(None, which.split(",")):
        name, _, wanted = entry.partition(":")
        if name == script and wanted in ("", model):
            return True
    return False


if _guarded(os.environ.get("CDM_FORBID_TEXT_ENCODERS", ""), sys.argv):
    import transformers

    def _forbidden(self, *args, **kwargs):
        raise RuntimeError(f"text encoder instantiated: {type(self).__name__}")

    transformers.PreTrainedModel.__init__ = _forbidden
