"""``/object_info``: every registered graphsd node, described from its schema in ComfyUI's
shape, plus the ComfyUI classes that plugins translate (``graphsd_comfy_nodes``).

A graphsd node keeps its type as its name unless a ComfyUI class has that name; it is then
listed as ``graphsd.<type>`` (:data:`~graphsd.hookspecs.COMFY_NATIVE_PREFIX`). Its inputs keep
their graphsd names: socket inputs become link-only inputs typed with the ComfyUI name of the
socket type (``graphsd_comfy_types``: ``UNet`` → ``MODEL``, ...), optional sockets go under
``optional``, and literal inputs become widgets (INT, FLOAT, STRING, BOOLEAN, or a combo of a
``Literal``'s choices) with their default, range and step. Outputs keep their declared order,
which is how the frontend's links ``[node, index]`` name them.
"""

from __future__ import annotations

import math
import types as pytypes
from typing import Any, Literal, Union, cast, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MultipleOf
from pydantic.fields import FieldInfo

from graphsd.hookspecs import COMFY_NATIVE_PREFIX
from graphsd.node import Node, socket_class, type_label

_MULTILINE = {"text", "prompt", "negative_prompt", "caption", "captions"}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None was allowed)."""
    if get_origin(annotation) in (Union, pytypes.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def _bounds(f: FieldInfo, integer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in f.metadata:
        if isinstance(m, Ge):
            out["min"] = m.ge
        elif isinstance(m, Gt):
            out["min"] = cast(Any, m.gt) + 1 if integer else m.gt
        elif isinstance(m, Le):
            out["max"] = m.le
        elif isinstance(m, Lt):
            out["max"] = cast(Any, m.lt) - 1 if integer else m.lt
        elif isinstance(m, MultipleOf):
            out["step"] = m.multiple_of
    return out


def _default(f: FieldInfo) -> tuple[bool, Any]:
    if f.is_required():
        return False, None
    value = f.get_default(call_default_factory=True)
    return value is not None, value


def _float_step(default: Any) -> float:
    """A widget step fine enough for the default (0.01, or 1e-4 for a default of 1e-4)."""
    if isinstance(default, (int, float)) and default and abs(default) < 0.01:
        return float(10 ** math.floor(math.log10(abs(default))))
    return 0.01


def input_spec(name: str, f: FieldInfo, comfy_types: dict[str, str]) -> tuple[list[Any], bool]:
    """(ComfyUI input spec, whether it goes under ``optional``) for one graphsd input."""
    inner, optional = _unwrap(f.annotation)
    opts: dict[str, Any] = {"tooltip": f.description} if f.description else {}
    sock = socket_class(f.annotation)
    if sock is not None:
        return [comfy_types.get(sock.type_name(), sock.type_name()), opts], optional or not f.is_required()
    has_default, default = _default(f)
    if has_default:
        opts["default"] = default
    if get_origin(inner) is Literal:
        return [list(get_args(inner)), opts], optional
    if inner is bool:
        return ["BOOLEAN", {"default": False, **opts}], optional
    if inner is int:
        opts = {"default": 0, **opts, "step": 1, **_bounds(f, True)}
        if name in ("seed", "noise_seed"):
            opts["control_after_generate"] = True
        return ["INT", opts], optional
    if inner is float:
        bounds = _bounds(f, False)
        opts = {"default": 0.0, **opts, "step": _float_step(opts.get("default")), "round": False, **bounds}
        return ["FLOAT", opts], optional
    if inner is str:
        opts = {"default": "", **opts}
        if name in _MULTILINE:
            opts["multiline"] = True
        return ["STRING", opts], optional
    return [type_label(f.annotation).rstrip("?"), opts], optional or not f.is_required()


def output_type(f: FieldInfo, comfy_types: dict[str, str]) -> str:
    sock = socket_class(f.annotation)
    if sock is not None:
        return comfy_types.get(sock.type_name(), sock.type_name())
    inner, _ = _unwrap(f.annotation)
    return {int: "INT", float: "FLOAT", str: "STRING", bool: "BOOLEAN"}.get(inner, type_label(f.annotation).rstrip("?"))


def native_entry(
    cls: type[Node], name: str, module: str, comfy_types: dict[str, str], choices: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The ``/object_info`` entry of one graphsd node class. ``choices`` (the node's
    :meth:`~graphsd.node.Node.input_choices`) turns those text inputs into lists to pick from."""
    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    for field_name, f in cls.input_fields().items():
        spec, is_optional = input_spec(field_name, f, comfy_types)
        if choices and field_name in choices and spec[0] == "STRING":
            spec = [list(choices[field_name]), {k: v for k, v in spec[1].items() if k not in ("default", "multiline")}]
        (optional if is_optional else required)[field_name] = spec
    outputs = cls.output_fields()
    return {
        "input": {"required": required, "optional": optional, "hidden": {}},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [output_type(f, comfy_types) for f in outputs.values()],
        "output_is_list": [False] * len(outputs),
        "output_name": list(outputs),
        "output_tooltips": [f.description or "" for f in outputs.values()],
        "name": name,
        "display_name": name,
        "description": cls.description,
        "category": f"graphsd/{cls.category or 'misc'}",
        "output_node": bool(cls.output_node),
        "python_module": module,
        "deprecated": False,
        "experimental": False,
        "search_aliases": [],
    }


def native_name(node_type: str, comfy_names: set[str] | dict[str, Any]) -> str:
    """The name a graphsd node type has in ``/object_info``."""
    return COMFY_NATIVE_PREFIX + node_type if node_type in comfy_names else node_type


def build(
    nodes: dict[str, type[Node]],
    modules: dict[str, str],
    comfy: dict[str, dict[str, Any]],
    comfy_types: dict[str, str],
    choices: dict[str, dict[str, list[str]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The whole ``/object_info``: ``comfy`` (the plugins' ComfyUI classes, completed where a
    plugin left out a field the frontend needs) and an entry per graphsd node type (``modules``
    gives each type's ``python_module``, ``choices`` the file names its inputs offer)."""
    info: dict[str, dict[str, Any]] = {}
    for name, entry in comfy.items():
        entry = dict(entry)
        entry["name"] = name
        if not isinstance(entry.get("python_module"), str):
            entry["python_module"] = "nodes"
        if not entry.get("category"):
            entry["category"] = "graphsd/comfyui"
        entry.setdefault("display_name", name)
        entry.setdefault("description", "")
        entry.setdefault("output_node", False)
        info[name] = entry
    for node_type in sorted(nodes):
        name = native_name(node_type, comfy)
        info[name] = native_entry(
            nodes[node_type], name, modules.get(node_type, "custom_nodes.graphsd"), comfy_types, (choices or {}).get(node_type)
        )
    return info
