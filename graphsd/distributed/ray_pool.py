"""Workers as Ray actors: each holds a warm :class:`~graphsd.engine.Engine` (built from the same
plain :class:`~graphsd.context.Settings`) behind a :class:`~graphsd.server.runner.LocalRunner`,
and runs plain :class:`~graphsd.server.runner.RunJob` documents, streaming the job's events back
in batches (a Ray generator: one item per ~50 ms of events, the last one with the outcome).

:class:`RayPool` starts the actors (one per GPU, or ``workers`` of them sharing the machine),
routes jobs with :class:`~graphsd.distributed.routing.Router`, and survives workers that die:
a job whose worker died (actor killed, process crash, out of memory) is re-run on a fresh actor
in the same place, at most :data:`MAX_ATTEMPTS` times; a job that fails (a node error) is not
retried. Needs ``ray`` (``pip install "graphsd[ray]"``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from graphsd.context import Settings
from graphsd.distributed.routing import Router, Slot
from graphsd.errors import GraphsdError
from graphsd.server.runner import RunJob, RunOutcome

log = logging.getLogger("graphsd.server.ray")  # under the server's logger: graphsd serve shows it

MAX_ATTEMPTS = 3  # runs of one job whose worker died, before the job fails
EVENT_INTERVAL_S = 0.05  # a worker sends the events of this long together
_END = object()


def import_ray() -> Any:
    """``ray``, or a GraphsdError that says how to install it."""
    try:
        import ray
    except ImportError:
        from graphsd.distributed import RAY_MISSING

        raise GraphsdError(RAY_MISSING) from None
    return ray


class Worker:
    """The actor: one Engine, one job at a time (interrupt and free may arrive meanwhile)."""

    def __init__(self, settings: dict[str, Any], threads: int | None = None):
        import torch

        from graphsd.engine import Engine
        from graphsd.server.runner import LocalRunner

        if threads:
            torch.set_num_threads(threads)
        self.runner = LocalRunner(Engine(Settings(**settings)))
        self.started = time.time()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": str(self.runner.engine.device), "host": os.uname().nodename}

    def run(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Run ``job`` (a RunJob as a mapping); yields ``{"events": [...]}`` batches, the last
        with ``"outcome"`` (a RunOutcome as a mapping, or None and ``"error"``) and
        ``"worker_s"``, the time spent here."""
        t0 = time.perf_counter()
        events: queue.Queue[Any] = queue.Queue()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["outcome"] = dataclasses.asdict(self.runner.run(RunJob(**job), events.put))
            except GraphsdError as exc:
                box["error"] = {"message": str(exc), "error_type": type(exc).__name__}
            except Exception as exc:
                box["error"] = {
                    "message": f"{type(exc).__name__}: {exc}",
                    "error_type": type(exc).__name__,
                    "traceback": traceback.format_exc(),
                }
            finally:
                events.put(_END)

        thread = threading.Thread(target=work, name="graphsd-job", daemon=True)
        thread.start()
        ended = False
        while not ended:
            batch = [events.get()]
            deadline = time.perf_counter() + EVENT_INTERVAL_S
            while batch[-1] is not _END:
                try:
                    batch.append(events.get(timeout=max(deadline - time.perf_counter(), 0)))
                except queue.Empty:
                    break
            if batch[-1] is _END:
                ended = True
                batch.pop()
                continue
            yield {"events": batch}
        thread.join()
        yield {
            "events": batch,
            "outcome": box.get("outcome"),
            "error": box.get("error"),
            "worker_s": time.perf_counter() - t0,
        }

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.runner.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.runner.free(unload_models, free_memory)


