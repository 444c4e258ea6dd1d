"""ComfyUI's SDXL text encoders as graphsd nodes of the same names and inputs: CLIPTextEncodeSDXL and
CLIPTextEncodeSDXLRefiner (``comfy_extras/nodes_clip_sdxl.py``).

SDXL's U-Nets take, beside the text, a few numbers (Podell et al. 2023, section 2.2): the base
model the original size, the crop's top-left corner and the target size, each (height, width) in
pixels; the refiner the original size, the crop and an aesthetic score. These nodes put them into
the conditioning's ``extras`` (``original_size``, ``crop_top_left``, ``target_size``,
``aesthetic_score``), which the denoise loop turns into the U-Net's ``time_ids`` in place of its
defaults (the latent's size, no crop, the loop's aesthetic scores); diffusers' pipelines take the
same numbers as ``original_size``, ``crops_coords_top_left``, ``target_size`` and
``aesthetic_score``.

CLIPTextEncodeSDXL encodes ``text_l`` with the first text encoder (CLIP ViT-L) and ``text_g``
with the second (OpenCLIP ViT-bigG), each as TextEncode does (weights, BREAK, long prompts,
embeddings), and puts the two side by side; when one text needs more 77-token chunks than the
other, the shorter is extended with chunks of the empty prompt, as ComfyUI does. The pooled
embedding comes from ``text_g``. It equals diffusers' ``encode_prompt(prompt=text_l,
prompt_2=text_g)``. A clip with fewer text encoders (SD1.x, SD2.x, the SDXL refiner) is refused
when the workflow is validated, where the loader it comes from tells (a checkpoint's
``model_index.json`` or tensor names, CLIPLoader's single encoder), and otherwise when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open

from graphsd.context import Context, Settings
from graphsd.errors import GraphsdError, NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream, socket_class
from graphsd.std.models.family import model_info
from graphsd.std.models.loading import resolve_model_path
from graphsd.std.models.single_file import TEXT_PREFIXES
from graphsd.std.nodes.comfy_core import MAX_LATENT_PIXELS as MAX_RESOLUTION
from graphsd.std.nodes.text import TextEncode, _vectors_for, load_prompt_embedding, prompt_embeddings
from graphsd.std.text.encode import encode_prompt
from graphsd.types import Clip, Conditioning

SDXL_SIZE = 1024


def _fingerprint(text: Any, field: str, ctx: Context) -> str:
    """TextEncode's cache identity of one prompt (the embedding files it names), with a missing
    embedding reported on ``field``."""
    try:
        return TextEncode.fingerprint({"text": text}, ctx)
    except NodeError as exc:
        raise NodeError(str(exc), field=field) from None


def _encode_with(ctx: Context, clip: Clip, role: str, text: str, field: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``text`` through one of an SDXL clip's text encoders, as TextEncode encodes it for SDXL
    (penultimate layer, no final norm): ``(embeddings [1, 77·chunks, width], pooled)``."""
    tokenizer = model_info(clip, "clip").tokenizers.get(role)
    if tokenizer is None:
        raise NodeError("this clip has no tokenizer for its text encoders; load it with a checkpoint loader", field="clip")
    try:
        files, bare = prompt_embeddings(text, ctx)
        loaded = {ref: load_prompt_embedding(path, ctx) for ref, path in files.items()}
        with ctx.models.use(clip, role) as encoder:
            vectors, unfit = _vectors_for(loaded, [role], [encoder], True)
            return encode_prompt(text, [(tokenizer, encoder)], 1, True, vectors, [n for n in bare if n not in unfit])
    except NodeError as exc:
        raise NodeError(str(exc), field=field) from None


def _finite(cond: Conditioning, field: str) -> Conditioning:
    if not torch.isfinite(cond.embeddings).all():
        raise NodeError("the embeddings hold NaN or infinite values: check the prompt's weights and the clip's patches", field=field)
    return cond


def clip_loader(upstream: Upstream | None) -> Upstream | None:
    """The node a clip comes from, followed back through nodes that pass one clip on (LoRAs and
    other patches): the first without a linked clip input; None for a merge of several clips."""
    while upstream is not None:
        fields = upstream.cls.Inputs.model_fields
        clips = [u for name, u in upstream.inputs.items() if socket_class(fields[name].annotation) is Clip]
        if not clips:
            return upstream
        if len(clips) > 1:
            return None
        upstream = clips[0]
    return None


def checkpoint_text_encoders(path: Path) -> int | None:
    """How many text encoders the checkpoint at ``path`` holds, read without loading it: the
    components a diffusers folder's ``model_index.json`` names, or the text-encoder prefixes of a
    ``.safetensors`` file's tensor names (its header only); None when that cannot be told (a
    pickle, an unreadable file)."""
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text())
            return sum(1 for role in ("text_encoder", "text_encoder_2") if isinstance(index.get(role), list) and index[role][:1] != [None])
        if path.suffix.lower() != ".safetensors":
            return None
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except (OSError, ValueError, SafetensorError):
        return None
    prefixes = {*TEXT_PREFIXES.values(), "conditioner.embedders.0.model."}  # the last: a refiner's OpenCLIP encoder
    return sum(1 for prefix in prefixes if any(k.startswith(prefix) for k in keys)) or None


def loader_text_encoders(loader: Upstream, settings: Settings) -> int | None:
    """How many text encoders the clip of a loader node holds, when validation can tell."""
    if loader.cls.type == "CLIPLoader":
        return 1
    if loader.cls.type == "DualCLIPLoader":
        return 2
    name = loader.literals.get("path")
    if loader.cls.type != "CheckpointLoader" or not isinstance(name, str):
        return None
    try:
        return checkpoint_text_encoders(resolve_model_path(name, settings.models_dir))
    except GraphsdError:  # not found: CheckpointLoader says so
        return None


