"""Nodes with the semantics of ComfyUI core nodes that SD workflows use and graphsd had no node
for: PreviewImage, LatentUpscale and LatentUpscaleBy. The ComfyUI import
(:mod:`graphsd.std.comfy`) maps the ComfyUI classes of the same names onto them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL import PngImagePlugin
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.paths import write_numbered
from graphsd.std.nodes.image_io import image_to_pil
from graphsd.types import Image, Latent
from graphsd.workflow import PNG_WORKFLOW_KEY

PREVIEW_FOLDER = "temp"
"""Sub-folder of the output directory PreviewImage writes into (ComfyUI's temporary folder)."""

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
"""ComfyUI's latent upscale methods graphsd runs: each is ``torch.nn.functional.interpolate``'s
mode of the same name (ComfyUI's ``bislerp`` is not supported)."""

MAX_LATENT_PIXELS = 16384
"""ComfyUI's MAX_RESOLUTION: the largest width or height, in pixels, a latent is scaled to."""


class PreviewImage(Node):
    type = "PreviewImage"
    category = "image"
    description = (
        "Show images without keeping them: each image of the batch is written as a PNG into the output "
        "directory's temp/ folder (preview_00001.png, ...), as ComfyUI's PreviewImage writes into its temporary "
        "folder; graphsd serve reports them like saved images (type output, subfolder temp). Nothing deletes "
        "them: empty temp/ when you like. Writes are atomic."
    )
    output_node = True

    class Inputs(NodeIO):
        image: Image = Field(description="Images to show")

    class Outputs(NodeIO):
        paths: list[str] = Field(description="Paths of the written files")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        folder = ctx.output_dir / PREVIEW_FOLDER
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_WORKFLOW_KEY, json.dumps(ctx.workflow, sort_keys=True))
        paths = []
        for pixels in inputs.image.pixels:
            ctx.check_interrupted()
            pil = image_to_pil(pixels)

            def write(tmp: Path, pil: PILImage.Image = pil) -> None:
                pil.save(tmp, format="PNG", pnginfo=info, compress_level=1)  # fast, as ComfyUI's previews

            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = write_numbered(folder, "preview", ".png", write)
            except OSError as exc:
                raise NodeError(f"cannot write into {folder}: {exc.strerror or exc}", field="image") from None
            ctx.wrote_file(path)
            paths.append(str(path))
        return self.Outputs(paths=paths)


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The centred part of ``samples [..., H, W]`` with the aspect ratio of ``width × height``
    (ComfyUI's ``crop: center``): the longer side is trimmed equally on both ends."""
    old_h, old_w = samples.shape[-2], samples.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples[..., y : old_h - y, x : old_w - x]


def resize_latent(latent: Latent, width: int, height: int, method: str, crop: str) -> Latent:
    """``latent`` resized to ``width × height`` latent pixels by ``method`` (after a centre crop to
    that aspect ratio when ``crop`` is ``center``); a noise mask is resized the same way
    (bilinear), so that it keeps covering the same part of the picture."""
    samples = latent.samples
    if crop == "center":
        samples = center_crop(samples, width, height)
    resized = _interpolate(samples, height, width, method)
    mask = latent.noise_mask
    if mask is not None:
        if crop == "center":
            mask = center_crop(mask, width, height)
        mask = _interpolate(mask, height, width, "bilinear")
    return Latent(samples=resized, noise_mask=mask)


def _interpolate(x: torch.Tensor, height: int, width: int, method: str) -> torch.Tensor:
    """``interpolate`` in the tensor's precision (half precisions go through float32, which every
    mode supports on every device)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(x.float(), size=(height, width), mode=method).to(x.dtype)
    return F.interpolate(x, size=(height, width), mode=method)


class LatentUpscale(Node):
    type = "LatentUpscale"
    category = "latent"
    description = (
        "Resize latents to a size in pixels (ComfyUI's Upscale Latent): width and height are divided by 8 "
        "(the VAE's factor); 0 for one of them keeps the aspect ratio, 0 for both keeps the size. Methods are "
        "torch's interpolate modes; crop center trims the latent to the new aspect ratio first."
    )

    class Inputs(NodeIO):
        latent: Latent = Field(description="Latents to resize")
        method: Literal["nearest-exact", "bilinear", "area", "bicubic"] = Field("nearest-exact", description="Interpolation")
        width: int = Field(512, ge=0, le=MAX_LATENT_PIXELS, description="New width in pixels (0: from height and the aspect ratio)")
        height: int = Field(512, ge=0, le=MAX_LATENT_PIXELS, description="New height in pixels (0: from width and the aspect ratio)")
        crop: Literal["disabled", "center"] = Field("disabled", description="center: crop to the new aspect ratio before resizing")

    class Outputs(NodeIO):
        latent: Latent = Field(description="Resized latents")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        latent, width, height = inputs.latent, inputs.width, inputs.height
        if width == 0 and height == 0:
            return self.Outputs(latent=latent)
        old_h, old_w = latent.samples.shape[-2:]
        if width == 0:
            height = max(64, height)
            width = max(64, round(old_w * height / old_h))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(old_h * width / old_w))
        else:
            width, height = max(64, width), max(64, height)
        return self.Outputs(latent=resize_latent(latent, width // 8, height // 8, inputs.method, inputs.crop))


class LatentUpscaleBy(Node):
    type = "LatentUpscaleBy"
    category = "latent"
    description = "Resize latents by a factor (ComfyUI's Upscale Latent By): each side becomes round(side × scale_by)."

    class Inputs(NodeIO):
        latent: Latent = Field(description="Latents to resize")
        method: Literal["nearest-exact", "bilinear", "area", "bicubic"] = Field("nearest-exact", description="Interpolation")
        scale_by: float = Field(1.5, ge=0.01, le=8.0, description="Factor applied to both sides")

    class Outputs(NodeIO):
        latent: Latent = Field(description="Resized latents")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        old_h, old_w = inputs.latent.samples.shape[-2:]
        width, height = round(old_w * inputs.scale_by), round(old_h * inputs.scale_by)
        if width < 1 or height < 1:
            raise NodeError(f"scale_by {inputs.scale_by:g} shrinks the {old_w}×{old_h} latent to nothing", field="scale_by")
        return self.Outputs(latent=resize_latent(inputs.latent, width, height, inputs.method, "disabled"))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [PreviewImage, LatentUpscale, LatentUpscaleBy]
