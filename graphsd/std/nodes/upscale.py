"""ComfyUI's model upscaling: UpscaleModelLoader and ImageUpscaleWithModel, with ComfyUI's class
names, input names and outputs, for the ESRGAN family (ESRGAN, Real-ESRGAN, Real-ESRGAN Compact:
see :mod:`graphsd.std.models.upscalers`).

ComfyUI loads these models with the ``spandrel`` library; graphsd builds the same networks itself
(spandrel needs torchvision, which graphsd does not install), with the same results.

The model's socket type is :class:`UpscaleModel` (ComfyUI's ``UPSCALE_MODEL``): a handle on the
network the ModelManager holds, so it is loaded once per engine and placed on the compute device
only while ImageUpscaleWithModel runs. Files are found in ``<models>/upscale_models`` (ComfyUI's
folder), then as a path; ``.pth`` files are pickles and need ``--allow-pickle``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import GraphsdError, NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.resources import require_memory
from graphsd.std.models.formats import WEIGHT_SUFFIXES
from graphsd.std.models.upscalers import MIN_TILE, OVERLAP, TILE, load_upscaler, upscale_tiled
from graphsd.types import Image, ModelRef, Socket

FOLDER = "upscale_models"
SUFFIXES = (*WEIGHT_SUFFIXES, ".pth")


@dataclass(frozen=True)
class UpscaleInfo:
    """What an upscaling model does: its architecture's name, its scale and its input channels."""

    architecture: str
    scale: int
    channels: int


class UpscaleModel(ModelRef):
    """An image upscaling network held by the ModelManager (role ``upscaler``); ``info`` is an
    :class:`UpscaleInfo`."""


def find_upscaler(name: str, models_dir: str | Path) -> Path | None:
    """The file ``name`` refers to: in ``<models>/upscale_models``, then as a path; a name
    without a suffix also tries the weight suffixes."""
    name = name.replace("\\", "/").strip()
    if not name:
        return None
    for base in (Path(models_dir) / FOLDER / name, Path(name)):
        for candidate in (base, *(base.with_name(base.name + s) for s in SUFFIXES)):
            if candidate.is_file():
                return candidate.resolve()
    return None


def upscaler_names(models_dir: str | Path) -> list[str]:
    folder = Path(models_dir) / FOLDER
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []


def _not_found(name: str, models_dir: str | Path) -> str:
    there = ", ".join(upscaler_names(models_dir)[:20]) or "none"
    return f"{name!r} not found in {Path(models_dir) / FOLDER} (there: {there}), nor as a path"


class UpscaleModelLoader(Node):
    type = "UpscaleModelLoader"
    category = "loaders"
    description = (
        "Load an image upscaling model (ComfyUI's UpscaleModelLoader): ESRGAN (4x-UltraSharp, Remacri, ...), Real-ESRGAN "
        "(x4plus, anime 6B, x2plus) or Real-ESRGAN Compact (realesr-general-x4v3) from <models>/upscale_models; "
        "other architectures (SwinIR, DAT, HAT, ...) are refused."
    )

    class Inputs(NodeIO):
        model_name: str = Field(description="Model file: a name in <models>/upscale_models, or a path (.pth needs --allow-pickle)")

    class Outputs(NodeIO):
        upscale_model: UpscaleModel = Field(description="The upscaling model")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        name = literals.get("model_name")
        path = find_upscaler(name, ctx.models_dir) if isinstance(name, str) else None
        return file_fingerprint(path) if path is not None else "missing"

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"model_name": upscaler_names(models_dir)}

    @classmethod
    def check_context(
        cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings
    ) -> list[tuple[str, str, str | None]]:
        """A model file that is not there is refused at validation, as ComfyUI refuses a name
        missing from its list."""
        name = literals.get("model_name")
        if isinstance(name, str) and find_upscaler(name, settings.models_dir) is None:
            return [("model_name", _not_found(name, settings.models_dir), "put the file there or give its path")]
        return []

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = find_upscaler(inputs.model_name, ctx.models_dir)
        if path is None:
            raise NodeError(f"{_not_found(inputs.model_name, ctx.models_dir)}; put the file there or give its path", field="model_name")
        path = ctx.readable(path, "model_name")
        allow_pickle = bool(ctx.settings.allow_pickle)
        try:
            key = ctx.models.load(f"{file_fingerprint(path)}:upscaler", lambda: load_upscaler(path, allow_pickle))
        except GraphsdError as exc:
            raise NodeError(str(exc), field="model_name") from None
        net = ctx.models.get(key)
        info = UpscaleInfo(type(net).__name__, int(net.scale), int(net.channels))
        ctx.progress(1, 1, architecture=info.architecture, scale=info.scale)
        return self.Outputs(upscale_model=UpscaleModel(ctx.models, {"upscaler": key}, info))


class ImageUpscaleWithModel(Node):
    type = "ImageUpscaleWithModel"
    category = "image/upscaling"
    description = (
        "Upscale images with an upscaling model (ComfyUI's ImageUpscaleWithModel): images larger than 512 pixels go "
        "through in 512-pixel tiles overlapping by 32, blended as ComfyUI blends them (smaller tiles after running out "
        "of GPU memory); the result is clamped to [0, 1]."
    )

    class Inputs(NodeIO):
        upscale_model: UpscaleModel = Field(description="The upscaling model (from UpscaleModelLoader)")
        image: Image = Field(description="Images to upscale (RGB; alpha is dropped, grey is repeated)")

    class Outputs(NodeIO):
        image: Image = Field(description="The upscaled images, scale × the size")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        info = inputs.upscale_model.info
        if not isinstance(info, UpscaleInfo):
            raise NodeError("this handle is not an upscaling model; connect an UpscaleModelLoader", field="upscale_model")
        pixels = inputs.image.pixels
        if info.channels != 3:
            raise NodeError(f"this model takes {info.channels}-channel images; graphsd runs RGB upscalers", field="upscale_model")
        if pixels.shape[-1] == 1:
            pixels = pixels.expand(-1, -1, -1, 3)
        batch, height, width = pixels.shape[:3]
        out_bytes = 2 * 4 * batch * 3 * height * width * info.scale**2  # the result and the blending weights
        require_memory(
            ctx.device, out_bytes, f"upscaling {batch} image(s) of {width}x{height} ×{info.scale}", "use a smaller image", "image"
        )
        tile = TILE
        with ctx.models.use(inputs.upscale_model, "upscaler") as net, torch.no_grad():
            x = pixels[..., :3].permute(0, 3, 1, 2).to(ctx.device, torch.float32)
            while True:
                try:
                    out = upscale_tiled(net, x, info.scale, tile, OVERLAP, ctx.progress)
                    break
                except torch.OutOfMemoryError:
                    if tile // 2 < MIN_TILE:
                        raise
                    tile //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        return self.Outputs(image=Image(out.clamp(0, 1).permute(0, 2, 3, 1).cpu()))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [UpscaleModelLoader, ImageUpscaleWithModel]


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return [UpscaleModel]


@hookimpl
def graphsd_comfy_types() -> dict[str, str]:
    return {"UpscaleModel": "UPSCALE_MODEL"}
