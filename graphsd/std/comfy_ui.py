"""ComfyUI UI-format workflows (the editor's saved files, LiteGraph JSON with ``nodes`` and
``links``) converted into the API prompt the ComfyUI frontend itself would send for them
(``app.graphToPrompt()``); :mod:`graphsd.std.comfy` then reads that prompt like any other.

What the frontend does, and this module does the same way:

- Each node's ``widgets_values`` (a list in widget order) map to input names through the class's
  ``/object_info`` definition: the inputs of ``input_order`` (required, then optional) whose type
  is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO or a list of choices), not a link type. An
  INT ``seed`` / ``noise_seed`` and any input declaring ``control_after_generate`` are followed
  by the frontend-only value ("fixed", "randomize", ...), which is skipped. Values left out of a
  short list take the definition's default; values past the end (LoadImage's upload button) are
  ignored. A mapping ``widgets_values`` is read by name.
- A linked input becomes a link ``[node id, output slot]``; a widget converted to an input and
  linked takes the link instead of its value.
- Muted nodes (mode 2) are left out and so are Note, MarkdownNote, Reroute and PrimitiveNode. A
  link is followed through Reroutes; through a bypassed node (mode 4) it goes on from that node's
  input chosen as the frontend chooses it (the input at the output's index if its type fits, else
  the first input of exactly the wanted type, else the first whose type fits). A PrimitiveNode
  linked straight to a widget input gives that widget its value. A link that leads nowhere (a
  muted node, a dangling Reroute, a bypassed node without a matching input) leaves the input its
  saved widget value, or no value at all.

Subgraphs (``definitions.subgraphs``) and the older group nodes are refused with a clear message.
"""

from __future__ import annotations

from typing import Any

from graphsd.errors import Issue, WorkflowError

