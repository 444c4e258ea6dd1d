"""ComfyUI's loaders of single components, with ComfyUI's class names, input names and output
order: VAELoader, LoraLoaderModelOnly, UNETLoader, CLIPLoader and DualCLIPLoader. A ComfyUI
prompt naming them runs as is (the classes are these graphsd nodes).

Names are looked up as ComfyUI does, in the models folder's sub-folders (``--models-dir``):
``vae/`` (VAELoader), ``loras/`` (LoraLoaderModelOnly, also graphsd's built-in LoRAs),
``unet/`` then ``diffusion_models/`` (UNETLoader), ``text_encoders/`` then ``clip/`` (CLIPLoader,
DualCLIPLoader); a name may be a path inside them (``sdxl/vae.safetensors``, Windows ``\\``
separators too) or a path of its own. The files are read as described in
:mod:`graphsd.std.models.components`; each is loaded once per engine through the ModelManager
(keyed by the file's fingerprint, so a replaced file is read again) and in float32, graphsd's
default precision (ComfyUI's ``weight_dtype`` ``default``; its fp8 storage is not supported).
Pickle files (``.pt``, ``.ckpt``, ``.bin``) need ``--allow-pickle``, as everywhere in graphsd.

Only the model families graphsd runs are loaded: Stable Diffusion 1.x, 2.x and XL. CLIPLoader's
``type`` other than ``stable_diffusion`` and DualCLIPLoader's other than ``sdxl`` (Flux, SD3, ...)
are refused when the workflow is validated, a file of another family when it is loaded.
"""

from __future__ import annotations

import re
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
from graphsd.std.models import components
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, Family, ModelInfo, detect_model_info
from graphsd.std.models.formats import WEIGHT_SUFFIXES
from graphsd.std.models.loading import _component_loader
from graphsd.std.models.single_file import bundled_config
from graphsd.std.nodes.patches import LoraLoader, missing_patch_file
from graphsd.std.nodes.patches import available as patch_files
from graphsd.types import Clip, UNet, Vae

#: Sub-folders of the models folder each kind of file is looked up in, in order (ComfyUI's).
FOLDERS = {"vae": ("vae",), "unet": ("unet", "diffusion_models"), "clip": ("text_encoders", "clip")}
#: What the loaded weights are kept in (see the module docstring).
DTYPE = torch.float32
#: ComfyUI's UNETLoader weight_dtype choices; only ``default`` is run.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
DEVICE = "Accepted for ComfyUI's prompts (default, cpu); graphsd's ModelManager places the model"
#: The CLIPLoader / DualCLIPLoader ``type`` that loads Stable Diffusion text encoders.
CLIP_TYPE, DUAL_CLIP_TYPE = "stable_diffusion", "sdxl"


def find_file(name: str, kind: str, models_dir: str | Path, folders_ok: bool = False) -> Path | None:
    """The file ``name`` refers to for ``kind`` (a key of :data:`FOLDERS`): under each of its
    folders, then as a path; a name without a weight suffix also tries them. With
    ``folders_ok``, a diffusers model folder (``config.json``) is found too."""
    name = name.replace("\\", "/").strip()
    if not name:
        return None
    for base in [Path(models_dir) / f / name for f in FOLDERS[kind]] + [Path(name)]:
        if folders_ok and base.is_dir() and (base / "config.json").is_file():
            return base.resolve()
        for candidate in (base, *(base.with_name(base.name + s) for s in WEIGHT_SUFFIXES)):
            if candidate.is_file():
                return candidate.resolve()
    return None


def available(kind: str, models_dir: str | Path) -> list[str]:
    """The weight files (and, for VAEs, diffusers folders) in the folders of ``kind``."""
    names: list[str] = []
    for folder in (Path(models_dir) / f for f in FOLDERS[kind]):
        if folder.is_dir():
            names += sorted(
                p.name
                for p in folder.iterdir()
                if (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES) or (kind == "vae" and (p / "config.json").is_file())
            )
    return names


#: What to do about a file that is not found.
HINT = "put the file there or give its path"


def not_found(name: str, kind: str, models_dir: str | Path) -> str:
    """Where ``name`` was looked for and what is there."""
    where = " and ".join(str(Path(models_dir) / f) for f in FOLDERS[kind])
    there = ", ".join(available(kind, models_dir)[:20]) or "none"
    return f"{name!r} not found in {where} (there: {there}), nor as a path"


def require_file(name: str, kind: str, ctx: Context, field: str, folders_ok: bool = False) -> Path:
    path = find_file(name, kind, ctx.models_dir, folders_ok)
    if path is None:
        raise NodeError(f"{not_found(name, kind, ctx.models_dir)}; {HINT}", field=field)
    return ctx.readable(path, field)


