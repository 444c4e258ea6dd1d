"""ComfyUI's TomePatchModel (``comfy_extras/nodes_tomesd.py``) as a graphsd node of the same name
and inputs: token merging in the U-Net's full-resolution self-attention
(:mod:`graphsd.std.models.tome`), recorded on the U-Net handle as a patch like a LoRA."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from graphsd.context import Context
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.std.models.tome import TomePatch
from graphsd.types import UNet


class TomePatchModel(Node):
    type = "TomePatchModel"
    category = "model_patches/unet"
    description = (
        "Token merging for Stable Diffusion (Bolya & Hoffman 2023), as ComfyUI's TomePatchModel applies it: in the "
        "full-resolution self-attention layers, the most similar ratio of the tokens are merged (bipartite soft matching, one "
        "destination per 2x2 cell) before the attention's queries and spread back after, which makes large images faster at "
        "some cost in detail. 0 changes nothing."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The U-Net to patch")
        ratio: float = Field(0.3, ge=0.0, le=1.0, description="Share of the tokens merged away in each such layer")

    class Outputs(NodeIO):
        model: UNet = Field(description="The U-Net with token merging recorded on it (the weights are shared)")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        if inputs.ratio == 0:
            return self.Outputs(model=inputs.model)
        return self.Outputs(model=inputs.model.with_patches(TomePatch(inputs.ratio)))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [TomePatchModel]
