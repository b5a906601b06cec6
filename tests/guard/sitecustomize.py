"""Test guard: with CDM_FORBID_TEXT_ENCODERS=1 and this folder on PYTHONPATH, building any
transformers model (every text encoder of SD3 and LongCat is one: CLIP, T5, Qwen2.5-VL)
raises, whichever way it is built (from_pretrained, from_config or a constructor)."""

import os

if os.environ.get("CDM_FORBID_TEXT_ENCODERS") == "1":
    import transformers

    def _forbidden(self, *args, **kwargs):
        raise RuntimeError(f"text encoder instantiated: {type(self).__name__}")

    transformers.PreTrainedModel.__init__ = _forbidden
