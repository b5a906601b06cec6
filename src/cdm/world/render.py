"""Procedural renderer: attributes + nuisance draws -> RGB images in [-1, 1].

Every image of a prompt differs by its nuisance (size, jitter, rotation, colour tint,
background shade), so a prompt names a distribution of images, not one image. Shapes
are rasterised at 4x and box-filtered down, which gives smooth anti-aliased edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cdm.world.prompts import BACKGROUNDS, COLOURS, N_PROMPTS, POSITIONS, Attributes

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# RGB of each colour in [-1, 1].
_RGB = {
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.85, -0.8),
    "blue": (-0.7, -0.6, 0.95),
    "yellow": (0.9, 0.85, -0.8),
    "magenta": (0.9, -0.8, 0.9),
    "cyan": (-0.8, 0.85, 0.9),
}
# Object centre of each position, as a fraction of the image side (x, y). Objects are
# large (about 18 of 32 pixels across) so that a shape spans several transformer patches.
_CENTRE = {"left": (0.3, 0.5), "center": (0.5, 0.5), "right": (0.7, 0.5)}
# Background grey level of each background, before its per-image shade nuisance.
_BACKGROUND = {"dark": -0.7, "light": 0.45}


def draw_nuisance(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The nuisance variables of n images, drawn from `generator`."""
    u = torch.rand(n, 8, generator=generator)
    return {
        "radius": 0.25 + 0.05 * u[:, 0],  # half-size, fraction of the side
        "dx": 0.04 * (2 * u[:, 1] - 1),
        "dy": 0.06 * (2 * u[:, 2] - 1),
        "angle": (math.pi / 9) * (2 * u[:, 3] - 1),  # +-20 degrees
        "shade": 0.15 * (2 * u[:, 4] - 1),  # background grey offset
        "tint": 0.12 * (2 * u[:, 5:8] - 1),
    }


def _masks(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Coverage of each shape in the object's own frame (u right, v up), radius r."""
    d2 = u**2 + v**2
    circle = d2 <= r**2
    ring = circle & (d2 >= (0.55 * r) ** 2)
    bar = (u.abs() <= r) & (v.abs() <= 0.38 * r)  # horizontal
    pillar = (v.abs() <= r) & (u.abs() <= 0.38 * r)  # vertical
    stack = torch.stack([circle, ring, bar, pillar])  # (4, B, H, W), in SHAPES order
    return stack.gather(0, shape.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def render_batch(
    attrs: torch.Tensor, nuisance: dict[str, torch.Tensor], size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Render a batch from attribute indices (B, n_kinds) and nuisance draws -> (B, 3, s, s)."""
    shape, colour, position, background = attrs.unbind(1)
    hi = size * SUPERSAMPLE
    centres = torch.tensor([_CENTRE[p] for p in POSITIONS])[position]  # (B, 2)
    cx = centres[:, 0] + nuisance["dx"]
    cy = centres[:, 1] + nuisance["dy"]
    axis = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi
    x = axis.view(1, 1, hi) - cx.view(-1, 1, 1)
    y = cy.view(-1, 1, 1) - axis.view(1, hi, 1)  # y grows upwards
    cos, sin = nuisance["angle"].cos().view(-1, 1, 1), nuisance["angle"].sin().view(-1, 1, 1)
    u, v = cos * x + sin * y, -sin * x + cos * y
    cover = _masks(shape, u, v, nuisance["radius"].view(-1, 1, 1)).float()
    cover = torch.nn.functional.avg_pool2d(cover.unsqueeze(1), SUPERSAMPLE)  # (B, 1, s, s)
    rgb = torch.tensor([_RGB[c] for c in COLOURS])[colour] + nuisance["tint"]
    fg = rgb.clamp(-1, 1).view(-1, 3, 1, 1)
    grey = torch.tensor([_BACKGROUND[b] for b in BACKGROUNDS])[background] + nuisance["shade"]
    bg = grey.view(-1, 1, 1, 1)
    return cover * fg + (1 - cover) * bg


def render(
    attrs: Sequence[Attributes], seeds: Sequence[int], size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Render one image per (attributes, seed); each image depends only on its own pair."""
    if len(attrs) != len(seeds):
        raise ValueError(f"{len(attrs)} attribute sets but {len(seeds)} seeds")
    if not attrs:
        raise ValueError("render needs at least one (attributes, seed) pair")
    draws = [draw_nuisance(1, torch.Generator().manual_seed(int(s))) for s in seeds]
    nuisance = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
    idx = torch.tensor([a.as_tuple() for a in attrs], dtype=torch.long)
    return render_batch(idx, nuisance, size)


def random_batch(
    n: int, generator: torch.Generator, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh training renders: (images (n,3,s,s), prompt indices (n,)) of uniform random prompts."""
    index = torch.randint(N_PROMPTS, (n,), generator=generator)
    attrs = torch.tensor([Attributes.from_index(int(i)).as_tuple() for i in index])
    return render_batch(attrs, draw_nuisance(n, generator), size), index
