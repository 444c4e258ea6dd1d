"""ComfyUI's mask classes and the image classes that go with them, as graphsd nodes of the same
names, inputs and outputs: LoadImageMask, MaskToImage, SolidMask, FeatherMask, ThresholdMask,
CropMask, GrowMask, ImageCompositeMasked and ImageScaleToTotalPixels (ImageToMask and InvertMask
are in :mod:`graphsd.std.nodes.inpaint`).

Masks are ``[batch, height, width]`` floats (graphsd's Mask, ComfyUI's MASK), images ``[batch,
height, width, channels]`` in [0, 1]; each node computes what ComfyUI's class computes on the same
tensors, quirks included (FeatherMask's right and bottom ramps, see its description). A ComfyUI
API prompt naming these classes runs through graphsd's ComfyUI import as is.

LoadImageMask's ``image`` is a file name as ComfyUI's prompts give it: in the input folder
(``--input-dir``, the server's input folder), or, annotated as the frontend writes it, in the
output folder or its ``temp/`` (``"x.png [output]"``); a path (absolute, or relative to the working
directory) is read as well. A workflow confined to some folders (a served prompt, a PNG's
workflow) may only read inside them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL import ImageOps
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.resources import require_memory
from graphsd.std.comfy import annotated_name, normalise_file_name
from graphsd.std.nodes.comfy_core import MAX_LATENT_PIXELS as MAX_RESOLUTION
from graphsd.std.nodes.comfy_core import PREVIEW_FOLDER
from graphsd.std.nodes.comfy_image import ScaleMethod, resize_pixels
from graphsd.std.nodes.image_io import read_image_file
from graphsd.types import Image, Mask

CHANNELS = ("alpha", "red", "green", "blue")
"""LoadImageMask's channel choices, in ComfyUI's order."""


# ---- LoadImageMask -----------------------------------------------------------------------------
def input_file_candidates(name: str, settings: Settings) -> list[Path]:
    """Where an input file name of a ComfyUI prompt is looked for, in order: an annotated name
    (``x.png [output]``) in that folder (input: the input folder; output: the output directory;
    temp: its ``temp/``); a plain name in the input folder, then as a path (absolute, or relative
    to the working directory). Windows separators count as ``/``."""
    file, kind = annotated_name(normalise_file_name(name))
    path = Path(file)
    if path.is_absolute():
        return [path]
    if kind == "output":
        return [Path(settings.output_dir) / path]
    if kind == "temp":
        return [Path(settings.output_dir) / PREVIEW_FOLDER / path]
    in_input = Path(settings.input_dir) / path
    return [in_input] if name.endswith("[input]") else [in_input, path]


def _missing(name: str, candidates: list[Path]) -> str:
    return f"image file '{name}' does not exist (looked for {', '.join(str(p) for p in candidates)})"


def channel_mask(im: PILImage.Image, channel: str) -> torch.Tensor:
    """One channel of a picture as a mask ``[1, H, W]``, as ComfyUI's LoadImageMask reads it: the
    picture turned upright by its EXIF orientation and converted to RGBA (32-bit integer pictures
    divided by 255 first), the channel's 8-bit values / 255, and for ``alpha`` 1 - that (1 where
    the picture is transparent)."""
    im = ImageOps.exif_transpose(im)
    if im.getbands() != ("R", "G", "B", "A"):
        if im.mode == "I":
            im = im.point(lambda v: v * (1 / 255))
        im = im.convert("RGBA")
    values = torch.from_numpy(np.asarray(im.getchannel(channel[0].upper()), dtype=np.float32) / 255.0)
    return (1.0 - values if channel == "alpha" else values).unsqueeze(0)


class LoadImageMask(Node):
    type = "LoadImageMask"
    category = "mask"
    description = (
        "Read one channel of a picture as a mask (ComfyUI's Load Image (as Mask)): alpha gives 1 where the picture is "
        "transparent (as LoadImage's mask), red, green or blue give the channel's values. The picture is turned upright by "
        "its EXIF orientation first."
    )

    class Inputs(NodeIO):
        image: str = Field(
            description="Picture file: a name in the input folder ('x.png', or 'x.png [input]'); 'x.png [output]' and "
            "'x.png [temp]' name files in the output directory and its temp/; or a path"
        )
        channel: Literal["alpha", "red", "green", "blue"] = Field("alpha", description="The channel that becomes the mask")
        upload: Literal["image"] = Field("image", description="The ComfyUI frontend's upload button (ignored)")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The channel as a mask [1, height, width] in [0, 1]")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The file's identity (size and mtime), so a replaced file is read again."""
        name = literals.get("image")
        if not isinstance(name, str):
            return "input:" + file_fingerprint(ctx.settings.input_dir)
        found = next((p for p in input_file_candidates(name, ctx.settings) if p.is_file()), None)
        return file_fingerprint(found) if found is not None else f"missing:{name}"

    @classmethod
    def check_context(
        cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings
    ) -> list[tuple[str, str, str | None]]:
        """A picture that is not there is refused at validation, as ComfyUI refuses it."""
        name = literals.get("image")
        if not isinstance(name, str):
            return []
        candidates = input_file_candidates(name, settings)
        if any(p.is_file() for p in candidates):
            return []
        return [("image", _missing(name, candidates), "put the picture in the input folder (--input-dir) or give its path")]

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        candidates = input_file_candidates(inputs.image, ctx.settings)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise NodeError(_missing(inputs.image, candidates), field="image")
        return self.Outputs(mask=Mask(read_image_file(found, ctx, "image", lambda im: channel_mask(im, inputs.channel))))


