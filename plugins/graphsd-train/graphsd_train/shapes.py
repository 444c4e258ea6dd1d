"""A deterministic synthetic text-to-image dataset: one flat-coloured shape on a plain background.

Every sample is a function of ``(seed, index)`` alone, so a dataset is described completely by
its seed and size, and any sample can be regenerated anywhere. Captions read
``a {color} {shape} on a {background} background``.

Held-out combinations: :data:`HELD_OUT` lists six colour × shape × background combinations
(one per colour, each shape and each background twice) that a training set leaves out when
``held_out=True``, so that a model's generalisation to unseen combinations can be measured.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

Combo = tuple[str, str, str]  # (color, shape, background)

ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(COLORS, SHAPES, BACKGROUNDS))
HELD_OUT: frozenset[Combo] = frozenset(
    {
        ("red", "triangle", "gray"),
        ("green", "circle", "black"),
        ("blue", "square", "white"),
        ("yellow", "triangle", "black"),
        ("purple", "circle", "white"),
        ("orange", "square", "gray"),
    }
)
TRAIN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)

_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def caption(combo: Combo) -> str:
    """The caption of a combination: ``a red circle on a white background``."""
    color, shape, background = combo
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> Combo:
    """Inverse of :func:`caption`; raises ValueError for text that is not such a caption."""
    m = _CAPTION.match(text.strip().lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        raise ValueError(f"not a shapes caption: {text!r} (expected 'a <color> <shape> on a <background> background')")
    return m[1], m[2], m[3]


@dataclass(frozen=True)
class ShapeSample:
    """Where and how big the shape is drawn (pixels)."""

    combo: Combo
    cx: float
    cy: float
    size: float


def render(sample: ShapeSample, resolution: int = 128) -> np.ndarray:
    """Draw a sample as a ``[H, W, 3]`` uint8 array (no anti-aliasing, so colours are exact).

    Sizes are the side of the shape's bounding box: a circle of that diameter, a square of that
    side, an isosceles triangle (apex up) of that base and height.
    """
    color, shape, background = sample.combo
    img = Image.new("RGB", (resolution, resolution), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    h = sample.size / 2
    x0, y0, x1, y1 = sample.cx - h, sample.cy - h, sample.cx + h, sample.cy + h
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(sample.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(img, dtype=np.uint8)


class ShapesDataset:
    """``count`` samples drawn from ``seed``; ``dataset[i]`` is ``(image uint8 [H,W,3], caption)``.

    Combinations cycle through the allowed list (all 54, or the 48 training ones when
    ``held_out`` is True) in an order shuffled by the seed, so every combination appears
    equally often; the shape's size (25–55 % of the image side) and its position (fully inside,
    with a small margin) are drawn from a NumPy generator seeded with ``(seed, index)``.
    """

    def __init__(self, seed: int = 0, count: int = 1000, resolution: int = 128, held_out: bool = True):
        self.seed, self.count, self.resolution, self.held_out = seed, count, resolution, held_out
        combos = list(TRAIN_COMBOS if held_out else ALL_COMBOS)
        order = np.random.default_rng([seed, 1]).permutation(len(combos))
        self.combos: list[Combo] = [combos[i] for i in order]

    def __len__(self) -> int:
        return self.count

    def sample(self, index: int) -> ShapeSample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, 0, index])
        r = self.resolution
        size = rng.uniform(0.25, 0.55) * r
        margin = 0.04 * r
        lo, hi = margin + size / 2, r - margin - size / 2
        cx, cy = rng.uniform(lo, hi, size=2)
        return ShapeSample(self.combos[index % len(self.combos)], float(cx), float(cy), float(size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        s = self.sample(index)
        return render(s, self.resolution), caption(s.combo)
