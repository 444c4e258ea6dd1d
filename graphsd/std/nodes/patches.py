"""Style patches: LoraLoader and HypernetworkLoader.

Both return new model handles with one more patch recorded (``ref.with_patches(patch)``); the
shared weights held by the ModelManager are only modified inside ``ctx.models.use(...)`` and
restored bit for bit afterwards, so branches with and without a patch can share one checkpoint,
and changing a strength never reloads the base model. The patch files themselves are loaded
once per engine through the ModelManager (keyed by the file's fingerprint).

Files are found, in order, among the built-in ones (``graphsd/std/models/builtin/loras/`` or
``.../hypernetworks/``), under ``<models_dir>/loras/`` (or ``hypernetworks/``), then as a path;
a name without a suffix also tries ``.safetensors`` and the pickle suffixes (LoRA) or ``.pt``
(hypernetwork).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.std.files import Issues, missing_file
from graphsd.std.models.family import model_info
from graphsd.std.models.formats import PICKLE_SUFFIXES, WEIGHT_SUFFIXES
from graphsd.std.models.hypernetwork import HypernetworkFormatError, HypernetworkPatch, attention_layers, load_hypernetwork
from graphsd.std.models.loading import builtin_models_dir
from graphsd.std.models.lora import LoraFormatError, LoraPatch, check_family, guess_family, load_lora, match_lora
from graphsd.types import Clip, UNet

log = logging.getLogger("graphsd.patches")

SUFFIXES = {"loras": WEIGHT_SUFFIXES, "hypernetworks": (".pt",)}  # A1111 hypernetworks are .pt files


#: What to do about a file that is not found.
HINT = "put the file there or give its path"


def find_patch_file(name: str, kind: str, models_dir: str | Path) -> Path | None:
    """The file ``name`` refers to for ``kind`` ("loras" or "hypernetworks"), or None."""
    if not name.strip():
        return None
    folders = [builtin_models_dir() / kind, Path(models_dir) / kind, Path(".")]
    for folder in folders:
        base = folder / name
        for candidate in (base, *(base.with_name(base.name + s) for s in SUFFIXES[kind])):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _not_found(name: str, kind: str, models_dir: str | Path) -> str:
    """Where ``name`` was looked for and what is there."""
    return (
        f"{kind[:-1]} file {name!r} not found: looked in the built-in {kind} "
        f"({', '.join(available(kind, models_dir)) or 'none'}), in {Path(models_dir) / kind}, and as a path"
    )


def _require_file(name: str, kind: str, ctx: Context, field: str) -> Path:
    path = find_patch_file(name, kind, ctx.models_dir)
    if path is None:
        raise NodeError(f"{_not_found(name, kind, ctx.models_dir)}. {HINT[0].upper()}{HINT[1:]}", field=field)
    return ctx.readable(path, field)  # a workflow confined to some folders (a PNG's, a server's) reads only there


def missing_patch_file(literals: dict[str, Any], field: str, kind: str, settings: Settings) -> Issues:
    """The validation-time form of :func:`_require_file`."""
    models = settings.models_dir
    return missing_file(literals, field, lambda n: find_patch_file(n, kind, models), lambda n: _not_found(n, kind, models), HINT)


def available(kind: str, models_dir: str | Path) -> list[str]:
    """Names of the patch files of ``kind`` that ship with graphsd or sit under models_dir."""
    names = []
    for folder in (builtin_models_dir() / kind, Path(models_dir) / kind):
        if folder.is_dir():
            names += sorted(p.name for p in folder.iterdir() if p.suffix in SUFFIXES[kind])
    return names


def _file_identity(name: str, kind: str, ctx: Context) -> str:
    path = find_patch_file(name, kind, ctx.models_dir)
    return file_fingerprint(path) if path is not None else "missing"


def _allow_pickle(ctx: Context, path: Path, field: str) -> bool:
    """Whether pickle files may be read: only when the user said so (``--allow-pickle``,
    ``Settings.allow_pickle``; a workflow cannot) or for the files graphsd ships. Refuses a
    pickle file up front otherwise (before the ModelManager's cache, which may hold it)."""
    allowed = bool(ctx.settings.allow_pickle) or builtin_models_dir() in path.resolve().parents
    if path.suffix.lower() in PICKLE_SUFFIXES and not allowed:
        raise NodeError(
            f"'{path.name}' is a pickle file: convert it to .safetensors, or, for a file you trust, run with "
            "--allow-pickle (Settings.allow_pickle), which reads pickle files with torch.load(weights_only=True): "
            "tensors only, no code",
            field=field,
        )
    return allowed


class LoraLoader(Node):
    type = "LoraLoader"
    category = "loaders"
    description = (
        "Apply a LoRA (kohya/A1111, PEFT/diffusers, LyCORIS LoHa/LoKr) to a U-Net and its text "
        "encoder(s) with separate strengths; the base model is not reloaded or copied."
    )

    class Inputs(NodeIO):
        unet: UNet = Field(description="U-Net to patch")
        clip: Clip = Field(description="Text encoder(s) to patch")
        lora: str = Field(description="LoRA file: a built-in name, a name under <models_dir>/loras, or a path")
        strength_model: float = Field(1.0, ge=-100.0, le=100.0, description="Strength on the U-Net (0 = off, negative inverts)")
        strength_clip: float = Field(1.0, ge=-100.0, le=100.0, description="Strength on the text encoder(s)")

    class Outputs(NodeIO):
        unet: UNet = Field(description="The U-Net with the LoRA recorded on it")
        clip: Clip = Field(description="The text encoder(s) with the LoRA recorded on them")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return _file_identity(str(literals.get("lora", "")), "loras", ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"lora": available("loras", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing_patch_file(literals, "lora", "loras", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = _require_file(inputs.lora, "loras", ctx, "lora")
        allow_pickle = _allow_pickle(ctx, path, "lora")
        try:
            key = ctx.models.load(f"lora:{file_fingerprint(path)}", lambda: load_lora(path, allow_pickle))
        except LoraFormatError as exc:
            raise NodeError(str(exc), field="lora") from None
        lora = ctx.models.get(key)
        components = {"unet": ctx.models.get(inputs.unet.keys["unet"])}
        components.update({r: ctx.models.get(inputs.clip.keys[r]) for r in ("text_encoder", "text_encoder_2") if r in inputs.clip.keys})
        try:
            check_family(lora, components)
        except LoraFormatError as exc:
            raise NodeError(str(exc), field="lora") from None
        match = match_lora(lora, components)
        if match.matched == 0:
            info = model_info(inputs.unet, "unet")
            raise NodeError(
                f"LoRA {path.name!r} matches none of the model's layers: it seems made for "
                f"{guess_family(lora)}, the model is {info.family} "
                f"(context width {info.context_width}). Use a LoRA for this model",
                field="lora",
            )
        if match.unmatched:
            log.warning("LoRA %s: %d layers matched, %d keys unmatched (e.g. %s)", path.name, match.matched,
                        len(match.unmatched), ", ".join(match.unmatched[:5]))
        ctx.progress(1, 1, lora=path.name, matched=match.matched, unmatched=len(match.unmatched),
                     unmatched_keys=match.unmatched[:20])
        unet_layers = {r: v for r, v in match.layers.items() if r == "unet"}
        clip_layers = {r: v for r, v in match.layers.items() if r != "unet"}
        unet, clip = inputs.unet, inputs.clip
        if unet_layers and inputs.strength_model != 0.0:
            unet = unet.with_patches(LoraPatch(lora, unet_layers, {"unet": inputs.strength_model}))
        if clip_layers and inputs.strength_clip != 0.0:
            clip = clip.with_patches(LoraPatch(lora, clip_layers, {r: inputs.strength_clip for r in clip_layers}))
        return self.Outputs(unet=unet, clip=clip)


class HypernetworkLoader(Node):
    type = "HypernetworkLoader"
    category = "loaders"
    description = (
        "Apply an A1111 hypernetwork (.pt) to a U-Net: small MLPs transform the attention context "
        "before the key and value projections, scaled by strength."
    )

    class Inputs(NodeIO):
        unet: UNet = Field(description="U-Net to patch")
        hypernetwork: str = Field(description="Hypernetwork file: a built-in name, a name under <models_dir>/hypernetworks, or a path")
        strength: float = Field(1.0, ge=-10.0, le=10.0, description="Multiplier of the nets' outputs (0 = off)")

    class Outputs(NodeIO):
        unet: UNet = Field(description="The U-Net with the hypernetwork recorded on it")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return _file_identity(str(literals.get("hypernetwork", "")), "hypernetworks", ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"hypernetwork": available("hypernetworks", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing_patch_file(literals, "hypernetwork", "hypernetworks", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = _require_file(inputs.hypernetwork, "hypernetworks", ctx, "hypernetwork")
        fingerprint = file_fingerprint(path)
        allow_pickle = _allow_pickle(ctx, path, "hypernetwork")
        try:
            key = ctx.models.load(f"hypernetwork:{fingerprint}", lambda: load_hypernetwork(path, allow_pickle))
        except HypernetworkFormatError as exc:
            raise NodeError(str(exc), field="hypernetwork") from None
        hn = ctx.models.get(key)
        widths = sorted({a.to_k.in_features for a in attention_layers(ctx.models.get(inputs.unet.keys["unet"]))})
        used = [w for w in hn.widths if w in widths]
        if not used:
            family = model_info(inputs.unet, "unet").family
            raise NodeError(
                f"hypernetwork {path.name!r} has nets for context widths {hn.widths}, but this "
                f"{family} U-Net's attention layers take widths {widths}: it was made for another model",
                field="hypernetwork",
            )
        ctx.progress(1, 1, hypernetwork=path.name, widths=used, unused_widths=[w for w in hn.widths if w not in widths])
        if inputs.strength == 0.0:
            return self.Outputs(unet=inputs.unet)
        return self.Outputs(unet=inputs.unet.with_patches(HypernetworkPatch(hn, fingerprint, inputs.strength)))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [LoraLoader, HypernetworkLoader]
