"""Model merging with ComfyUI's classes, input names and formulas: ModelMergeSimple,
ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd (U-Nets) and CLIPMergeSimple,
CLIPMergeSubtract, CLIPMergeAdd (text encoders).

Every merge computes, for each parameter the two models share (same name, same shape),
``w = a·w1 + b·w2`` from the first model's weight ``w1`` and the second's ``w2``:

| class | a | b |
| --- | --- | --- |
| ModelMergeSimple, CLIPMergeSimple | ratio | 1 − ratio (ratio is model1's share: 1 keeps model1) |
| ModelMergeBlocks | the same, with the ratio of the parameter's block | |
| ModelMergeSubtract, CLIPMergeSubtract | multiplier | −multiplier (the difference model1 − model2, scaled) |
| ModelMergeAdd, CLIPMergeAdd | 1 | 1 |

which is ComfyUI's ``add_patches(patches, strength_patch=b, strength_model=a)`` with model2's
weights as the patch: the weight is multiplied by ``a`` and ``b·w2`` is added, in float32 for
half-precision models. Parameters of model1 that model2 lacks, or holds in another shape, keep
model1's values (ComfyUI skips them too); the node reports how many.

ModelMergeBlocks gives each parameter the ratio of the block it belongs to in the original LDM
U-Net: ``input`` for ``input_blocks`` (the diffusers ``conv_in`` and ``down_blocks``), ``middle``
for ``middle_block``, ``out`` for ``output_blocks`` and the final ``out`` layers; the time (and
SDXL label) embeddings take ``input``'s ratio, as in ComfyUI for prompts that list ``input``
first, the order its editor writes.

A merge does not copy weights: it returns model1's handle with a :class:`MergePatch` recorded
on it, applied only while a node uses the model (like a LoRA), so the loaded checkpoints stay
shared and cached, offloading keeps working, and removing the patch restores model1 bit for bit
(a copy of the weights it changes is kept, on the CPU, while it is applied). Model2's own
patches (a LoRA on it, say) are part of what is merged in. When both inputs are the same loaded
component (one checkpoint merged with a patched version of itself), model2 is read from a
copy the ModelManager holds beside it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.std.models.family import model_info
from graphsd.std.models.formats import ModelFileError
from graphsd.std.models.single_file import UNET_PREFIX, unet_rule
from graphsd.types import Clip, ModelRef, UNet, working_dtype

log = logging.getLogger("graphsd.merge")
Handle = TypeVar("Handle", bound=ModelRef)

CATEGORY = "advanced/model_merging"
TEXT_ROLES = ("text_encoder", "text_encoder_2")
#: LDM U-Net block prefixes → the ModelMergeBlocks input whose ratio they take (longest first).
BLOCK_INPUTS = (("input", "input"), ("middle", "middle"), ("out", "out"))


@dataclass(frozen=True)
class MergePatch:
    """``w = a·w1 + b·w2`` on every parameter of a component that ``other`` (the second model's
    handle) has in the same shape; ``per_name`` overrides ``(a, b)`` by parameter name. ``label``
    names the merge and its numbers in the fingerprint."""

    other: ModelRef
    weights: tuple[float, float]
    label: str
    per_name: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def fingerprint(self) -> str:
        return f"merge:{self.label}:[{self.other.fingerprint()}]"

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        if role not in self.other.keys:
            return None
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        with ExitStack() as stack, torch.no_grad():
            theirs = dict(_open(self.other, role, stack).named_parameters())
            for name, weight in module.named_parameters():
                source = theirs.get(name)
                if source is None or source.shape != weight.shape:
                    continue
                a, b = self.per_name.get(name, self.weights)
                if (a, b) == (1.0, 0.0):
                    continue
                backups.append((weight, weight.detach().to("cpu", copy=True)))
                work = working_dtype(weight.dtype)
                merged = weight.to(work) * a + source.to(weight.device, work) * b
                weight.copy_(merged)

        def undo() -> None:
            with torch.no_grad():
                for weight, original in backups:
                    weight.copy_(original)
            backups.clear()

        return undo


def _open(handle: ModelRef, role: str, stack: ExitStack) -> torch.nn.Module:
    """The component ``role`` of ``handle`` with the handle's patches applied (undone when
    ``stack`` closes), read where it lives: it is not placed on the compute device."""
    try:
        module = handle.manager.get(handle.keys[role])
    except KeyError:
        raise NodeError(
            f"the model merged in is no longer loaded (its {role} was evicted from memory): raise the RAM budget "
            "(--ram-budget) or run the workflow again"
        ) from None
    for patch in handle.patches:
        restore = patch.apply(role, module)
        if restore is not None:
            stack.callback(restore)
    return module


def _reads(handle: ModelRef, role: str) -> set[str]:
    """ModelManager keys of every component read when ``handle``'s ``role`` is opened: its own
    and those of the models merged into it."""
    keys = {handle.keys[role]} if role in handle.keys else set()
    for patch in handle.patches:
        if isinstance(patch, MergePatch):
            keys |= _reads(patch.other, role)
    return keys


def _separate(first: ModelRef, second: ModelRef, roles: list[str], ctx: Context, field: str) -> ModelRef:
    """``second``, reading its weights from a copy where it is the very component ``first``
    names (the merge patches that component while it reads the other, so the two must differ)."""
    keys = dict(second.keys)
    for role in roles:
        key = first.keys[role]
        if any(key in _reads(p.other, role) for p in second.patches if isinstance(p, MergePatch)):
            raise NodeError(
                f"{field} was itself merged with the first model's {role}; merge in the other order, or load that "
                "checkpoint a second time from another file",
                field=field,
            )
        if key != second.keys.get(role):
            continue

        def clone(key: str = key) -> torch.nn.Module:
            ctx.models.offload(key)  # copied on the CPU, never on the compute device
            return copy.deepcopy(ctx.models.get(key))

        keys[role] = ctx.models.load(f"{key}:merge-source", clone)
    return replace(second, keys=keys)


def _shared(first: ModelRef, second: ModelRef, roles: list[str], ctx: Context) -> tuple[int, list[str]]:
    """(parameters both models have in the same shape, names of model1's parameters that model2
    lacks or holds in another shape) over ``roles``."""
    same, differ = 0, []
    for role in roles:
        mine = ctx.models.get(first.keys[role]).named_parameters()
        theirs = {n: p.shape for n, p in ctx.models.get(second.keys[role]).named_parameters()}
        for name, p in mine:
            if theirs.get(name) == p.shape:
                same += 1
            else:
                differ.append(f"{role}.{name}")
    return same, differ


def merge(
    first: Handle,
    second: ModelRef,
    roles: list[str],
    weights: tuple[float, float],
    label: str,
    ctx: Context,
    fields: tuple[str, str],
    per_name: Mapping[str, tuple[float, float]] | None = None,
) -> Handle:
    """``first`` with a :class:`MergePatch` of ``second`` over ``roles`` recorded on it; a clear
    NodeError (on ``fields``: the two inputs) when the models share no parameter."""
    if not roles:
        raise NodeError(f"{fields[1]} has none of the components of {fields[0]} ({', '.join(first.keys)}) to merge", field=fields[1])
    families = [getattr(getattr(h, "info", None), "family", "unknown") for h in (first, second)]
    if len(set(families)) > 1 and "unknown" not in families:
        raise NodeError(
            f"{fields[0]} is a {families[0]} model and {fields[1]} a {families[1]} one: models of different families "
            "cannot be merged (only some of their layers even have the same shapes); merge models of one family",
            field=fields[1],
        )
    same, differ = _shared(first, second, roles, ctx)
    if same == 0:
        raise NodeError(
            f"{fields[0]} ({families[0]}) and {fields[1]} ({families[1]}) share no parameter of the same name and shape: "
            "they are different architectures and cannot be merged; merge models of one family",
            field=fields[1],
        )
    if differ:
        log.warning(
            "merge: %d parameters of %s kept as they are (absent from %s or of another shape), e.g. %s",
            len(differ),
            fields[0],
            fields[1],
            ", ".join(differ[:5]),
        )
    ctx.progress(1, 1, merged=same, kept=len(differ), kept_names=differ[:20])
    other = _separate(first, second, roles, ctx, fields[1])
    return cast(Handle, first.with_patches(MergePatch(other, weights, label, dict(per_name or {}))))


def block_ratios(unet: Any, ratios: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """(a, b) of each U-Net parameter for ModelMergeBlocks: the ratio of the longest input name
    (``input``, ``middle``, ``out``) its LDM name starts with, else ``input``'s."""
    rule = unet_rule(dict(unet.config))
    table = {}
    for name, _ in unet.named_parameters():
        ldm = rule(name)[0][len(UNET_PREFIX) :]
        matches = [arg for prefix, arg in BLOCK_INPUTS if ldm.startswith(prefix)]
        ratio = ratios[max(matches, key=len)] if matches else ratios["input"]
        table[name] = (ratio, 1.0 - ratio)
    return table


