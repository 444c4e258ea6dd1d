"""The aiohttp application: ComfyUI's HTTP routes and websocket on one long-lived Engine, the
dispatcher thread that runs the persistent queue, and start-up / shut-down.

Routes are served with and without the ``/api`` prefix, as ComfyUI serves them; ``/ws`` and
``/internal/...`` only without it; the ComfyUI frontend's static files (the
``comfyui-frontend-package`` wheel) at ``/``. See docs/server.md for the list.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import mimetypes
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.multipart import BodyPartReader

from graphsd.context import Settings
from graphsd.engine import Engine
from graphsd.errors import GraphsdError, Issue, WorkflowError
from graphsd.hookspecs import COMFY_NATIVE_PREFIX
from graphsd.paths import remove_temporaries, sweep_stale_temporaries, write_atomic
from graphsd.server import objectinfo, protocol
from graphsd.server.runner import LocalRunner, RunJob, Runner, RunOutcome, check_runnable
from graphsd.server.security import COOKIE, Guard, Refused, check_bind, confined
from graphsd.server.store import Job, Store
from graphsd.server.userdata import UserData

log = logging.getLogger("graphsd.server")

MAX_PROMPT_BYTES = 32 * 1024 * 1024
MAX_CLIENT_BACKLOG = 5_000  # websocket messages waiting for a slow client before it is dropped
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
SAFE_INLINE = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "video/", "audio/")


@dataclasses.dataclass
class ServerConfig:
    """What ``graphsd serve`` is started with (plain values)."""

    host: str = "127.0.0.1"
    port: int = 8188
    output_dir: str = "output"
    input_dir: str = "input"
    data_dir: str = "graphsd-data"
    models_dir: str = "models"
    token: str | None = None
    allow_pickle: bool = False
    device: str = "auto"
    plugins_dirs: list[str] = dataclasses.field(default_factory=list)
    load_entry_points: bool = True
    vram_budget_mb: float | None = None
    ram_budget_mb: float | None = None
    max_upload_mb: float = 100.0
    max_history: int = 10_000
    open_browser: bool = False
    #: run prompts on Ray workers instead of this process: a cluster address, "auto" (the cluster
    #: on this machine, else a new local one) or "" (a new local cluster); None: no Ray
    ray_address: str | None = None
    workers: int | None = None  # Ray workers (default: one per GPU, or per CPU)

    @property
    def temp_dir(self) -> str:
        return str(Path(self.data_dir) / "temp")

    def settings(self) -> Settings:
        """The Engine's settings: prompts from the network read only the models, input, output
        and temporary folders (and the models graphsd ships)."""
        return Settings(
            device=self.device,
            output_dir=self.output_dir,
            models_dir=self.models_dir,
            input_dir=self.input_dir,
            plugins_dirs=list(self.plugins_dirs),
            allow_pickle=self.allow_pickle,
            load_entry_points=self.load_entry_points,
            vram_budget_mb=self.vram_budget_mb,
            ram_budget_mb=self.ram_budget_mb,
            read_roots=[self.models_dir, self.input_dir, self.output_dir, self.temp_dir],
        )


def _error(message: str, status: int, kind: str = "invalid_request", details: str = "") -> web.Response:
    return web.json_response(
        {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}, status=status
    )


# ---- websocket clients ----------------------------------------------------------------------
class PreviewSlot:
    """Queued in a client's outgoing frames where its newest preview frame is to be written."""


class Client:
    """One websocket, with its own queue of outgoing frames and the task that writes them, and
    the feature flags the client announced (``supports_preview_metadata``, ...)."""

    def __init__(self, sid: str, ws: web.WebSocketResponse):
        self.sid = sid
        self.ws = ws
        self.flags: dict[str, Any] = {}
        self.preview: bytes | None = None  # the newest preview frame not yet written
        self.queue: asyncio.Queue[str | bytes | type[PreviewSlot] | None] = asyncio.Queue(MAX_CLIENT_BACKLOG)
        self.task = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while True:
            queued = await self.queue.get()
            if queued is None or self.ws.closed:
                return
            item: str | bytes | type[PreviewSlot] | None = queued
            if queued is PreviewSlot:
                item, self.preview = self.preview, None
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                elif isinstance(item, str):
                    await self.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                return

    def put(self, item: str | bytes) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:  # a client that does not read: drop it rather than grow without bound
            log.warning("websocket client %s does not keep up; disconnecting it", self.sid)
            asyncio.ensure_future(self.ws.close())

    def put_preview(self, frame: bytes) -> None:
        """Queue a preview frame. At most one waits: a newer frame replaces it, so a client that
        reads slowly skips previews instead of falling behind (and is never dropped for them)."""
        waiting = self.preview is not None
        self.preview = frame
        if not waiting:
            try:
                self.queue.put_nowait(PreviewSlot)
            except asyncio.QueueFull:
                self.preview = None


