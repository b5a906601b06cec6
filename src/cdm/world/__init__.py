"""The embedded "shapes" world: a procedural text-to-image domain small enough for a CPU."""

from cdm.world.prompts import ATTRIBUTES, Attributes, all_prompts, parse_prompt, prompt_of
from cdm.world.render import IMAGE_SIZE, render, render_batch

__all__ = [
    "ATTRIBUTES",
    "Attributes",
    "IMAGE_SIZE",
    "all_prompts",
    "parse_prompt",
    "prompt_of",
    "render",
    "render_batch",
]
