"""ComfyUI's ControlNet classes as graphsd nodes of the same names, inputs and outputs:
ControlNetLoader, DiffControlNetLoader, ControlNetApply and ControlNetApplyAdvanced. A ComfyUI
prompt naming them runs as is, and the ``CONTROL_NET`` socket (:class:`ControlNet`) links to
ComfyUI's nodes in the served frontend.

Applying a ControlNet records it on the conditioning (ComfyUI's semantics); both denoise loops
then run it beside the U-Net (:mod:`graphsd.std.sampling.control`). Files are looked up in the
models folder's ``controlnet/`` (``--models-dir``), a name may also be a path of its own, and are
read as :mod:`graphsd.std.models.controlnet` says; each is loaded once per engine, keyed by the
file's fingerprint (a replaced file is read again). Pickle files (``.pth``, as lllyasviel's
ControlNet 1.1 releases come) need ``--allow-pickle``, as everywhere in graphsd.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import GraphsdError, NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.std.files import Issues, missing_file
from graphsd.std.models.controlnet import Control, ControlNet, hint_of, is_difference, load_controlnet
from graphsd.std.models.formats import WEIGHT_SUFFIXES
from graphsd.std.models.loading import DTYPES, _component_loader
from graphsd.types import Conditioning, Image, Socket, UNet, Vae

#: The models folder's sub-folder ControlNets are looked up in (ComfyUI's).
FOLDER = "controlnet"
DTYPE_FIELD = (
    "graphsd: precision the ControlNet's weights are kept and run in (its inputs are cast to it, its residuals back to the "
    "U-Net's): fp32, fp16 / bf16 (GPU), fp64 (reference checks)"
)
Precision = Literal["fp32", "fp16", "bf16", "fp64"]


def find_controlnet(name: str, models_dir: str | Path) -> Path | None:
    """The file or diffusers folder (``config.json``) ``name`` refers to: in ``<models>/controlnet``,
    then as a path; a name without a weight suffix also tries them. Windows separators are
    accepted."""
    name = name.replace("\\", "/").strip()
    if not name:
        return None
    for base in (Path(models_dir) / FOLDER / name, Path(name)):
        if base.is_dir() and (base / "config.json").is_file():
            return base.resolve()
        for candidate in (base, *(base.with_name(base.name + s) for s in WEIGHT_SUFFIXES)):
            if candidate.is_file():
                return candidate.resolve()
    return None


def available(models_dir: str | Path) -> list[str]:
    """The ControlNet files and folders in ``<models>/controlnet``."""
    folder = Path(models_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES) or (p / "config.json").is_file()
    )


def _identity(literals: dict[str, Any], ctx: Context) -> str:
    name = literals.get("control_net_name")
    path = find_controlnet(name, ctx.models_dir) if isinstance(name, str) else None
    return file_fingerprint(path) if path is not None else "missing"


#: What to do about a ControlNet that is not found.
HINT = "put the file (or diffusers folder) there or give its path"


def _not_found(name: str, models_dir: str | Path) -> str:
    there = ", ".join(available(models_dir)[:20]) or "none"
    return f"ControlNet {name!r} not found in {Path(models_dir) / FOLDER} (there: {there}), nor as a path"


def _require(name: str, ctx: Context) -> Path:
    path = find_controlnet(name, ctx.models_dir)
    if path is None:
        raise NodeError(f"{_not_found(name, ctx.models_dir)}; {HINT}", field="control_net_name")
    return ctx.readable(path, "control_net_name")


def _missing(literals: dict[str, Any], settings: Settings) -> Issues:
    """The validation-time form of :func:`_require`."""
    models = settings.models_dir
    return missing_file(literals, "control_net_name", lambda n: find_controlnet(n, models), lambda n: _not_found(n, models), HINT)


def _load(ctx: Context, path: Path, precision: str, base: UNet | None = None) -> ControlNet:
    """The ControlNet at ``path`` as a handle, loaded into the ModelManager unless held; a
    difference ControlNet gets ``base``'s U-Net weights added (and its key names that U-Net)."""
    dtype = DTYPES[precision]
    allow_pickle = bool(ctx.settings.allow_pickle)
    key = f"{file_fingerprint(path)}:controlnet:{precision}"
    try:
        if path.is_dir():
            from diffusers import ControlNetModel

            loader = _component_loader(ControlNetModel, path, dtype, allow_pickle, tokenizer=False)
        elif base is not None and is_difference(path, allow_pickle, "control_net_name"):
            key += ":difference-to:" + hashlib.sha256(base.fingerprint().encode()).hexdigest()[:16]

            def loader() -> Any:
                with ctx.models.use(base, "unet") as unet:
                    return load_controlnet(path, dtype, allow_pickle, "control_net_name", unet.state_dict())

        else:

            def loader() -> Any:
                return load_controlnet(path, dtype, allow_pickle, "control_net_name")

        return ControlNet(ctx.models, {"controlnet": ctx.models.load(key, loader)})
    except NodeError:
        raise
    except GraphsdError as exc:
        raise NodeError(str(exc), field="control_net_name") from None
    except (OSError, ValueError) as exc:  # diffusers' from_pretrained on a damaged folder
        raise NodeError(f"{path} cannot be loaded as a diffusers ControlNet folder ({exc})", field="control_net_name") from None


