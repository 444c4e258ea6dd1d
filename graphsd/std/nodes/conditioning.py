"""Conditioning operations with ComfyUI's names, inputs and semantics: ConditioningZeroOut,
ConditioningAverage, ConditioningConcat, ConditioningCombine, ConditioningSetArea,
ConditioningSetAreaPercentage, ConditioningSetAreaStrength and ConditioningSetMask.

A conditioning is a list of one or more entries (:meth:`Conditioning.entries`), as in ComfyUI:
the operations that change a conditioning change every entry, ConditioningCombine joins two
lists, and the denoise loops evaluate every entry of a side and average their predictions by
area, strength and mask (:mod:`graphsd.std.sampling.guidance` says how, as ComfyUI's
``calc_cond_batch`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.types import Area, Conditioning, Mask

MAX_RESOLUTION = 16384
"""ComfyUI's largest width or height, in pixels."""
PIXELS_PER_CELL = 8
"""ComfyUI's area nodes divide pixel sizes by 8 (the SD VAEs' downscale) to get latent cells."""


def each(cond: Conditioning, change: Callable[[Conditioning], Conditioning]) -> Conditioning:
    """``cond`` with ``change`` applied to every entry."""
    return Conditioning.of_entries([change(e) for e in cond.entries()])


class ConditioningZeroOut(Node):
    type = "ConditioningZeroOut"
    category = "advanced/conditioning"
    description = (
        "Zero the text embeddings (and SDXL's pooled embedding) of a conditioning, keeping its other settings "
        "(ComfyUI's ConditioningZeroOut)."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning to zero")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The same conditioning with all-zero embeddings")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        def zero(e: Conditioning) -> Conditioning:
            return replace(e, embeddings=torch.zeros_like(e.embeddings), pooled=None if e.pooled is None else torch.zeros_like(e.pooled))

        return self.Outputs(conditioning=each(inputs.conditioning, zero))


class ConditioningAverage(Node):
    type = "ConditioningAverage"
    category = "conditioning"
    description = (
        "Blend two conditionings (ComfyUI's ConditioningAverage): each entry of conditioning_to becomes "
        "to × strength + from × (1 - strength), with the first entry of conditioning_from cut or zero-padded to its "
        "number of tokens; pooled embeddings blend the same way."
    )

    class Inputs(NodeIO):
        conditioning_to: Conditioning = Field(description="The conditioning to blend into (its settings are kept)")
        conditioning_from: Conditioning = Field(description="The conditioning blended in (only its first entry is used, as in ComfyUI)")
        conditioning_to_strength: float = Field(1.0, ge=0.0, le=1.0, description="Weight of conditioning_to (1 = unchanged)")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The blend")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        source = inputs.conditioning_from.entries()[0]
        strength = inputs.conditioning_to_strength

        def blend(e: Conditioning) -> Conditioning:
            tokens = e.embeddings.shape[1]
            other = source.embeddings[:, :tokens]
            if other.shape[1] < tokens:
                pad = other.new_zeros((other.shape[0], tokens - other.shape[1], other.shape[2]))
                other = torch.cat([other, pad], dim=1)
            _same_width(e, source, "conditioning_from")
            embeddings = _weighted(e.embeddings, other, strength, "conditioning_from")
            pooled = e.pooled
            if source.pooled is not None:  # an entry without one blends the source's with itself
                pooled = _weighted(source.pooled if e.pooled is None else e.pooled, source.pooled, strength, "conditioning_from")
            return replace(e, embeddings=embeddings, pooled=pooled)

        return self.Outputs(conditioning=each(inputs.conditioning_to, blend))


def _same_width(e: Conditioning, other: Conditioning, field: str) -> None:
    if e.embeddings.shape[-1] != other.embeddings.shape[-1]:
        raise NodeError(
            f"the conditionings have embeddings {e.embeddings.shape[-1]} and {other.embeddings.shape[-1]} wide: they come from "
            "different text encoders; encode both prompts with the same clip",
            field=field,
        )


def _weighted(to: torch.Tensor, other: torch.Tensor, strength: float, field: str) -> torch.Tensor:
    if to.shape[0] != other.shape[0] and 1 not in (to.shape[0], other.shape[0]):
        raise NodeError(f"the conditionings have batches {to.shape[0]} and {other.shape[0]}; use batch 1 or the same batch", field=field)
    return torch.mul(to, strength) + torch.mul(other.to(to.dtype), 1.0 - strength)


class ConditioningConcat(Node):
    type = "ConditioningConcat"
    category = "conditioning"
    description = (
        "Append the tokens of conditioning_from to each entry of conditioning_to (ComfyUI's ConditioningConcat): the "
        "U-Net attends to both prompts at once, each as strong as alone."
    )

    class Inputs(NodeIO):
        conditioning_to: Conditioning = Field(description="The conditioning to extend (its settings are kept)")
        conditioning_from: Conditioning = Field(description="The conditioning appended (only its first entry, as in ComfyUI)")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The concatenation")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        source = inputs.conditioning_from.entries()[0]

        def concat(e: Conditioning) -> Conditioning:
            _same_width(e, source, "conditioning_from")
            if e.embeddings.shape[0] != source.embeddings.shape[0]:
                raise NodeError(
                    f"the conditionings have batches {e.embeddings.shape[0]} and {source.embeddings.shape[0]}; encode both with "
                    "the same batch",
                    field="conditioning_from",
                )
            return replace(e, embeddings=torch.cat([e.embeddings, source.embeddings.to(e.embeddings.dtype)], dim=1))

        return self.Outputs(conditioning=each(inputs.conditioning_to, concat))


