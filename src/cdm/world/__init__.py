"""The embedded "shapes" world: a procedural text-to-image domain small enough for a CPU.

The package exports the prompt grammar, which needs no torch (the report and the validator
read prompts); the renderer is `cdm.world.render`, imported where images are drawn."""

from cdm.world.prompts import ATTRIBUTES, Attributes, all_prompts, parse_prompt, prompt_of

__all__ = ["ATTRIBUTES", "Attributes", "all_prompts", "parse_prompt", "prompt_of"]
