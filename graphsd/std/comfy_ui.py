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
- Subgraphs (``definitions.subgraphs``; a node whose ``type`` is a subgraph's id is an instance
  of it) are flattened as the frontend flattens them: the nodes inside an instance ``7`` get the
  ids ``"7:<inner id>"`` (``"7:3:12"`` when nested); a link from the subgraph's input node (id
  -10) continues from what feeds the instance's input of that index, or, when nothing does and
  the input carries a promoted widget, takes the instance's widget value
  (``widgets_values_named``, else ``widgets_values`` in the order of the inputs with widgets); a
  link to an instance's output continues from the inner link into the subgraph's output node (id
  -20). A PrimitiveNode linked to an instance's input gives the inner nodes nothing (they keep
  their own widget values: the frontend 1.58 sends that too). A muted instance is left out with
  everything in it; a bypassed one passes its inputs through like any bypassed node.
- Group nodes of older editors (``extra.groupNodes``, instances of class ``workflow>Name`` or
  ``workflow/Name``) are unpacked into their inner nodes, ids ``"<instance>:<index>"``, as the
  frontend's GroupNodeConfig numbers their inputs, outputs and widgets: in inner-node order, each
  node's widget inputs (not converted to inputs) are the instance's widgets; its link inputs not
  linked inside the group (and not hidden by the group's ``config``) are the instance's inputs,
  then every node's converted widgets not linked inside; its outputs not linked inside (or listed
  in ``external``, or made visible by ``config``) are the instance's outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from graphsd.errors import Issue, WorkflowError

MUTED, BYPASSED = 2, 4
IGNORED_CLASSES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
"""Frontend-only nodes: they never reach the API prompt."""

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
"""The values of the frontend-only ``control_after_generate`` widget. Files of older editors (and
ComfyUI's own default graph as shipped in its templates) hold a boolean there instead (true:
randomize); it is skipped the same way."""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = "-10", "-20"
"""Ids of a subgraph definition's input and output nodes, as its links name them."""

GROUP_PREFIXES = ("workflow>", "workflow/")
"""How an instance of an ``extra.groupNodes`` entry names its class (``/`` in older files)."""

FORMAT = "this is a ComfyUI UI-format workflow (the editor's saved file)"


def is_ui_workflow(data: Any) -> bool:
    """A ComfyUI UI-format workflow: a mapping with a ``nodes`` list (LiteGraph's serialisation);
    graphsd's own documents have a ``nodes`` mapping."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and ("links" in data or "last_node_id" in data)


def _spec_parts(spec: Any) -> tuple[Any, dict[str, Any]] | None:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    return spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec: Any) -> bool:
    parts = _spec_parts(spec)
    if parts is None:
        return False
    kind, opts = parts
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def input_specs(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, spec) of each input of a class, required then optional, in ``input_order``."""
    inputs = entry.get("input") if isinstance(entry.get("input"), dict) else {}
    order = entry.get("input_order") if isinstance(entry.get("input_order"), dict) else {}
    specs = []
    for section in ("required", "optional"):
        defined = inputs.get(section) if isinstance(inputs.get(section), dict) else {}
        names = order.get(section) if isinstance(order.get(section), list) else list(defined)
        specs += [(name, defined.get(name)) for name in names if isinstance(name, str)]
    return specs


