"""The Node contract.

A node type is one class::

    class Invert(Node):
        type = "InvertImage"
        category = "image"
        description = "Invert the colours of an image."

        class Inputs(NodeIO):
            image: Image = Field(description="Image to invert")
            amount: float = Field(1.0, ge=0.0, le=1.0, description="0 = unchanged, 1 = inverted")

        class Outputs(NodeIO):
            image: Image

        def run(self, inputs, ctx):
            p = inputs.image.pixels
            return self.Outputs(image=Image(p + (1 - 2 * p) * inputs.amount))

plus one line in a ``graphsd_register_nodes`` hook implementation returning it. ``run`` is a
pure function of its inputs and the context: nodes keep no state between runs and hold no
weights (models come from ``ctx.models``). Inputs declared with a :class:`~graphsd.types.Socket`
type only accept links; plain types (int, float, str, bool, ``Literal[...]``) accept a literal
or a link of the same type. Defaults, ranges (``ge``/``le``/``gt``/``lt``), enums
(``Literal``) and descriptions declared on the fields are what validation checks and what
``graphsd nodes`` and :meth:`Node.schema` export.
"""

from __future__ import annotations

import builtins
import types as _pytypes
import typing
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic.fields import FieldInfo

from graphsd.types import Socket

if TYPE_CHECKING:
    from graphsd.context import Settings
    from graphsd.executor import Context

_NONE_TYPE = type(None)


class NodeIO(BaseModel):
    """Base for a node's ``Inputs`` and ``Outputs`` models."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=False)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, _pytypes.UnionType):
        args = [a for a in get_args(annotation) if a is not _NONE_TYPE]
        optional = len(args) < len(get_args(annotation))
        if len(args) == 1:
            return args[0], optional
    return annotation, False


def socket_class(annotation: Any) -> type[Socket] | None:
    """The Socket subclass an annotation names (through Optional), or None for literals."""
    inner, _ = _strip_optional(annotation)
    if isinstance(inner, type) and issubclass(inner, Socket):
        return inner
    return None


def type_label(annotation: Any) -> str:
    """Short human name of a field type: ``Latent``, ``int``, ``choice``..."""
    inner, optional = _strip_optional(annotation)
    if isinstance(inner, type) and issubclass(inner, Socket):
        name = inner.type_name()
    elif get_origin(inner) is Literal:
        name = "choice"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner).replace("typing.", "")
    return f"{name}?" if optional else name


def types_compatible(out_annotation: Any, in_annotation: Any) -> bool:
    """Can an output declared ``out_annotation`` feed an input declared ``in_annotation``?"""
    out_sock, in_sock = socket_class(out_annotation), socket_class(in_annotation)
    if out_sock or in_sock:
        return bool(out_sock and in_sock and issubclass(out_sock, in_sock))
    out_t, _ = _strip_optional(out_annotation)
    in_t, _ = _strip_optional(in_annotation)
    if in_t is Any or out_t is Any or out_t == in_t:
        return True
    if get_origin(in_t) is Literal:
        return out_t is str or get_origin(out_t) is Literal
    if in_t is float and out_t is int:
        return True
    return False


class Node:
    """Base class of every node type (see the module docstring for the contract)."""

    #: Unique name used in workflow files (``type: CheckpointLoader``).
    type: ClassVar[str]
    #: Menu/grouping name (``loaders``, ``sampling``, ``image``, ...).
    category: ClassVar[str] = "misc"
    #: One or two sentences for ``graphsd nodes`` and the docs.
    description: ClassVar[str] = ""
    #: Bump when the implementation changes what it computes: old cache entries stop matching.
    version: ClassVar[int] = 1
    #: False for nodes whose result must never be reused (e.g. reading a clock or a camera).
    cacheable: ClassVar[bool] = True
    #: True for sinks (SaveImage, ...): they are what a run executes when no output is chosen.
    output_node: ClassVar[bool] = False

    # (builtins.type: inside this class body ``type`` is the node's name)
    Inputs: ClassVar[builtins.type[NodeIO]] = NodeIO
    Outputs: ClassVar[builtins.type[NodeIO]] = NodeIO

    def run(self, inputs: Any, ctx: Context) -> NodeIO:  # pragma: no cover - abstract
        raise NotImplementedError(f"node type {self.type!r} does not implement run()")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        """Checks that depend on what plugins registered (e.g. a sampler name), run during
        validation: return ``(field, problem, hint)`` triples. Default: none."""
        return []

    @classmethod
    def check_context(
        cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings
    ) -> list[tuple[str, str, str | None]]:
        """Checks that need more than the node's own literals, run when an engine validates a
        workflow (:meth:`~graphsd.engine.Engine.load`: ``graphsd run`` / ``validate``, the
        server): the engine's ``settings`` (does a file a loader names exist in the models or
        input folder?) and what feeds each linked input (``upstream``: input name →
        :class:`Upstream`, e.g. "this clip comes from a checkpoint with one text encoder").
        Nothing has run: a check that cannot tell says nothing. Return ``(field, problem, hint)``
        triples, as :meth:`check_literals`. Default: none."""
        return []

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """Extra cache identity beyond the literal inputs, e.g. the size and mtime of a file a
        loader reads, so that replacing the file invalidates the cache. Default: nothing."""
        return ""

    # ---- batching (optional) ---------------------------------------------------------------
    @classmethod
    def batch_key(cls, inputs: Any, ctx: Context) -> Hashable | None:
        """What a run of this node must share with others to run with them as one batch, or None
        (the default) when it runs alone. The executor gives ``inputs`` (validated, as ``run``
        gets them) of nodes of this class that are ready at the same time; those whose keys are
        equal run in one :meth:`run_batch` call (at most ``Settings.max_batch``). A key names
        everything the batched computation shares (the model handle and its patches, settings,
        tensor shapes and dtypes); what differs per item (a seed's noise, a prompt's embeddings)
        stays out of it."""
        return None

    @classmethod
    def run_batch(cls, inputs: list[Any], ctxs: list[Context]) -> list[NodeIO]:
        """Run several nodes of equal :meth:`batch_key` at once and return each one's outputs,
        in order. Each result must equal what ``run`` gives for that item alone, within the
        rounding of a batched computation. Any exception makes the executor run the items one
        by one with ``run`` instead, so an item that fails fails alone. Per-step progress goes
        to every item's context (``ctx.progress``), which also checks for interruption."""
        raise NotImplementedError(f"node type {cls.type!r} has a batch_key but no run_batch()")

    @classmethod
    def batch_item_bytes(cls, inputs: Any, ctx: Context) -> int:
        """Device memory one more item adds to a batched call (working tensors, not weights),
        which bounds the batch by what is available on the device. Default: 0 (no bound but
        ``Settings.max_batch``)."""
        return 0

    @classmethod
    def input_choices(cls, models_dir: str, input_dir: str) -> dict[str, list[str]]:
        """The names a text input that names a file can take right now, ``{input: [names]}``:
        the model files under ``models_dir`` or the images in ``input_dir``. Editors show these as
        lists (``graphsd serve``'s ``/object_info``); validation is unchanged, so any other value
        (a path) is still checked as usual. Default: none."""
        return {}

    # ---- introspection -------------------------------------------------------------------
    @classmethod
    def input_fields(cls) -> dict[str, FieldInfo]:
        return dict(cls.Inputs.model_fields)

    @classmethod
    def output_fields(cls) -> dict[str, FieldInfo]:
        return dict(cls.Outputs.model_fields)

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """A JSON-serialisable description of the node (for ``graphsd nodes --json`` and the
        future HTTP API's ``/object_info``)."""
        return {
            "type": cls.type,
            "category": cls.category,
            "description": cls.description,
            "version": cls.version,
            "cacheable": cls.cacheable,
            "output_node": cls.output_node,
            "inputs": {name: field_schema(f) for name, f in cls.input_fields().items()},
            "outputs": {
                name: {"type": type_label(f.annotation), "description": f.description or ""} for name, f in cls.output_fields().items()
            },
        }


