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

import dataclasses
import gc
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from graphsd.engine import Engine
from graphsd.errors import GraphsdError
from graphsd.events import Event, NodeDone

EventSink = Callable[[dict[str, Any]], None]


@dataclass
class RunJob:
    prompt_id: str
    workflow: dict[str, Any]  # a graphsd workflow document
    outputs: list[str] | None = None  # graphsd node ids to run (None: every output node)
    previews: bool = False  # the client wants previews of long nodes (Preview events)
    #: when set, the job writes its files into ``<output dir>/<output_subdir>/`` exactly once:
    #: into a staging folder first, moved into place when the job succeeds; a job whose folder
    #: exists already is done (a duplicate or a re-run) and runs nothing (``graphsd batch``)
    output_subdir: str | None = None
    #: the folder ``output_subdir`` is made in, when not the engine's output folder (set by
    #: ``graphsd batch`` for its rows, never from a request)
    output_dir: str | None = None


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
    """Runs jobs for the server's dispatcher: one at a time, or up to ``workers`` at once from
    several threads when the runner has that attribute (a pool of workers)."""

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
        if job.output_subdir is None:
            return self._run(job, emit)
        return _run_in_subdir(self, job, emit)

    def _run(self, job: RunJob, emit: EventSink, files_root: Path | None = None) -> RunOutcome:
        """Run ``job``; a cached output node's files are looked for under ``files_root``
        (default: the output folder)."""
        with self._lock:
            self._current = job.prompt_id
        output_dir = files_root or Path(self.engine.settings.output_dir).resolve()

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


STAGING = ".graphsd-staging"


def _folder_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def _run_in_subdir(runner: LocalRunner, job: RunJob, emit: EventSink) -> RunOutcome:
    """Run ``job`` so that ``<output dir>/<job.output_subdir>/`` appears once, complete: the
    engine writes into a fresh staging folder beside it, which is renamed into place when the
    run succeeds (a rename is atomic, and fails when another attempt got there first). Output
    nodes whose results came from the cache get copies of the files they name, so the folder
    holds the job's outputs whichever way they were made."""
    engine = runner.engine
    root = Path(job.output_dir or engine.settings.output_dir).resolve()
    name = job.output_subdir or ""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(STAGING):
        raise GraphsdError(f"output_subdir must be one folder name, got {name!r}")
    final = root / name
    if final.is_dir():
        return RunOutcome("success", files={"": _folder_files(final)})
    staging = root / STAGING / f"{name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    settings = engine.settings
    engine.settings = dataclasses.replace(settings, output_dir=str(staging))
    try:
        outcome = runner._run(job, emit, files_root=root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        engine.settings = settings
    if outcome.status != "success":
        shutil.rmtree(staging, ignore_errors=True)
        outcome.files = {}
        return outcome
    for paths in outcome.files.values():
        for path in paths:
            source = Path(path)
            if staging not in source.parents:  # a cached output node: its files lie elsewhere under the output folder
                shutil.copy2(source, staging / source.name)
    try:
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another attempt finished first: its folder stands
    outcome.files = {"": _folder_files(final)}
    return outcome


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
                path = _published(Path(item).resolve(), output_dir)
                if output_dir in path.parents and path.is_file():
                    found.append(str(path))
    return found


def _published(path: Path, output_dir: Path) -> Path:
    """Where a file written into a staging folder of :func:`_run_in_subdir` lies now that its
    folder was moved into place (other paths are returned as they are)."""
    try:
        first, *rest = path.relative_to(output_dir / STAGING).parts
    except ValueError:
        return path
    return output_dir / first.rsplit(".", 1)[0] / Path(*rest)


def check_runnable(engine: Engine, workflow: dict[str, Any], outputs: list[str] | None) -> None:
    """Validate a workflow and its requested outputs as :meth:`Runner.run` will (raises
    :class:`~graphsd.errors.WorkflowError` listing every problem)."""
    from graphsd.executor import plan

    graph = engine.load(workflow)
    plan(graph, outputs)
