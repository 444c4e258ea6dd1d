"""Typed events emitted while a workflow runs.

Every event is a small frozen dataclass with a ``kind`` string and plain-JSON fields, so the
same objects feed the CLI progress display, the ``graphsd_event`` plugin hook, a Python
callback, and (later) websocket messages of an HTTP server. ``to_dict()`` gives that JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class RunStart(Event):
    """The plan is made: ``planned`` lists the node ids that will be visited, in order."""

    kind: ClassVar[str] = "run_start"
    planned: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeCached(Event):
    """A node's outputs came from the cache; it did not run."""

    kind: ClassVar[str] = "node_cached"
    node_id: str = ""
    node_type: str = ""
    key: str = ""


@dataclass(frozen=True)
class NodeStart(Event):
    kind: ClassVar[str] = "node_start"
    node_id: str = ""
    node_type: str = ""
    key: str = ""


@dataclass(frozen=True)
class Progress(Event):
    """Progress inside a long node (denoise steps, training steps). ``info`` carries extras
    such as the current training loss."""

    kind: ClassVar[str] = "progress"
    node_id: str = ""
    value: int = 0
    total: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preview(Event):
    """A picture of a long node's work in progress (a denoise step's latent as RGB), sent only
    in runs that asked for previews (``Engine.run(..., previews=True)``). ``image`` is the
    encoded picture (``image_type``, e.g. ``image/jpeg``) in base64, so the event stays plain
    JSON. Previews are transient: observers get them, ``RunResult.events`` does not keep them."""

    kind: ClassVar[str] = "preview"
    node_id: str = ""
    image_type: str = "image/jpeg"
    image: str = ""

    def image_bytes(self) -> bytes:
        """The encoded picture."""
        return base64.b64decode(self.image)


@dataclass(frozen=True)
class NodeBatch(Event):
    """Nodes of one type that run together as one batched call (``Node.run_batch``), sent before
    their ``node_start`` events; each node still gets its own start, done (or error) event and
    cache entry. ``size`` is the number of nodes, ``node_ids`` them in order. A second event
    with ``error`` set says the batched call failed (that error) and the nodes run one by one,
    so that a node that fails fails alone."""

    kind: ClassVar[str] = "node_batch"
    node_type: str = ""
    node_ids: tuple[str, ...] = ()
    size: int = 0
    error: str = ""


@dataclass(frozen=True)
class NodeDone(Event):
    kind: ClassVar[str] = "node_done"
    node_id: str = ""
    node_type: str = ""
    duration_s: float = 0.0
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeFailed(Event):
    """A node failed (``skipped`` lists the descendants that therefore did not run). Named
    apart from :class:`graphsd.errors.NodeError`, the exception a node raises."""

    kind: ClassVar[str] = "node_error"
    node_id: str = ""
    node_type: str = ""
    message: str = ""
    error_type: str = ""
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class CacheEvent(Event):
    """A decision of the output cache: ``action`` is ``hit``, ``miss``, ``store`` or ``evict``."""

    kind: ClassVar[str] = "cache"
    action: str = ""
    key: str = ""
    node_id: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class ModelEvent(Event):
    """A ModelManager decision: ``action`` is ``load``, ``reuse``, ``place`` (to the compute
    device), ``offload`` (back to CPU), ``evict`` (dropped from RAM) or ``oom_retry``; with
    ``Settings.compile``, ``compile`` (a component put on the compiled fast path) or
    ``compile_skipped`` (it runs eagerly, e.g. because a hypernetwork's hooks patch it); under a
    VRAM budget, ``place_partial`` (some blocks stay on the CPU and stream, see
    :class:`StreamEvent`), ``reload`` (a component the RAM budget evicted, read again from its
    files), ``workspace_grown`` (a call's activations went past the budget by ``nbytes``: the
    next call keeps that much more room) and ``economy`` (the usual way of computing a call
    would not fit: its calls now run with fewer activations, ``nbytes``, more slowly; a U-Net's
    feed-forward in chunks of tokens)."""

    kind: ClassVar[str] = "model"
    action: str = ""
    key: str = ""
    device: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class StreamEvent(Event):
    """A component partially loaded under the VRAM budget (ModelManager weight streaming).

    ``action`` ``plan``: the split was made or changed (before the calls it is for); ``use``: a
    use of the component ended, and ``bytes_moved`` / ``calls`` say how many weight bytes were
    copied to the device during it and over how many forward calls (a denoise step is one call,
    or two without batched guidance). ``resident_bytes`` stay on the device, ``streamed_bytes``
    are copied in for every call through a ring buffer of ``ring_bytes``; ``workspace_bytes`` is
    the room kept for activations; the block names say which is which."""

    kind: ClassVar[str] = "stream"
    action: str = ""
    key: str = ""
    device: str = ""
    resident_bytes: int = 0
    streamed_bytes: int = 0
    ring_bytes: int = 0
    workspace_bytes: int = 0
    resident_blocks: tuple[str, ...] = ()
    streamed_blocks: tuple[str, ...] = ()
    bytes_moved: int = 0
    calls: int = 0


@dataclass(frozen=True)
class Interrupted(Event):
    kind: ClassVar[str] = "interrupted"
    node_id: str = ""


@dataclass(frozen=True)
class RunDone(Event):
    """``status`` is ``success``, ``failed`` (some node failed) or ``interrupted``."""

    kind: ClassVar[str] = "run_done"
    status: str = "success"
    executed: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    duration_s: float = 0.0


EventCallback = Callable[[Event], None]