class CLIPTextEncodeSDXL(Node):
    type = "CLIPTextEncodeSDXL"
    category = "advanced/conditioning"
    description = (
        "Encode a prompt for SDXL's base model with its size conditioning (ComfyUI's CLIPTextEncodeSDXL): text_l goes "
        "through the first text encoder, text_g through the second (which also gives the pooled embedding), and the U-Net "
        "is told the original size, the crop's top-left corner and the target size, in pixels."
    )

    class Inputs(NodeIO):
        clip: Clip = Field(description="An SDXL base model's clip (both text encoders)")
        width: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Original width the U-Net is told, in pixels")
        height: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Original height the U-Net is told, in pixels")
        crop_w: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the crop the U-Net is told, in pixels")
        crop_h: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the crop the U-Net is told, in pixels")
        target_width: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Target width the U-Net is told, in pixels")
        target_height: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Target height the U-Net is told, in pixels")
        text_g: str = Field(description="Prompt for the second text encoder (OpenCLIP ViT-bigG); TextEncode's syntax")
        text_l: str = Field(description="Prompt for the first text encoder (CLIP ViT-L); TextEncode's syntax")

    class Outputs(NodeIO):
        cond: Conditioning = Field(description="Embeddings [1, 77·chunks, width of both encoders], pooled, and the size conditioning")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The embedding files both prompts name (see TextEncode)."""
        return "|".join(_fingerprint(literals.get(name), name, ctx) for name in ("text_g", "text_l"))

    @classmethod
    def check_context(
        cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings
    ) -> list[tuple[str, str, str | None]]:
        """A clip whose loader has fewer than SDXL base's two text encoders is refused before
        anything runs (ComfyUI fails on it when it runs)."""
        loader = clip_loader(upstream.get("clip"))
        count = loader_text_encoders(loader, settings) if loader is not None else None
        if loader is None or count is None or count >= 2:
            return []
        return [
            (
                "clip",
                f"CLIPTextEncodeSDXL needs the clip of an SDXL base model (two text encoders), but this clip comes from "
                f"node '{loader.node_id}' ({loader.cls.type}), whose model has one text encoder",
                "use CLIPTextEncode (TextEncode) for SD1.x / SD2.x, CLIPTextEncodeSDXLRefiner for the SDXL refiner, "
                "or load an SDXL base checkpoint",
            )
        ]

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        clip = inputs.clip
        if "text_encoder" not in clip.keys or "text_encoder_2" not in clip.keys:
            raise NodeError(
                "CLIPTextEncodeSDXL needs the clip of an SDXL base model (two text encoders); for another model use "
                "CLIPTextEncode (TextEncode), for the SDXL refiner CLIPTextEncodeSDXLRefiner",
                field="clip",
            )
        z_l, _ = _encode_with(ctx, clip, "text_encoder", inputs.text_l, "text_l")
        z_g, pooled = _encode_with(ctx, clip, "text_encoder_2", inputs.text_g, "text_g")
        if z_l.shape[1] != z_g.shape[1]:  # extend the shorter with chunks of the empty prompt
            role, field, short = ("text_encoder", "text_l", z_l) if z_l.shape[1] < z_g.shape[1] else ("text_encoder_2", "text_g", z_g)
            empty, _ = _encode_with(ctx, clip, role, "", field)
            chunks = (max(z_l.shape[1], z_g.shape[1]) - short.shape[1]) // empty.shape[1]
            short = torch.cat([short] + [empty] * chunks, dim=1)
            z_l, z_g = (short, z_g) if role == "text_encoder" else (z_l, short)
        extras = {
            "original_size": (inputs.height, inputs.width),
            "crop_top_left": (inputs.crop_h, inputs.crop_w),
            "target_size": (inputs.target_height, inputs.target_width),
        }
        cond = Conditioning(embeddings=torch.cat([z_l, z_g], dim=-1), pooled=pooled, extras=extras)
        return self.Outputs(cond=_finite(cond, "text_g"))


class CLIPTextEncodeSDXLRefiner(Node):
    type = "CLIPTextEncodeSDXLRefiner"
    category = "advanced/conditioning"
    description = (
        "Encode a prompt for SDXL's refiner with its aesthetic conditioning (ComfyUI's CLIPTextEncodeSDXLRefiner): the text "
        "as TextEncode encodes it, and the U-Net is told the aesthetic score and the original size in pixels (no crop). "
        "On the base model the size is also the target size."
    )

    class Inputs(NodeIO):
        ascore: float = Field(
            6.0, ge=0.0, le=1000.0, description="Aesthetic score the U-Net is told (6 for a positive, 2.5 for a negative)"
        )
        width: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Original width the U-Net is told, in pixels")
        height: int = Field(SDXL_SIZE, ge=0, le=MAX_RESOLUTION, description="Original height the U-Net is told, in pixels")
        text: str = Field(description="The prompt; TextEncode's syntax")
        clip: Clip = Field(description="The SDXL refiner's clip")

    class Outputs(NodeIO):
        cond: Conditioning = Field(description="Embeddings, pooled, and the aesthetic and size conditioning")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The embedding files the prompt names (see TextEncode)."""
        return TextEncode.fingerprint(literals, ctx)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        encoded = TextEncode().run(TextEncode.Inputs(clip=inputs.clip, text=inputs.text, clip_skip=1), ctx).cond
        extras = {
            **encoded.extras,
            "original_size": (inputs.height, inputs.width),
            "crop_top_left": (0, 0),
            "target_size": (inputs.height, inputs.width),
            "aesthetic_score": inputs.ascore,
        }
        return self.Outputs(cond=Conditioning(embeddings=encoded.embeddings, pooled=encoded.pooled, extras=extras))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner]
