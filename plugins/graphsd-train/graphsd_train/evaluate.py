"""Judge a generated shapes image by plain pixel analysis (no learned model).

1. Background: the median colour of the border pixels, named by the nearest background palette
   entry.
2. Foreground: pixels farther than :data:`FOREGROUND_DISTANCE` (RGB Euclidean) from that median;
   the largest 8-connected component of them is the shape (stray specks are ignored).
3. Colour: the median colour of the shape's interior (the component eroded by one pixel, so
   blended edge pixels do not count), named by the nearest shape palette entry.
4. Shape: the fill ratio of the component's bounding box, area / (width × height), which is
   about 1 for a square, π/4 ≈ 0.785 for a circle and 0.5 for a triangle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from graphsd_train.shapes import BACKGROUNDS, COLORS, parse_caption

FOREGROUND_DISTANCE = 60.0
MIN_SHAPE_PIXELS = 40
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.64


@dataclass(frozen=True)
class ShapeReading:
    """What the evaluator sees in one image (``shape`` is "none" when nothing stands out)."""

    shape: str
    color: str
    background: str
    fill_ratio: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = [np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(dist))]


def as_rgb_array(image) -> np.ndarray:
    """Accept a PIL image, a uint8 ``[H,W,3]`` array or a float ``[H,W,3]`` array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) * 255.0, 0, 255).round()
    return arr[..., :3].astype(np.float64)


def read_shape(image) -> ShapeReading:
    """Read shape, shape colour and background colour from an RGB image."""
    rgb = as_rgb_array(image)
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    foreground = np.linalg.norm(rgb - bg_rgb, axis=-1) > FOREGROUND_DISTANCE
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    if n == 0:
        return ShapeReading("none", "none", background, 0.0, 0, (0, 0, 0, 0))
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, n + 1))
    component = labels == (int(np.argmax(sizes)) + 1)
    area = int(component.sum())
    ys, xs = np.nonzero(component)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    if area < MIN_SHAPE_PIXELS:
        return ShapeReading("none", "none", background, 0.0, area, bbox)
    interior = ndimage.binary_erosion(component)
    core = interior if interior.sum() >= MIN_SHAPE_PIXELS // 2 else component
    color = _nearest(np.median(rgb[core], axis=0), COLORS)
    fill = area / float((bbox[2] - bbox[0] + 1) * (bbox[3] - bbox[1] + 1))
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    return ShapeReading(shape, color, background, round(fill, 4), area, bbox)


@dataclass(frozen=True)
class ShapeScore:
    """A reading compared with the caption it should show."""

    expected: tuple[str, str, str]  # color, shape, background
    reading: ShapeReading

    @property
    def checks(self) -> dict[str, bool]:
        color, shape, background = self.expected
        r = self.reading
        return {"color": r.color == color, "shape": r.shape == shape, "background": r.background == background}

    @property
    def correct(self) -> bool:
        """All three attributes right."""
        return all(self.checks.values())

    @property
    def score(self) -> float:
        """Fraction of the three attributes that are right."""
        return sum(self.checks.values()) / 3.0

    def report(self) -> str:
        r = self.reading
        parts = [f"{k}: {'ok' if ok else 'WRONG'}" for k, ok in self.checks.items()]
        return (
            f"expected {' '.join(self.expected)}; saw a {r.color} {r.shape} on {r.background} "
            f"(fill {r.fill_ratio:.2f}, area {r.area}px) -> " + ", ".join(parts)
        )


def score_image(image, expected_caption: str) -> ShapeScore:
    """Evaluate an image against a caption ``a {color} {shape} on a {background} background``."""
    return ShapeScore(parse_caption(expected_caption), read_shape(image))
