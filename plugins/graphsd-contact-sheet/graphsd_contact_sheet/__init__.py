"""ContactSheet: one image showing every image of a batch (or two batches) in a grid.

Typical use: generate a batch (or several seeds / prompts) and save one overview picture.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from graphsd import Node, NodeError, NodeIO, hookimpl
from graphsd.types import Image


class ContactSheet(Node):
    type = "ContactSheet"
    category = "image"
    description = "Arrange all images of a batch (plus an optional second batch) in a grid, row by row."

    class Inputs(NodeIO):
        images: Image = Field(description="Images to lay out (all of one size)")
        more: Image | None = Field(None, description="Optional second batch appended after the first (same size)")
        columns: int = Field(0, ge=0, le=64, description="Images per row; 0 = as square as possible")
        gap: int = Field(4, ge=0, le=256, description="Pixels between images and around the sheet")
        background: float = Field(1.0, ge=0.0, le=1.0, description="Grey level of the gaps (0 black, 1 white)")

    class Outputs(NodeIO):
        image: Image = Field(description="The contact sheet (a batch of one)")

    def run(self, inputs, ctx):
        pixels = inputs.images.pixels
        if inputs.more is not None:
            if inputs.more.pixels.shape[1:] != pixels.shape[1:]:
                raise NodeError(
                    f"'more' images are {tuple(inputs.more.pixels.shape[1:3])} but 'images' are {tuple(pixels.shape[1:3])}; resize one batch first",
                    field="more",
                )
            pixels = torch.cat([pixels, inputs.more.pixels])
        n, h, w, c = pixels.shape
        cols = inputs.columns or math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        g = inputs.gap
        sheet = torch.full((rows * (h + g) + g, cols * (w + g) + g, c), inputs.background, dtype=pixels.dtype)
        for i, img in enumerate(pixels):
            r, col = divmod(i, cols)
            y, x = g + r * (h + g), g + col * (w + g)
            sheet[y : y + h, x : x + w] = img
        return self.Outputs(image=Image(sheet.unsqueeze(0)))


@hookimpl
def graphsd_register_nodes():
    return [ContactSheet]