def missing(literals: dict[str, Any], fields: tuple[str, ...], kind: str, settings: Settings, folders_ok: bool = False) -> Issues:
    """The validation-time form of :func:`require_file`, for each of ``fields``."""
    models = settings.models_dir
    return [
        issue
        for field in fields
        for issue in missing_file(
            literals, field, lambda n: find_file(n, kind, models, folders_ok), lambda n: not_found(n, kind, models), HINT
        )
    ]


def file_identity(name: Any, kind: str, ctx: Context, folders_ok: bool = False) -> str:
    """Cache identity of a named file: its fingerprint (a replaced file is another model)."""
    path = find_file(name, kind, ctx.models_dir, folders_ok) if isinstance(name, str) else None
    return file_fingerprint(path) if path is not None else "missing"


def _load(ctx: Context, key: str, loader: Any, field: str) -> str:
    """``ctx.models.load`` with a file's problems reported on ``field``."""
    try:
        return ctx.models.load(key, loader)
    except NodeError:
        raise
    except GraphsdError as exc:
        raise NodeError(str(exc), field=field) from None


# ---- VAELoader ---------------------------------------------------------------------------------
def vae_scale(choice: str, path: Path, vae: Any) -> float:
    """The latent scale of a VAE: the one ``choice`` names; for ``auto`` a diffusers folder's
    ``scaling_factor``, else SDXL's when the file's name says ``xl`` (``sdxl_vae.safetensors``), else
    SD1.x / SD2.x's. The weights of the SD and SDXL VAEs have the same shapes, so a file cannot
    tell."""
    if choice != "auto":
        return components.VAE_SCALES[choice]
    if path.is_dir():
        return float(vae.config.scaling_factor)
    return components.VAE_SCALES["sdxl" if re.search("xl", path.stem, re.IGNORECASE) else "sd"]


