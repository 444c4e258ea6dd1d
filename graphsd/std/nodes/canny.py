"""ComfyUI's Canny (``comfy_extras/nodes_canny.py``) as a graphsd node of the same name and inputs:
edges of an image by Canny's method (Canny 1986, "A Computational Approach to Edge Detection"),
in the variant ComfyUI runs (kornia's ``canny`` with its defaults), written here in torch:

1. grey values ``0.299 R + 0.587 G + 0.114 B`` (a one-channel image as it is; alpha ignored);
2. a 5×5 Gaussian blur, sigma 1 (the normalised 1-D kernel ``exp(-x^2 / 2)``, x = -2..2, along
   each axis), the borders mirrored without repeating the edge pixel;
3. Sobel gradients ``gx`` (right minus left, weights 1 2 1) and ``gy`` (bottom minus top), not
   divided by 8, the borders repeating the edge pixel; magnitude ``sqrt(gx^2 + gy^2 + 1e-6)``;
4. non-maximum suppression: the gradient's direction ``atan2(gy, gx)`` rounded to a multiple of
   45 degrees (halves to even), and a pixel is kept only where its magnitude is above both
   neighbours along that direction (0 outside the image);
5. double threshold and hysteresis: magnitudes above ``high_threshold`` are edges, those above
   ``low_threshold`` are edges when they touch an edge (8 neighbours), repeated until nothing
   changes.

The result is 1 on edges and 0 elsewhere, in the three channels of an RGB image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from graphsd.context import Context
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.types import Image

GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G and B."""

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
"""The Sobel kernel for d/dx, as a cross-correlation (d/dy is its transpose)."""

NEIGHBOURS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
"""(dy, dx) of the neighbour in direction k × 45 degrees (y down, as atan2(gy, gx) measures it)."""


def _gaussian_blur(grey: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    x = torch.arange(size, dtype=grey.dtype, device=grey.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(grey, (size // 2,) * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, size))
    return F.conv2d(rows, kernel.view(1, 1, size, 1))


def _shifted(values: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``values[y + dy, x + dx]`` at each pixel, 0 outside the image."""
    padded = F.pad(values, (1, 1, 1, 1))
    height, width = values.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def canny_edges(pixels: torch.Tensor, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """Edges ``[B, H, W]`` (1 or 0) of images ``[B, H, W, C]`` by the steps in the module
    docstring."""
    images = pixels.movedim(-1, 1)
    if images.shape[1] >= 3:
        weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device)
        grey = (images[:, :3] * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    else:
        grey = images[:, :1]
    blurred = _gaussian_blur(grey)
    sobel = torch.tensor(SOBEL_X, dtype=grey.dtype, device=grey.device)
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-6)[:, 0]
    direction = torch.round(180.0 * torch.atan2(gy, gx)[:, 0] / math.pi / 45)
    forward = torch.remainder(direction, 8).long()
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        ahead, behind = _shifted(magnitude, dy, dx), _shifted(magnitude, -dy, -dx)
        keep |= (forward == k) & (magnitude > ahead) & (magnitude > behind)
    magnitude = magnitude * keep
    weak = magnitude > low_threshold
    strong = magnitude > high_threshold
    while True:
        grown = strong | (weak & (F.max_pool2d(strong.unsqueeze(1).to(magnitude.dtype), 3, 1, 1)[:, 0] > 0))
        if torch.equal(grown, strong):
            return strong.to(pixels.dtype)
        strong = grown


class Canny(Node):
    type = "Canny"
    category = "image/preprocessors"
    description = (
        "Edges of an image by Canny's method, as ComfyUI's Canny computes them (kornia's canny: grey, 5x5 Gaussian blur, "
        "Sobel gradients, non-maximum suppression, hysteresis between the two thresholds): white edges on black, e.g. for "
        "a canny ControlNet. The thresholds apply to the Sobel gradient magnitude of [0, 1] grey values."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="The image")
        low_threshold: float = Field(0.4, ge=0.01, le=0.99, description="Gradients above this are edges where they touch an edge")
        high_threshold: float = Field(0.8, ge=0.01, le=0.99, description="Gradients above this are edges")

    class Outputs(NodeIO):
        image: Image = Field(description="1 on edges, 0 elsewhere, in three channels")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        low, high = literals.get("low_threshold"), literals.get("high_threshold")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            return [("low_threshold", f"low_threshold {low:g} is above high_threshold {high:g}", "make low_threshold the smaller one")]
        return []

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        edges = canny_edges(inputs.image.pixels, inputs.low_threshold, inputs.high_threshold)
        return self.Outputs(image=Image(edges.unsqueeze(-1).expand(*edges.shape, 3).contiguous()))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [Canny]
