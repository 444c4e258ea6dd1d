"""ComfyUI's simple image nodes as graphsd nodes of the same names, inputs and outputs: ImageScale,
ImageScaleBy, ImageInvert, ImageBatch, ImageCrop, EmptyImage and ImagePadForOutpaint.

Images are ``[batch, height, width, channels]`` floats in [0, 1] on both sides, so each node
computes what ComfyUI's does on the same tensor: resizing is ``torch.nn.functional.interpolate``
in the mode of the method's name (align_corners off, no antialiasing), except ``lanczos``, which
goes through 8-bit PIL images as ComfyUI does (values × 255 truncated to integers, resized with
PIL's Lanczos filter, divided by 255). ``crop: center`` first trims the longer side to the new
aspect ratio, equally on both ends (the crop LatentUpscale uses). A ComfyUI API prompt naming
these classes runs through graphsd's ComfyUI import as is.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.resources import require_memory
from graphsd.std.nodes.comfy_core import MAX_LATENT_PIXELS as MAX_RESOLUTION
from graphsd.std.nodes.comfy_core import center_crop
from graphsd.types import Image, Mask

ScaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
"""ComfyUI's image upscale methods: torch's interpolate modes, and PIL's Lanczos filter."""

MAX_COLOR = 0xFFFFFF


def _require_image_memory(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype, what: str, field: str) -> None:
    """Refuse an image result that could not be held in memory, before allocating it."""
    n = 1
    for s in shape:
        n *= s
    need = n * torch.empty((), dtype=dtype).element_size()
    batch, height, width = shape[0], shape[1], shape[2]
    require_memory(device, need, f"{what} ({batch} image(s) of {width}x{height})", "lower the size or the batch", field=field)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``samples [B, C, H, W]`` resized by PIL's Lanczos filter through 8-bit images (ComfyUI's
    ``lanczos``: 255 × value clipped to [0, 255] and truncated, resized, divided by 255)."""
    out = []
    for image in samples:
        arr = np.clip(255.0 * image.movedim(0, -1).detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
        single = arr.shape[-1] == 1
        pil = PILImage.fromarray(arr[..., 0] if single else arr)
        resized = np.asarray(pil.resize((width, height), resample=PILImage.Resampling.LANCZOS), dtype=np.float32) / 255.0
        if single:
            resized = resized[..., None]
        out.append(torch.from_numpy(resized.copy()).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def resize_pixels(pixels: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Images ``[B, H, W, C]`` resized to ``width × height`` by ``method`` (ComfyUI's
    ``common_upscale``), after a centre crop to that aspect ratio when ``crop`` is ``center``."""
    samples = pixels.movedim(-1, 1)
    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "lanczos":
        resized = _lanczos(samples, width, height)
    elif samples.dtype in (torch.float16, torch.bfloat16):  # every mode runs in float32 on every device
        resized = F.interpolate(samples.float(), size=(height, width), mode=method).to(samples.dtype)
    else:
        resized = F.interpolate(samples, size=(height, width), mode=method)
    return resized.movedim(1, -1)


class ImageScale(Node):
    type = "ImageScale"
    category = "image/upscaling"
    description = (
        "Resize images to a size in pixels (ComfyUI's Upscale Image): 0 for one side keeps the aspect ratio, 0 for both "
        "keeps the size. nearest-exact, bilinear, area and bicubic are torch's interpolate modes; lanczos is PIL's filter "
        "on 8-bit images. crop center trims the longer side to the new aspect ratio first."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="Images to resize")
        upscale_method: ScaleMethod = Field("nearest-exact", description="Interpolation")
        width: int = Field(512, ge=0, le=MAX_RESOLUTION, description="New width in pixels (0: from height and the aspect ratio)")
        height: int = Field(512, ge=0, le=MAX_RESOLUTION, description="New height in pixels (0: from width and the aspect ratio)")
        crop: Literal["disabled", "center"] = Field("disabled", description="center: crop to the new aspect ratio before resizing")

    class Outputs(NodeIO):
        image: Image = Field(description="Resized images")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels, width, height = inputs.image.pixels, inputs.width, inputs.height
        if width == 0 and height == 0:
            return self.Outputs(image=inputs.image)
        old_h, old_w = pixels.shape[1], pixels.shape[2]
        if width == 0:
            width = max(1, round(old_w * height / old_h))
        elif height == 0:
            height = max(1, round(old_h * width / old_w))
        shape = (pixels.shape[0], height, width, pixels.shape[3])
        _require_image_memory(pixels.device, shape, pixels.dtype, "the resized images", "width")
        return self.Outputs(image=Image(resize_pixels(pixels, width, height, inputs.upscale_method, inputs.crop)))