# ---- simple mask classes -----------------------------------------------------------------------
class MaskToImage(Node):
    type = "MaskToImage"
    category = "mask"
    description = "A mask as a grey RGB image (ComfyUI's Convert Mask to Image): each channel is the mask."

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask")

    class Outputs(NodeIO):
        image: Image = Field(description="The mask in each of the red, green and blue channels")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(image=Image(inputs.mask.values.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()))


class SolidMask(Node):
    type = "SolidMask"
    category = "mask"
    description = "A mask of one value everywhere (ComfyUI's SolidMask)."

    class Inputs(NodeIO):
        value: float = Field(1.0, ge=0.0, le=1.0, description="The mask's value")
        width: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Width in pixels")
        height: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Height in pixels")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The mask [1, height, width]")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        require_memory(torch.device("cpu"), 4 * inputs.width * inputs.height, "the mask", "lower width or height", field="width")
        return self.Outputs(mask=Mask(torch.full((1, inputs.height, inputs.width), inputs.value, dtype=torch.float32)))


class ThresholdMask(Node):
    type = "ThresholdMask"
    category = "mask"
    description = "1 where the mask is above value, 0 elsewhere (ComfyUI's ThresholdMask)."

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask")
        value: float = Field(0.5, ge=0.0, le=1.0, description="The threshold (values equal to it become 0)")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The thresholded mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(mask=Mask((inputs.mask.values > inputs.value).float()))


class CropMask(Node):
    type = "CropMask"
    category = "mask"
    description = "Cut a rectangle out of a mask (ComfyUI's CropMask); a rectangle reaching past the edge is cut there."

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask")
        x: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the rectangle, in pixels")
        y: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the rectangle, in pixels")
        width: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Width of the rectangle")
        height: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Height of the rectangle")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The part of the mask in the rectangle")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        values = inputs.mask.values
        _, height, width = values.shape
        for field, start, size in (("x", inputs.x, width), ("y", inputs.y, height)):
            if start >= size:
                raise NodeError(f"{field} {start} lies outside the {width}x{height} mask; use {field} below {size}", field=field)
        return self.Outputs(mask=Mask(values[:, inputs.y : inputs.y + inputs.height, inputs.x : inputs.x + inputs.width].clone()))