class ControlNetLoader(Node):
    type = "ControlNetLoader"
    category = "loaders"
    description = (
        "Load a ControlNet (ComfyUI's ControlNetLoader) for SD1.x, SD2.x or SDXL: a single file in <models>/controlnet in "
        "the original layout (ControlNet 1.0 / 1.1, .safetensors or .pth) or diffusers' (diffusion_pytorch_model.safetensors, "
        "as SDXL ControlNets come), or a diffusers ControlNetModel folder. Apply it with ControlNetApply(Advanced)."
    )

    class Inputs(NodeIO):
        control_net_name: str = Field(description="ControlNet file or folder: a name in <models>/controlnet, or a path")
        dtype: Precision = Field("fp32", description=DTYPE_FIELD)

    class Outputs(NodeIO):
        control_net: ControlNet = Field(description="The ControlNet")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return _identity(literals, ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"control_net_name": available(models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return _missing(literals, settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(control_net=_load(ctx, _require(inputs.control_net_name, ctx), inputs.dtype))


class DiffControlNetLoader(Node):
    type = "DiffControlNetLoader"
    category = "loaders"
    description = (
        "Load a ControlNet for a model (ComfyUI's DiffControlNetLoader): a difference ControlNet (diff_control_*, whose "
        "weights are differences to a base model's U-Net) gets the model's U-Net weights added, LoRAs included; any "
        "other ControlNet loads as with ControlNetLoader."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The U-Net the difference ControlNet was made for")
        control_net_name: str = Field(description="ControlNet file or folder: a name in <models>/controlnet, or a path")
        dtype: Precision = Field("fp32", description=DTYPE_FIELD)

    class Outputs(NodeIO):
        control_net: ControlNet = Field(description="The ControlNet")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        return _identity(literals, ctx)

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        return {"control_net_name": available(models_dir)}

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        return _missing(literals, settings)

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(control_net=_load(ctx, _require(inputs.control_net_name, ctx), inputs.dtype, base=inputs.model))


STRENGTH = "How much the ControlNet steers: its residuals are multiplied by this (0 = not applied)"
IMAGE = "The hint (edges, depth, pose, ...), resized when sampling to the image size (centre crop to its aspect ratio, nearest)"


class ControlNetApply(Node):
    type = "ControlNetApply"
    category = "conditioning/controlnet"
    description = (
        "Apply a ControlNet to a conditioning (ComfyUI's ControlNetApply): it steers every step of the denoise loop, and "
        "also the negative side when that has no ControlNet of its own (as in ComfyUI, and as diffusers' "
        "StableDiffusionControlNetPipeline does). Applied on top of another ControlNet, their residuals add up."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning to steer (usually the positive prompt)")
        control_net: ControlNet = Field(description="The ControlNet (ControlNetLoader)")
        image: Image = Field(description=IMAGE)
        strength: float = Field(1.0, ge=0.0, le=10.0, description=STRENGTH)

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with the ControlNet applied")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        cond = inputs.conditioning
        if inputs.strength == 0:
            return self.Outputs(conditioning=cond)
        hint = hint_of(inputs.image)
        entries = [_with(e, Control(inputs.control_net, hint, inputs.strength, to_uncond=True, previous=e.control)) for e in cond.entries()]
        return self.Outputs(conditioning=Conditioning.of_entries(entries))


class ControlNetApplyAdvanced(Node):
    type = "ControlNetApplyAdvanced"
    category = "conditioning/controlnet"
    description = (
        "Apply a ControlNet to the positive and the negative conditioning (ComfyUI's ControlNetApplyAdvanced), acting only "
        "from start_percent to end_percent of the schedule's noise levels (ComfyUI's percent: 0 = the start, the noisiest)."
    )

    class Inputs(NodeIO):
        positive: Conditioning = Field(description="The positive conditioning")
        negative: Conditioning = Field(description="The negative conditioning")
        control_net: ControlNet = Field(description="The ControlNet (ControlNetLoader)")
        image: Image = Field(description=IMAGE)
        strength: float = Field(1.0, ge=0.0, le=10.0, description=STRENGTH)
        start_percent: float = Field(0.0, ge=0.0, le=1.0, description="Where in the schedule it starts acting (0 = the first step)")
        end_percent: float = Field(1.0, ge=0.0, le=1.0, description="Where in the schedule it stops acting (1 = the last step)")
        vae: Vae | None = Field(
            None,
            description="Accepted for ComfyUI's prompts; SD ControlNets read the hint as pixels (ComfyUI uses the VAE for "
            "ControlNets of other model families, whose hint is a latent)",
        )

    class Outputs(NodeIO):
        positive: Conditioning = Field(description="The positive conditioning with the ControlNet applied")
        negative: Conditioning = Field(description="The negative conditioning with the ControlNet applied")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        if inputs.strength == 0:
            return self.Outputs(positive=inputs.positive, negative=inputs.negative)
        hint = hint_of(inputs.image)
        made: dict[int, Control] = {}  # one application per ControlNet applied before, shared by both sides (ComfyUI's)

        def apply(cond: Conditioning) -> Conditioning:
            out = []
            for entry in cond.entries():
                key = id(entry.control)
                if key not in made:
                    made[key] = Control(
                        inputs.control_net, hint, inputs.strength, inputs.start_percent, inputs.end_percent, previous=entry.control
                    )
                out.append(_with(entry, made[key]))
            return Conditioning.of_entries(out)

        return self.Outputs(positive=apply(inputs.positive), negative=apply(inputs.negative))


def _with(entry: Conditioning, control: Control) -> Conditioning:
    return replace(entry, control=control)


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return [ControlNet]


@hookimpl
def graphsd_comfy_types() -> dict[str, str]:
    return {"ControlNet": "CONTROL_NET"}


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced]