class ConditioningCombine(Node):
    type = "ConditioningCombine"
    category = "conditioning"
    description = (
        "Use two conditionings together (ComfyUI's Conditioning (Combine)): the sampler predicts with each and averages "
        "the predictions, weighted by their areas, strengths and masks."
    )

    class Inputs(NodeIO):
        conditioning_1: Conditioning = Field(description="The first conditioning")
        conditioning_2: Conditioning = Field(description="The second conditioning")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="Both, as one conditioning of their entries")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(conditioning=Conditioning.of_entries(inputs.conditioning_1.entries() + inputs.conditioning_2.entries()))


class ConditioningSetArea(Node):
    type = "ConditioningSetArea"
    category = "conditioning"
    description = (
        "Restrict a conditioning to a rectangle of the picture (ComfyUI's Conditioning (Set Area)): the U-Net sees only "
        "that part of the latent for it, and its prediction counts there with this strength (fading out over up to 8 "
        "latent cells at edges inside the picture). Sizes are in pixels, divided by 8 into latent cells."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning to place")
        width: int = Field(64, ge=64, le=MAX_RESOLUTION, description="Width of the area in pixels")
        height: int = Field(64, ge=64, le=MAX_RESOLUTION, description="Height of the area in pixels")
        x: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the area in pixels")
        y: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the area in pixels")
        strength: float = Field(1.0, ge=0.0, le=10.0, description="Weight of its prediction against the side's others")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with its area")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        c = PIXELS_PER_CELL
        area = Area(inputs.height // c, inputs.width // c, inputs.y // c, inputs.x // c)
        return self.Outputs(
            conditioning=each(inputs.conditioning, lambda e: replace(e, area=area, strength=inputs.strength, mask_bounds=False))
        )


class ConditioningSetAreaPercentage(Node):
    type = "ConditioningSetAreaPercentage"
    category = "conditioning"
    description = (
        "Restrict a conditioning to a rectangle given as fractions of the picture's width and height (ComfyUI's "
        "Conditioning (Set Area with Percentage)); otherwise as ConditioningSetArea."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning to place")
        width: float = Field(1.0, ge=0.0, le=1.0, description="Width of the area, as a fraction of the picture's")
        height: float = Field(1.0, ge=0.0, le=1.0, description="Height of the area, as a fraction of the picture's")
        x: float = Field(0.0, ge=0.0, le=1.0, description="Left edge, as a fraction of the picture's width")
        y: float = Field(0.0, ge=0.0, le=1.0, description="Top edge, as a fraction of the picture's height")
        strength: float = Field(1.0, ge=0.0, le=10.0, description="Weight of its prediction against the side's others")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with its area")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        area = Area(inputs.height, inputs.width, inputs.y, inputs.x, relative=True)
        return self.Outputs(
            conditioning=each(inputs.conditioning, lambda e: replace(e, area=area, strength=inputs.strength, mask_bounds=False))
        )


class ConditioningSetAreaStrength(Node):
    type = "ConditioningSetAreaStrength"
    category = "conditioning"
    description = "Set the weight of a conditioning's prediction against the others of its side (ComfyUI's ConditioningSetAreaStrength)."

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning")
        strength: float = Field(1.0, ge=0.0, le=10.0, description="Weight of its prediction")

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with its strength")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(conditioning=each(inputs.conditioning, lambda e: replace(e, strength=inputs.strength)))


class ConditioningSetMask(Node):
    type = "ConditioningSetMask"
    category = "conditioning"
    description = (
        "Weigh a conditioning by a mask (ComfyUI's Conditioning (Set Mask)): its prediction counts in proportion to the "
        "mask (resized to the latent) times strength; with set_cond_area 'mask bounds' the U-Net sees only the mask's "
        "bounding box for it."
    )

    class Inputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning")
        mask: Mask = Field(description="Where (and how much) it applies, in [0, 1]")
        strength: float = Field(1.0, ge=0.0, le=10.0, description="Multiplies the mask")
        set_cond_area: Literal["default", "mask bounds"] = Field(
            "default", description="default: the whole latent; mask bounds: only the mask's bounding box"
        )

    class Outputs(NodeIO):
        conditioning: Conditioning = Field(description="The conditioning with its mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        bounds = inputs.set_cond_area == "mask bounds"
        mask = inputs.mask.values
        return self.Outputs(
            conditioning=each(inputs.conditioning, lambda e: replace(e, mask=mask, mask_strength=inputs.strength, mask_bounds=bounds))
        )


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [
        ConditioningZeroOut,
        ConditioningAverage,
        ConditioningConcat,
        ConditioningCombine,
        ConditioningSetArea,
        ConditioningSetAreaPercentage,
        ConditioningSetAreaStrength,
        ConditioningSetMask,
    ]