class FeatherMask(Node):
    type = "FeatherMask"
    category = "mask"
    description = (
        "Fade a mask out towards its edges (ComfyUI's FeatherMask): the k-th of the first `left` columns is multiplied by "
        "k / left, and likewise for the top rows. As in ComfyUI, the right and bottom ramps are shifted by one: the first "
        "column (row) gets 1 / right (1 / bottom), then the last gets 2 / right, the one before it 3 / right, and so on."
    )

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask")
        left: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Width of the fade at the left edge, in pixels")
        top: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Height of the fade at the top edge")
        right: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Width of the fade at the right edge")
        bottom: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Height of the fade at the bottom edge")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The feathered mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        out = inputs.mask.values.clone()
        height, width = out.shape[-2:]
        left, right = min(inputs.left, width), min(inputs.right, width)
        top, bottom = min(inputs.top, height), min(inputs.bottom, height)
        for k in range(left):
            out[:, :, k] *= (k + 1) / left
        for k in range(right):
            out[:, :, -k] *= (k + 1) / right  # -0 is column 0: ComfyUI's ramp
        for k in range(top):
            out[:, k, :] *= (k + 1) / top
        for k in range(bottom):
            out[:, -k, :] *= (k + 1) / bottom
        return self.Outputs(mask=Mask(out))


# ---- GrowMask ----------------------------------------------------------------------------------
def grow(mask: torch.Tensor, expand: int, tapered_corners: bool, ctx: Context | None = None) -> torch.Tensor:
    """``mask [B, H, W]`` dilated (``expand`` > 0) or eroded (< 0) ``|expand|`` times by a 3×3
    neighbourhood, the plus-shaped one with ``tapered_corners``: each pass takes the maximum
    (minimum) over the pixel and its neighbours inside the mask (grey-scale morphology; pixels
    outside count as the edge pixel itself, which changes nothing)."""
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if not (tapered_corners and dy and dx)]
    reduce = torch.maximum if expand > 0 else torch.minimum
    out = mask
    height, width = mask.shape[-2:]
    for _ in range(abs(expand)):
        if ctx is not None:
            ctx.check_interrupted()
        padded = F.pad(out.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
        result = out
        for dy, dx in offsets:
            result = reduce(result, padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width])
        out = result
    return out.clone() if out is mask else out


class GrowMask(Node):
    type = "GrowMask"
    category = "mask"
    description = (
        "Grow (expand > 0) or shrink (expand < 0) a mask by that many pixels (ComfyUI's GrowMask): grey-scale dilation or "
        "erosion, one pixel per pass, by the 3x3 square, or the plus-shaped neighbourhood with tapered_corners (rounder corners)."
    )

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask")
        expand: int = Field(0, ge=-MAX_RESOLUTION, le=MAX_RESOLUTION, description="Pixels to grow by (negative: to shrink by)")
        tapered_corners: bool = Field(True, description="Grow through edges only, not corners, at each pass (rounder corners)")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The grown or shrunk mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(mask=Mask(grow(inputs.mask.values, inputs.expand, inputs.tapered_corners, ctx)))


