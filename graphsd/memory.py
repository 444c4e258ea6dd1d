"""ModelManager: loads each model component once, keeps it in CPU RAM under a budget, places it
on the compute device on demand (under a VRAM budget when one is set), applies a handle's
patches only for the duration of a use, and reports every decision as a ModelEvent.

Nodes never move weights themselves::

    with ctx.models.use(unet_ref, "unet") as unet:      # placed + patched here
        eps = unet(x, t, encoder_hidden_states=ctx_emb).sample
                                                         # patches removed here, bit for bit

Offloading is a strategy object (:class:`KeepOnDevice`, :class:`ModelOffload`) so policies can
be swapped and benchmarked.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from graphsd.events import ModelEvent


class Patch(Protocol):
    """A modification recorded on a model handle (LoRA, hypernetwork, ...)."""

    def fingerprint(self) -> str:
        """Stable identity (file fingerprint + strengths): part of downstream cache keys."""

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        """Modify ``module`` (the component playing ``role``: "unet", "text_encoder", ...)
        in place and return a function that restores it exactly, or None if this patch does not
        touch that role."""


def module_nbytes(module: Any) -> int:
    """Memory held by a component: tensors of an nn.Module, or what its ``nbytes()`` says."""
    if isinstance(module, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    nbytes = getattr(module, "nbytes", None)
    return int(nbytes()) if callable(nbytes) else 0


def _device_of(module: Any) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


@dataclass
class _Entry:
    module: Any
    nbytes: int


class KeepOnDevice:
    """Move a component to the compute device when first used and leave it there."""

    name = "keep"

    def make_room(self, manager: ModelManager, key: str, nbytes: int) -> None:
        return None


class ModelOffload:
    """Model-level offload: before placing a component, move least recently used components
    back to CPU until it fits in ``vram_budget`` bytes (only what the running node needs
    stays on the device)."""

    name = "model_offload"

    def __init__(self, vram_budget: int):
        self.vram_budget = vram_budget

    def make_room(self, manager: ModelManager, key: str, nbytes: int) -> None:
        for other in list(manager.on_device):
            if manager.device_bytes() + nbytes <= self.vram_budget:
                break
            if other != key and other not in manager.in_use:
                manager.offload(other)


class ModelManager:
    """Holds loaded components for an Engine (shared across runs)."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        ram_budget: int | None = None,
        strategy: KeepOnDevice | ModelOffload | None = None,
    ):
        self.device = torch.device(device)
        self.ram_budget = ram_budget
        self.strategy = strategy or KeepOnDevice()
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.on_device: OrderedDict[str, None] = OrderedDict()  # LRU order of placed keys
        self.in_use: dict[str, int] = {}
        # sees every decision; the engine forwards it to the run in progress, which sets run_id
        self.listener: Callable[[ModelEvent], None] | None = None
        # objects made from a component (see derived), dropped with it
        self._derived: dict[str, dict[Hashable, Any]] = {}
        self._lock = threading.RLock()

    # ---- events ---------------------------------------------------------------------------
    def _emit(self, action: str, key: str, nbytes: int = 0, device: str = "") -> None:
        if self.listener is not None:
            self.listener(ModelEvent(run_id="", action=action, key=key, device=device, nbytes=nbytes))

    # ---- loading --------------------------------------------------------------------------
    def load(self, key: str, loader: Callable[[], Any]) -> str:
        """Load the component named ``key`` with ``loader()`` unless it is already held.

        ``key`` must identify the content (file fingerprint + component + dtype). The loaded
        object stays on the CPU until :meth:`use` places it."""
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self._emit("reuse", key, self.entries[key].nbytes, "cpu")
                return key
        module = loader()
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
        entry = _Entry(module, module_nbytes(module))
        with self._lock:
            self.entries[key] = entry
            self._emit("load", key, entry.nbytes, str(_device_of(module)))
            self._evict_ram(keep=key)
        return key

    def add(self, key: str, module: Any) -> str:
        """Register an object built in memory (e.g. by a training node) under ``key``."""
        return self.load(key, lambda: module)

    def has(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> Any:
        """The held component, wherever it currently lives, unpatched. Raises KeyError."""
        with self._lock:
            entry = self.entries[key]
            self.entries.move_to_end(key)
            return entry.module

    def _evict_ram(self, keep: str) -> None:
        if self.ram_budget is None:
            return
        for other in list(self.entries):
            if sum(e.nbytes for e in self.entries.values()) <= self.ram_budget:
                break
            if other != keep and other not in self.in_use:
                nbytes = self.entries.pop(other).nbytes
                self.on_device.pop(other, None)
                self._derived.pop(other, None)
                self._emit("evict", other, nbytes)

    def derived(self, key: str, tag: Hashable, build: Callable[[Any], Any]) -> tuple[Any, bool]:
        """An object made from the component ``key`` by ``build(module)`` (a compiled wrapper,
        say), made once per ``tag`` and kept while the component stays loaded; returns it and
        whether this call made it. ``build`` may change the module (e.g. its memory layout), but
        never its values."""
        with self._lock:
            made = self._derived.setdefault(key, {})
            if tag in made:
                return made[tag], False
            made[tag] = build(self.entries[key].module)
            return made[tag], True

    # ---- placement ------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(self.entries[k].nbytes for k in self.on_device if k in self.entries)

    def place(self, key: str) -> Any:
        with self._lock:
            entry = self.entries[key]
            if self.device.type == "cpu" or not isinstance(entry.module, torch.nn.Module):
                return entry.module
            if key not in self.on_device:
                self.strategy.make_room(self, key, entry.nbytes)
                entry.module.to(self.device)
                self._emit("place", key, entry.nbytes, str(self.device))
            self.on_device[key] = None
            self.on_device.move_to_end(key)
            return entry.module

    def offload(self, key: str) -> None:
        with self._lock:
            if key in self.on_device:
                self.on_device.pop(key)
                entry = self.entries.get(key)
                if entry is not None and isinstance(entry.module, torch.nn.Module):
                    entry.module.to("cpu")
                    self._emit("offload", key, entry.nbytes, "cpu")

    def free_device_memory(self) -> None:
        """Offload everything not in use and empty the allocator's cache (OOM recovery)."""
        for key in list(self.on_device):
            if key not in self.in_use:
                self.offload(key)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextmanager
    def use(self, ref: Any, role: str) -> Iterator[Any]:
        """Place the component ``ref.keys[role]`` on the compute device, apply the handle's
        patches for that role in order, yield it, then undo them in reverse order (so stacked
        patches restore the weights exactly). Nested uses of the same component are not allowed
        with different patches."""
        key = ref.keys[role]
        with self._lock:
            self.in_use[key] = self.in_use.get(key, 0) + 1
        try:
            module = self.place(key)
            with ExitStack() as undo:
                for patch in ref.patches:
                    restore = patch.apply(role, module)
                    if restore is not None:
                        undo.callback(restore)
                yield module
        finally:
            with self._lock:
                self.in_use[key] -= 1
                if not self.in_use[key]:
                    del self.in_use[key]