# ---- nodes -------------------------------------------------------------------------------------
RATIO = "model1's share: merged = ratio·model1 + (1 − ratio)·model2 (1 keeps model1, 0 gives model2)"
MULTIPLIER = "Scale of the difference: merged = multiplier·(model1 − model2)"


class ModelMergeSimple(Node):
    type = "ModelMergeSimple"
    category = CATEGORY
    description = (
        "Blend two U-Nets of one family (ComfyUI's ModelMergeSimple): every weight becomes ratio·model1 + "
        "(1 − ratio)·model2, recorded as a patch on model1 (nothing is copied or reloaded)."
    )

    class Inputs(NodeIO):
        model1: UNet = Field(description="First U-Net (its handle, config and scheduler are kept)")
        model2: UNet = Field(description="Second U-Net, blended in (with its own patches)")
        ratio: float = Field(1.0, ge=0.0, le=1.0, description=RATIO)

    class Outputs(NodeIO):
        model: UNet = Field(description="model1 with the merge recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        r = inputs.ratio
        return self.Outputs(model=merge(inputs.model1, inputs.model2, ["unet"], (r, 1.0 - r), f"simple:{r!r}", ctx, ("model1", "model2")))


class ModelMergeBlocks(Node):
    type = "ModelMergeBlocks"
    category = CATEGORY
    description = (
        "Blend two U-Nets with one ratio per part of the U-Net (ComfyUI's ModelMergeBlocks): input blocks (and the "
        "time embedding), middle block, output blocks; each is model1's share as in ModelMergeSimple."
    )

    class Inputs(NodeIO):
        model1: UNet = Field(description="First U-Net (its handle, config and scheduler are kept)")
        model2: UNet = Field(description="Second U-Net, blended in (with its own patches)")
        input: float = Field(1.0, ge=0.0, le=1.0, description="model1's share in the input blocks (and the time embedding)")
        middle: float = Field(1.0, ge=0.0, le=1.0, description="model1's share in the middle block")
        out: float = Field(1.0, ge=0.0, le=1.0, description="model1's share in the output blocks and the final layers")

    class Outputs(NodeIO):
        model: UNet = Field(description="model1 with the merge recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        ratios = {"input": inputs.input, "middle": inputs.middle, "out": inputs.out}
        try:
            table = block_ratios(ctx.models.get(inputs.model1.keys["unet"]), ratios)
        except (KeyError, ModelFileError):
            family = model_info(inputs.model1, "model1").family
            raise NodeError(
                f"model1 ({family}) is not a U-Net with the block layout of Stable Diffusion (input, middle and output "
                "blocks); use ModelMergeSimple",
                field="model1",
            ) from None
        label = "blocks:" + ",".join(f"{k}={v!r}" for k, v in ratios.items())
        model = merge(inputs.model1, inputs.model2, ["unet"], (1.0, 0.0), label, ctx, ("model1", "model2"), table)
        return self.Outputs(model=model)


class ModelMergeSubtract(Node):
    type = "ModelMergeSubtract"
    category = CATEGORY
    description = (
        "The difference of two U-Nets, scaled (ComfyUI's ModelMergeSubtract): every weight becomes multiplier·(model1 − "
        "model2). Add it to a third model with ModelMergeAdd for an 'add difference' merge."
    )

    class Inputs(NodeIO):
        model1: UNet = Field(description="U-Net to subtract from")
        model2: UNet = Field(description="U-Net subtracted (with its own patches)")
        multiplier: float = Field(1.0, ge=-10.0, le=10.0, description=MULTIPLIER)

    class Outputs(NodeIO):
        model: UNet = Field(description="model1 with the difference recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        m = inputs.multiplier
        model = merge(inputs.model1, inputs.model2, ["unet"], (m, -m), f"subtract:{m!r}", ctx, ("model1", "model2"))
        return self.Outputs(model=model)


class ModelMergeAdd(Node):
    type = "ModelMergeAdd"
    category = CATEGORY
    description = "The sum of two U-Nets (ComfyUI's ModelMergeAdd): every weight becomes model1 + model2."

    class Inputs(NodeIO):
        model1: UNet = Field(description="First U-Net")
        model2: UNet = Field(description="U-Net added (with its own patches), e.g. a ModelMergeSubtract difference")

    class Outputs(NodeIO):
        model: UNet = Field(description="model1 with the sum recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(model=merge(inputs.model1, inputs.model2, ["unet"], (1.0, 1.0), "add", ctx, ("model1", "model2")))


def _clip_roles(clip: Clip, other: Clip) -> list[str]:
    return [r for r in TEXT_ROLES if r in clip.keys and r in other.keys]


class CLIPMergeSimple(Node):
    type = "CLIPMergeSimple"
    category = CATEGORY
    description = (
        "Blend two text encoders (ComfyUI's CLIPMergeSimple): every weight becomes ratio·clip1 + (1 − ratio)·clip2, "
        "encoder by encoder (SDXL's two each); clip1's tokenizers are kept."
    )

    class Inputs(NodeIO):
        clip1: Clip = Field(description="First text encoder(s) (its tokenizers are kept)")
        clip2: Clip = Field(description="Second text encoder(s), blended in (with its own patches)")
        ratio: float = Field(1.0, ge=0.0, le=1.0, description=RATIO.replace("model", "clip"))

    class Outputs(NodeIO):
        clip: Clip = Field(description="clip1 with the merge recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        r, roles = inputs.ratio, _clip_roles(inputs.clip1, inputs.clip2)
        return self.Outputs(clip=merge(inputs.clip1, inputs.clip2, roles, (r, 1.0 - r), f"clip-simple:{r!r}", ctx, ("clip1", "clip2")))


class CLIPMergeSubtract(Node):
    type = "CLIPMergeSubtract"
    category = CATEGORY
    description = (
        "The difference of two text encoders, scaled (ComfyUI's CLIPMergeSubtract): every weight becomes multiplier·(clip1 − clip2)."
    )

    class Inputs(NodeIO):
        clip1: Clip = Field(description="Text encoder(s) to subtract from")
        clip2: Clip = Field(description="Text encoder(s) subtracted (with its own patches)")
        multiplier: float = Field(1.0, ge=-10.0, le=10.0, description=MULTIPLIER.replace("model", "clip"))

    class Outputs(NodeIO):
        clip: Clip = Field(description="clip1 with the difference recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        m, roles = inputs.multiplier, _clip_roles(inputs.clip1, inputs.clip2)
        return self.Outputs(clip=merge(inputs.clip1, inputs.clip2, roles, (m, -m), f"clip-subtract:{m!r}", ctx, ("clip1", "clip2")))


class CLIPMergeAdd(Node):
    type = "CLIPMergeAdd"
    category = CATEGORY
    description = "The sum of two text encoders (ComfyUI's CLIPMergeAdd): every weight becomes clip1 + clip2."

    class Inputs(NodeIO):
        clip1: Clip = Field(description="First text encoder(s)")
        clip2: Clip = Field(description="Text encoder(s) added (with its own patches)")

    class Outputs(NodeIO):
        clip: Clip = Field(description="clip1 with the sum recorded on it")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        roles = _clip_roles(inputs.clip1, inputs.clip2)
        return self.Outputs(clip=merge(inputs.clip1, inputs.clip2, roles, (1.0, 1.0), "clip-add", ctx, ("clip1", "clip2")))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [ModelMergeSimple, ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd, CLIPMergeSimple, CLIPMergeSubtract, CLIPMergeAdd]