class Hub:
    """The connected websocket clients by sid. Its methods run on the event loop; ``post``
    may be called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue_remaining: Callable[[], int]):
        self.loop = loop
        self.clients: dict[str, Client] = {}
        self.queue_remaining = queue_remaining
        self._status_scheduled = False

    def connect(self, sid: str, ws: web.WebSocketResponse) -> Client:
        # a page reconnecting (or a duplicated tab, which shares the id): the newest socket gets the
        # messages; the old one is left open, as closing it would make its page reconnect in turn
        client = self.clients[sid] = Client(sid, ws)
        return client

    def disconnect(self, client: Client) -> None:
        if self.clients.get(client.sid) is client:
            del self.clients[client.sid]
        if client.queue.full():
            client.task.cancel()
        else:
            client.queue.put_nowait(None)

    def send(self, sid: str | None, kind: str, data: Any) -> None:
        client = self.clients.get(sid) if sid else None
        if client is not None:
            client.put(json.dumps({"type": kind, "data": data}))

    def broadcast(self, kind: str, data: Any) -> None:
        text = json.dumps({"type": kind, "data": data})
        for client in list(self.clients.values()):
            client.put(text)

    def flags(self, sid: str | None) -> dict[str, Any]:
        """The feature flags the client ``sid`` announced (from any thread)."""
        client = self.clients.get(sid) if sid else None
        return dict(client.flags) if client is not None else {}

    def post_preview(self, sid: str | None, frame: bytes) -> None:
        """Send a preview frame to ``sid`` from any thread (after the messages posted before it)."""
        if sid:
            self.loop.call_soon_threadsafe(self._send_preview, sid, frame)

    def _send_preview(self, sid: str, frame: bytes) -> None:
        client = self.clients.get(sid)
        if client is not None:
            client.put_preview(frame)

    def post(self, sid: str | None, messages: list[tuple[str, Any]]) -> None:
        """Send ``messages`` to ``sid`` from any thread, in order."""
        if sid and messages:
            self.loop.call_soon_threadsafe(self._send_all, sid, messages)

    def _send_all(self, sid: str, messages: list[tuple[str, Any]]) -> None:
        for kind, data in messages:
            self.send(sid, kind, data)

    def queue_changed(self) -> None:
        """Broadcast the queue size soon (from any thread; changes close together are sent once)."""
        self.loop.call_soon_threadsafe(self._schedule_status)

    def _schedule_status(self) -> None:
        if not self._status_scheduled:
            self._status_scheduled = True
            self.loop.call_soon(self._broadcast_status)

    def _broadcast_status(self) -> None:
        self._status_scheduled = False
        self.broadcast("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}})


# ---- running the queue ----------------------------------------------------------------------
class Dispatcher(threading.Thread):
    """Takes pending prompts from the store in order and runs them on the runner: one at a
    time, or up to the runner's ``workers`` at once (each in its own thread) when it has
    several; records files as they are written, puts each finished prompt in the history, and
    sends its events to the client that queued it."""

    def __init__(self, server: Server):
        super().__init__(name="graphsd-dispatcher", daemon=True)
        self.server = server
        # set by every change the dispatcher must look at (a prompt queued, a prompt done, /free,
        # stopping); it is cleared before the store is read, so a prompt queued while the store
        # says "nothing pending" still wakes it at once
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.capacity = max(int(getattr(server.runner, "workers", 1)), 1)
        self.running: dict[str, Job] = {}  # prompt id -> the running prompt
        self.nodes: dict[str, str | None] = {}  # prompt id -> the prompt node it runs now
        self.free_request: tuple[bool, bool] | None = None
        self._threads: list[threading.Thread] = []

    def running_for(self, client_id: str) -> tuple[Job, str] | None:
        """A running prompt the client queued and the node it runs now, if any."""
        for job in list(self.running.values()):
            node = self.nodes.get(job.prompt_id)
            if job.client_id == client_id and node is not None:
                return job, node
        return None

    def notify(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        for job in list(self.running.values()):
            self.server.runner.interrupt(job.prompt_id)
        self.notify()

    def run(self) -> None:
        store = self.server.store
        while not self.stopping.is_set():
            self.wake.clear()
            if self.free_request is not None:
                unload, free = self.free_request
                self.free_request = None
                self.server.runner.free(unload, free)
            job = store.claim_next() if len(self.running) < self.capacity else None
            if job is None:
                if not self.stopping.is_set():  # (stop() sets stopping before wake)
                    self.wake.wait()
                continue
            self.running[job.prompt_id], self.nodes[job.prompt_id] = job, None
            self.server.hub.queue_changed()
            if self.capacity == 1:
                self._guarded(job)
            else:
                thread = threading.Thread(target=self._guarded, args=(job,), name=f"graphsd-prompt-{job.prompt_id[:8]}", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
        for thread in self._threads:
            thread.join()

    def _guarded(self, job: Job) -> None:
        try:
            self._run(job)
        except Exception:  # the server must outlive anything one prompt does
            log.exception("internal error while running prompt %s", job.prompt_id)
            with contextlib.suppress(Exception):
                self.server.store.finish(
                    job.prompt_id,
                    "failed",
                    {},
                    {"exception_type": "InternalError", "exception_message": "the server failed while running this prompt"},
                    [],
                )
        finally:
            self.running.pop(job.prompt_id, None)
            self.nodes.pop(job.prompt_id, None)
            self.server.hub.queue_changed()
            self.notify()

    def _run(self, job: Job) -> None:
        server = self.server
        tracker = protocol.RunMessages(job.prompt_id, job.origins, server.roots)
        written: list[str] = []

        def emit(event: dict[str, Any]) -> None:
            if event.get("kind") == "preview":
                image = base64.b64decode(event.get("image", ""))
                frame = protocol.preview_frame(job.prompt_id, tracker.cid(event["node_id"]), event.get("image_type", "image/jpeg"), image)
                server.hub.post_preview(job.client_id, frame)
                return
            if event.get("kind") == "node_done" and event.get("files"):
                written.extend(event["files"])
                server.store.add_files(job.prompt_id, list(event["files"]))
            if event.get("kind") == "node_start":
                self.nodes[job.prompt_id] = tracker.cid(event["node_id"])
            server.hub.post(job.client_id, tracker.event(event))

        log.info("prompt %s started (queue number %s)", job.prompt_id, protocol.number_json(job.number))
        try:
            previews = protocol.wants_previews(job.extra_data, server.hub.flags(job.client_id))
            outcome = server.runner.run(RunJob(job.prompt_id, job.workflow, job.targets, previews), emit)
        except GraphsdError as exc:
            outcome = RunOutcome("failed", errors=[{"node": "", "type": "", "message": str(exc), "error_type": type(exc).__name__}])
        except Exception as exc:
            outcome = RunOutcome(
                "failed",
                errors=[
                    {
                        "node": "",
                        "type": "",
                        "message": f"{type(exc).__name__}: {exc}",
                        "error_type": type(exc).__name__,
                        "traceback": traceback.format_exc(),
                    }
                ],
            )
        if self.stopping.is_set() and outcome.status == "interrupted":
            server.delete_files(written)
            server.store.requeue(job.prompt_id)
            log.info("prompt %s interrupted by the shutdown; it runs again at the next start", job.prompt_id)
            return
        closing = tracker.finish(outcome)
        status = {"success": "completed", "failed": "failed", "interrupted": "cancelled"}[outcome.status]
        error = next((data for kind, data in closing if kind in ("execution_error", "execution_interrupted")), None)
        server.store.finish(job.prompt_id, status, tracker.outputs, error, tracker.history)  # before the client hears it is done
        server.hub.post(job.client_id, closing)
        counts = f"{len(outcome.executed)} nodes run, {len(outcome.cached)} cached"
        line = f"prompt {job.prompt_id}: {outcome.status} in {outcome.duration_s:.2f} s ({counts})"
        if outcome.errors:
            line += "; " + "; ".join(f"{e['node'] or 'prompt'}: {e['message']}" for e in outcome.errors[:3])
        log.info(line)


# ---- the server -----------------------------------------------------------------------------
class Server:
    def __init__(self, config: ServerConfig, engine: Engine, runner: Runner | None = None):
        self.config = config
        self.engine = engine
        self.runner: Runner = runner or LocalRunner(engine)
        self.output_dir = Path(config.output_dir).resolve()
        self.input_dir = Path(config.input_dir).resolve()
        self.temp_dir = Path(config.temp_dir).resolve()
        for folder in (self.output_dir, self.input_dir, self.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.roots = {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}
        self.data_dir = Path(config.data_dir).resolve()
        self.store = Store(self.data_dir / "queue.sqlite3", max_history=config.max_history)
        self.userdata = UserData(self.data_dir / "user" / "default")
        self.guard = Guard(config.host, config.token)
        self.max_upload = int(config.max_upload_mb * 1024 * 1024)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="graphsd-http")
        self.dispatcher = Dispatcher(self)
        self.hub: Hub = None  # type: ignore[assignment]  # made on the event loop (start)
        self.log_entries: collections.deque[dict[str, str]] = collections.deque(maxlen=1000)
        self.static_dir = _frontend_dir()
        self._remember_comfy(self._comfy_nodes())

    # ---- helpers ------------------------------------------------------------------------------
    def _comfy_nodes(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for result in self.engine.pm.hook.graphsd_comfy_nodes(models_dir=self.config.models_dir, input_dir=str(self.input_dir)):
            for name, entry in (result or {}).items():
                merged.setdefault(name, entry)
        return merged

    def object_info(self) -> dict[str, dict[str, Any]]:
        comfy_types: dict[str, str] = {}
        for result in self.engine.pm.hook.graphsd_comfy_types():
            for k, v in (result or {}).items():
                comfy_types.setdefault(k, v)
        builtin = {p.name for p in self.engine.registry.plugins if p.source == "builtin"}
        modules = {}
        for node_type, plugin in self.engine.registry.node_plugin.items():
            pack = "graphsd" if plugin in builtin else re.sub(r"[^A-Za-z0-9_\-]", "_", plugin)
            modules[node_type] = f"custom_nodes.{pack}"
        comfy = self._comfy_nodes()
        self._remember_comfy(comfy)
        choices = {}
        for node_type, cls in self.engine.nodes.items():
            try:
                choices[node_type] = cls.input_choices(self.config.models_dir, str(self.input_dir))
            except Exception as exc:  # a plugin's listing must not break /object_info for every node
                log.warning("%s.input_choices failed: %s", node_type, exc)
        return objectinfo.build(self.engine.nodes, modules, comfy, comfy_types, choices)

    def delete_files(self, files: list[str]) -> int:
        """Delete files a crashed or stopped attempt wrote (only regular files inside the output
        folder); returns how many."""
        deleted = 0
        for f in files:
            path = Path(f)
            try:
                if not path.is_symlink() and path.is_file() and self.output_dir in path.resolve().parents:
                    path.unlink()
                    deleted += 1
            except OSError:
                pass
        return deleted

    def recover(self) -> None:
        """Put back in the queue what a crashed server left running; delete what it wrote."""
        jobs = self.store.recover()
        for job in jobs:
            deleted = self.delete_files(job.files)
            log.warning(
                "prompt %s was running when the server stopped: it runs again from the start (%d file(s) of the interrupted "
                "attempt deleted)",
                job.prompt_id,
                deleted,
            )
        if jobs:
            for folder, _, _ in os.walk(self.output_dir):
                sweep_stale_temporaries(Path(folder))

    def validate(self, prompt: Any, partial: list[str] | None) -> tuple[dict[str, Any], int]:
        """Translate and validate a prompt (in a worker thread): ((workflow, origins, targets,
        output_nodes), 200) or (ComfyUI error body, 400)."""
        if not isinstance(prompt, dict) or not prompt:
            return {
                "error": {
                    "type": "invalid_prompt",
                    "message": "the prompt must be a non-empty object of nodes",
                    "details": "",
                    "extra_info": {},
                },
                "node_errors": {},
            }, 400
        prompt = {str(k): v for k, v in prompt.items()}
        issues = []
        known = self.comfy_names | set(self.engine.nodes) | {objectinfo.native_name(t, self.comfy_names) for t in self.engine.nodes}
        for cid, node in prompt.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not isinstance(node.get("inputs", {}), dict):
                issues.append(Issue('a node must be {"class_type": <name>, "inputs": {...}}', node=cid, code="schema"))
            elif node["class_type"] not in known:
                issues.append(
                    Issue(
                        f"Cannot execute because node {node['class_type']} does not exist.",
                        node=cid,
                        code="unknown_type",
                        hint="refresh the node definitions, or install the plugin that provides it",
                    )
                )
        outputs_all = [cid for cid, n in prompt.items() if isinstance(n, dict) and self._is_output(n.get("class_type"))]
        if issues:
            return protocol.error_response(issues, prompt, {}, outputs_all), 400
        try:
            translated = self.engine.pm.hook.graphsd_comfy_prompt(
                prompt=prompt, nodes=self.engine.nodes, input_dir=str(self.input_dir), folders={k: str(v) for k, v in self.roots.items()}
            )
        except WorkflowError as err:
            return protocol.error_response(err.issues, prompt, {}, outputs_all), 400
        if translated is None:
            return protocol.error_response([Issue("no installed plugin reads ComfyUI prompts (graphsd.std does)")], prompt, {}, []), 400
        workflow, origins = translated["workflow"], translated["origins"]
        targets = None
        if partial:
            unknown = [t for t in partial if t not in prompt]
            if unknown:
                return protocol.error_response(
                    [Issue(f"partial_execution_targets names nodes that are not in the prompt: {', '.join(unknown)}", code="missing_node")],
                    prompt,
                    {},
                    outputs_all,
                ), 400
            targets = [gid for gid, o in origins.items() if o["id"] in partial and self._is_output(o["class_type"])]
            targets = targets or [gid for gid, o in origins.items() if o["id"] in partial]
        try:
            check_runnable(self.engine, workflow, targets)
        except WorkflowError as err:
            return protocol.error_response(err.issues, prompt, origins, outputs_all), 400
        if targets is None:
            output_nodes = sorted(
                {
                    o["id"]
                    for gid, o in origins.items()
                    if getattr(self.engine.nodes.get(workflow["nodes"][gid]["type"]), "output_node", False)
                }
            )
        else:
            output_nodes = sorted({origins[t]["id"] for t in targets})
        return {"workflow": workflow, "origins": origins, "targets": targets, "output_nodes": output_nodes}, 200

    def _remember_comfy(self, comfy: dict[str, dict[str, Any]]) -> None:
        self.comfy_names = set(comfy)
        self.comfy_outputs = {name for name, entry in comfy.items() if entry.get("output_node")}

    def _is_output(self, class_type: Any) -> bool:
        if not isinstance(class_type, str):
            return False
        if class_type in self.comfy_names:
            return class_type in self.comfy_outputs
        name = class_type.removeprefix(COMFY_NATIVE_PREFIX)
        return bool(getattr(self.engine.nodes.get(name), "output_node", False))

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- middleware ---------------------------------------------------------------------------
    @web.middleware
    async def guard_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        problem = self.guard.host_problem(host)
        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        problem = problem or self.guard.origin_problem(
            request.method, websocket, host, request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")
        )
        if problem:
            log.warning("refused %s %s: %s", request.method, request.path, problem)
            return _error(problem, 403, "forbidden")
        query_token = request.query.get("token")
        if not self.guard.token_ok(request.headers.get("Authorization"), query_token, request.cookies.get(COOKIE)):
            return _error(
                "this graphsd server needs its token: send 'Authorization: Bearer <token>', or open the page once "
                "as http://host:port/?token=<token> (the browser then keeps it in a cookie)",
                401,
                "unauthorized",
            )
        try:
            response = await handler(request)
        except Refused as exc:
            return _error(str(exc), exc.status, "forbidden" if exc.status == 403 else "invalid_request")
        except web.HTTPException:
            raise
        except Exception:
            log.exception("internal error in %s %s", request.method, request.path)
            return _error("internal server error (see the server log)", 500, "internal_error")
        if self.guard.token and query_token is not None and not websocket and isinstance(response, web.Response | web.FileResponse):
            response.set_cookie(COOKIE, query_token, httponly=True, samesite="Lax", path="/")
        return response

    # ---- prompts ------------------------------------------------------------------------------
    async def read_json(self, request: web.Request, limit: int) -> Any:
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        try:
            return json.loads(body or b"null")
        except (ValueError, RecursionError) as exc:
            raise Refused(f"the body is not valid JSON ({exc})") from None

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, MAX_PROMPT_BYTES)
        if not isinstance(body, dict) or "prompt" not in body:
            return _error("No prompt provided", 400, "no_prompt", 'send {"prompt": {...}, "client_id": "..."}')
        client_id = body.get("client_id")
        client_id = client_id if isinstance(client_id, str) and client_id else None
        extra_data: dict[str, Any] = body["extra_data"] if isinstance(body.get("extra_data"), dict) else {}
        if problem := protocol.preview_method_problem(extra_data):
            return _error(problem, 400, "invalid_prompt")
        partial = body.get("partial_execution_targets")
        if partial is not None and not (isinstance(partial, list) and all(isinstance(p, str) for p in partial)):
            return _error("partial_execution_targets must be a list of node ids", 400, "invalid_prompt")
        number = body.get("number")
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float)) or not abs(number) < 1e15):
            return _error("number must be a number below 1e15", 400, "invalid_prompt")
        try:
            result, status = await self._in_thread(self.validate, body["prompt"], partial or None)
        except Exception as exc:  # a bug in a plugin's translation: the prompt is refused, the server stays up
            log.exception("could not validate a prompt")
            return _error(f"graphsd could not read this prompt ({type(exc).__name__}: {exc})", 400, "invalid_prompt")
        if status != 200:
            return web.json_response(result, status=status)
        prompt_id = body.get("prompt_id") if isinstance(body.get("prompt_id"), str) and CLIENT_ID_RE.match(body["prompt_id"]) else None
        prompt_id = prompt_id or str(uuid.uuid4())
        if self.store.get(prompt_id) is not None:
            return _error(f"a prompt with id {prompt_id} was already queued", 400, "invalid_prompt")
        job = Job(
            prompt_id=prompt_id,
            number=0,
            status="pending",
            client_id=client_id,
            prompt=body["prompt"],
            extra_data=extra_data,
            workflow=result["workflow"],
            origins=result["origins"],
            targets=result["targets"],
            output_nodes=result["output_nodes"],
            created=time.time(),
        )
        number = self.store.add(job, front=bool(body.get("front")), number=number)
        log.info("prompt %s queued (client %s)", prompt_id, client_id or "-")
        self.dispatcher.notify()
        self.hub.queue_changed()
        return web.json_response({"prompt_id": prompt_id, "number": protocol.number_json(number), "node_errors": {}})

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.store.queue_remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.store.queue()
        return web.json_response(
            {"queue_running": [protocol.queue_entry(j) for j in running], "queue_pending": [protocol.queue_entry(j) for j in pending]}
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, 1024 * 1024)
        body = body if isinstance(body, dict) else {}
        if body.get("clear"):
            self.store.cancel_pending(None)
        if isinstance(body.get("delete"), list):
            self.store.cancel_pending([str(i) for i in body["delete"]])
        self.hub.queue_changed()
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info.get("prompt_id")
        if prompt_id is not None:
            job = self.store.get(prompt_id)
            if job is None or job.status not in ("completed", "failed", "cancelled"):
                return web.json_response({})
            return web.json_response({job.prompt_id: protocol.history_entry(job)})
        max_items = _int(request.query.get("max_items"))
        offset = _int(request.query.get("offset")) or 0
        return web.json_response({j.prompt_id: protocol.history_entry(j) for j in self.store.history(max_items, offset)})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, 1024 * 1024)
        body = body if isinstance(body, dict) else {}
        if body.get("clear"):
            self.store.delete_history(None)
        if isinstance(body.get("delete"), list):
            self.store.delete_history([str(i) for i in body["delete"]])
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, 1024 * 1024) if request.can_read_body else None
        prompt_id = body.get("prompt_id") if isinstance(body, dict) and isinstance(body.get("prompt_id"), str) else None
        for current in list(self.dispatcher.running.values()):
            if prompt_id is None or prompt_id == current.prompt_id:
                self.runner.interrupt(current.prompt_id)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, 1024 * 1024) if request.can_read_body else None
        body = body if isinstance(body, dict) else {}
        self.dispatcher.free_request = (bool(body.get("unload_models")), bool(body.get("free_memory")))
        self.dispatcher.notify()
        return web.Response(status=200)

    # ---- jobs -------------------------------------------------------------------------------
    async def get_jobs(self, request: web.Request) -> web.Response:
        wanted = [s.strip() for s in request.query.get("status", "").split(",") if s.strip()]
        reverse = {v: k for k, v in protocol.JOB_STATUS.items()}
        statuses = [reverse[s] for s in wanted if s in reverse] if wanted else list(protocol.JOB_STATUS)
        limit = _int(request.query.get("limit"))
        offset = max(_int(request.query.get("offset")) or 0, 0)
        jobs, total = self.store.jobs(statuses or ["none"], limit if limit is not None and limit >= 0 else None, offset)
        shown = limit if limit is not None and limit >= 0 else total
        return web.json_response(
            {
                "jobs": [protocol.job_item(j) for j in jobs],
                "pagination": {"offset": offset, "limit": shown, "total": total, "has_more": offset + len(jobs) < total},
            }
        )

    async def get_job(self, request: web.Request) -> web.Response:
        job = self.store.get(request.match_info["job_id"])
        if job is None:
            return _error("no such job", 404, "not_found")
        return web.json_response(protocol.job_item(job, detail=True))

    def _cancel(self, ids: list[str]) -> bool:
        cancelled = bool(self.store.cancel_pending(ids))
        for current in list(self.dispatcher.running.values()):
            if current.prompt_id in ids:
                self.runner.interrupt(current.prompt_id)
                cancelled = True
        self.hub.queue_changed()
        return cancelled

    async def cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self._cancel([request.match_info["job_id"]])})

    async def cancel_jobs(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, 1024 * 1024)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return _error('send {"job_ids": [...]}', 400)
        return web.json_response({"cancelled": self._cancel([str(i) for i in ids])})

    # ---- files ------------------------------------------------------------------------------
    async def view(self, request: web.Request) -> web.StreamResponse:
        kind = request.query.get("type") or "output"
        if kind not in self.roots:
            return _error(f"type must be one of {', '.join(self.roots)}", 400)
        filename = request.query.get("filename", "")
        if not filename:
            return _error("filename is required", 400)
        subfolder = request.query.get("subfolder", "")
        path = confined(self.roots[kind], f"{subfolder}/{filename}" if subfolder else filename)
        if not path.is_file():
            return _error("no such file", 404, "not_found")
        headers = {
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "Cache-Control": "no-cache",
        }
        channel, preview = request.query.get("channel"), request.query.get("preview")
        if channel in ("rgb", "a", "rgba") or preview:
            converted = await self._in_thread(_convert_image, path, channel, preview)
            if converted is not None:
                data, content_type = converted
                return web.Response(body=data, content_type=content_type, headers=headers)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not content_type.startswith(SAFE_INLINE):
            content_type = "application/octet-stream"
            headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        headers["Content-Type"] = content_type
        return web.FileResponse(path, headers=headers)

    async def _read_upload(self, request: web.Request) -> tuple[bytes, str, dict[str, str]]:
        if request.content_length is not None and request.content_length > self.max_upload + 64 * 1024:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_upload, actual_size=request.content_length)
        reader = await request.multipart()
        data, filename, fields = b"", "", {}
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "image" and part.filename is not None:
                chunks, size = [], 0
                while chunk := await part.read_chunk(256 * 1024):
                    size += len(chunk)
                    if size > self.max_upload:
                        raise web.HTTPRequestEntityTooLarge(max_size=self.max_upload, actual_size=size)
                    chunks.append(chunk)
                data, filename = b"".join(chunks), part.filename
            elif part.name:
                text = await part.read_chunk(64 * 1024)
                fields[part.name] = text.decode("utf-8", "replace")
        if not filename:
            raise Refused("no file: send it as the multipart field 'image'")
        return data, filename, fields

    async def upload_image(self, request: web.Request) -> web.Response:
        data, filename, fields = await self._read_upload(request)
        return web.json_response(await self._store_upload(data, filename, fields))

    async def upload_mask(self, request: web.Request) -> web.Response:
        """The mask editor's upload: the mask's alpha becomes the alpha of the original image
        (``original_ref``), saved as a new input image."""
        data, filename, fields = await self._read_upload(request)
        try:
            ref = json.loads(fields.get("original_ref", ""))
        except ValueError:
            raise Refused("original_ref must be JSON {filename, subfolder, type}") from None
        if not isinstance(ref, dict) or ref.get("type", "input") not in self.roots or not isinstance(ref.get("filename"), str):
            raise Refused("original_ref must be JSON {filename, subfolder, type}")
        sub = ref.get("subfolder") or ""
        original = confined(self.roots[ref.get("type", "input")], f"{sub}/{ref['filename']}" if sub else ref["filename"])
        if not original.is_file():
            raise Refused("the original image does not exist", 404)
        combined = await self._in_thread(_apply_mask, original, data, self.engine.settings.max_image_pixels)
        return web.json_response(await self._store_upload(combined, filename, fields))

    async def _store_upload(self, data: bytes, filename: str, fields: dict[str, str]) -> dict[str, str]:
        kind = fields.get("type") or "input"
        if kind not in ("input", "temp"):
            raise Refused("uploads go to type 'input' or 'temp'")
        name = filename
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise Refused(f"file name {filename!r} is not allowed: give a plain name (a folder goes in the 'subfolder' field)")
        subfolder = fields.get("subfolder", "").strip("/")
        target = confined(self.roots[kind], f"{subfolder}/{name}" if subfolder else name)
        problem = await self._in_thread(_image_problem, data, self.engine.settings.max_image_pixels)
        if problem:
            raise Refused(f"{name}: {problem}")
        overwrite = fields.get("overwrite", "").lower() in ("true", "1")
        if not overwrite and target.is_file() and target.read_bytes() == data:
            final = target
        else:
            final = await self._in_thread(lambda: write_atomic(target, _writer(data), overwrite=overwrite))
        return {"name": final.name, "subfolder": subfolder, "type": kind}

    async def internal_files(self, request: web.Request) -> web.Response:
        kind = request.match_info["directory_type"]
        if kind not in self.roots:
            return _error(f"unknown folder {kind}", 400)
        root = self.roots[kind]
        files = [p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return web.json_response([p.relative_to(root).as_posix() for p in files[:5000]])

    # ---- information ------------------------------------------------------------------------
    async def get_object_info(self, request: web.Request) -> web.Response:
        info = await self._in_thread(self.object_info)
        name = request.match_info.get("node_class")
        if name is not None:
            return web.json_response({name: info[name]} if name in info else {})
        return web.json_response(info)

    async def system_stats(self, request: web.Request) -> web.Response:
        import torch

        from graphsd import __version__

        total, available = _memory()
        device = self.engine.device
        entry: dict[str, Any] = {
            "name": str(device),
            "type": device.type,
            "index": device.index,
            "vram_total": 0,
            "vram_free": 0,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }
        if device.type == "cuda":
            free, vram = torch.cuda.mem_get_info(device)
            entry.update(
                name=torch.cuda.get_device_name(device),
                vram_total=vram,
                vram_free=free,
                torch_vram_total=torch.cuda.memory_reserved(device),
                torch_vram_free=torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device),
            )
        return web.json_response(
            {
                "system": {
                    "os": sys.platform,
                    "ram_total": total,
                    "ram_free": available,
                    "comfyui_version": f"graphsd {__version__}",
                    "python_version": sys.version,
                    "pytorch_version": torch.__version__,
                    "embedded_python": False,
                    "argv": list(sys.argv),
                },
                "devices": [entry],
            }
        )

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(self.feature_flags())

    def feature_flags(self) -> dict[str, Any]:
        return {"supports_preview_metadata": True, "max_upload_size": self.max_upload}

    def _model_folders(self) -> list[str]:
        root = Path(self.config.models_dir)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_folders())

    async def models_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self._model_folders():
            return _error(f"no model folder {folder}", 404, "not_found")
        root = confined(self.config.models_dir, folder)
        names = [
            p.relative_to(root).as_posix()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
        ]
        return web.json_response(names[:10000])

    async def experiment_models(self, request: web.Request) -> web.Response:
        root = Path(self.config.models_dir).resolve()
        return web.json_response([{"name": f, "folders": [str(root / f)]} for f in self._model_folders()])

    async def experiment_models_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self._model_folders():
            return _error(f"no model folder {folder}", 404, "not_found")
        root = confined(self.config.models_dir, folder)
        return web.json_response(
            [{"name": p.relative_to(root).as_posix(), "pathIndex": 0} for p in sorted(root.rglob("*")) if p.is_file()][:10000]
        )

    async def get_logs(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": list(self.log_entries), "size": {"cols": 120, "rows": 40}})

    async def folder_paths(self, request: web.Request) -> web.Response:
        root = Path(self.config.models_dir).resolve()
        return web.json_response({f: [str(root / f)] for f in self._model_folders()})

    async def index(self, request: web.Request) -> web.StreamResponse:
        if self.static_dir is None:
            return web.Response(text=NO_FRONTEND, content_type="text/html", headers={"Cache-Control": "no-cache"})
        return web.FileResponse(self.static_dir / "index.html", headers={"Cache-Control": "no-cache"})

    # ---- websocket --------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1024 * 1024)
        await ws.prepare(request)
        wanted = request.query.get("clientId", "")
        sid = wanted if CLIENT_ID_RE.match(wanted) else uuid.uuid4().hex
        client = self.hub.connect(sid, ws)
        try:
            self.hub.send(sid, "status", {"status": {"exec_info": {"queue_remaining": self.store.queue_remaining()}}, "sid": sid})
            running = self.dispatcher.running_for(sid)
            if running is not None:
                job, node = running
                self.hub.send(sid, "executing", {"node": node, "display_node": node, "prompt_id": job.prompt_id})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(data, dict) and data.get("type") == "feature_flags":
                        flags = data.get("data")
                        client.flags = dict(flags) if isinstance(flags, dict) else {}
                        self.hub.send(sid, "feature_flags", self.feature_flags())
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.hub.disconnect(client)
        return ws

    # ---- the application --------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard_middleware], client_max_size=self.max_upload + 1024 * 1024)

        async def empty_object(request: web.Request) -> web.Response:
            return web.json_response({})

        async def empty_list(request: web.Request) -> web.Response:
            return web.json_response([])

        u = self.userdata
        api: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/prompt", self.get_prompt),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image),
            ("POST", "/upload/mask", self.upload_mask),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/embeddings", empty_list),
            ("GET", "/models", self.models),
            ("GET", "/models/{folder}", self.models_folder),
            ("GET", "/jobs", self.get_jobs),
            ("GET", "/jobs/{job_id}", self.get_job),
            ("POST", "/jobs/cancel", self.cancel_jobs),
            ("POST", "/jobs/{job_id}/cancel", self.cancel_job),
            ("GET", "/features", self.features),
            ("GET", "/users", u.users),
            ("GET", "/settings", u.get_settings),
            ("POST", "/settings", u.post_settings),
            ("GET", "/settings/{id}", u.get_setting),
            ("POST", "/settings/{id}", u.post_setting),
            ("GET", "/userdata", u.list_files),
            ("GET", "/userdata/{file}", u.get_file),
            ("POST", "/userdata/{file}", u.post_file),
            ("DELETE", "/userdata/{file}", u.delete_file),
            ("POST", "/userdata/{file}/move/{dest}", u.move_file),
            ("GET", "/extensions", empty_list),
            ("GET", "/i18n", empty_object),
            ("GET", "/global_subgraphs", empty_object),
            ("GET", "/workflow_templates", empty_object),
            ("GET", "/experiment/models", self.experiment_models),
            ("GET", "/experiment/models/{folder}", self.experiment_models_folder),
        ]
        for method, path, handler in api:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/internal/files/{directory_type}", self.internal_files)
        app.router.add_get("/internal/logs", self.get_logs)
        app.router.add_get("/internal/logs/raw", self.get_logs)
        app.router.add_route("PATCH", "/internal/logs/subscribe", empty_object)
        app.router.add_get("/internal/folder_paths", self.folder_paths)
        app.router.add_get("/templates/index.json", empty_list)
        app.router.add_get("/", self.index)
        if self.static_dir is not None:
            app.router.add_static("/", self.static_dir, follow_symlinks=False)
        return app

    async def main(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM; then stop the running prompt (it goes back to the queue)
        and close."""
        loop = asyncio.get_running_loop()
        self.hub = Hub(loop, self.store.queue_remaining)
        self.recover()
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.config.port
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        url = f"http://{host}:{port}/"
        stop = asyncio.Event()
        signals_seen: list[int] = []

        def on_signal(signum: int) -> None:
            signals_seen.append(signum)
            if len(signals_seen) > 1:
                remove_temporaries()
                os._exit(128 + signum)
            log.info("stopping (the running prompt goes back to the queue); press Ctrl-C again to stop at once")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)
        self.dispatcher.start()
        if ready is not None:
            ready(url)
        try:
            await stop.wait()
        finally:
            self.dispatcher.stop()
            await loop.run_in_executor(None, self.dispatcher.join, 60.0)
            for client in list(self.hub.clients.values()):
                await client.ws.close()
            await runner.cleanup()
            self.pool.shutdown(wait=False)
            self.store.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)