class VAELoader(Node):
    type = "VAELoader"
    category = "loaders"
    description = (
        "Load a VAE on its own (ComfyUI's VAELoader): a single file in <models>/vae (the original layout, like "
        "vae-ft-mse-840000 or sdxl_vae.safetensors, or diffusers') or a diffusers VAE folder. SD1.x, SD2.x and SDXL "
        "VAEs; it replaces the checkpoint's VAE in VAEDecode / VAEEncode."
    )

    class Inputs(NodeIO):
        vae_name: str = Field(description="VAE file or folder: a name in <models>/vae, or a path")
        scale: Literal["auto", "sd", "sdxl"] = Field(
            "auto",
            description=(
                "graphsd: the latent space the VAE decodes, which sets the latent scale: sd (SD1.x/SD2.x, 0.18215) or "
                "sdxl (0.13025). auto: a diffusers folder's config says; for a file, 'xl' in its name means sdxl, "
                "else sd (the weights cannot tell them apart). In ComfyUI the model sets it"
            ),
        )

    class Outputs(NodeIO):
        vae: Vae = Field(description="The VAE")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return file_identity(literals.get("vae_name"), "vae", ctx, folders_ok=True)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"vae_name": available("vae", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing(literals, ("vae_name",), "vae", settings, folders_ok=True)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = require_file(inputs.vae_name, "vae", ctx, "vae_name", folders_ok=True)
        allow_pickle = bool(ctx.settings.allow_pickle)
        if path.is_dir():
            from diffusers import AutoencoderKL

            try:
                from_folder = _component_loader(AutoencoderKL, path, DTYPE, allow_pickle, tokenizer=False)
            except GraphsdError as exc:
                raise NodeError(str(exc), field="vae_name") from None

            def loader() -> Any:
                try:
                    return from_folder()
                except (OSError, ValueError) as exc:
                    raise NodeError(f"{path} cannot be loaded as a diffusers VAE folder ({exc})", field="vae_name") from None

        else:

            def loader() -> Any:
                return components.load_vae(path, DTYPE, allow_pickle)

        key = _load(ctx, f"{file_fingerprint(path)}:vae-file:fp32", loader, "vae_name")
        vae = ctx.models.get(key)
        scale = vae_scale(inputs.scale, path, vae)
        info = ModelInfo(
            family="sdxl" if scale == components.VAE_SCALES["sdxl"] else "sd1",
            latent_downscale=2 ** (len(vae.config.block_out_channels) - 1),
            scaling_factor=scale,
            shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
            vae_key=key,
        )
        return self.Outputs(vae=Vae(ctx.models, {"vae": key}, info))


# ---- LoraLoaderModelOnly -----------------------------------------------------------------------
class LoraLoaderModelOnly(Node):
    type = "LoraLoaderModelOnly"
    category = "loaders"
    description = (
        "Apply a LoRA to the U-Net only (ComfyUI's LoraLoaderModelOnly): graphsd's LoraLoader with no text encoder; "
        "the LoRA's text-encoder layers, if any, are left out (reported as unmatched)."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="U-Net to patch")
        lora_name: str = Field(description="LoRA file: a built-in name, a name in <models>/loras, or a path")
        strength_model: float = Field(1.0, ge=-100.0, le=100.0, description="Strength on the U-Net (0 = off, negative inverts)")

    class Outputs(NodeIO):
        model: UNet = Field(description="The U-Net with the LoRA recorded on it")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        name = literals.get("lora_name")
        return LoraLoader.fingerprint({"lora": name.replace("\\", "/") if isinstance(name, str) else name}, ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"lora_name": patch_files("loras", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        name = literals.get("lora_name")  # looked up as the run does, with / separators
        return missing_patch_file({"lora_name": name.replace("\\", "/")} if isinstance(name, str) else {}, "lora_name", "loras", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        no_clip = Clip(ctx.models, {}, inputs.model.info)
        lora = LoraLoader.Inputs(
            unet=inputs.model,
            clip=no_clip,
            lora=inputs.lora_name.replace("\\", "/"),
            strength_model=inputs.strength_model,
            strength_clip=0.0,
        )
        try:
            out: Any = LoraLoader().run(lora, ctx)
        except NodeError as exc:
            raise NodeError(str(exc), field={"lora": "lora_name", "unet": "model"}.get(exc.field or "", exc.field)) from None
        return self.Outputs(model=out.unet)


# ---- UNETLoader --------------------------------------------------------------------------------
class UNETLoader(Node):
    type = "UNETLoader"
    category = "advanced/loaders"
    description = (
        "Load a U-Net on its own (ComfyUI's UNETLoader, 'Load Diffusion Model'): an SD1.x, SD2.x or SDXL U-Net file in "
        "<models>/unet or <models>/diffusion_models (original or diffusers layout), with its family's sampling "
        "schedule (SD2.x: v-prediction, as graphsd reads SD2 checkpoints)."
    )

    class Inputs(NodeIO):
        unet_name: str = Field(description="U-Net file: a name in <models>/unet or <models>/diffusion_models, or a path")
        weight_dtype: Literal["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"] = Field(
            "default", description="Storage precision: default (float32 in graphsd); ComfyUI's fp8 storage is not supported"
        )

    class Outputs(NodeIO):
        model: UNet = Field(description="The U-Net")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        dtype = literals.get("weight_dtype", "default")
        if dtype in WEIGHT_DTYPES and dtype != "default":
            return [("weight_dtype", f"weight_dtype {dtype} (fp8 weights) is not supported", "use default")]
        return []

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return file_identity(literals.get("unet_name"), "unet", ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"unet_name": available("unet", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing(literals, ("unet_name",), "unet", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = require_file(inputs.unet_name, "unet", ctx, "unet_name")
        allow_pickle = bool(ctx.settings.allow_pickle)
        key = _load(
            ctx, f"{file_fingerprint(path)}:unet-file:fp32", lambda: components.load_unet(path, DTYPE, allow_pickle)[0], "unet_name"
        )
        config = ctx.models.get(key).config
        probe = detect_model_info(config, {}, {}, {})
        info = detect_model_info(config, {}, bundled_config(probe.family, "scheduler"), {})
        return self.Outputs(model=UNet(ctx.models, {"unet": key}, info))


# ---- CLIPLoader / DualCLIPLoader ---------------------------------------------------------------
def load_clip(ctx: Context, files: list[tuple[Path, tuple[Family, str], str]]) -> Clip:
    """A Clip handle of the text encoders in ``files`` ((path, (family, role), field) each), with
    the shipped CLIP tokenizer for each (padding as the encoder's family does)."""
    allow_pickle = bool(ctx.settings.allow_pickle)
    keys, tokenizers = {}, {}
    for path, slot, field in files:
        family, role = slot
        key = _load(
            ctx,
            f"{file_fingerprint(path)}:text-encoder:{family}:{role}:fp32",
            lambda path=path, slot=slot, field=field: components.load_text_encoder(path, slot, DTYPE, allow_pickle, field),
            field,
        )
        pad = components.pad_token(family, role)
        tokenizer = ctx.models.get(ctx.models.load(f"clip-tokenizer:{pad}", lambda pad=pad: components.tokenizer(pad)))
        try:
            components.check_vocabulary(TOKENIZER_OF_ENCODER[role], tokenizer, ctx.models.get(key))
        except GraphsdError as exc:
            raise NodeError(f"'{path.name}': {exc}", field=field) from None
        keys[role], tokenizers[role] = key, tokenizer
    family = files[-1][1][0]
    return Clip(ctx.models, keys, ModelInfo(family=family, tokenizers=tokenizers))


def _layout(path: Path, ctx: Context, field: str) -> tuple[int, bool]:
    try:
        return components.text_encoder_layout(path, bool(ctx.settings.allow_pickle), field)
    except GraphsdError as exc:
        raise NodeError(str(exc), field=field) from None


def _other_type(kind: str, value: Any, supported: str) -> list[tuple[str, str, str | None]]:
    if value in (None, supported):
        return []
    return [
        (
            "type",
            f"{kind} type {value!r} loads text encoders of another model family than graphsd runs",
            f"graphsd runs Stable Diffusion 1.x, 2.x and XL: use CLIPLoader type {CLIP_TYPE} or DualCLIPLoader type {DUAL_CLIP_TYPE}",
        )
    ]


class CLIPLoader(Node):
    type = "CLIPLoader"
    category = "advanced/loaders"
    description = (
        "Load a text encoder on its own (ComfyUI's CLIPLoader, type stable_diffusion): CLIP ViT-L (SD1.x), OpenCLIP "
        "ViT-H (SD2.x) or ViT-bigG (SDXL's second encoder, as the refiner uses it), from <models>/text_encoders or "
        "<models>/clip, with the CLIP tokenizer."
    )

    class Inputs(NodeIO):
        clip_name: str = Field(description="Text-encoder file: a name in <models>/text_encoders or <models>/clip, or a path")
        type: str = Field(CLIP_TYPE, description="ComfyUI's text-encoder type: stable_diffusion (others are other model families)")
        device: Literal["default", "cpu"] = Field(
            "default", description="Accepted for ComfyUI's prompts; graphsd's ModelManager places the model"
        )

    class Outputs(NodeIO):
        clip: Clip = Field(description="The text encoder and its tokenizer")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        return _other_type("CLIPLoader", literals.get("type"), CLIP_TYPE)

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return file_identity(literals.get("clip_name"), "clip", ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"clip_name": available("clip", models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing(literals, ("clip_name",), "clip", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = require_file(inputs.clip_name, "clip", ctx, "clip_name")
        return self.Outputs(clip=load_clip(ctx, [(path, components.default_slot(*_layout(path, ctx, "clip_name")), "clip_name")]))


class DualCLIPLoader(Node):
    type = "DualCLIPLoader"
    category = "advanced/loaders"
    description = (
        "Load SDXL's two text encoders from two files (ComfyUI's DualCLIPLoader, type sdxl): CLIP ViT-L and OpenCLIP "
        "ViT-bigG (clip-l, clip-g), from <models>/text_encoders or <models>/clip, each with the CLIP tokenizer. Which "
        "file is which follows from their widths (768 and 1280), else from the order: clip_name1 is CLIP-L."
    )

    class Inputs(NodeIO):
        clip_name1: str = Field(description="First text-encoder file (CLIP-L)")
        clip_name2: str = Field(description="Second text-encoder file (CLIP-G)")
        type: str = Field(DUAL_CLIP_TYPE, description="ComfyUI's pair type: sdxl (others are other model families)")
        device: Literal["default", "cpu"] = Field(
            "default", description="Accepted for ComfyUI's prompts; graphsd's ModelManager places the model"
        )

    class Outputs(NodeIO):
        clip: Clip = Field(description="SDXL's two text encoders and their tokenizers")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        return _other_type("DualCLIPLoader", literals.get("type"), DUAL_CLIP_TYPE)

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return ",".join(file_identity(literals.get(n), "clip", ctx) for n in ("clip_name1", "clip_name2"))

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return dict.fromkeys(("clip_name1", "clip_name2"), available("clip", models_dir))

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return missing(literals, ("clip_name1", "clip_name2"), "clip", settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        fields = ["clip_name1", "clip_name2"]
        paths = [require_file(getattr(inputs, f), "clip", ctx, f) for f in fields]
        widths = [_layout(p, ctx, f)[0] for p, f in zip(paths, fields, strict=True)]
        if widths[0] == components.CLIP_G_WIDTH and widths[1] != components.CLIP_G_WIDTH:
            paths, fields = paths[::-1], fields[::-1]
        slots: list[tuple[Family, str]] = [("sdxl", "text_encoder"), ("sdxl", "text_encoder_2")]
        return self.Outputs(clip=load_clip(ctx, list(zip(paths, slots, fields, strict=True))))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [VAELoader, LoraLoaderModelOnly, UNETLoader, CLIPLoader, DualCLIPLoader]
