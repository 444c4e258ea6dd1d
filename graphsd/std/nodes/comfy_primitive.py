"""ComfyUI's primitive nodes (``comfy_extras/nodes_primitive.py``) as graphsd nodes of the same names:
PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline and PrimitiveBoolean. Each
passes its ``value`` on as an output of that type, which a link can feed into any input of the
same type (an int also into a float input, a string into a choice), so one value can drive
several nodes: ``{"class_type": "PrimitiveInt", "inputs": {"value": 7}}`` linked to a KSampler's
seed, say.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import Field

from graphsd.context import Context
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO

LIMIT = sys.maxsize
"""ComfyUI's bounds of PrimitiveInt and PrimitiveFloat: ±(2**63 - 1)."""


class _Primitive(Node):
    """A node whose output ``value`` is its input ``value``."""

    category = "utils/primitive"

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(value=inputs.value)


class PrimitiveInt(_Primitive):
    type = "PrimitiveInt"
    description = "An integer (ComfyUI's Int primitive), to link into integer inputs."

    class Inputs(NodeIO):
        value: int = Field(0, ge=-LIMIT, le=LIMIT, description="The integer")

    class Outputs(NodeIO):
        value: int = Field(description="The integer")


class PrimitiveFloat(_Primitive):
    type = "PrimitiveFloat"
    description = "A number (ComfyUI's Float primitive), to link into number inputs."

    class Inputs(NodeIO):
        value: float = Field(0.0, ge=-LIMIT, le=LIMIT, allow_inf_nan=False, description="The number")

    class Outputs(NodeIO):
        value: float = Field(description="The number")


class PrimitiveString(_Primitive):
    type = "PrimitiveString"
    description = "A line of text (ComfyUI's String primitive), to link into text inputs."

    class Inputs(NodeIO):
        value: str = Field("", description="The text")

    class Outputs(NodeIO):
        value: str = Field(description="The text")


class PrimitiveStringMultiline(_Primitive):
    type = "PrimitiveStringMultiline"
    description = "Text of several lines (ComfyUI's String (Multiline) primitive), to link into text inputs."

    class Inputs(NodeIO):
        value: str = Field("", description="The text")

    class Outputs(NodeIO):
        value: str = Field(description="The text")


class PrimitiveBoolean(_Primitive):
    type = "PrimitiveBoolean"
    description = "True or false (ComfyUI's Boolean primitive), to link into on/off inputs."

    class Inputs(NodeIO):
        value: bool = Field(False, description="True or false")

    class Outputs(NodeIO):
        value: bool = Field(description="True or false")


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean]