# ---- helpers --------------------------------------------------------------------------------
def _writer(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _memory() -> tuple[int, int]:
    total = available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total, available


def _image_problem(data: bytes, max_pixels: int) -> str | None:
    """What makes ``data`` unacceptable as an uploaded image (None: a readable image within
    the pixel limit), judged from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "not an image graphsd can read (PNG, JPEG, WebP, ...)"
    if width * height > max_pixels:
        return f"{width}x{height} pixels is more than the limit of {max_pixels / 1e6:g} megapixels"
    return None


def _convert_image(path: Path, channel: str | None, preview: str | None) -> tuple[bytes, str] | None:
    """``/view``'s ``channel`` (rgb, a, rgba) and ``preview`` (``webp;90``, ``jpeg;90``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as source:
            source.load()
            image: Image.Image = source
            if channel == "a":  # the alpha on black, as ComfyUI's mask editor reads it
                alpha = source.getchannel("A") if "A" in source.getbands() else Image.new("L", source.size, 255)
                image = Image.new("RGBA", source.size)
                image.putalpha(alpha)
            elif channel == "rgb":
                image = source.convert("RGB")
            elif channel == "rgba":
                image = source.convert("RGBA")
            fmt, quality = "png", 90
            if preview:
                name, _, q = preview.partition(";")
                if name in ("webp", "jpeg"):
                    fmt = name
                    quality = int(q) if q.isdigit() and 1 <= int(q) <= 100 else 90
            if fmt == "jpeg":
                image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format=fmt.upper(), quality=quality)
            return buffer.getvalue(), f"image/{fmt}"
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _apply_mask(original: Path, mask_png: bytes, max_pixels: int) -> bytes:
    from PIL import Image, UnidentifiedImageError

    problem = _image_problem(mask_png, max_pixels)
    if problem:
        raise Refused(f"mask: {problem}")
    try:
        with Image.open(original) as base, Image.open(io.BytesIO(mask_png)) as mask:
            if base.size[0] * base.size[1] > max_pixels:
                raise Refused("the original image is larger than the pixel limit")
            rgba = base.convert("RGBA")
            alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
            rgba.putalpha(alpha.resize(rgba.size))
            buffer = io.BytesIO()
            rgba.save(buffer, format="PNG")
            return buffer.getvalue()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise Refused(f"cannot combine the mask with the original image ({exc})") from None


