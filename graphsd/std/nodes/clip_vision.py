"""ComfyUI's CLIP vision classes as graphsd nodes of the same names, inputs and outputs:
CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning and unCLIPCheckpointLoader. A ComfyUI prompt naming them runs as is, and the
``CLIP_VISION`` / ``CLIP_VISION_OUTPUT`` sockets (:class:`ClipVision`, :class:`ClipVisionOutput`)
link to ComfyUI's nodes in the served frontend.

Files are looked up in the models folder's ``clip_vision/`` (``--models-dir``; a name may also be a
path of its own) and read as :mod:`graphsd.std.models.clip_vision` says; each is loaded once per
engine, keyed by the file's fingerprint. Pickle files need ``--allow-pickle``, as everywhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import GraphsdError, NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.std.files import Issues, missing_file
from graphsd.std.models.clip_vision import (
    UNCLIP_KEY,
    ClipVision,
    ClipVisionError,
    ClipVisionOutput,
    NoiseAugmentor,
    Unclip,
    build_clip_vision,
    encode,
    load_clip_vision,
    preprocess,
    vision_tensors,
)
from graphsd.std.models.family import model_info
from graphsd.std.models.formats import WEIGHT_SUFFIXES, read_weights
from graphsd.std.models.loading import load_checkpoint, resolve_model_path
from graphsd.types import Clip, Conditioning, Image, Socket, UNet, Vae

#: The models folder's sub-folder CLIP vision files are looked up in (ComfyUI's).
FOLDER = "clip_vision"
#: What the loaded weights are kept in (ComfyUI runs CLIP vision in float32 on the CPU too).
DTYPE = torch.float32


def find_clip_vision(name: str, models_dir: str | Path) -> Path | None:
    """The file ``name`` refers to: in ``<models>/clip_vision``, then as a path; a name without a
    weight suffix also tries them. Windows separators are accepted."""
    name = name.replace("\\", "/").strip()
    if not name:
        return None
    for base in (Path(models_dir) / FOLDER / name, Path(name)):
        for candidate in (base, *(base.with_name(base.name + s) for s in WEIGHT_SUFFIXES)):
            if candidate.is_file():
                return candidate.resolve()
    return None


def available(models_dir: str | Path) -> list[str]:
    """The weight files in ``<models>/clip_vision``."""
    folder = Path(models_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)


#: What to do about a file that is not found.
HINT = "put the file there or give its path"


def _not_found(name: str, models_dir: str | Path) -> str:
    there = ", ".join(available(models_dir)[:20]) or "none"
    return f"CLIP vision file {name!r} not found in {Path(models_dir) / FOLDER} (there: {there}), nor as a path"


class CLIPVisionLoader(Node):
    type = "CLIPVisionLoader"
    category = "loaders"
    description = (
        "Load a CLIP vision encoder (ComfyUI's CLIPVisionLoader) from <models>/clip_vision: transformers' "
        "CLIPVisionModelWithProjection layout (as ComfyUI, IP-Adapter and SD-unCLIP image encoders come) or OpenCLIP's "
        "(visual.*). ViT-L/14, ViT-H/14, ViT-bigG/14 and smaller ones; the architecture is read from the file."
    )

    class Inputs(NodeIO):
        clip_name: str = Field(description="CLIP vision file: a name in <models>/clip_vision, or a path")

    class Outputs(NodeIO):
        clip_vision: ClipVision = Field(description="The CLIP vision encoder")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        name = literals.get("clip_name")
        path = find_clip_vision(name, ctx.models_dir) if isinstance(name, str) else None
        return file_fingerprint(path) if path is not None else "missing"

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"clip_name": available(models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        models = settings.models_dir
        return missing_file(literals, "clip_name", lambda n: find_clip_vision(n, models), lambda n: _not_found(n, models), HINT)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = find_clip_vision(inputs.clip_name, ctx.models_dir)
        if path is None:
            raise NodeError(f"{_not_found(inputs.clip_name, ctx.models_dir)}; {HINT}", field="clip_name")
        path = ctx.readable(path, "clip_name")
        allow_pickle = bool(ctx.settings.allow_pickle)
        try:
            key = ctx.models.load(
                f"{file_fingerprint(path)}:clip_vision:fp32", lambda: load_clip_vision(path, DTYPE, allow_pickle, "clip_name")
            )
        except NodeError:
            raise
        except GraphsdError as exc:
            raise NodeError(str(exc), field="clip_name") from None
        return self.Outputs(clip_vision=ClipVision(ctx.models, {"clip_vision": key}))


class CLIPVisionEncode(Node):
    type = "CLIPVisionEncode"
    category = "conditioning"
    description = (
        "Encode images with a CLIP vision encoder (ComfyUI's CLIPVisionEncode), preprocessed as ComfyUI does: the shortest "
        "side resized to the encoder's size (224, bicubic, antialiased) and the centre cut out (crop center) or the whole "
        "picture squeezed to the square (crop none), 8-bit levels, CLIP's mean and std. Gives the image embedding "
        "(unCLIPConditioning) and the last two layers' hidden states."
    )

    class Inputs(NodeIO):
        clip_vision: ClipVision = Field(description="The CLIP vision encoder (CLIPVisionLoader, unCLIPCheckpointLoader)")
        image: Image = Field(description="The images to encode (a batch gives one embedding per image)")
        crop: Literal["center", "none"] = Field(
            "center", description="center: keep the centre square of the picture; none: squeeze the whole picture into the square"
        )

    class Outputs(NodeIO):
        clip_vision_output: ClipVisionOutput = Field(description="The image embeddings and hidden states")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        with ctx.models.use(inputs.clip_vision, "clip_vision") as model:
            pixels = preprocess(inputs.image.pixels, int(model.config.image_size), inputs.crop == "center")
            with torch.inference_mode():
                out = encode(model, pixels)
        return self.Outputs(clip_vision_output=out)


class unCLIPConditioning(Node):  # noqa: N801 (ComfyUI's class name)
    type = "unCLIPConditioning"
    category = "conditioning"
    description = (
        "Add an image's CLIP embedding to a conditioning (ComfyUI's unCLIPConditioning), for unCLIP models (SD2.1-unCLIP), "
        "whose U-Net takes it noise-augmented as its class embedding. Several applications (or a batch of images) add up; "
        "other models ignore it, as in ComfyUI."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning to add the image to (usually the positive prompt)")
        clip_vision_output: ClipVisionOutput = Field(description="The image's encoding (CLIPVisionEncode)")
        strength: float = Field(1.0, ge=-10.0, le=10.0, description="Weight of the image embedding (0 = not applied)")
        noise_augmentation: float = Field(
            0.0,
            ge=0.0,
            le=1.0,
            description="How much noise is added to the embedding (0..1 of the 1000 levels): higher keeps less of the image",
        )

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with the image embedding")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        if inputs.strength == 0:
            return self.Outputs(conditioning=inputs.conditioning)
        added = Unclip(inputs.clip_vision_output, float(inputs.strength), float(inputs.noise_augmentation))
        entries = [
            replace(e, extras={**e.extras, UNCLIP_KEY: (*e.extras.get(UNCLIP_KEY, ()), added)}) for e in inputs.conditioning.entries()
        ]
        return self.Outputs(conditioning=Conditioning.of_entries(entries))


#: Where an SD2.1-unCLIP single file keeps its image encoder, and its noise augmentation's statistics.
UNCLIP_VISION_PREFIX = "embedder.model.visual."
UNCLIP_STATS = ("noise_augmentor.data_mean", "noise_augmentor.data_std")


def load_unclip_parts(path: Path, allow_pickle: bool, width: int) -> tuple[torch.nn.Module, NoiseAugmentor]:
    """The CLIP vision encoder an SD2.1-unCLIP single file holds (``embedder.model.visual.*``,
    OpenCLIP's layout) and its noise augmentation for ``width``-wide image embeddings: the
    file's ``noise_augmentor.data_mean`` / ``data_std`` where it has them, else mean 0 and std 1
    (what the released checkpoints' configs and ComfyUI use: those statistics are not saved)."""
    tensors, _ = read_weights(path, allow_pickle, ClipVisionError, "ckpt_name")
    if f"{UNCLIP_VISION_PREFIX}conv1.weight" not in tensors:
        raise ClipVisionError(
            f"'{path.name}' is not an unCLIP checkpoint: it holds no image encoder ({UNCLIP_VISION_PREFIX}*); "
            "load it with CheckpointLoaderSimple, or pick an SD2.1-unCLIP checkpoint",
            field="ckpt_name",
        )
    vision = vision_tensors({k: v for k, v in tensors.items() if k.startswith(UNCLIP_VISION_PREFIX)}, path.name, "ckpt_name")
    model = build_clip_vision(vision, path.name, DTYPE, "ckpt_name")
    mean, std = (tensors.get(k) for k in UNCLIP_STATS)
    augmentor = NoiseAugmentor(
        mean=torch.zeros(width) if mean is None else mean.float().reshape(-1),
        std=torch.ones(width) if std is None else std.float().reshape(-1),
    )
    if augmentor.mean.shape != (width,) or augmentor.std.shape != (width,):
        raise ClipVisionError(
            f"'{path.name}' has noise-augmentation statistics of {augmentor.mean.numel()} numbers but its U-Net takes "
            f"{width}-wide image embeddings; the file is inconsistent",
            field="ckpt_name",
        )
    return model, augmentor


_SINGLE_FILES = "unCLIPCheckpointLoader reads SD2.1-unCLIP single files (.safetensors)"


class unCLIPCheckpointLoader(Node):  # noqa: N801 (ComfyUI's class name)
    type = "unCLIPCheckpointLoader"
    category = "loaders"
    description = (
        "Load an SD2.1-unCLIP single-file checkpoint (ComfyUI's unCLIPCheckpointLoader): the U-Net, which takes the "
        "image embedding of unCLIPConditioning noise-augmented as its class labels, the text encoder, the VAE and the "
        "image encoder the checkpoint holds (embedder.model.visual.*), for CLIPVisionEncode."
    )

    class Inputs(NodeIO):
        ckpt_name: str = Field(description="The checkpoint: a name in <models>/checkpoints or <models>, or a path")

    class Outputs(NodeIO):
        model: UNet = Field(description="The U-Net, with the checkpoint's noise augmentation of image embeddings")
        clip: Clip = Field(description="The text encoder")
        vae: Vae = Field(description="The VAE")
        clip_vision: ClipVision = Field(description="The checkpoint's CLIP vision encoder")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        name = literals.get("ckpt_name")
        if not isinstance(name, str):
            return ""
        try:
            return file_fingerprint(resolve_model_path(name, ctx.models_dir))
        except GraphsdError:
            return "missing"

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        name = literals.get("ckpt_name")
        if not isinstance(name, str):
            return []
        try:
            path = resolve_model_path(name, settings.models_dir)
        except GraphsdError as exc:
            return [("ckpt_name", str(exc), None)]
        if path.is_dir():
            return [("ckpt_name", f"{path} is a diffusers folder; {_SINGLE_FILES}", "name an SD2.1-unCLIP checkpoint file")]
        return []

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        allow_pickle = bool(ctx.settings.allow_pickle)
        try:
            path = ctx.readable(resolve_model_path(inputs.ckpt_name, ctx.models_dir), "ckpt_name")
            if path.is_dir():
                raise NodeError(
                    f"{path} is a diffusers folder; {_SINGLE_FILES}",
                    field="ckpt_name",
                )
            loaded = load_checkpoint(ctx.models, path, "fp32", allow_pickle=allow_pickle)
            info = model_info(loaded.unet, "ckpt_name")
            if not info.class_labels_width:
                raise NodeError(
                    f"'{path.name}' is not an unCLIP checkpoint: its U-Net takes no image embedding (no label_emb); "
                    "load it with CheckpointLoaderSimple",
                    field="ckpt_name",
                )
            width = info.class_labels_width // 2
            fingerprint = file_fingerprint(path)
            parts: list[tuple[torch.nn.Module, NoiseAugmentor]] = []

            def read() -> tuple[torch.nn.Module, NoiseAugmentor]:
                if not parts:
                    parts.append(load_unclip_parts(path, allow_pickle, width))
                return parts[0]

            vision_key = ctx.models.load(f"{fingerprint}:unclip_clip_vision:fp32", lambda: read()[0])
            augmentor = ctx.models.get(ctx.models.load(f"{fingerprint}:unclip_noise_augmentor", lambda: read()[1]))
        except NodeError:
            raise
        except GraphsdError as exc:
            raise NodeError(str(exc), field="ckpt_name") from None
        unet = replace(loaded.unet, info=replace(info, noise_augmentor=augmentor))
        return self.Outputs(model=unet, clip=loaded.clip, vae=loaded.vae, clip_vision=ClipVision(ctx.models, {"clip_vision": vision_key}))


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return [ClipVision, ClipVisionOutput]


@hookimpl
def graphsd_comfy_types() -> dict[str, str]:
    return {"ClipVision": "CLIP_VISION", "ClipVisionOutput": "CLIP_VISION_OUTPUT"}


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning, unCLIPCheckpointLoader]