MUTED, BYPASSED = 2, 4
IGNORED_CLASSES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
"""Frontend-only nodes: they never reach the API prompt."""

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
"""The values of the frontend-only ``control_after_generate`` widget."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

FORMAT = "this is a ComfyUI UI-format workflow (the editor's saved file)"


def is_ui_workflow(data: Any) -> bool:
    """A ComfyUI UI-format workflow: a mapping with a ``nodes`` list (LiteGraph's serialisation);
    graphsd's own documents have a ``nodes`` mapping."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and ("links" in data or "last_node_id" in data)


def widget_inputs(entry: dict[str, Any]) -> list[tuple[str, bool, Any]]:
    """(name, followed by a control_after_generate value, default or ``...``) of each widget of a
    class, in the order the frontend creates them."""
    inputs = entry.get("input") or {}
    order = entry.get("input_order") or {section: list(inputs.get(section) or {}) for section in ("required", "optional")}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section) or []:
            spec = (inputs.get(section) or {}).get(name)
            if not isinstance(spec, (list, tuple)) or not spec:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            control = bool(opts.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
            default = opts["default"] if "default" in opts else (kind[0] if isinstance(kind, list) and kind else ...)
            widgets.append((name, control, default))
    return widgets


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph's isValidConnection: a generic type ('', '*') fits anything; otherwise the types
    are equal ignoring case, a comma-separated list fitting if one of its types does."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


class _UIConversion:
    """One UI workflow being converted: its nodes and links by id, and the problems found."""

    def __init__(self, workflow: dict[str, Any], classes: dict[str, dict[str, Any]]):
        self.classes = classes
        self.issues: list[Issue] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        for node in workflow["nodes"]:
            if not isinstance(node, dict) or not isinstance(node.get("id"), (int, str)) or not isinstance(node.get("type"), str):
                self.issues.append(Issue(f"{FORMAT}, but a node is not an object with an 'id' and a 'type': {_short(node)}", code="schema"))
                continue
            self.nodes[str(node["id"])] = node
        self.links: dict[str, tuple[str, int, str]] = {}  # link id -> (origin node id, origin slot, type)
        for link in _list(workflow.get("links")):
            if isinstance(link, list) and len(link) >= 6:
                link_id, origin, slot, link_type = link[0], link[1], link[2], link[5]
            elif isinstance(link, dict):
                link_id, origin, slot, link_type = link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("type")
            else:
                self.issues.append(Issue(f"{FORMAT}, but a link is not [id, from node, from slot, to node, to slot, type]: {_short(link)}"))
                continue
            if isinstance(slot, int) and not isinstance(slot, bool):
                self.links[str(link_id)] = (str(origin), slot, link_type)

    # ---- links ----------------------------------------------------------------------------
    def _input_origin(self, node: dict[str, Any], index: int) -> tuple[str, int, Any] | None:
        inputs = _list(node.get("inputs"))
        if not 0 <= index < len(inputs) or not isinstance(inputs[index], dict):
            return None
        link = inputs[index].get("link")
        return self.links.get(str(link)) if link is not None else None

    def resolve(self, origin: str, slot: int, want: Any, seen: frozenset[str] = frozenset()) -> tuple[str, int] | None:
        """The real node output a link from (origin, slot) stands for, for an input of type
        ``want``: through Reroutes and bypassed nodes; None where it leads nowhere."""
        node = self.nodes.get(origin)
        if node is None or origin in seen:
            return None
        seen = seen | {origin}
        if node.get("mode") == MUTED:
            return None
        if node["type"] == "Reroute":
            source = self._input_origin(node, slot)
            return self.resolve(source[0], source[1], want, seen) if source else None
        if node["type"] in IGNORED_CLASSES:
            return None
        if node.get("mode") == BYPASSED:
            index = self._bypass_index(node, slot, want)
            source = self._input_origin(node, index) if index >= 0 else None
            return self.resolve(source[0], source[1], want, seen) if source else None
        return origin, slot

    @staticmethod
    def _bypass_index(node: dict[str, Any], slot: int, want: Any) -> int:
        inputs = [i if isinstance(i, dict) else {} for i in _list(node.get("inputs"))]
        if want in ("", "*", None):
            return slot if slot < len(inputs) else (0 if inputs else -1)
        outputs = _list(node.get("outputs"))
        out_type = outputs[slot].get("type") if slot < len(outputs) and isinstance(outputs[slot], dict) else None

        def fits(i: dict[str, Any]) -> bool:
            return _valid_connection(i.get("type"), out_type) and _valid_connection(i.get("type"), want)

        if slot < len(inputs) and fits(inputs[slot]):
            return slot
        for index, i in enumerate(inputs):
            if i.get("type") == want:
                return index
        return next((index for index, i in enumerate(inputs) if fits(i)), -1)

    # ---- nodes ----------------------------------------------------------------------------
    def widgets(self, nid: str, node: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        values = node.get("widgets_values")
        specs = widget_inputs(entry)
        if isinstance(values, dict):
            return {name: values[name] for name, _, _ in specs if name in values}
        values = values if isinstance(values, list) else []
        inputs: dict[str, Any] = {}
        index = 0
        for name, control, default in specs:
            if index < len(values):
                inputs[name] = values[index]
                index += 1
                if control and index < len(values) and values[index] in CONTROL_VALUES:
                    index += 1
            elif default is not ...:
                inputs[name] = default
        return {k: {"__value__": v} if isinstance(v, list) else v for k, v in inputs.items()}

    def convert_node(self, nid: str, node: dict[str, Any]) -> dict[str, Any]:
        entry = self.classes[node["type"]]
        inputs = self.widgets(nid, node, entry)
        for slot in _list(node.get("inputs")):
            if not isinstance(slot, dict) or slot.get("link") is None or not isinstance(slot.get("name"), str):
                continue
            link = self.links.get(str(slot["link"]))
            if link is None:
                continue
            origin = self.nodes.get(link[0])
            if origin is not None and origin["type"] == "PrimitiveNode" and origin.get("mode") != MUTED and slot.get("widget"):
                primitive = origin.get("widgets_values")
                if isinstance(primitive, list) and primitive:
                    inputs[slot["name"]] = primitive[0]
                continue
            resolved = self.resolve(link[0], link[1], slot.get("type"))
            if resolved is not None:
                inputs[slot["name"]] = [resolved[0], resolved[1]]
        return {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or entry.get("display_name") or node["type"]},
        }


def class_definitions(nodes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``/object_info`` definitions of what a UI workflow can name: the ComfyUI classes graphsd
    imports and graphsd's node types (``nodes``), under the names ``graphsd serve`` gives them,
    so widget orders are the ones the frontend used. File choices play no part in widget order,
    so they are listed from empty folders."""
    import tempfile

    from graphsd.server.objectinfo import native_entry, native_name
    from graphsd.std.comfy import COMFY_TYPES, object_info

    with tempfile.TemporaryDirectory() as empty:
        classes = object_info(empty, empty)
    for node_type, cls in nodes.items():
        name = native_name(node_type, classes)
        classes[name] = native_entry(cls, name, "custom_nodes.graphsd", COMFY_TYPES)
    return classes


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ui_to_prompt(workflow: dict[str, Any], classes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The API prompt the ComfyUI frontend sends for a UI-format ``workflow``, given the
    ``/object_info`` definitions of the classes graphsd knows (``classes``). Raises
    :class:`WorkflowError` saying this is a UI-format workflow and what cannot be converted (each
    unknown class with its node id and title)."""
    if not isinstance(workflow.get("nodes"), list):
        raise WorkflowError([Issue(f"{FORMAT}, but its 'nodes' is not a list of nodes", code="schema")])
    definitions, extra = workflow.get("definitions"), workflow.get("extra")
    subgraphs = _list(definitions.get("subgraphs")) if isinstance(definitions, dict) else []
    group_nodes: dict[str, Any] = extra["groupNodes"] if isinstance(extra, dict) and isinstance(extra.get("groupNodes"), dict) else {}
    conversion = _UIConversion(workflow, classes)
    issues = conversion.issues
    subgraph_ids = {str(s.get("id")) for s in subgraphs if isinstance(s, dict)}
    prompt: dict[str, dict[str, Any]] = {}
    for nid, node in conversion.nodes.items():
        mode, class_type = node.get("mode", 0), node["type"]
        if mode in (MUTED, BYPASSED) or class_type in IGNORED_CLASSES:
            continue
        title = f" ('{node['title']}')" if node.get("title") and node.get("title") != class_type else ""
        if class_type in subgraph_ids or class_type.startswith("workflow>") or class_type.split(">")[-1] in group_nodes:
            issues.append(
                Issue(
                    f"{FORMAT}; node {nid}{title} is a subgraph or group node, which graphsd cannot expand yet",
                    node=nid,
                    hint="unpack it in the ComfyUI editor (right-click → Unpack Subgraph) and save again, or use 'Export (API)'",
                    code="unknown_type",
                )
            )
        elif class_type not in classes:
            issues.append(
                Issue(
                    f"{FORMAT}; node {nid}{title} is of class '{class_type}', which graphsd lacks",
                    node=nid,
                    hint="graphsd reads the ComfyUI classes "
                    + ", ".join(sorted(c for c, e in classes.items() if e.get("python_module") == "nodes"))
                    + " and its own node types (graphsd nodes lists them)",
                    code="unknown_type",
                )
            )
        else:
            prompt[nid] = conversion.convert_node(nid, node)
    if not issues and not prompt:
        issues.append(
            Issue(f"{FORMAT}, but every node in it is muted, bypassed or frontend-only: there is nothing to run", code="no_outputs")
        )
    if issues:
        raise WorkflowError(issues)
    # an input linked to a node that is not in the prompt is removed, as the frontend removes it
    for api_node in prompt.values():
        inputs = api_node["inputs"]
        for name in [n for n, v in inputs.items() if isinstance(v, list) and len(v) == 2 and str(v[0]) not in prompt]:
            del inputs[name]
    return prompt
