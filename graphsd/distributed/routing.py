"""Which worker runs which job: a job's model identity (what its loaders read) and a scheduler
that sends a job to a free worker already holding its models, so a mixed stream of checkpoints
pays few model loads.

Plain Python, no Ray: the Ray pool and the tests use the same decisions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_PARAM_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def loader_types(nodes: dict[str, Any]) -> set[str]:
    """The node types (of a registry's ``name -> class``) that load models: category
    ``loaders`` (the convention of graphsd's loaders and of ComfyUI's), or a name ending in
    ``Loader``."""
    return {name for name, cls in nodes.items() if str(getattr(cls, "category", "")).startswith("loaders") or name.endswith("Loader")}


def model_identity(workflow: dict[str, Any], loaders: set[str] | None = None) -> str:
    """What a worker must hold to run ``workflow`` without loading a model: each loader node's
    type and its literal text inputs (file names, paths; a ``${param}`` is read from the
    workflow's params), sorted so that node ids and order do not matter. ``loaders`` names the
    loader node types (default: the types whose name ends in ``Loader``). A workflow without
    loaders has the identity ``""`` (any worker will do)."""
    params = workflow.get("params") or {}
    parts: list[str] = []
    for spec in (workflow.get("nodes") or {}).values():
        kind = str(spec.get("type", ""))
        if not (kind in loaders if loaders is not None else kind.endswith("Loader")):
            continue
        values = []
        for name, value in sorted((spec.get("inputs") or {}).items()):
            if isinstance(value, str) and (m := _PARAM_RE.match(value)):
                value = params.get(m.group(1), value)
            if isinstance(value, str) and not value.startswith("@"):
                values.append(f"{name}={value}")
        parts.append(kind + "(" + ",".join(values) + ")")
    return "+".join(sorted(parts))


@dataclass
class Slot:
    """One worker as the scheduler sees it: its jobs in progress and the models it holds."""

    index: int
    busy: int = 0
    models: set[str] = field(default_factory=set)
    jobs_run: int = 0


class Router:
    """Chooses workers for jobs (a job waiting for a worker) and jobs for workers (a worker
    taking from a backlog). Thread-safe.

    A job goes to a free worker that holds its model identity; otherwise to the least loaded
    free worker, preferring one that holds no model, then the one holding the fewest. A worker
    taking work from a backlog takes the first job whose model it holds; otherwise the first job
    whose model the fewest workers hold (so two workers do not both load the same new model
    while another model waits). A worker then keeps serving its model while there is work for
    it, which keeps the loads of a mixed stream near ``models + workers``.
    """

    def __init__(self, workers: int, per_worker: int = 1):
        self.slots = [Slot(i) for i in range(workers)]
        self.per_worker = per_worker
        self._lock = threading.Condition()

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.busy < self.per_worker]

    def _best_for(self, identity: str, free: list[Slot]) -> Slot:
        holding = [s for s in free if identity in s.models]
        if holding or not identity:
            return min(holding or free, key=lambda s: (s.busy, s.jobs_run))
        return min(free, key=lambda s: (s.busy, len(s.models), s.jobs_run))

    def acquire(self, identity: str, timeout: float | None = None) -> Slot | None:
        """Wait for a free worker and reserve the best one for a job of ``identity`` (None after
        ``timeout`` seconds)."""
        with self._lock:
            if not self._lock.wait_for(lambda: bool(self.free_slots()), timeout):
                return None
            slot = self._best_for(identity, self.free_slots())
            slot.busy += 1
            if identity:  # it will hold it: the next choices count it
                slot.models.add(identity)
            return slot

    def pick(self, slot: Slot, backlog: Iterable[tuple[Any, str]]) -> Any:
        """The job (of ``(job, identity)`` pairs, in queue order) that the free ``slot`` should
        take next, or None when the backlog is empty; does not reserve the slot."""
        first_new: tuple[int, Any] | None = None
        with self._lock:
            holders: dict[str, int] = {}
            for other in self.slots:
                for model in other.models:
                    holders[model] = holders.get(model, 0) + 1
            for job, identity in backlog:
                if not identity or identity in slot.models:
                    return job
                rank = holders.get(identity, 0)
                if first_new is None or rank < first_new[0]:
                    first_new = (rank, job)
        return first_new[1] if first_new is not None else None

    def reserve(self, slot: Slot, identity: str = "") -> None:
        """Mark ``slot`` busy with a job of ``identity`` (which it will then hold: the next
        choices count it at once, not when the job ends)."""
        with self._lock:
            slot.busy += 1
            if identity:
                slot.models.add(identity)

    def release(self, slot: Slot, identity: str | None, reset: bool = False) -> None:
        """The job on ``slot`` ended. ``identity``: the model identity it left loaded (None: it
        failed before loading anything we can count on); ``reset``: the worker was replaced (it
        holds nothing now)."""
        with self._lock:
            slot.busy = max(slot.busy - 1, 0)
            slot.jobs_run += 1
            if reset:
                slot.models.clear()
            if identity:
                slot.models.add(identity)
            self._lock.notify_all()

    def forget_models(self, slot: Slot, keep: str | None = None) -> None:
        """The worker dropped models (an eviction): keep only ``keep``, which it just used."""
        with self._lock:
            slot.models = {keep} if keep else set()