class ImageScaleBy(Node):
    type = "ImageScaleBy"
    category = "image/upscaling"
    description = "Resize images by a factor (ComfyUI's Upscale Image By): each side becomes round(side × scale_by)."

    class Inputs(NodeIO):
        image: Image = Field(description="Images to resize")
        upscale_method: ScaleMethod = Field("nearest-exact", description="Interpolation")
        scale_by: float = Field(1.0, ge=0.01, le=8.0, description="Factor applied to both sides")

    class Outputs(NodeIO):
        image: Image = Field(description="Resized images")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels = inputs.image.pixels
        old_h, old_w = pixels.shape[1], pixels.shape[2]
        width, height = round(old_w * inputs.scale_by), round(old_h * inputs.scale_by)
        if width < 1 or height < 1:
            raise NodeError(f"scale_by {inputs.scale_by:g} shrinks the {old_w}x{old_h} image to nothing", field="scale_by")
        _require_image_memory(
            pixels.device, (pixels.shape[0], height, width, pixels.shape[3]), pixels.dtype, "the resized images", "scale_by"
        )
        return self.Outputs(image=Image(resize_pixels(pixels, width, height, inputs.upscale_method, "disabled")))


class ImageInvert(Node):
    type = "ImageInvert"
    category = "image"
    description = "Invert images (ComfyUI's Invert Image): every channel becomes 1 - value."

    class Inputs(NodeIO):
        image: Image = Field(description="Images to invert")

    class Outputs(NodeIO):
        image: Image = Field(description="1 - image")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(image=Image(1.0 - inputs.image.pixels))


class ImageBatch(Node):
    type = "ImageBatch"
    category = "image"
    description = (
        "Join two batches of images into one (ComfyUI's Batch Images): image2 is resized to image1's size "
        "(bilinear, centre crop) when the sizes differ, and an RGB batch joined to an RGBA one gets an opaque alpha."
    )

    class Inputs(NodeIO):
        image1: Image = Field(description="The first images; they set the size")
        image2: Image = Field(description="Images appended after image1")

    class Outputs(NodeIO):
        image: Image = Field(description="image1 then image2, one batch")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        one, two = inputs.image1.pixels, inputs.image2.pixels
        channels = {one.shape[-1], two.shape[-1]}
        if len(channels) > 1:
            if channels != {3, 4}:
                raise NodeError(
                    f"image1 has {one.shape[-1]} channel(s) and image2 {two.shape[-1]}; only RGB and RGBA images can be joined",
                    field="image2",
                )
            one, two = (F.pad(p, (0, 1), value=1.0) if p.shape[-1] == 3 else p for p in (one, two))
        if one.shape[1:3] != two.shape[1:3]:
            two = resize_pixels(two, one.shape[2], one.shape[1], "bilinear", "center")
        return self.Outputs(image=Image(torch.cat((one, two.to(one.device, one.dtype)))))


class ImageCrop(Node):
    type = "ImageCrop"
    category = "image/transform"
    description = (
        "Cut a rectangle out of images (ComfyUI's Image Crop): width × height pixels from (x, y), clipped at the image's "
        "edges; an x or y past the edge starts at the last column or row."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="Images to crop")
        width: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Width of the rectangle in pixels")
        height: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Height of the rectangle in pixels")
        x: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the rectangle")
        y: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the rectangle")

    class Outputs(NodeIO):
        image: Image = Field(description="The cropped images")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels = inputs.image.pixels
        x, y = min(inputs.x, pixels.shape[2] - 1), min(inputs.y, pixels.shape[1] - 1)
        return self.Outputs(image=Image(pixels[:, y : y + inputs.height, x : x + inputs.width, :]))


