"""Where queued prompts run: the :class:`Runner` interface and :class:`LocalRunner`, one
long-lived :class:`~graphsd.engine.Engine` in the server process (models and cached outputs stay
warm from one prompt to the next).

Everything that crosses the interface is plain JSON: a :class:`RunJob` is a graphsd workflow
document and the node ids to run, events are ``Event.to_dict()`` mappings, a
:class:`RunOutcome` lists file paths. So a runner that dispatches jobs to workers in other
processes or on other machines (an Engine per GPU, each built from the same plain Settings)
can take LocalRunner's place without changes to the server.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from graphsd.engine import Engine
from graphsd.events import Event, NodeDone

EventSink = Callable[[dict[str, Any]], None]


@dataclass
class RunJob:
    prompt_id: str
    workflow: dict[str, Any]  # a graphsd workflow document
    outputs: list[str] | None = None  # graphsd node ids to run (None: every output node)
    previews: bool = False  # the client wants previews of long nodes (Preview events)


@dataclass
class RunOutcome:
    status: str  # success | failed | interrupted
    #: graphsd node id -> files it wrote in this run or, for a node whose outputs came from the
    #: cache, the existing files its outputs name; for the nodes that were asked for
    files: dict[str, list[str]] = field(default_factory=dict)
    #: one entry per failed node: node, type, message, error_type, traceback, skipped
    errors: list[dict[str, Any]] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    duration_s: float = 0.0


class Runner(Protocol):
    """Runs one job at a time for the server's dispatcher thread."""

    def run(self, job: RunJob, emit: EventSink) -> RunOutcome:
        """Run ``job`` to its end, passing every event (as a JSON mapping) to ``emit`` in order.
        Node failures and interruption are reported in the outcome; a workflow that cannot run
        at all (it no longer validates) raises :class:`graphsd.errors.GraphsdError`."""
        ...

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running job (only if it is ``prompt_id``, when given) at its next step or
        node; a job about to start is stopped too."""
        ...

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Drop cached outputs and, with ``unload_models``, the loaded models (between jobs)."""
        ...


class LocalRunner:
    """A :class:`Runner` on one Engine in this process."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._current: str | None = None
        self._stop_id: str | None = None  # a job asked to stop before or while it runs

    def run(self, job: RunJob, emit: EventSink) -> RunOutcome:
        with self._lock:
            self._current = job.prompt_id
        output_dir = Path(self.engine.settings.output_dir).resolve()

        def on_event(event: Event) -> None:
            with self._lock:
                stop = self._stop_id == job.prompt_id
            if stop:
                self.engine.interrupt()
            emit(event.to_dict())

        t0 = time.perf_counter()
        try:
            result = self.engine.run(job.workflow, outputs=job.outputs, on_event=on_event, previews=job.previews)
        finally:
            with self._lock:
                self._current = None
                if self._stop_id == job.prompt_id:
                    self._stop_id = None
        targets = job.outputs or [n for n in result.outputs if n in _output_nodes(self.engine, job.workflow)]
        files: dict[str, list[str]] = {}
        written = {e.node_id: list(e.files) for e in result.events if isinstance(e, NodeDone)}
        for node in targets:
            if node in written:
                files[node] = written[node]
            elif node in result.cached:
                files[node] = _named_files(result.outputs.get(node, {}), output_dir)
        return RunOutcome(
            status=result.status,
            files=files,
            errors=[
                {
                    "node": f.node_id,
                    "type": f.node_type,
                    "message": f.message,
                    "error_type": f.error_type,
                    "traceback": f.traceback,
                    "skipped": list(f.skipped),
                }
                for f in result.errors
            ],
            executed=list(result.executed),
            cached=list(result.cached),
            duration_s=time.perf_counter() - t0,
        )

    def interrupt(self, prompt_id: str | None = None) -> None:
        with self._lock:
            target = prompt_id or self._current
            if target is None:
                return
            self._stop_id = target
            running = self._current == target
        if running:
            self.engine.interrupt()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        engine = self.engine
        if free_memory or unload_models:
            engine.cache.clear()
        if unload_models:
            models = engine.models
            with models._lock:
                for key in [k for k in models.entries if k not in models.in_use]:
                    models.entries.pop(key, None)
                    models.on_device.pop(key, None)
        models_free = getattr(engine.models, "free_device_memory", None)
        if models_free is not None:
            models_free()
        gc.collect()


def _output_nodes(engine: Engine, workflow: dict[str, Any]) -> set[str]:
    nodes = workflow.get("nodes", {})
    return {nid for nid, spec in nodes.items() if getattr(engine.nodes.get(spec.get("type")), "output_node", False)}


def _named_files(outputs: dict[str, Any], output_dir: Path) -> list[str]:
    """The existing files inside ``output_dir`` that a node's output values name (a path, or a
    list of paths): what a cached output node wrote when it last ran."""
    found: list[str] = []
    for value in outputs.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item:
                path = Path(item).resolve()
                if output_dir in path.parents and path.is_file():
                    found.append(str(path))
    return found


def check_runnable(engine: Engine, workflow: dict[str, Any], outputs: list[str] | None) -> None:
    """Validate a workflow and its requested outputs as :meth:`Runner.run` will (raises
    :class:`~graphsd.errors.WorkflowError` listing every problem)."""
    from graphsd.executor import plan

    graph = engine.load(workflow)
    plan(graph, outputs)