@dataclasses.dataclass
class Stats:
    """What the pool measured: per-job dispatch overhead (the job's time at the caller minus
    its time in the worker), model loads (jobs that loaded a model), worker deaths, retries."""

    overheads: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=100_000))
    loads: int = 0
    deaths: int = 0
    retries: int = 0
    jobs: int = 0


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> Any:
    """Join a Ray cluster: ``address`` ``auto`` joins the one running on this machine (``ray
    start --head``) or, when there is none, starts a local one, as ``None`` does; any other
    address is a cluster's (``host:port``, ``ray://host:port``)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if address in (None, "", "local", "auto"):
        if address == "auto":
            try:
                ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=True)
                return ray
            except ConnectionError:
                log.info("no Ray cluster runs on this machine: starting a local one")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, ValueError) as exc:
            raise GraphsdError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return ray


class RayPool:
    """``workers`` actors on the Ray cluster this process joined (see :func:`connect`), each
    with an Engine built from ``settings``. ``device`` cuda (or auto on a cluster with GPUs):
    one worker per GPU by default, ``workers`` more than the GPUs share them; cpu: one worker
    per CPU by default."""

    def __init__(self, settings: Settings, workers: int | None = None, threads: int | None = None):
        ray = import_ray()
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        wants_gpu = settings.device.startswith("cuda") or (settings.device == "auto" and gpus > 0)
        if wants_gpu and gpus <= 0:
            raise GraphsdError(f"--device {settings.device}: the Ray cluster has no GPU")
        count = workers or int(gpus if wants_gpu else cpus) or 1
        self.options: dict[str, Any] = {"max_concurrency": 4, "max_restarts": 0}
        if wants_gpu:
            self.options.update(num_gpus=min(1.0, gpus / count), num_cpus=0)
            settings = dataclasses.replace(settings, device="cuda")  # Ray gives each actor its GPU(s) as cuda:0...
        else:
            self.options.update(num_gpus=0, num_cpus=min(1.0, cpus / count))
            settings = dataclasses.replace(settings, device="cpu")
        plain = dataclasses.asdict(settings)
        for name in ("output_dir", "models_dir", "input_dir"):  # the workers start in other folders
            plain[name] = str(Path(plain[name]).resolve())
        for name in ("plugins_dirs", "read_roots"):
            if plain[name] is not None:
                plain[name] = [str(Path(p).resolve()) for p in plain[name]]
        self.settings = plain
        self.threads = threads
        self.size = count
        self.router = Router(count)
        self.stats = Stats()
        self._actor_class = ray.remote(Worker)
        self._lock = threading.Lock()
        self.actors = [self._start() for _ in range(count)]
        self.running: dict[str, Slot] = {}  # prompt id -> the worker running it

    def _start(self) -> Any:
        return self._actor_class.options(**self.options).remote(self.settings, self.threads)

    def wait_ready(self, timeout: float = 600) -> list[dict[str, Any]]:
        """Wait until every worker has built its Engine; their pid, device and host."""
        try:
            return list(self.ray.get([a.info.remote() for a in self.actors], timeout=timeout))
        except self.ray.exceptions.GetTimeoutError:
            raise GraphsdError(
                f"the {self.size} Ray workers did not start within {timeout:.0f} s: does the cluster have the resources "
                f"({self.options['num_gpus']} GPU and {self.options['num_cpus']} CPU each)?"
            ) from None

    def replace(self, slot: Slot, dead: Any) -> None:
        """Start a fresh actor in ``slot`` unless someone already replaced ``dead``."""
        with self._lock:
            if self.actors[slot.index] is dead:
                self.actors[slot.index] = self._start()
                self.stats.deaths += 1

    def execute(self, slot: Slot, job: RunJob, emit: Callable[[dict[str, Any]], None], identity: str) -> RunOutcome:
        """Run ``job`` on ``slot`` (reserved by the caller; released here), re-running it on a
        fresh actor there when the worker dies (files the dead attempt reported are deleted)."""
        ray = self.ray
        self.running[job.prompt_id] = slot
        loaded = False
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                actor = self.actors[slot.index]
                written: list[str] = []
                t0 = time.perf_counter()
                try:
                    for ref in actor.run.remote(dataclasses.asdict(job)):
                        item = ray.get(ref)
                        for event in item["events"]:
                            kind = event.get("kind")
                            if kind == "model" and event.get("action") == "load":
                                loaded = True
                            elif kind == "model" and event.get("action") == "evict":
                                self.router.forget_models(slot, keep=identity)
                            elif kind == "node_done":
                                written.extend(event.get("files") or ())
                            emit(event)
                        if "outcome" in item:
                            self.stats.overheads.append(max(time.perf_counter() - t0 - item["worker_s"], 0.0))
                            self.stats.jobs += 1
                            self.stats.loads += loaded
                            if item["outcome"] is None:
                                raise GraphsdError(item["error"]["message"])
                            outcome = RunOutcome(**item["outcome"])
                            self.router.release(slot, identity if outcome.status == "success" else None)
                            return outcome
                    raise RuntimeError("the worker's stream ended without an outcome")
                except ray.exceptions.RayActorError as exc:
                    self.replace(slot, actor)
                    self.router.forget_models(slot)
                    _delete(written)
                    if attempt == MAX_ATTEMPTS:
                        raise GraphsdError(
                            f"the worker died {attempt} times while running this job; it is not retried again ({exc})"
                        ) from None
                    self.stats.retries += 1
                    log.warning(
                        "a worker died while running %s: running it again on a fresh worker (attempt %d)", job.prompt_id, attempt + 1
                    )
            raise AssertionError("unreachable")
        except BaseException:
            self.router.release(slot, None)
            raise
        finally:
            self.running.pop(job.prompt_id, None)

    def interrupt(self, prompt_id: str | None = None) -> None:
        targets = [(p, s) for p, s in list(self.running.items()) if prompt_id is None or p == prompt_id]
        for pid, slot in targets:
            self.actors[slot.index].interrupt.remote(pid)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        refs = [a.free.remote(unload_models, free_memory) for a in self.actors]
        try:
            self.ray.get(refs, timeout=60)
        except Exception as exc:  # a dead or stuck worker: it frees everything anyway when replaced
            log.warning("could not free every worker: %s", exc)
        if unload_models:
            for slot in self.router.slots:
                self.router.forget_models(slot)

    def kill(self, index: int) -> None:
        """Kill worker ``index`` at once (tests, benchmarks: a worker that dies)."""
        self.ray.kill(self.actors[index], no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass


def _delete(files: list[str]) -> None:
    for f in files:
        try:
            Path(f).unlink()
        except OSError:
            pass


class RayRunner:
    """A :class:`~graphsd.server.runner.Runner` that runs ``graphsd serve``'s prompts on a
    :class:`RayPool`, up to one per worker at once (the dispatcher's ``workers``)."""

    def __init__(self, pool: RayPool, loaders: set[str]):
        self.pool = pool
        self.loaders = loaders
        self.workers = pool.size
        self._stopped: set[str] = set()

    def run(self, job: RunJob, emit: Callable[[dict[str, Any]], None]) -> RunOutcome:
        from graphsd.distributed.routing import model_identity

        identity = model_identity(job.workflow, self.loaders)
        slot = self.pool.router.acquire(identity)
        assert slot is not None
        if job.prompt_id in self._stopped:
            self._stopped.discard(job.prompt_id)
            self.pool.router.release(slot, None)
            return RunOutcome("interrupted")
        return self.pool.execute(slot, job, emit, identity)

    def interrupt(self, prompt_id: str | None = None) -> None:
        if prompt_id is not None and prompt_id not in self.pool.running:
            self._stopped.add(prompt_id)
        self.pool.interrupt(prompt_id)

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.pool.free(unload_models, free_memory)


def start_runner(engine: Any, address: str, workers: int | None) -> RayRunner:
    """Join (or start) the Ray cluster at ``address`` and start the workers of ``graphsd serve
    --ray``: Engines built from ``engine``'s settings; prompts are routed by the loaders of
    ``engine``'s node types."""
    from graphsd.distributed.routing import loader_types

    connect(address or None, num_cpus=workers)
    pool = RayPool(engine.settings, workers)
    infos = pool.wait_ready()
    hosts = sorted({i["host"] for i in infos})
    log.info("%d Ray workers ready (%s on %s)", len(infos), ", ".join(sorted({i["device"] for i in infos})), ", ".join(hosts))
    return RayRunner(pool, loader_types(engine.nodes))