class EmptyImage(Node):
    type = "EmptyImage"
    category = "image"
    description = "A batch of RGB images of one colour (ComfyUI's EmptyImage): color is 0xRRGGBB as an integer (0 = black)."

    class Inputs(NodeIO):
        width: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Width in pixels")
        height: int = Field(512, ge=1, le=MAX_RESOLUTION, description="Height in pixels")
        batch_size: int = Field(1, ge=1, le=4096, description="Number of images")
        color: int = Field(0, ge=0, le=MAX_COLOR, description="Colour as 0xRRGGBB (16711680 = red)")

    class Outputs(NodeIO):
        image: Image = Field(description="Images [batch, height, width, 3] filled with the colour")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        shape = (inputs.batch_size, inputs.height, inputs.width, 3)
        _require_image_memory(torch.device("cpu"), shape, torch.float32, "the empty images", "width")
        rgb = torch.tensor([((inputs.color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)], dtype=torch.float32)
        return self.Outputs(image=Image(rgb.expand(shape).clone()))


class ImagePadForOutpaint(Node):
    type = "ImagePadForOutpaint"
    category = "image"
    description = (
        "Add borders to images for outpainting (ComfyUI's Pad Image for Outpainting): the new pixels are grey (0.5) and the "
        "mask is 1 there. With feathering > 0 (and less than half the image's width and height) the mask also rises inside "
        "the image towards each padded side: ((feathering - d) / feathering)² at distance d < feathering from it."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="Images to extend")
        left: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Pixels added on the left")
        top: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Pixels added on top")
        right: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Pixels added on the right")
        bottom: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Pixels added at the bottom")
        feathering: int = Field(40, ge=0, le=MAX_RESOLUTION, description="Width in pixels of the soft mask edge inside the image")

    class Outputs(NodeIO):
        image: Image = Field(description="The padded images")
        mask: Mask = Field(description="[1, height, width]: 1 on the new pixels, feathered into the image")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels = inputs.image.pixels
        batch, h, w, channels = pixels.shape
        left, top, right, bottom, feather = inputs.left, inputs.top, inputs.right, inputs.bottom, inputs.feathering
        new_h, new_w = h + top + bottom, w + left + right
        _require_image_memory(pixels.device, (batch, new_h, new_w, channels), pixels.dtype, "the padded images", "left")
        padded = torch.full((batch, new_h, new_w, channels), 0.5, dtype=pixels.dtype, device=pixels.device)
        padded[:, top : top + h, left : left + w, :] = pixels
        mask = torch.ones((1, new_h, new_w), dtype=torch.float32)
        inside = torch.zeros((h, w), dtype=torch.float32)
        if 0 < feather and 2 * feather < h and 2 * feather < w:
            rows = torch.arange(h, dtype=torch.float64)[:, None]
            cols = torch.arange(w, dtype=torch.float64)[None, :]
            # distance to each padded side (a side that is not padded counts as far away)
            sides = [rows if top else h, h - rows if bottom else h, cols if left else w, w - cols if right else w]
            d = torch.broadcast_to(torch.as_tensor(sides[0], dtype=torch.float64), (h, w))
            for side in sides[1:]:
                d = torch.minimum(d, torch.as_tensor(side, dtype=torch.float64))
            ramp = ((feather - d) / feather) ** 2
            inside = torch.where(d < feather, ramp, torch.zeros_like(ramp)).to(torch.float32)
        mask[0, top : top + h, left : left + w] = inside
        return self.Outputs(image=Image(padded), mask=Mask(mask))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [ImageScale, ImageScaleBy, ImageInvert, ImageBatch, ImageCrop, EmptyImage, ImagePadForOutpaint]