def _frontend_dir() -> Path | None:
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    static = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    return static if (static / "index.html").is_file() else None


NO_FRONTEND = """<!doctype html><title>graphsd</title>
<h1>graphsd server</h1>
<p>The API is running (ComfyUI's: <code>POST /prompt</code>, <code>/ws</code>, <code>/history</code>, ...), but the web
frontend is not installed. Install it with <code>pip install "graphsd[server]"</code> and restart the server.</p>
"""


class _LogBuffer(logging.Handler):
    """Keeps the server's recent log lines for ``/internal/logs``."""

    def __init__(self, entries: collections.deque[dict[str, str]]):
        super().__init__()
        self.entries = entries

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append({"t": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)), "m": self.format(record) + "\n"})


@contextlib.contextmanager
def _single_server(data_dir: Path):
    """Hold ``<data dir>/server.lock`` so two servers never share one queue (the lock goes with
    the process, also when it is killed)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "server.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise GraphsdError(
                f"another graphsd server is using the data folder {data_dir}; stop it or choose another --data-dir"
            ) from None
        yield


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM (``graphsd serve``). Raises GraphsdError for a
    configuration it refuses (another address without a token, a data folder in use)."""
    problem = check_bind(config.host, config.token)
    if problem:
        raise GraphsdError(problem)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    with _single_server(Path(config.data_dir).resolve()):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            engine = Engine(config.settings())
        for w in engine.warnings:
            log.warning("warning: %s", w)
        runner: Runner | None = None
        if config.ray_address is not None:
            from graphsd.distributed.ray_pool import start_runner

            runner = start_runner(engine, config.ray_address, config.workers)
        server = Server(config, engine, runner)
        log.addHandler(_LogBuffer(server.log_entries))

        def ready(url: str) -> None:
            print(f"graphsd serve: {url}", flush=True)
            if config.token:
                print(
                    "  every request needs the token: open the page once with ?token=<token>, or send 'Authorization: Bearer <token>'",
                    flush=True,
                )
            if config.open_browser:
                import webbrowser

                threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()

        asyncio.run(server.main(ready))
    return 0
