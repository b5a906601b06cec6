"""Attributes of a shapes-world image and the English prompts that name them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Each attribute kind with its values, in a fixed order: the index of a value is its label.
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "position": POSITIONS,
}


@dataclass(frozen=True)
class Attributes:
    """One prompt's content: an index into each attribute kind."""

    shape: int
    colour: int
    position: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.shape, self.colour, self.position)

    @property
    def index(self) -> int:
        """Position of this prompt in `all_prompts()`."""
        return (self.shape * len(COLOURS) + self.colour) * len(POSITIONS) + self.position

    @classmethod
    def from_index(cls, index: int) -> Attributes:
        n = len(SHAPES) * len(COLOURS) * len(POSITIONS)
        if not 0 <= index < n:
            raise ValueError(f"prompt index {index} out of range [0, {n})")
        rest, position = divmod(index, len(POSITIONS))
        shape, colour = divmod(rest, len(COLOURS))
        return cls(shape, colour, position)


def prompt_of(attrs: Attributes) -> str:
    """English prompt, e.g. "a red triangle at the top left"."""
    where = POSITIONS[attrs.position]
    place = "in the center" if where == "center" else f"at the {where}"
    return f"a {COLOURS[attrs.colour]} {SHAPES[attrs.shape]} {place}"


def parse_prompt(prompt: str) -> Attributes:
    """Inverse of `prompt_of`; raises ValueError on text that is not a world prompt."""
    words = prompt.strip().lower().split()
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    try:
        colour = COLOURS.index(words[1])
        shape = SHAPES.index(words[2])
    except ValueError:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}") from None
    tail = words[3:]
    if tail == ["in", "the", "center"]:
        position = POSITIONS.index("center")
    elif len(tail) == 4 and tail[:2] == ["at", "the"] and " ".join(tail[2:]) in POSITIONS:
        position = POSITIONS.index(" ".join(tail[2:]))
    else:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    return Attributes(shape, colour, position)


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
