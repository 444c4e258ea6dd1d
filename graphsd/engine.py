"""The Engine: plugins, the output cache and the ModelManager, kept warm across runs.

    engine = Engine(Settings(output_dir="out"))
    result = engine.run("workflows/txt2img.yaml", params={"seed": 7})
    result.files        # ['out/txt2img_00001.png']

An Engine is built from plain :class:`~graphsd.context.Settings`, so another process (a server
worker) can construct an identical one.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Any

from graphsd.cache import OutputCache
from graphsd.context import Settings
from graphsd.errors import GraphsdError
from graphsd.events import EventCallback, ModelEvent
from graphsd.executor import Execution, RunResult, plan
from graphsd.graph import Graph, build_graph
from graphsd.memory import KeepOnDevice, ModelManager, ModelOffload
from graphsd.node import Node
from graphsd.paths import check_output_dir
from graphsd.plugins import load_plugins
from graphsd.workflow import read_document

MB = 1024 * 1024


class Engine:
    def __init__(self, settings: Settings | None = None, **overrides: Any):
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Settings)})
        if unknown:
            raise TypeError(f"unknown engine setting(s): {', '.join(unknown)}")
        # a copy: the caller's Settings object is never changed
        self.settings = dataclasses.replace(settings or Settings(), **overrides)
        s = self.settings
        self.device = s.resolved_device()
        self.warnings: list[str] = []
        self.pm, self.registry = load_plugins(s.plugins_dirs, load_entry_points=s.load_entry_points)
        for w in self.registry.warnings:
            self.warn(w)
        self.cache = OutputCache(int(s.cache_budget_mb * MB))
        strategy = ModelOffload(int(s.vram_budget_mb * MB)) if s.vram_budget_mb else KeepOnDevice()
        ram = int(s.ram_budget_mb * MB) if s.ram_budget_mb else None
        self.models = ModelManager(self.device, ram_budget=ram, strategy=strategy)
        # the cache and the model manager report to the engine, which forwards to the run in progress
        self._execution: Execution | None = None
        self.cache.listener = self._cache_event
        self.models.listener = self._model_event
        self._interrupt = threading.Event()
        self._lock = threading.Lock()

    def _cache_event(self, action: str, key: str, nbytes: int) -> None:
        if (execution := self._execution) is not None:
            execution.cache_event(action, key, nbytes)

    def _model_event(self, event: ModelEvent) -> None:
        if (execution := self._execution) is not None:
            execution.emit(dataclasses.replace(event, run_id=execution.result.run_id))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, stacklevel=2)

    @property
    def nodes(self) -> dict[str, type[Node]]:
        return self.registry.nodes

    def load(self, workflow: str | Path | dict, params: dict[str, Any] | None = None) -> Graph:
        """Read and validate a workflow (raises WorkflowError listing every problem)."""
        return build_graph(self.read(workflow), self.registry, params, self.settings)

    def read(self, workflow: str | Path | dict) -> dict:
        """The workflow document a file (YAML, JSON, PNG) or dict holds, a foreign format (a
        ComfyUI prompt or editor file) translated by the plugins; not yet validated."""
        return read_document(workflow, self._import_workflow)

    def _import_workflow(self, data: Any) -> dict | None:
        return self.pm.hook.graphsd_import_workflow(data=data, nodes=self.registry.nodes, settings=self.settings)

    def run(
        self,
        workflow: str | Path | dict | Graph,
        params: dict[str, Any] | None = None,
        outputs: list[str] | None = None,
        on_event: EventCallback | None = None,
        previews: bool = False,
    ) -> RunResult:
        """Validate and run a workflow. Only ``outputs`` (node ids) and their ancestors run;
        by default every output node. Raises WorkflowError for an invalid workflow; node
        failures are reported in the returned result, not raised. An output directory that
        cannot be written (a file is in the way) raises GraphsdError before anything runs.

        With ``previews``, long nodes that can (the denoise loop) send ``on_event`` a
        :class:`~graphsd.events.Preview` picture of their progress at each step; it costs a
        little time and changes no output."""
        if problem := check_output_dir(self.settings.output_dir):
            raise GraphsdError(problem)
        graph = workflow if isinstance(workflow, Graph) else self.load(workflow, params)
        order, targets = plan(graph, outputs)
        with self._lock:
            self._interrupt.clear()
            self._execution = Execution(self, graph, on_event, self._interrupt, previews)
            try:
                return self._execution.run(order, targets)
            finally:
                self._execution = None

    def interrupt(self) -> None:
        """Stop the current run between nodes or between steps of a long node."""
        self._interrupt.set()


_default_engine: Engine | None = None


def run_workflow(
    workflow: str | Path | dict,
    params: dict[str, Any] | None = None,
    outputs: list[str] | None = None,
    on_event: EventCallback | None = None,
    **settings: Any,
) -> RunResult:
    """Run a workflow file or dict. Without settings, a process-wide Engine is reused so models
    and cached outputs stay warm between calls (notebooks); with settings, a new Engine is made."""
    global _default_engine
    if settings:
        return Engine(Settings(**settings)).run(workflow, params, outputs, on_event)
    if _default_engine is None:
        _default_engine = Engine()
    return _default_engine.run(workflow, params, outputs, on_event)
