"""Attributes of a shapes-world image and the English prompts that name them."""

from __future__ import annotations

import itertools
import math
from dataclasses import astuple, dataclass

# Each attribute kind with its values, in a fixed order: the index of a value is its label.
# Shapes differ in coarse structure (a hole, an orientation), which a small flow model
# learns early; corners and arms (square, triangle, cross) it learned far too slowly.
SHAPES = ("circle", "ring", "bar", "pillar")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
POSITIONS = ("left", "center", "right")
BACKGROUNDS = ("dark", "light")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
N_PROMPTS = math.prod(len(v) for v in ATTRIBUTES.values())


@dataclass(frozen=True)
class Attributes:
    """One prompt's content: an index into each attribute kind."""

    shape: int
    colour: int
    position: int
    background: int

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)

    @property
    def index(self) -> int:
        """Position of this prompt in `all_prompts()` (mixed radix, last kind fastest)."""
        index = 0
        for value, values in zip(self.as_tuple(), ATTRIBUTES.values(), strict=True):
            index = index * len(values) + value
        return index

    @classmethod
    def from_index(cls, index: int) -> Attributes:
        if not 0 <= index < N_PROMPTS:
            raise ValueError(f"prompt index {index} out of range [0, {N_PROMPTS})")
        digits = []
        for values in reversed(ATTRIBUTES.values()):
            index, digit = divmod(index, len(values))
            digits.append(digit)
        return cls(*reversed(digits))


def prompt_of(attrs: Attributes) -> str:
    """English prompt, e.g. "a red ring on the left on a light background"."""
    where = POSITIONS[attrs.position]
    place = "in the center" if where == "center" else f"on the {where}"
    colour, shape = COLOURS[attrs.colour], SHAPES[attrs.shape]
    return f"a {colour} {shape} {place} on a {BACKGROUNDS[attrs.background]} background"


def parse_prompt(prompt: str) -> Attributes:
    """Inverse of `prompt_of`; raises ValueError on text that is not a world prompt."""
    words = prompt.strip().lower().split()
    try:
        if (
            len(words) != 10
            or words[0] != "a"
            or words[6:8] != ["on", "a"]
            or words[9] != "background"
        ):
            raise ValueError
        place = words[3:6]
        if place == ["in", "the", "center"]:
            position = POSITIONS.index("center")
        elif place[:2] == ["on", "the"] and place[2] != "center":
            position = POSITIONS.index(place[2])
        else:
            raise ValueError
        return Attributes(
            SHAPES.index(words[2]), COLOURS.index(words[1]), position, BACKGROUNDS.index(words[8])
        )
    except ValueError:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}") from None


# The example the refusal gives: built from the world's own words, so it always renders.
EXAMPLE = prompt_of(Attributes(SHAPES.index("ring"), 0, POSITIONS.index("left"), 1))


def check_renderable(prompts: list[str], source: str) -> None:
    """The shapes world scores only prompts it can render: refuse the others up front."""
    bad = []
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except ValueError:
            bad.append(i)
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} prompt(s) the shapes world cannot render (the first: "
            f"{prompts[bad[0]][:80]!r}); the world takes prompts like "
            f"{EXAMPLE!r}"
        )


def all_attributes() -> list[Attributes]:
    ranges = (range(len(v)) for v in ATTRIBUTES.values())
    return [Attributes(*combo) for combo in itertools.product(*ranges)]


def all_prompts() -> list[str]:
    """Every distinct prompt of the world, in index order."""
    return [prompt_of(a) for a in all_attributes()]


def vocabulary() -> list[str]:
    """Every word a world prompt can contain, sorted."""
    words = {w for p in all_prompts() for w in p.split()}
    return sorted(words)