# ---- ImageCompositeMasked ----------------------------------------------------------------------
def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` cut or repeated along its first dimension to ``batch`` items (ComfyUI's
    ``repeat_to_batch_size``)."""
    if tensor.shape[0] > batch:
        return tensor[:batch]
    if tensor.shape[0] < batch:
        return tensor.repeat(math.ceil(batch / tensor.shape[0]), *[1] * (tensor.ndim - 1))[:batch]
    return tensor


def composite(
    destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None, resize_source: bool
) -> torch.Tensor:
    """``source [B, C, h, w]`` pasted into ``destination [B, C, H, W]`` with its top-left corner at
    pixel (x, y), blended by ``mask`` (resized bilinearly to the source; 1 = source): ComfyUI's
    ``composite`` with a multiplier of 1. The source is first resized to the destination
    (bilinear) with ``resize_source``, and cut or repeated to the destination's batch; what falls
    outside the destination is dropped."""
    out = destination.clone()
    if resize_source:
        source = F.interpolate(source, size=out.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source, out.shape[0])
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).to(source), size=source.shape[-2:], mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    x, y = min(x, out.shape[3]), min(y, out.shape[2])
    visible_h, visible_w = out.shape[2] - y, out.shape[3] - x
    weight = weight[:, :, :visible_h, :visible_w]
    part = source[:, :, :visible_h, :visible_w]
    bottom, right = y + part.shape[2], x + part.shape[3]
    out[:, :, y:bottom, x:right] = weight * part + (1 - weight) * out[:, :, y:bottom, x:right]
    return out


class ImageCompositeMasked(Node):
    type = "ImageCompositeMasked"
    category = "image"
    description = (
        "Paste one image into another at (x, y), through a mask where one is given (ComfyUI's ImageCompositeMasked): "
        "destination × (1 - mask) + source × mask over the source's rectangle, the mask resized to the source. The "
        "result has the destination's channels (a source without alpha counts as opaque)."
    )

    class Inputs(NodeIO):
        destination: Image = Field(description="The image pasted into")
        source: Image = Field(description="The image pasted")
        x: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the source in the destination, in pixels")
        y: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the source in the destination, in pixels")
        resize_source: bool = Field(False, description="Resize the source to the destination's size first (bilinear)")
        mask: Mask | None = Field(None, description="Where the source shows (1) and where the destination stays (0)")

    class Outputs(NodeIO):
        image: Image = Field(description="The composite")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        destination, source = inputs.destination.pixels, inputs.source.pixels.to(inputs.destination.pixels)
        channels = destination.shape[-1]
        if source.shape[-1] == 1 and channels > 1:  # a grey source: the same value in red, green and blue
            source = source.expand(-1, -1, -1, 3)
        if source.shape[-1] > channels:
            source = source[..., :channels]
        elif source.shape[-1] < channels:  # RGB into RGBA: opaque
            source = F.pad(source, (0, channels - source.shape[-1]), value=1.0)
        mask = inputs.mask.values if inputs.mask is not None else None
        out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), inputs.x, inputs.y, mask, inputs.resize_source)
        return self.Outputs(image=Image(out.movedim(1, -1)))


# ---- ImageScaleToTotalPixels -------------------------------------------------------------------
def total_pixels_size(width: int, height: int, megapixels: float, steps: int) -> tuple[int, int]:
    """The size ImageScaleToTotalPixels gives a ``width × height`` picture: both sides scaled by
    ``sqrt(megapixels × 2^20 / (width × height))`` and rounded to a multiple of ``steps``."""
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    return round(width * scale / steps) * steps, round(height * scale / steps) * steps


class ImageScaleToTotalPixels(Node):
    type = "ImageScaleToTotalPixels"
    category = "image/upscaling"
    description = (
        "Resize images to about a number of megapixels (of 2^20 pixels), keeping the aspect ratio (ComfyUI's "
        "ImageScaleToTotalPixels): each side × sqrt(target / pixels), rounded to a multiple of resolution_steps."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="Images to resize")
        upscale_method: ScaleMethod = Field("nearest-exact", description="Interpolation (as ImageScale)")
        megapixels: float = Field(1.0, ge=0.01, le=16.0, description="Target size in megapixels (1 = 1024 x 1024 pixels)")
        resolution_steps: int = Field(1, ge=1, le=256, description="Round each side to a multiple of this")

    class Outputs(NodeIO):
        image: Image = Field(description="Resized images")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels = inputs.image.pixels
        batch, old_h, old_w, channels = pixels.shape
        width, height = total_pixels_size(old_w, old_h, inputs.megapixels, inputs.resolution_steps)
        if width < 1 or height < 1:
            raise NodeError(
                f"the {old_w}x{old_h} image becomes {width}x{height} pixels at {inputs.megapixels:g} megapixels; "
                "raise megapixels or lower resolution_steps",
                field="resolution_steps" if inputs.resolution_steps > 1 else "megapixels",
            )
        need = batch * width * height * channels * pixels.element_size()
        require_memory(pixels.device, need, f"{batch} image(s) of {width}x{height}", "lower megapixels or the batch", field="megapixels")
        return self.Outputs(image=Image(resize_pixels(pixels, width, height, inputs.upscale_method, "disabled")))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [
        LoadImageMask,
        MaskToImage,
        SolidMask,
        ThresholdMask,
        CropMask,
        FeatherMask,
        GrowMask,
        ImageCompositeMasked,
        ImageScaleToTotalPixels,
    ]
