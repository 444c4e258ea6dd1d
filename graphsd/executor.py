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
- Batching: when nodes of a batchable type (:meth:`Node.batch_key`) are to run, the nodes run in
  waves of ready nodes instead: nodes that cannot batch run first, in plan order; then nodes of
  one type that are ready together and have equal batch keys (the shallowest in the graph
  first) run as one :meth:`Node.run_batch` call of at most ``Settings.max_batch`` items (fewer
  when the device memory would not hold them), and their results are split back: each node has
  its own events, cache entry and files. A failed batched call runs its nodes one by one. A
  :class:`~graphsd.events.NodeBatch` event names the nodes of each batch.
- Previews: a run started with ``previews=True`` lets nodes publish pictures of their work in
  progress (``ctx.preview``, :class:`~graphsd.events.Preview` events); they reach the observers
  but not ``RunResult.events``.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Hashable
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
from graphsd.node import Node, NodeIO
from graphsd.resources import available_memory
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
        self._batch_keys: dict[str, Hashable | None] = {}  # node -> (class, its batch key), None: runs alone
        self._batch_inputs: dict[str, NodeIO] = {}  # validated inputs of the nodes with a batch key

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
            if self._may_batch(to_run):
                self._run_waves(order, to_run)
            else:
                for node_id in order:
                    self._step(node_id, to_run)
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

    def _step(self, node_id: str, to_run: set[str]) -> None:
        """Visit one node of the plan alone: report it cached, run it, or pass it by (not needed,
        or skipped because something it needs failed)."""
        if self.flag.is_set():
            raise RunInterrupted(node_id)
        gn = self.graph.nodes[node_id]
        if node_id in self.values and node_id in self.result.cached:
            self.emit(ev.NodeCached(run_id=self.result.run_id, node_id=node_id, node_type=gn.cls.type, key=self.keys[node_id]))
        elif node_id in to_run and node_id not in self.blocked:
            self._current = node_id
            self._visit(node_id)

    # ---- batching -----------------------------------------------------------------------
    def _may_batch(self, to_run: set[str]) -> bool:
        """Batching is on and two nodes to run are of one batchable type."""
        if self.engine.settings.max_batch <= 1:
            return False
        types = [self.graph.nodes[n].cls for n in to_run]
        batchable = [cls for cls in types if cls.batch_key.__func__ is not Node.batch_key.__func__]  # type: ignore[attr-defined]
        return len(batchable) > len(set(batchable))

    def _run_waves(self, order: list[str], to_run: set[str]) -> None:
        """Run the plan in waves of ready nodes (every predecessor visited). Nodes without a batch
        key go first, in plan order; once only nodes with one are ready, the group of equal keys
        of the shallowest, earliest of them runs as one batch (up to the batch limit)."""
        position = {n: i for i, n in enumerate(order)}
        preds = {n: [p for p in self.graph.dag.predecessors(n) if p in self.planned] for n in order}
        depth: dict[str, int] = {}
        for n in order:
            depth[n] = 1 + max((depth[p] for p in preds[n]), default=-1)
        pending = list(order)
        visited: set[str] = set()
        while pending:
            ready = [n for n in pending if all(p in visited for p in preds[n])]
            keyed = {n: k for n in ready if (k := self._group_key(n, to_run)) is not None}
            alone = [n for n in ready if n not in keyed]
            if alone:
                batch = alone
                for node_id in alone:
                    self._step(node_id, to_run)
            else:
                first = min(keyed, key=lambda n: (depth[n], position[n]))
                group = [n for n in ready if keyed.get(n) == keyed[first]]
                batch = group[: self._batch_limit(group)]
                if self.flag.is_set():
                    raise RunInterrupted(batch[0])
                if len(batch) == 1:
                    self._step(batch[0], to_run)
                else:
                    self._visit_batch(batch)
            visited.update(batch)
            pending = [n for n in pending if n not in visited]

    def _group_key(self, node_id: str, to_run: set[str]) -> Hashable | None:
        """(node class, batch key) of a node that is to run and may batch; None otherwise (it runs
        alone: not batchable, invalid inputs, or its class said None). Computed once per node."""
        if node_id not in to_run or node_id in self.blocked or node_id in self.values:
            return None
        if node_id in self._batch_keys:
            return self._batch_keys[node_id]
        cls = self.graph.nodes[node_id].cls
        group: Hashable | None = None
        if cls.batch_key.__func__ is not Node.batch_key.__func__:  # type: ignore[attr-defined]
            try:
                model = self._validate(cls, self._inputs(node_id))
                key = cls.batch_key(model, self._context(node_id))
                if key is not None:
                    hash(key)
                    group = (cls, key)
                    self._batch_inputs[node_id] = model
            except RunInterrupted:
                raise
            except Exception:  # invalid inputs, an unhashable key: the node runs alone and reports any error then
                group = None
        self._batch_keys[node_id] = group
        return group

    def _batch_limit(self, group: list[str]) -> int:
        """How many of ``group`` run in one call: ``Settings.max_batch``, fewer when their working
        memory (:meth:`Node.batch_item_bytes`) would not fit on the device (or in the VRAM budget)."""
        settings = self.engine.settings
        limit = max(1, settings.max_batch)
        first = group[0]
        cls = self.graph.nodes[first].cls
        try:
            item = int(cls.batch_item_bytes(self._batch_inputs[first], self._context(first)))
        except Exception as exc:
            self.engine.warn(f"{cls.type}.batch_item_bytes raised {type(exc).__name__}: {exc}; batching without a memory bound")
            item = 0
        if item > 0:
            device = self.engine.device
            have = available_memory(device)
            if device.type == "cuda" and settings.vram_budget_mb is not None:
                budget = int(settings.vram_budget_mb * 2**20)
                have = budget if have is None else min(have, budget)
            if have is not None:
                limit = min(limit, max(1, have // item))
        return limit

    def _visit_batch(self, group: list[str]) -> None:
        """Run ``group`` (nodes of one class with equal batch keys) as one batched call and give
        each node its outputs, events, cache entry and files; if the call fails, run them one by one."""
        cls = self.graph.nodes[group[0]].cls
        run_id = self.result.run_id
        ctxs = [self._context(n) for n in group]
        models = [self._batch_inputs[n] for n in group]
        self.emit(ev.NodeBatch(run_id=run_id, node_type=cls.type, node_ids=tuple(group), size=len(group)))
        for node_id in group:
            self.emit(ev.NodeStart(run_id=run_id, node_id=node_id, node_type=cls.type, key=self.keys[node_id]))
        t0 = time.perf_counter()
        try:
            for node_id in group:
                self._before(node_id, cls, self._inputs(node_id))
            self._current = group[0]
            outs = cls.run_batch(models, ctxs)
            if len(outs) != len(group) or not all(isinstance(o, cls.Outputs) for o in outs):
                raise TypeError(f"node type {cls.type}'s run_batch returned {len(outs)} results, expected {len(group)} Outputs")
        except RunInterrupted:
            raise
        except Exception as exc:  # one bad item, too little memory, a bug: each node runs alone and fails alone
            if isinstance(exc, torch.OutOfMemoryError):
                self.engine.models.free_device_memory()
            message = str(exc) if isinstance(exc, GraphsdError) else f"{type(exc).__name__}: {exc}"
            self.emit(ev.NodeBatch(run_id=run_id, node_type=cls.type, node_ids=tuple(group), size=len(group), error=message))
            for node_id in group:
                if self.flag.is_set():
                    raise RunInterrupted(node_id) from None
                self._current = node_id
                self._visit(node_id, started=True)
            return
        duration = (time.perf_counter() - t0) / len(group)  # each node's share of the batch
        for node_id, ctx, out in zip(group, ctxs, outs, strict=True):
            self._done(node_id, {name: getattr(out, name) for name in cls.Outputs.model_fields}, ctx, duration)

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

    def _inputs(self, node_id: str) -> dict[str, Any]:
        """The node's literal inputs and the upstream outputs its links name."""
        gn = self.graph.nodes[node_id]
        inputs = dict(gn.literals)
        for name, link in gn.links.items():
            inputs[name] = self.values[link.node][link.output]
        return inputs

    def _visit(self, node_id: str, started: bool = False) -> None:
        """Run one node alone (``started``: its NodeStart was sent, by a batch that failed)."""
        gn = self.graph.nodes[node_id]
        ctx = self._context(node_id)
        key = self.keys[node_id]
        inputs = self._inputs(node_id)
        if not started:
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
        self._done(node_id, outputs, ctx, time.perf_counter() - t0)

    def _done(self, node_id: str, outputs: dict[str, Any], ctx: Context, duration: float) -> None:
        """Keep a node's outputs, cache them under its key, report it done."""
        gn = self.graph.nodes[node_id]
        self._current = node_id
        self.values[node_id] = outputs
        self.result.executed.append(node_id)
        self.result.files.extend(ctx.files)
        if gn.cls.cacheable:
            self.engine.cache.put(self.keys[node_id], outputs)
        self.emit(
            ev.NodeDone(run_id=self.result.run_id, node_id=node_id, node_type=gn.cls.type, duration_s=duration, files=tuple(ctx.files))
        )
        try:
            self.engine.pm.hook.graphsd_after_node(node_id=node_id, node_type=gn.cls.type, outputs=outputs, duration_s=duration)
        except Exception as exc:
            self.engine.warn(f"a graphsd_after_node hook raised {type(exc).__name__}: {exc}")

    @staticmethod
    def _validate(cls: type[Node], inputs: dict[str, Any]) -> NodeIO:
        """The node's Inputs model, or a NodeError naming the input that is wrong."""
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
        return model

    def _before(self, node_id: str, cls: type[Node], inputs: dict[str, Any]) -> None:
        try:
            self.engine.pm.hook.graphsd_before_node(node_id=node_id, node_type=cls.type, inputs=inputs)
        except Exception as exc:
            self.engine.warn(f"a graphsd_before_node hook raised {type(exc).__name__}: {exc}")

    def _run_node(self, cls: type[Node], inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        model = self._validate(cls, inputs)
        self._before(ctx.node_id, cls, inputs)
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