@dataclass(frozen=True)
class Upstream:
    """The node output that feeds a linked input, as validation sees it before anything runs:
    the node's id, class and literal inputs, which of its outputs, and what feeds its own linked
    inputs (so a check can follow a model through patches back to its loader)."""

    node_id: str
    cls: type[Node]
    output: str
    literals: Mapping[str, Any]
    inputs: Mapping[str, Upstream]


def field_schema(f: FieldInfo) -> dict[str, Any]:
    inner, _ = _strip_optional(f.annotation)
    out: dict[str, Any] = {
        "type": type_label(f.annotation),
        "required": f.is_required(),
        "link_only": socket_class(f.annotation) is not None,
        "description": f.description or "",
    }
    if not f.is_required():
        default = f.get_default(call_default_factory=True)
        out["default"] = default if isinstance(default, (int, float, str, bool, type(None))) else repr(default)
    for m in f.metadata:
        if isinstance(m, Ge):
            out["min"] = m.ge
        elif isinstance(m, Gt):
            out["min_exclusive"] = m.gt
        elif isinstance(m, Le):
            out["max"] = m.le
        elif isinstance(m, Lt):
            out["max_exclusive"] = m.lt
    if get_origin(inner) is Literal:
        out["choices"] = list(get_args(inner))
    return out


_ADAPTERS: dict[int, TypeAdapter] = {}


def literal_adapter(f: FieldInfo) -> TypeAdapter:
    """A pydantic validator for one literal field, constraints included."""
    key = id(f)
    if key not in _ADAPTERS:
        annotated: Any = typing.Annotated[f.annotation, f]  # a type built at run time
        _ADAPTERS[key] = TypeAdapter(annotated, config=ConfigDict(arbitrary_types_allowed=True, strict=False))
    return _ADAPTERS[key]
