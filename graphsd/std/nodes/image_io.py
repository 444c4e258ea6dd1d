"""LoadImage and SaveImage."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import PngImagePlugin, UnidentifiedImageError
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint, safe_output_path, write_numbered
from graphsd.std.files import Issues, first_file, missing_file
from graphsd.types import Image, Mask
from graphsd.workflow import PNG_WORKFLOW_KEY

T = TypeVar("T")


def pil_to_image(im: PILImage.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL image -> (pixels [1,H,W,3] in [0,1], mask [1,H,W]: 1 where transparent)."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(rgba[..., :3].copy()).unsqueeze(0)
    mask = 1.0 - torch.from_numpy(rgba[..., 3].copy()).unsqueeze(0)
    return pixels, mask


def image_to_pil(pixels: torch.Tensor) -> PILImage.Image:
    """One image [H,W,C] in [0,1] -> 8-bit PIL image (rounded, clamped)."""
    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    return PILImage.fromarray(arr)


class LoadImage(Node):
    type = "LoadImage"
    category = "image"
    description = "Read an image file (PNG, JPEG, WebP, ...) as an RGB image and its alpha as a mask."

    class Inputs(NodeIO):
        path: str = Field(description="Image file to read (absolute, or relative to the working directory)")

    class Outputs(NodeIO):
        image: Image = Field(description="RGB pixels in [0, 1]")
        mask: Mask = Field(description="1 where the image is transparent, 0 where opaque")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return file_fingerprint(literals.get("path", ""))

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        """A file that is not there is refused at validation (a ComfyUI prompt's names, annotated
        ones included, arrive here as paths in the folder they name)."""
        return missing_file(literals, "path", lambda n: first_file([Path(n)]), lambda n: missing_image(Path(n)), HINT)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels, mask = read_image_file(Path(inputs.path), ctx, "path", pil_to_image)
        return self.Outputs(image=Image(pixels), mask=Mask(mask))


#: What to do about an image file that is not there.
HINT = "put the picture in the input folder (--input-dir) or give its path"


def missing_image(path: Path) -> str:
    """That ``path`` does not exist, and the files of its folder (when it is one)."""
    folder = path.parent
    there = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return f"image file '{path}' does not exist ({folder} has {', '.join(there[:20]) or 'no files'})"


def read_image_file(path: Path, ctx: Context, field: str, convert: Callable[[PILImage.Image], T]) -> T:
    """``convert`` applied to the image file at ``path``, after checking that the workflow may
    read it (``ctx.readable``), that it exists, and, from its header, that it is within
    ``settings.max_image_pixels``; every failure is a NodeError on ``field``."""
    ctx.readable(path, field)
    if not path.is_file():
        raise NodeError(missing_image(path), field=field)
    limit = ctx.settings.max_image_pixels
    too_large = (
        f"is larger than the limit of {limit / 1e6:g} megapixels (settings.max_image_pixels, "
        "--max-image-megapixels); raise the limit if you trust the file and have the memory"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:  # reads the header only
                width, height = im.size
                if width * height > limit:
                    raise NodeError(f"'{path}' is {width}x{height} pixels and {too_large}", field=field)
                return convert(im)
    except PILImage.DecompressionBombError:
        raise NodeError(f"'{path}' {too_large}", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NodeError(f"'{path}' is not a readable image ({exc})", field=field) from None


class SaveImage(Node):
    type = "SaveImage"
    category = "image"
    description = (
        "Write each image of a batch as a PNG into the output directory, numbered "
        "<prefix>_00001.png, ... (or as ComfyUI names them: <prefix>_00001_.png) without overwriting, "
        "with the workflow embedded as PNG text (so `graphsd run image.png` runs it again). Writes are atomic."
    )
    output_node = True

    class Inputs(NodeIO):
        image: Image = Field(description="Images to save")
        prefix: str = Field(
            "graphsd",
            min_length=1,
            description="File name prefix; may name a sub-folder ('portraits/face'); must stay inside the output directory",
        )
        embed_workflow: bool = Field(True, description="Embed the workflow (with its params) as PNG text metadata")
        naming: Literal["graphsd", "comfyui"] = Field(
            "graphsd",
            description="graphsd: <prefix>_00001.png, ...; comfyui: <prefix>_00001_.png as ComfyUI's SaveImage names them (what "
            "its clients expect; a ComfyUI prompt imports with it), the number following the highest <prefix>_NNNNN_.png "
            "there, and %batch_num%, %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second% in the prefix "
            "replaced as ComfyUI replaces them",
        )

    class Outputs(NodeIO):
        paths: list[str] = Field(description="Paths of the written files")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        comfyui = inputs.naming == "comfyui"
        prefix = inputs.prefix
        if comfyui:
            _, height, width, _ = inputs.image.pixels.shape
            prefix = comfy_prefix(prefix, width, height)
        info = PngImagePlugin.PngInfo()
        if inputs.embed_workflow:
            info.add_text(PNG_WORKFLOW_KEY, json.dumps(ctx.workflow, sort_keys=True))
        paths = []
        for index, pixels in enumerate(inputs.image.pixels):
            ctx.check_interrupted()
            target = safe_output_path(ctx.output_dir, prefix.replace("%batch_num%", str(index)) if comfyui else prefix, field="prefix")
            pil = image_to_pil(pixels)
            suffix = "_.png" if comfyui else ".png"
            try:
                # ComfyUI numbers a batch on from one counter, so %batch_num% names go 00001, 00002, ...
                start = index + 1 if comfyui else 1
                path = write_numbered(
                    target.parent, target.name, suffix, lambda tmp, pil=pil: pil.save(tmp, format="PNG", pnginfo=info), start
                )
            except OSError as exc:
                raise NodeError(f"cannot write into {target.parent}: {exc.strerror or exc}", field="prefix") from None
            ctx.wrote_file(path)
            paths.append(str(path))
        return self.Outputs(paths=paths)


def comfy_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """A file name prefix with the variables ComfyUI's SaveImage replaces: ``%width%`` and
    ``%height%`` of the images, and the local date and time (``%year%``, ``%month%``, ``%day%``,
    ``%hour%``, ``%minute%``, ``%second%``, zero-padded to two digits but the year)."""
    now = now or time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year}
    values |= {
        name: f"{value:02d}"
        for name, value in (
            ("month", now.tm_mon),
            ("day", now.tm_mday),
            ("hour", now.tm_hour),
            ("minute", now.tm_min),
            ("second", now.tm_sec),
        )
    }
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [LoadImage, SaveImage]
