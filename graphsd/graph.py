"""Build a workflow document into a typed DAG and validate all of it before anything runs.

Every problem is collected (never only the first): unknown node types (with the closest known
name), unknown or missing inputs, literals given to link-only inputs, values out of range or
not in the allowed set, links to missing nodes or outputs, edges whose types differ (naming
both), and cycles (listing their nodes). :func:`build_graph` raises one
:class:`~graphsd.errors.WorkflowError` holding them all.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import ValidationError

from graphsd.errors import Issue, WorkflowError
from graphsd.node import Node, Upstream, literal_adapter, socket_class, type_label, types_compatible
from graphsd.workflow import NODE_ID_RE, Link, WorkflowDoc, merge_params, parse_document, resolve_value


@dataclass
class GraphNode:
    id: str
    cls: type[Node]
    literals: dict[str, Any] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)


@dataclass
class Graph:
    """A validated workflow: nodes with their literal inputs and links, and the DAG."""

    nodes: dict[str, GraphNode]
    dag: nx.DiGraph
    params: dict[str, Any]
    document: dict[str, Any]

    def order(self, subset: set[str] | None = None) -> list[str]:
        """Deterministic topological order (of ``subset`` if given)."""
        g = self.dag if subset is None else self.dag.subgraph(subset)
        return list(nx.lexicographical_topological_sort(g))

    def output_nodes(self) -> list[str]:
        """What runs when no outputs are requested: the nodes declared ``output_node``
        (SaveImage, SaveModel, ...)."""
        return sorted(n for n, gn in self.nodes.items() if gn.cls.output_node)


def _suggest(name: str, options: list[str]) -> str | None:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else None


def _format_validation_error(exc: ValidationError) -> str:
    return "; ".join(e["msg"] for e in exc.errors())


def _check_literal(node_id: str, cls: type[Node], name: str, value: Any, issues: list[Issue]) -> Any:
    f = cls.Inputs.model_fields[name]
    sock = socket_class(f.annotation)
    if sock is not None:
        issues.append(
            Issue(
                f"expects a link to a {sock.type_name()} output, got the literal {value!r}",
                node=node_id,
                field=name,
                code="literal_for_link",
                hint="write '@<node id>.<output>'",
            )
        )
        return value
    if _contains_link(value):
        issues.append(
            Issue("links are only allowed as a whole input value, not inside lists or mappings", node=node_id, field=name, code="bad_link")
        )
        return value
    try:
        return literal_adapter(f).validate_python(value)
    except ValidationError as exc:
        issues.append(Issue(f"invalid value {value!r}: {_format_validation_error(exc)}", node=node_id, field=name, code="bad_value"))
        return value


def _contains_link(value: Any) -> bool:
    if isinstance(value, Link):
        return True
    if isinstance(value, list):
        return any(_contains_link(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_link(v) for v in value.values())
    return False


def build_graph(data: dict, registry: Any, params: dict[str, Any] | None = None, settings: Any = None) -> Graph:
    """Validate a workflow document against what the plugins registered (``registry.nodes``,
    ``registry.samplers``, ...) and build its DAG. With the engine's ``settings``, a graph
    without other problems also gets each node's :meth:`~graphsd.node.Node.check_context`.
    Raises WorkflowError listing every problem."""
    registry_nodes: dict[str, type[Node]] = registry.nodes
    doc: WorkflowDoc = parse_document(data)
    issues: list[Issue] = []
    try:
        merged = merge_params(doc, params)
    except WorkflowError as exc:
        issues.extend(exc.issues)
        merged = dict(doc.params)  # the declared values: each bad override is reported once
    nodes: dict[str, GraphNode] = {}
    dag = nx.DiGraph()
    known_types = sorted(registry_nodes)
    if not doc.nodes:
        issues.append(Issue("the workflow has no nodes", code="schema", hint="add nodes under 'nodes:'"))

    for node_id, spec in doc.nodes.items():
        if not NODE_ID_RE.match(node_id):
            issues.append(Issue(f"invalid node id '{node_id}'", node=node_id, code="bad_id", hint="use letters, digits, '_' and '-' only"))
            continue
        cls = registry_nodes.get(spec.type)
        if cls is None:
            issues.append(
                Issue(
                    f"unknown node type '{spec.type}'",
                    node=node_id,
                    field=None,
                    code="unknown_type",
                    hint=_suggest(spec.type, known_types) or "run 'graphsd nodes' to list the node types",
                )
            )
            continue
        gn = GraphNode(node_id, cls)
        fields = cls.Inputs.model_fields
        for name, raw in spec.inputs.items():
            if name not in fields:
                hint: str | None = _suggest(name, list(fields)) or f"inputs of {cls.type}: {', '.join(fields) or 'none'}"
                issues.append(
                    Issue(f"unknown input '{name}' for node type {cls.type}", node=node_id, field=name, code="unknown_input", hint=hint)
                )
                continue
            before = len(issues)
            value = resolve_value(raw, merged, node_id, name, issues)
            if len(issues) > before:
                continue
            if isinstance(value, Link):
                gn.links[name] = value
            else:
                gn.literals[name] = _check_literal(node_id, cls, name, value, issues)
        for checked, problem, advice in cls.check_literals(gn.literals, registry):
            issues.append(Issue(problem, node=node_id, field=checked, code="bad_value", hint=advice))
        for name, f in fields.items():
            if f.is_required() and name not in spec.inputs:
                issues.append(
                    Issue(
                        f"missing required input '{name}' ({type_label(f.annotation)})",
                        node=node_id,
                        field=name,
                        code="missing_input",
                        hint=f.description or None,
                    )
                )
        nodes[node_id] = gn
        dag.add_node(node_id)

    for node_id, gn in nodes.items():
        for name, link in gn.links.items():
            source = nodes.get(link.node)
            if source is None:
                reason = "unknown node type" if link.node in doc.nodes else "no such node"
                hint = _suggest(link.node, list(doc.nodes)) if link.node not in doc.nodes else None
                issues.append(
                    Issue(f"link {link} points to node '{link.node}' ({reason})", node=node_id, field=name, code="missing_node", hint=hint)
                )
                continue
            outputs = source.cls.Outputs.model_fields
            if link.output not in outputs:
                issues.append(
                    Issue(
                        f"link {link}: node '{link.node}' ({source.cls.type}) has no output '{link.output}'",
                        node=node_id,
                        field=name,
                        code="missing_output",
                        hint=f"its outputs: {', '.join(outputs) or 'none'}",
                    )
                )
                continue
            out_ann = outputs[link.output].annotation
            in_ann = gn.cls.Inputs.model_fields[name].annotation
            if not types_compatible(out_ann, in_ann):
                issues.append(
                    Issue(
                        f"type mismatch: {link} is {type_label(out_ann)} but input '{name}' of {gn.cls.type} expects {type_label(in_ann)}",
                        node=node_id,
                        field=name,
                        code="type_mismatch",
                        hint=f"connect an output of type {type_label(in_ann)}",
                    )
                )
                continue
            dag.add_edge(link.node, node_id)

    for cycle in nx.simple_cycles(dag):
        ring = " -> ".join(cycle + [cycle[0]])
        issues.append(Issue(f"cycle: {ring}", node=cycle[0], code="cycle", hint="a workflow must be a DAG; remove one of these links"))
        if sum(1 for i in issues if i.code == "cycle") >= 10:
            break

    if not issues and settings is not None:
        issues.extend(_context_issues(nodes, dag, settings))
    if issues:
        raise WorkflowError(issues)
    return Graph(nodes=nodes, dag=dag, params=merged, document={**data, "params": merged})


def _context_issues(nodes: dict[str, GraphNode], dag: nx.DiGraph, settings: Any) -> list[Issue]:
    """Each node's :meth:`~graphsd.node.Node.check_context`, with what feeds its inputs, in
    topological order."""
    upstream: dict[str, dict[str, Upstream]] = {}
    issues = []
    for node_id in nx.lexicographical_topological_sort(dag):
        gn = nodes[node_id]
        upstream[node_id] = {
            name: Upstream(link.node, nodes[link.node].cls, link.output, nodes[link.node].literals, upstream[link.node])
            for name, link in gn.links.items()
        }
        for checked, problem, advice in gn.cls.check_context(dict(gn.literals), upstream[node_id], settings):
            issues.append(Issue(problem, node=node_id, field=checked, code="bad_value", hint=advice))
    return issues