def widget_inputs(entry: dict[str, Any]) -> list[tuple[str, bool, Any]]:
    """(name, followed by a control_after_generate value, default or ``...``) of each widget of a
    class, in the order the frontend creates them."""
    widgets = []
    for name, spec in input_specs(entry):
        if not _is_widget(spec):
            continue
        kind, opts = _spec_parts(spec) or (None, {})
        control = bool(opts.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
        default = opts["default"] if "default" in opts else (kind[0] if isinstance(kind, list) and kind else ...)
        widgets.append((name, control, default))
    return widgets


def read_widget_values(values: Any, specs: list[tuple[str, bool, Any]], defaults: bool = True) -> dict[str, Any]:
    """Widget values by name: a list read in widget order (a control_after_generate value after
    a seed skipped), or a mapping read by name; widgets past a short list take their defaults."""
    if isinstance(values, dict):
        return {name: values[name] for name, _, _ in specs if name in values}
    values = values if isinstance(values, list) else []
    named: dict[str, Any] = {}
    index = 0
    for name, control, default in specs:
        if index < len(values):
            named[name] = values[index]
            index += 1
            if control and index < len(values) and (values[index] in CONTROL_VALUES or isinstance(values[index], bool)):
                index += 1
        elif defaults and default is not ...:
            named[name] = default
    return named


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph's isValidConnection: a generic type ('', '*') fits anything; otherwise the types
    are equal ignoring case, a comma-separated list fitting if one of its types does."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int
    type: Any
    target: str = ""
    target_slot: int = -1


@dataclass
class _Graph:
    """One level of a workflow: the root graph or a subgraph definition; nodes and links by id."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: dict[str, _Link] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)  # a subgraph's output slots (their linkIds)

    def output_link(self, index: int) -> _Link | None:
        """The link inside a subgraph into its output ``index``."""
        slot = self.outputs[index] if 0 <= index < len(self.outputs) else None
        for link_id in _list(slot.get("linkIds")) if isinstance(slot, dict) else []:
            if (link := self.links.get(str(link_id))) is not None:
                return link
        return next((link for link in self.links.values() if link.target == SUBGRAPH_OUTPUT and link.target_slot == index), None)


def _parse_link(link: Any) -> tuple[str, _Link] | None:
    if isinstance(link, list) and len(link) >= 6:
        link_id, origin, slot, target, target_slot, link_type = link[:6]
    elif isinstance(link, dict):
        link_id, origin, slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
        target, target_slot, link_type = link.get("target_id"), link.get("target_slot"), link.get("type")
    else:
        return None
    if not isinstance(slot, int) or isinstance(slot, bool) or link_id is None:
        return None
    target_slot = target_slot if isinstance(target_slot, int) and not isinstance(target_slot, bool) else -1
    return str(link_id), _Link(str(origin), slot, link_type, str(target), target_slot)


def _parse_graph(data: dict[str, Any], issues: list[Issue], where: str) -> _Graph:
    graph = _Graph(outputs=_list(data.get("outputs")))
    for node in _list(data.get("nodes")):
        if not isinstance(node, dict) or not isinstance(node.get("id"), (int, str)) or not isinstance(node.get("type"), str):
            issues.append(Issue(f"{FORMAT}, but a node{where} is not an object with an 'id' and a 'type': {_short(node)}", code="schema"))
            continue
        graph.nodes[str(node["id"])] = node
    for link in _list(data.get("links")):
        parsed = _parse_link(link)
        if parsed is not None:
            graph.links[parsed[0]] = parsed[1]
        elif not isinstance(link, (list, dict)) or (isinstance(link, list) and len(link) < 6):
            issues.append(Issue(f"{FORMAT}, but a link{where} is not [id, from node, from slot, to node, to slot, type]: {_short(link)}"))
    return graph


_Scope = tuple[tuple[_Graph, dict[str, Any]], ...]
"""Where a node sits: the (graph, subgraph instance) pairs from the root down to its graph."""


class _UIConversion:
    """One UI workflow being converted: its graphs (the root and the subgraph definitions) and the
    problems found."""

    def __init__(self, workflow: dict[str, Any], classes: dict[str, dict[str, Any]]):
        self.classes = classes
        self.issues: list[Issue] = []
        self.root = _parse_graph(workflow, self.issues, "")
        definitions = workflow.get("definitions")
        self.subgraphs: dict[str, _Graph] = {}
        self.subgraph_names: dict[str, str] = {}
        for sub in _list(definitions.get("subgraphs")) if isinstance(definitions, dict) else []:
            if isinstance(sub, dict) and isinstance(sub.get("id"), str):
                name = sub.get("name") if isinstance(sub.get("name"), str) else sub["id"]
                self.subgraphs[sub["id"]] = _parse_graph(sub, self.issues, f" of subgraph '{name}'")
                self.subgraph_names[sub["id"]] = name
        extra = workflow.get("extra")
        groups = extra.get("groupNodes") if isinstance(extra, dict) else None
        _GroupNodes(self, groups if isinstance(groups, dict) else {}).expand()

    # ---- links ----------------------------------------------------------------------------
    def graph_of(self, scope: _Scope) -> _Graph:
        return self.subgraphs[scope[-1][1]["type"]] if scope else self.root

    @staticmethod
    def exec_id(scope: _Scope, node: dict[str, Any]) -> str:
        return ":".join([str(instance["id"]) for _, instance in scope] + [str(node["id"])])

    def resolve_input(
        self, scope: _Scope, node: dict[str, Any], index: int, want: Any, seen: frozenset = frozenset(), inner: bool = False
    ) -> Any:
        """What input ``index`` of ``node`` receives: ``("link", id, slot)`` (a node of the
        prompt), ``("value", v)`` (a PrimitiveNode's or a promoted widget's value) or None.
        ``inner``: resolving for a node inside this subgraph instance, to which a PrimitiveNode
        on the instance's input gives nothing (the frontend puts its value into the instance's
        widget, which a linked input does not read)."""
        key = (self.exec_id(scope, node), "in", index)
        inputs = _list(node.get("inputs"))
        if key in seen or not 0 <= index < len(inputs) or not isinstance(inputs[index], dict):
            return None
        seen = seen | {key}
        link_id = inputs[index].get("link")
        link = self.graph_of(scope).links.get(str(link_id)) if link_id is not None else None
        if link is None:
            return None
        if link.origin == SUBGRAPH_INPUT:
            if not scope:
                return None
            instance = scope[-1][1]
            outer = _list(instance.get("inputs"))
            slot = outer[link.slot] if 0 <= link.slot < len(outer) and isinstance(outer[link.slot], dict) else None
            if slot is None:
                return None
            if slot.get("link") is not None:
                return self.resolve_input(scope[:-1], instance, link.slot, want, seen, inner=True)
            if slot.get("widget") is not None:
                return self.promoted_value(instance, slot)
            return None
        origin = self.graph_of(scope).nodes.get(link.origin)
        if origin is None:
            return None
        if origin["type"] == "PrimitiveNode" and inputs[index].get("widget") is not None:
            value = origin.get("widgets_values")
            if inner or origin.get("mode") == MUTED or not isinstance(value, list) or not value:
                return None
            return ("value", value[0])
        return self.resolve_output(scope, origin, link.slot, want, seen)

    def resolve_output(self, scope: _Scope, node: dict[str, Any], slot: int, want: Any, seen: frozenset = frozenset()) -> Any:
        """What output ``slot`` of ``node`` stands for, for an input of type ``want``: through
        Reroutes, bypassed nodes and subgraph instances; None where it leads nowhere."""
        key = (self.exec_id(scope, node), "out", slot)
        if key in seen:
            return None
        seen = seen | {key}
        if node.get("mode") == MUTED:
            return None
        if node.get("mode") == BYPASSED:
            index = self._bypass_index(node, slot, want)
            return self.resolve_input(scope, node, index, want, seen) if index >= 0 else None
        if node["type"] == "Reroute":
            return self.resolve_input(scope, node, slot, want, seen)
        if node["type"] in IGNORED_CLASSES:
            return None
        definition = self.subgraphs.get(node["type"])
        if definition is not None:
            inner = definition.output_link(slot)
            if inner is None:
                return None
            if inner.origin == SUBGRAPH_INPUT:  # an input passed straight through
                return self.resolve_input(scope, node, inner.slot, want, seen)
            origin = definition.nodes.get(inner.origin)
            inner_scope = (*scope, (self.graph_of(scope), node))
            return self.resolve_output(inner_scope, origin, inner.slot, want, seen) if origin is not None else None
        return ("link", self.exec_id(scope, node), slot)

    @staticmethod
    def promoted_value(instance: dict[str, Any], slot: dict[str, Any]) -> Any:
        """The value of the widget a subgraph instance shows for an input (a promoted widget)."""
        named = instance.get("widgets_values_named")
        if isinstance(named, dict) and slot.get("name") in named:
            return ("value", named[slot["name"]])
        values = instance.get("widgets_values")
        with_widgets = [s for s in _list(instance.get("inputs")) if isinstance(s, dict) and s.get("widget") is not None]
        position = next((i for i, s in enumerate(with_widgets) if s is slot), None)
        if isinstance(values, list) and position is not None and position < len(values):
            return ("value", values[position])
        return None

    @staticmethod
    def _bypass_index(node: dict[str, Any], slot: int, want: Any) -> int:
        inputs = [i if isinstance(i, dict) else {} for i in _list(node.get("inputs"))]
        if want in ("", "*", None):
            return slot if slot < len(inputs) else (0 if inputs else -1)
        outputs = _list(node.get("outputs"))
        out_type = outputs[slot].get("type") if 0 <= slot < len(outputs) and isinstance(outputs[slot], dict) else None

        def fits(i: dict[str, Any]) -> bool:
            return _valid_connection(i.get("type"), out_type) and _valid_connection(i.get("type"), want)

        if 0 <= slot < len(inputs) and fits(inputs[slot]):
            return slot
        for index, i in enumerate(inputs):
            if i.get("type") == want:
                return index
        return next((index for index, i in enumerate(inputs) if fits(i)), -1)

    # ---- nodes ----------------------------------------------------------------------------
    def executable(self, scope: _Scope = (), chain: frozenset = frozenset()) -> list[tuple[_Scope, dict[str, Any]]]:
        """The nodes that reach the prompt, with their scope: every node that is not muted,
        bypassed or frontend-only, the inside of subgraph instances in their place."""
        found = []
        for node in self.graph_of(scope).nodes.values():
            if node.get("mode") in (MUTED, BYPASSED) or node["type"] in IGNORED_CLASSES:
                continue
            if node["type"] in self.subgraphs:
                if node["type"] in chain:
                    self.issues.append(Issue(f"{FORMAT}, but subgraph '{self.subgraph_names[node['type']]}' contains itself", code="cycle"))
                    continue
                found += self.executable((*scope, (self.graph_of(scope), node)), chain | {node["type"]})
            else:
                found.append((scope, node))
        return found

    def widgets(self, node: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        inputs = read_widget_values(node.get("widgets_values"), widget_inputs(entry))
        return {k: {"__value__": v} if isinstance(v, list) else v for k, v in inputs.items()}

    def convert_node(self, scope: _Scope, node: dict[str, Any]) -> dict[str, Any]:
        entry = self.classes[node["type"]]
        inputs = self.widgets(node, entry)
        for index, slot in enumerate(_list(node.get("inputs"))):
            if not isinstance(slot, dict) or slot.get("link") is None or not isinstance(slot.get("name"), str):
                continue
            resolved = self.resolve_input(scope, node, index, slot.get("type"))
            if resolved is None:
                continue
            if resolved[0] == "value":
                inputs[slot["name"]] = {"__value__": resolved[1]} if isinstance(resolved[1], list) else resolved[1]
            else:
                inputs[slot["name"]] = [resolved[1], resolved[2]]
        return {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or entry.get("display_name") or node["type"]},
        }


class _GroupNodes:
    """Unpacks the instances of ``extra.groupNodes`` in the root graph into their inner nodes,
    numbering the instance's inputs, outputs and widgets as the frontend's GroupNodeConfig does."""

    def __init__(self, conversion: _UIConversion, groups: dict[str, Any]):
        self.conversion = conversion
        self.groups = groups

    def expand(self) -> None:
        """Unpack every group node instance, in the root graph and in subgraph definitions."""
        graphs = [("", self.conversion.root)]
        graphs += [(f" of subgraph '{self.conversion.subgraph_names[sid]}'", graph) for sid, graph in self.conversion.subgraphs.items()]
        for where, graph in graphs:
            for node_id, node in list(graph.nodes.items()):
                name = next((node["type"][len(p) :] for p in GROUP_PREFIXES if node["type"].startswith(p)), None)
                if name is None or node.get("mode") in (MUTED, BYPASSED):
                    continue  # a bypassed group node passes its inputs through like any node
                group = self.groups.get(name)
                if not isinstance(group, dict) or not isinstance(group.get("nodes"), list):
                    self.conversion.issues.append(
                        Issue(
                            f"{FORMAT}; node {node_id}{where} is an instance of group node '{name}', which the file does not define",
                            node=node_id,
                            hint="the file's extra.groupNodes must hold it: save the workflow again from the editor that made it",
                        )
                    )
                    continue
                self.unpack(graph, node_id, node, group)

    def unpack(self, root: _Graph, gid: str, instance: dict[str, Any], group: dict[str, Any]) -> None:
        inner = [n if isinstance(n, dict) else {} for n in group["nodes"]]
        config = group.get("config") if isinstance(group.get("config"), dict) else {}
        links = [link for link in _list(group.get("links")) if isinstance(link, list) and len(link) >= 4]
        internal = [link for link in links if None not in (_index(link[0]), _index(link[1]), _index(link[2]), _index(link[3]))]
        linked_to = {(_index(link[2]), link[3]) for link in internal}
        linked_from = {(_index(link[0]), link[1]) for link in internal}
        external = {(_index(e[0]), _index(e[1])) for e in _list(group.get("external")) if isinstance(e, list) and len(e) >= 2}

        def shown(index: int, kind: str, name: Any) -> Any:
            node_config = config.get(str(index))
            entries = node_config.get(kind) if isinstance(node_config, dict) else None
            entry = entries.get(str(name)) if isinstance(entries, dict) else None
            return entry.get("visible") if isinstance(entry, dict) else None

        widgets: list[tuple[int, str, bool, Any]] = []  # the instance's widgets: (inner index, input, control, default)
        slots: list[tuple[int, str]] = []  # the instance's inputs
        converted: list[tuple[int, str]] = []
        outputs: list[tuple[int, int]] = []  # the instance's outputs
        for index, node in enumerate(inner):
            entry = self.definition(node, (index, 0) in linked_from)
            if entry is None:
                continue
            node_inputs = [i if isinstance(i, dict) else {} for i in _list(node.get("inputs"))]
            for name, spec in input_specs(entry):
                position = next((p for p, i in enumerate(node_inputs) if i.get("name") == name), None)
                if _is_widget(spec):
                    if position is not None and isinstance(node_inputs[position].get("widget"), dict):
                        converted.append((index, name))  # a widget converted to an input
                        continue
                    _, opts = _spec_parts(spec) or (None, {})
                    control = bool(opts.get("control_after_generate")) or name in ("seed", "noise_seed")
                    widgets.append((index, name, control, opts.get("default", ...)))
                elif (index, position) not in linked_to and shown(index, "input", name) is not False:
                    slots.append((index, name))
            for slot in range(len(_list(entry.get("output")))):
                visible = shown(index, "output", slot)
                if visible if visible is not None else ((index, slot) not in linked_from or (index, slot) in external):
                    outputs.append((index, slot))
        for index, name in converted:
            position = next((p for p, i in enumerate(_list(inner[index].get("inputs"))) if isinstance(i, dict) and i.get("name") == name))
            if (index, position) not in linked_to:
                slots.append((index, name))

        # the inner nodes, their links, and the instance's widget values
        prefix = f"{gid}:"
        copies = {}
        for index, node in enumerate(inner):
            if isinstance(node.get("type"), str):
                copies[index] = copy.deepcopy(node) | {"id": f"{prefix}{index}"}
            else:
                self.conversion.issues.append(
                    Issue(f"{FORMAT}, but node {index} of group node {gid} is not an object with a 'type': {_short(node)}", code="schema")
                )
        for node in copies.values():
            for slot in _list(node.get("inputs")):
                if isinstance(slot, dict):
                    slot["link"] = None
        for number, link in enumerate(internal):
            origin, target = _index(link[0]), _index(link[2])
            if origin not in copies or target not in copies or not isinstance(link[1], int) or not isinstance(link[3], int):
                continue
            link_id = f"{prefix}link{number}"
            root.links[link_id] = _Link(f"{prefix}{origin}", link[1], link[5] if len(link) > 5 else None, f"{prefix}{target}", link[3])
            target_inputs = _list(copies[target].get("inputs"))
            if 0 <= link[3] < len(target_inputs) and isinstance(target_inputs[link[3]], dict):
                target_inputs[link[3]]["link"] = link_id
        outer_inputs = _list(instance.get("inputs"))
        for position, (index, name) in enumerate(slots):
            outer = outer_inputs[position] if position < len(outer_inputs) and isinstance(outer_inputs[position], dict) else {}
            if outer.get("link") is None or index not in copies:
                continue
            if not isinstance(copies[index].get("inputs"), list):
                copies[index]["inputs"] = []
            node_inputs = copies[index]["inputs"]
            target = next((i for i in node_inputs if isinstance(i, dict) and i.get("name") == name), None)
            if target is None:
                target = {"name": name, "type": outer.get("type")}
                node_inputs.append(target)
            target["link"] = outer["link"]
        values = read_widget_values(instance.get("widgets_values"), [(f"{i}\0{n}", c, d) for i, n, c, d in widgets], defaults=False)
        for index, node in copies.items():
            entry = self.definition(inner[index], (index, 0) in linked_from) or {}
            own = read_widget_values(node.get("widgets_values"), widget_inputs(entry))
            own |= {key.split("\0", 1)[1]: value for key, value in values.items() if key.startswith(f"{index}\0")}
            node["widgets_values"] = own if node["type"] != "PrimitiveNode" else [own.get("value")]
        # what linked to the instance's outputs links to the inner nodes' now
        for link_id, link in list(root.links.items()):
            if link.origin == gid and 0 <= link.slot < len(outputs):
                index, slot = outputs[link.slot]
                root.links[link_id] = _Link(f"{prefix}{index}", slot, link.type, link.target, link.target_slot)
        del root.nodes[gid]
        root.nodes.update({str(node["id"]): node for node in copies.values()})

    def definition(self, node: dict[str, Any], used: bool) -> dict[str, Any] | None:
        """The class definition GroupNodeConfig reads an inner node by: a Reroute has its one
        link input and one output; a PrimitiveNode, when its output is ``used`` inside the group,
        one widget ``value`` followed by a control_after_generate value (GroupNodeConfig gives
        every primitive it links one)."""
        kind = node.get("type")
        if kind == "PrimitiveNode":
            required: dict[str, Any] = {"value": ["COMBO", {"control_after_generate": True}]}
            return {"input": {"required": required}, "input_order": {"required": ["value"]}, "output": ["*"]} if used else None
        if kind == "Reroute":
            first = _list(node.get("inputs"))[:1]
            name = first[0].get("name") if first and isinstance(first[0], dict) and isinstance(first[0].get("name"), str) else ""
            return {"input": {"required": {name: ["*", {"forceInput": True}]}}, "input_order": {"required": [name]}, "output": ["*"]}
        entry = self.conversion.classes.get(kind) if isinstance(kind, str) else None
        return entry if isinstance(entry, dict) else None


def _index(value: Any) -> int | None:
    """An inner node's index in a group node's ``links`` / ``external``: a number, or (older
    files) the node itself with its ``index``."""
    if isinstance(value, dict):
        value = value.get("index")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    ``/object_info`` definitions of the classes graphsd knows (``classes``): subgraphs flattened
    and group nodes unpacked. Raises :class:`WorkflowError` saying this is a UI-format workflow and
    what cannot be converted (each unknown class with its node id and title)."""
    if not isinstance(workflow.get("nodes"), list):
        raise WorkflowError([Issue(f"{FORMAT}, but its 'nodes' is not a list of nodes", code="schema")])
    conversion = _UIConversion(workflow, classes)
    issues = conversion.issues
    prompt: dict[str, dict[str, Any]] = {}
    for scope, node in conversion.executable():
        nid, class_type = conversion.exec_id(scope, node), node["type"]
        title = f" ('{node['title']}')" if node.get("title") and node.get("title") != class_type else ""
        inside = "".join(f" in subgraph '{conversion.subgraph_names[instance['type']]}'" for _, instance in reversed(scope))
        if class_type.startswith(GROUP_PREFIXES):
            continue  # an instance of a group node the file does not define, reported when unpacking
        if class_type not in classes:
            issues.append(
                Issue(
                    f"{FORMAT}; node {nid}{title}{inside} is of class '{class_type}', which graphsd lacks",
                    node=nid,
                    hint="graphsd reads the ComfyUI classes "
                    + ", ".join(sorted(c for c, e in classes.items() if e.get("python_module") == "nodes"))
                    + " and its own node types (graphsd nodes lists them)",
                    code="unknown_type",
                )
            )
        else:
            prompt[nid] = conversion.convert_node(scope, node)
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
