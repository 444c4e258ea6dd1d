"""Plan, cache and execute a validated :class:`~graphsd.graph.Graph`.

- Plan: the requested output nodes (or the declared output nodes; a workflow with none is
  refused) and their ancestors, nothing else,
  in a deterministic topological order.
- Cache: a node whose key is in the output cache is not run (``node_cached``). Keys chain, so
  a changed literal re-runs exactly that node and its descendants.
- Failure: a failing node's descendants are skipped; independent branches still run; every
  failure is reported at the end (``RunResult.errors``).
- Interruption: checked between nodes and, through ``ctx.progress``, between steps of long
  nodes; the run stops with status ``interrupted``. Nodes write files atomically, so nothing
  half-written remains.
- A CUDA out-of-memory error frees device memory and retries the node once.
- Previews: a run started with ``previews=True`` lets nodes publish pictures of their work in
  progress (``ctx.preview``, :class:`~graphsd.events.Preview` events); they reach the observers
  but not ``RunResult.events``.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from pydantic import ValidationError

from graphsd import events as ev
from graphsd.cache import key_document, make_key
from graphsd.context import Context
from graphsd.errors import GraphsdError, Issue, NodeError, RunInterrupted, WorkflowError
from graphsd.graph import Graph
from graphsd.node import Node
from graphsd.types import Socket

if TYPE_CHECKING:
    from graphsd.engine import Engine


@dataclass
class NodeFailure:
    node_id: str
    node_type: str
    message: str
    error_type: str
    traceback: str = ""
    skipped: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"node '{self.node_id}' ({self.node_type}) failed: {self.message}"
        if self.skipped:
            text += f" [not run because of it: {', '.join(self.skipped)}]"
        return text


@dataclass
class RunResult:
    run_id: str
    status: str = "success"  # success | failed | interrupted
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    errors: list[NodeFailure] = field(default_factory=list)
    events: list[ev.Event] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> what it was made of

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (files, status, errors) for the CLI and remote callers."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "files": list(self.files),
            "executed": list(self.executed),
            "cached": list(self.cached),
            "errors": [
                {"node": f.node_id, "type": f.node_type, "message": f.message, "error_type": f.error_type, "skipped": list(f.skipped)}
                for f in self.errors
            ],
        }


def plan(graph: Graph, outputs: list[str] | None) -> tuple[list[str], list[str]]:
    """(ancestors of the targets in execution order, the targets)."""
    targets = list(outputs) if outputs else graph.output_nodes()
    if not targets:
        raise WorkflowError(
            [
                Issue(
                    "the workflow has no output node, so running it would produce nothing",
                    code="no_outputs",
                    hint="add an output node (SaveImage, SaveModel, ...) or name the nodes to run (--output NODE)",
                )
            ]
        )
    missing = [t for t in targets if t not in graph.nodes]
    if missing:
        raise WorkflowError(
            [
                Issue(
                    f"requested output node '{m}' does not exist",
                    node=m,
                    code="missing_node",
                    hint=f"nodes: {', '.join(sorted(graph.nodes))}",
                )
                for m in missing
            ]
        )
    needed: set[str] = set()
    for t in targets:
        needed |= nx.ancestors(graph.dag, t) | {t}
    return graph.order(needed), targets


class Execution:
    """One run of a graph on an engine."""

    def __init__(
        self, engine: Engine, graph: Graph, on_event: ev.EventCallback | None, interrupt_flag: threading.Event, previews: bool = False
    ):
        self.engine = engine
        self.previews = previews
        self.graph = graph
        self.on_event = on_event
        self.flag = interrupt_flag
        self.result = RunResult(run_id=uuid.uuid4().hex[:12])
        self.keys: dict[str, str] = {}
        self.values: dict[str, dict[str, Any]] = {}
        self.blocked: set[str] = set()
        self.failed: set[str] = set()
        self.planned: set[str] = set()
        self._current = ""

    # ---- events -------------------------------------------------------------------------
    def emit(self, event: ev.Event) -> None:
        if not isinstance(event, ev.Preview):  # previews are transient: the result keeps no pictures
            self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        try:
            self.engine.pm.hook.graphsd_event(event=event)
        except Exception as exc:  # observers must not break runs
            self.engine.warn(f"a graphsd_event hook raised {type(exc).__name__}: {exc}")

    def cache_event(self, action: str, key: str, nbytes: int) -> None:
        self.emit(ev.CacheEvent(run_id=self.result.run_id, action=action, key=key, node_id=self._current, nbytes=nbytes))

    # ---- keys ---------------------------------------------------------------------------
    def _context(self, node_id: str) -> Context:
        gn = self.graph.nodes[node_id]
        return Context(
            node_id=node_id,
            node_type=gn.cls.type,
            run_id=self.result.run_id,
            models=self.engine.models,
            device=self.engine.device,
            settings=self.engine.settings,
            workflow=self.graph.document,
            samplers=self.engine.registry.samplers,
            emit=self.emit,
            interrupt_flag=self.flag,
            shipped_folders=self.engine.registry.shipped_folders,
            wants_previews=self.previews,
        )

    def _key(self, node_id: str, ctx: Context) -> str:
        gn = self.graph.nodes[node_id]
        upstream = {name: (self.keys[link.node], link.output) for name, link in gn.links.items()}
        # a never-cached node gets a key of its own each run, so what depends on it re-runs too
        fingerprint = gn.cls.fingerprint(dict(gn.literals), ctx) if gn.cls.cacheable else f"run:{self.result.run_id}"
        doc = key_document(gn.cls.type, gn.cls.version, gn.literals, fingerprint, upstream)
        key = make_key(doc)
        self.result.keys[key] = doc
        return key

    # ---- running ------------------------------------------------------------------------
    def run(self, order: list[str], targets: list[str]) -> RunResult:
        t0 = time.perf_counter()
        res = self.result
        self.planned = set(order)
        self.emit(ev.RunStart(run_id=res.run_id, planned=tuple(order)))
        try:
            to_run = self._resolve_cached(order, targets)
            for node_id in order:
                if self.flag.is_set():
                    raise RunInterrupted(node_id)
                gn = self.graph.nodes[node_id]
                if node_id in self.values and node_id in res.cached:
                    self.emit(ev.NodeCached(run_id=res.run_id, node_id=node_id, node_type=gn.cls.type, key=self.keys[node_id]))
                elif node_id in to_run and node_id not in self.blocked:
                    self._current = node_id
                    self._visit(node_id)
        except RunInterrupted as exc:
            res.status = "interrupted"
            self.emit(ev.Interrupted(run_id=res.run_id, node_id=exc.node_id or self._current))
        if res.status != "interrupted" and res.errors:
            res.status = "failed"
        res.outputs = dict(self.values)
        self.emit(
            ev.RunDone(
                run_id=res.run_id,
                status=res.status,
                executed=tuple(res.executed),
                cached=tuple(res.cached),
                failed=tuple(f.node_id for f in res.errors),
                duration_s=time.perf_counter() - t0,
            )
        )
        return res

    def _resolve_cached(self, order: list[str], targets: list[str]) -> set[str]:
        """Compute every key, take cached outputs, and return the nodes that must run: a node
        runs only if its outputs are not cached and a target needs them."""
        for node_id in order:
            if node_id in self.blocked or node_id in self.failed:
                continue
            self._current = node_id
            try:
                self.keys[node_id] = self._key(node_id, self._context(node_id))
            except GraphsdError as exc:  # NodeError, or another user-facing error (a bad model file, ...)
                self._fail(node_id, str(exc), "NodeError", field=getattr(exc, "field", None))
        to_run: set[str] = set()
        stack = list(targets)
        while stack:
            node_id = stack.pop()
            if node_id in to_run or node_id in self.values or node_id in self.blocked or node_id in self.failed:
                continue
            self._current = node_id
            if self.graph.nodes[node_id].cls.cacheable:
                hit = self.engine.cache.get(self.keys[node_id])
                if hit is not None:
                    self.values[node_id] = hit
                    self.result.cached.append(node_id)
                    continue
            to_run.add(node_id)
            stack.extend(self.graph.dag.predecessors(node_id))
        self.result.cached.sort(key=order.index)
        return to_run

    def _visit(self, node_id: str) -> None:
        gn = self.graph.nodes[node_id]
        ctx = self._context(node_id)
        key = self.keys[node_id]
        inputs = dict(gn.literals)
        for name, link in gn.links.items():
            inputs[name] = self.values[link.node][link.output]
        self.emit(ev.NodeStart(run_id=self.result.run_id, node_id=node_id, node_type=gn.cls.type, key=key))
        t0 = time.perf_counter()
        try:
            outputs = self._run_node(gn.cls, inputs, ctx)
        except RunInterrupted:
            raise
        except GraphsdError as exc:  # NodeError, or another user-facing error (a bad model file, ...): no traceback
            self._fail(node_id, str(exc), "NodeError", field=getattr(exc, "field", None))
            return
        except Exception as exc:  # a bug or an unexpected failure inside the node
            self._fail(node_id, f"{type(exc).__name__}: {exc}", type(exc).__name__, tb=traceback.format_exc())
            return
        duration = time.perf_counter() - t0
        self.values[node_id] = outputs
        self.result.executed.append(node_id)
        self.result.files.extend(ctx.files)
        if gn.cls.cacheable:
            self.engine.cache.put(key, outputs)
        self.emit(
            ev.NodeDone(run_id=self.result.run_id, node_id=node_id, node_type=gn.cls.type, duration_s=duration, files=tuple(ctx.files))
        )
        try:
            self.engine.pm.hook.graphsd_after_node(node_id=node_id, node_type=gn.cls.type, outputs=outputs, duration_s=duration)
        except Exception as exc:
            self.engine.warn(f"a graphsd_after_node hook raised {type(exc).__name__}: {exc}")

    def _run_node(self, cls: type[Node], inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        try:
            model = cls.Inputs.model_validate(inputs)
        except ValidationError as exc:
            first = exc.errors()[0]
            field_name = str(first["loc"][0]) if first["loc"] else None
            raise NodeError(f"received an invalid value: {first['msg']}", field=field_name) from None
        for name in cls.Inputs.model_fields:
            value = getattr(model, name)
            if isinstance(value, Socket) and (problem := value.check()):
                raise NodeError(f"received a malformed {value.type_name()}: {problem}", field=name)
        try:
            self.engine.pm.hook.graphsd_before_node(node_id=ctx.node_id, node_type=cls.type, inputs=inputs)
        except Exception as exc:
            self.engine.warn(f"a graphsd_before_node hook raised {type(exc).__name__}: {exc}")
        try:
            out = cls().run(model, ctx)
        except torch.OutOfMemoryError:
            self.engine.models.free_device_memory()
            self.emit(ev.ModelEvent(run_id=ctx.run_id, action="oom_retry", key=ctx.node_id, device=str(ctx.device)))
            ctx.files.clear()
            out = cls().run(model, ctx)
        if not isinstance(out, cls.Outputs):
            raise TypeError(f"node type {cls.type} returned {type(out).__name__}, expected its Outputs model")
        return {name: getattr(out, name) for name in cls.Outputs.model_fields}

    def _fail(self, node_id: str, message: str, error_type: str, field: str | None = None, tb: str = "") -> None:
        gn = self.graph.nodes[node_id]
        downstream = nx.descendants(self.graph.dag, node_id) & self.planned
        skipped = tuple(n for n in self.graph.order(downstream) if n not in self.blocked)
        self.blocked.update(skipped)
        self.failed.add(node_id)
        if field:
            message = f"input '{field}': {message}"
        failure = NodeFailure(node_id, gn.cls.type, message, error_type, tb, skipped)
        self.result.errors.append(failure)
        self.emit(
            ev.NodeFailed(
                run_id=self.result.run_id, node_id=node_id, node_type=gn.cls.type, message=message, error_type=error_type, skipped=skipped
            )
        )
