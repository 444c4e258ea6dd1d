"""ModelManager: loads each model component once, keeps it in CPU RAM under a budget, places it
on the compute device on demand (under a VRAM budget when one is set), applies a handle's
patches only for the duration of a use, and reports every decision as an event.

Nodes never move weights themselves::

    with ctx.models.use(unet_ref, "unet") as unet:      # placed + patched here
        eps = unet(x, t, encoder_hidden_states=ctx_emb).sample
                                                         # patches removed here, bit for bit

Offloading is a strategy object (:class:`KeepOnDevice`, :class:`ModelOffload`) so policies can
be swapped and benchmarked.

**The VRAM budget is a cap on weights and activations.** Under :class:`ModelOffload` a component
that fits next to what is in use is placed whole (least recently used ones go back to the CPU to
make room). One that does not fit is *partially loaded*: its :class:`Layout` divides it into
blocks (a plugin registers how a model family divides, :func:`register_splitter`; any other
module is divided by size, :func:`generic_layout`), as many blocks as the budget allows stay on
the device, and the others are *streamed*: their weights stay in pinned CPU memory and are copied
into a fixed ring buffer on the device just before each runs, on a separate CUDA stream, several
blocks ahead, so the copies overlap the computation (:class:`Streamer`). The room kept for
activations comes from the layout's ``workspace`` estimators, which read the shape of each call
(the latent batch and size): a larger batch or image re-plans the split before the call runs. A
budget below the smallest working set (the layers that never stream, the largest block, the ring
and the activations) is refused with a :class:`VramBudgetError` naming that minimum: by a loader
right after loading when the weights alone do not fit (:meth:`ModelManager.load`), else
when the component is placed.

**Moves are cheap under a budget.** Each component's weights get a *home* in CPU memory once
(pinned on CUDA, packed into a few chunks of power-of-two sizes so the pinned allocator's
rounding wastes little, :func:`pinned_home`, and made tensor by tensor, each one's old memory freed
as its copy is made): placing a component (whole or its resident blocks) is an
asynchronous copy from there on the compute stream, and offloading it only points its tensors back
home, with nothing copied, since outside a use its weights always equal their home (patches are
undone bit for bit before a use ends). So components taking turns on the device between the
nodes of an image cost one host-to-device copy of what they keep resident, at the link's speed.

Patches see streamed weights as they see resident ones: a streamed block's parameters *are* its
pinned CPU copies outside its own forward, so a patch that changes weights in place (a LoRA) changes
what every later copy carries, and its undo restores them exactly.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from graphsd.errors import NodeError
from graphsd.events import ModelEvent, StreamEvent

MB = 1024 * 1024
#: Byte alignment of each tensor in the ring buffer (what CUDA kernels like to read).
ALIGN = 256


class Patch(Protocol):
    """A modification recorded on a model handle (LoRA, hypernetwork, ...)."""

    def fingerprint(self) -> str:
        """Stable identity (file fingerprint + strengths): part of downstream cache keys."""

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        """Modify ``module`` (the component playing ``role``: "unet", "text_encoder", ...)
        in place and return a function that restores it exactly, or None if this patch does not
        touch that role. A patch that keeps copies of the weights it changes makes them with
        :func:`patch_backup`, which keeps them off the device under a VRAM budget."""


def module_nbytes(module: Any) -> int:
    """Memory held by a component: tensors of an nn.Module, or what its ``nbytes()`` says."""
    if isinstance(module, torch.nn.Module):
        return sum(_nbytes(t) for t in _tensors(module))
    nbytes = getattr(module, "nbytes", None)
    return int(nbytes()) if callable(nbytes) else 0


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module`` and its children, each once."""
    seen: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def region_bytes(module: torch.nn.Module) -> int:
    """Bytes a block takes in the ring: its tensors, each starting at an :data:`ALIGN` boundary."""
    return sum(_aligned(t) for t in _tensors(module))


#: The largest chunk homes are packed into (each chunk's size is a power of two: the pinned
#: allocator rounds every allocation up to one).
HOME_CHUNK = 1024 * MB


def _power_of_two(n: int, down: bool = False) -> int:
    """The power of two at or above ``n`` (at or below it with ``down``)."""
    n = max(n, 1)
    up = 1 << (n - 1).bit_length()
    return up // 2 if down and up > n else up


def chunk_plan(sizes: list[int], largest: int = HOME_CHUNK) -> list[tuple[int, list[int]]]:
    """Pack items of ``sizes`` bytes into chunks whose sizes are powers of two, as
    ``(chunk bytes, item indices)`` in allocation order, wasting little of what the chunks hold.

    Chunks are filled first-fit from the largest item down; each chunk's size is the power of two
    at or below what is left to pack (at most ``largest``, at least the largest item left), or
    the one above when that wastes at most an eighth, so only the last chunk or two are partly
    empty. On the layouts of SD1.5's and SDXL's U-Nets (44 and 91 blocks of up to 94 MB, plus
    the loose tensors) the chunks hold 0.1 % more than the items (test_vram checks under 2 %)."""
    left = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    plan: list[tuple[int, list[int]]] = []
    while left:
        total = sum(sizes[i] for i in left)
        floor = _power_of_two(sizes[left[0]])
        capacity = _power_of_two(total)
        if capacity - total > total // 8:
            capacity = _power_of_two(total, down=True)
        capacity = max(floor, min(capacity, max(largest, floor)))
        taken, used = [], 0
        for i in left:
            if used + sizes[i] <= capacity:
                taken.append(i)
                used += sizes[i]
        plan.append((capacity, taken))
        chosen = set(taken)
        left = [i for i in left if i not in chosen]
    return plan


def pinned_home(tensors: list[torch.Tensor], pin: bool, groups: list[list[int]] | None = None, adopt: bool = False) -> list[torch.Tensor]:
    """CPU copies of ``tensors`` (their values, dtypes, shapes), in pinned memory when ``pin``.

    Each of ``groups`` (indices into ``tensors``: a streamed block's tensors in the order
    :class:`Streamer` lays them out in its ring) is packed as one run, each tensor at an
    :data:`ALIGN` boundary, so the group's home is one contiguous span laid out exactly like the
    block's slot in the ring and the block moves in a single copy. A group that shares a tensor
    with an earlier one or holds a non-contiguous tensor is not packed as a group. With ``pin``
    the other contiguous tensors are runs of their own; runs are packed into a few chunks of
    power-of-two sizes (:func:`chunk_plan`), so a component of thousands of tensors takes a few
    pinned allocations that the allocator's rounding does not inflate; non-contiguous tensors are
    pinned one by one. Without ``pin``, grouped tensors are still packed (in plain memory: the CPU
    device runs the same mechanics) and any other CPU tensor is its own home (no copy).

    With ``adopt`` (``tensors`` are a module's parameters and buffers) each tensor is pointed at
    its home as soon as it is copied, so the memory it held is freed while the homes are made
    rather than after, and the pages of a memory-mapped file it was read from leave the process's
    resident memory (:func:`drop_file_pages`): a component costs its size once, not twice, at its
    peak."""
    homes: list[torch.Tensor | None] = [None] * len(tensors)
    runs: list[list[int]] = []  # index lists packed consecutively within one chunk
    claimed: set[int] = set()
    for group in groups or []:
        if group and not claimed.intersection(group) and all(tensors[i].is_contiguous() for i in group):
            runs.append(group)
            claimed.update(group)
    for i, t in enumerate(tensors):
        if i in claimed:
            continue
        if not pin:
            homes[i] = t.data if t.device.type == "cpu" else t.data.to("cpu")
        elif t.is_contiguous() and _nbytes(t) > 0:
            runs.append([i])
        else:
            homes[i] = t.data.to("cpu").pin_memory()
        home = homes[i]
        if adopt and home is not None:
            if not _same(home, t.data):
                drop_file_pages(t.data)
            t.data = home
    for capacity, members in chunk_plan([sum(_aligned(tensors[i]) for i in run) for run in runs]):
        chunk = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        used = 0
        for i in (i for r in members for i in runs[r]):
            t = tensors[i]
            home = chunk[used : used + _nbytes(t)].view(t.dtype).view(t.shape)
            home.copy_(t.data)
            homes[i] = home
            if adopt:
                drop_file_pages(t.data)
                t.data = home
            used += _aligned(t)
    return [h for h in homes if h is not None]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux
_FILE_PAGE = 1 << 61  # a /proc/self/pagemap flag: file page or shared (bit 63, present, is the sign)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def drop_file_pages(t: torch.Tensor) -> int:
    """Take the pages of CPU tensor ``t`` that are file (or shared-memory) pages out of this
    process's resident memory (``madvise(MADV_DONTNEED)``); returns the bytes dropped. For a
    tensor of a memory-mapped ``.safetensors`` file whose values were just copied to their home:
    its pages would otherwise count in the process's RSS until the last tensor of that file is
    gone, so a component's peak was its size twice. No value can change: such a page stays in the
    page cache (or the shared object) and comes back from it if touched again; a page written
    since it was mapped (copy-on-write) is a private page, which /proc/self/pagemap tells apart,
    and stays. Linux only (elsewhere nothing is dropped)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or _nbytes(t) < _PAGE:
        return 0
    first = -(-t.data_ptr() // _PAGE)  # whole pages inside the tensor only: its neighbours keep theirs
    last = (t.data_ptr() + _nbytes(t)) // _PAGE
    if last <= first:
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            raw = pagemap.read((last - first) * 8)
    except OSError:
        return 0
    flags = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    droppable = ((flags & _FILE_PAGE) != 0) & (flags < 0)  # file page, present (bit 63: the sign)
    if not bool(droppable.any()):
        return 0
    libc = _libc()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), droppable.to(torch.int8), torch.zeros(1, dtype=torch.int8)]))
    starts, ends = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    dropped = 0
    for a, b in zip(starts, ends, strict=True):
        if libc.madvise(ctypes.c_void_p((first + a) * _PAGE), ctypes.c_size_t((b - a) * _PAGE), _MADV_DONTNEED) == 0:
            dropped += (b - a) * _PAGE
    return dropped


def _aligned(t: torch.Tensor) -> int:
    """Bytes ``t`` takes in the ring or a packed home: its size rounded up to :data:`ALIGN`."""
    return -(-_nbytes(t) // ALIGN) * ALIGN


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive places of its storage in some dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` ("cuda" matches any CUDA index)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same memory (``param.data`` is a new object on every read)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _device_of(module: Any) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


# ---- how a component divides into blocks ----------------------------------------------------


@dataclass
class Block:
    """A unit of streaming: a submodule whose weights move to the device together, just before
    its forward. ``rank``: the higher, the more computation the block does per byte of weights
    (a U-Net block at a higher resolution), so the better its copy hides behind computation; it
    decides which blocks stream under :attr:`ModelOffload.residency` ``"rank"`` and breaks ties
    under ``"size"``."""

    name: str
    module: torch.nn.Module
    nbytes: int
    rank: float = 1.0
    _region: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def region(self) -> int:
        """Bytes the block takes in the ring (:func:`region_bytes`), counted once: a streamed
        component's calls ask for it, and a block's tensors keep their sizes (patches change values)."""
        if self._region is None:
            self._region = region_bytes(self.module)
        return self._region


@dataclass
class Layout:
    """How a component divides for partial loading: ``blocks`` (disjoint submodules, in the
    order they usually run; everything outside them always stays on the device) and
    ``workspace``: for a submodule name ("" is the component itself), a function of that
    submodule's call arguments giving the activation bytes the call needs on the device.
    ``economy``: for some of those names, a function ``(args, kwargs, on)`` that sets the
    submodule to compute that call with fewer activations (``on``; slower, e.g. a U-Net's
    feed-forward in chunks of tokens) or the usual way, and says whether the economy is on; the
    workspace estimate then reflects it. It is switched on for a call only when the usual way
    would not fit the budget. ``order`` is the order all blocks last ran in (indices), learned by a :class:`Streamer` and
    kept here for the next one: a component offloaded between images and streamed again copies
    its blocks in the right order from its first call."""

    blocks: list[Block]
    workspace: dict[str, Callable[[tuple, dict], int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    economy: dict[str, Callable[[tuple, dict, bool], bool]] = field(default_factory=dict)

    _fixed: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def resident_bytes(self, module: torch.nn.Module) -> int:
        """Bytes of the layers that are in no block (they never stream), counted once per module
        (the budget's checks ask at every call of a streamed component)."""
        fixed = self._fixed.get(id(module))
        if fixed is None:
            fixed = self._fixed[id(module)] = module_nbytes(module) - sum(b.nbytes for b in self.blocks)
        return fixed


Splitter = Callable[[torch.nn.Module], "Layout | None"]
_SPLITTERS: list[Splitter] = []


def register_splitter(splitter: Splitter) -> None:
    """Make ``splitter(module)`` (a :class:`Layout`, or None for a module it does not know) the
    first asked how a component divides; a plugin registers one for its model families."""
    if splitter not in _SPLITTERS:
        _SPLITTERS.insert(0, splitter)


def layout_of(module: torch.nn.Module) -> Layout:
    """The layout a registered splitter gives ``module``, else :func:`generic_layout`."""
    for splitter in _SPLITTERS:
        layout = splitter(module)
        if layout is not None:
            return layout
    return generic_layout(module)


def generic_layout(module: torch.nn.Module, pieces: int = 32) -> Layout:
    """Divide a module it knows nothing about by size: descend into children larger than
    1/``pieces`` of the whole, make the others blocks (in registration order), and keep the
    smallest ones (under 1/8 of that) with the always-resident layers."""
    target = max(1, module_nbytes(module) // pieces)
    blocks: list[Block] = []

    def visit(prefix: str, parent: torch.nn.Module) -> None:
        for name, child in parent.named_children():
            size = module_nbytes(child)
            path = f"{prefix}{name}"
            if size > target and any(True for _ in child.children()):
                visit(path + ".", child)
            elif size >= target // 8 and size > 0:
                blocks.append(Block(path, child, size))

    visit("", module)
    if not blocks and module_nbytes(module) > 0 and not any(True for _ in module.children()):
        blocks.append(Block("", module, module_nbytes(module)))
    return Layout(blocks)


# ---- streaming ---------------------------------------------------------------------------------


class VramBudgetError(NodeError):
    """The VRAM budget is below the smallest working set of what a node needs on the device."""

    def __init__(self, what: str, budget: int, minimum: int, parts: str):
        self.minimum = minimum
        super().__init__(
            f"the VRAM budget ({budget / MB:.0f} MB, --vram-budget / Settings.vram_budget_mb) is below the least {what} can "
            f"run in: {math.ceil(minimum / MB)} MB ({parts}); raise the budget to at least {math.ceil(minimum / MB)} MB, or "
            "use a smaller image or batch"
        )


@dataclass
class _Slot:
    """A block's weights copied (or being copied) into ``[start, end)`` of the ring."""

    block: int
    start: int
    end: int
    ready: Any = None  # CUDA event recorded after the copy, on the copy stream


@dataclass
class _Tensor:
    tensor: torch.Tensor  # the Parameter / buffer object the module holds
    offset: int  # byte offset within the block's region of the ring
    master: torch.Tensor | None = None  # the pinned CPU copy while the block streams


class Streamer:
    """Runs a component with ``resident`` blocks (indices into ``layout.blocks``) and the layers
    outside any block on ``device``, and every other block streamed through a ring buffer of
    ``ring_bytes`` on the device.

    Forward pre-hooks on the blocks drive it: before a streamed block runs, its modules'
    parameter and buffer entries are pointed at views of its copy in the ring (views kept from the
    block's earlier landings at the same place), after it at the parameters themselves again, whose
    data are the pinned CPU copies (so between calls a streamed block's weights are plain CPU
    tensors, which is what patches see and change). Copies are issued in
    the order the blocks ran in the previous call (the layout's order at first), as far ahead as
    the ring has room, on a side stream that waits only for the block whose ring space it reuses;
    the compute stream waits for a block's copy just before the block. A block whose CPU copies
    form one span laid out like its ring slot (the homes :class:`ModelManager` makes are packed
    so) moves in a single copy of that span, its parameters then being views into the slot; any
    other block is copied tensor by tensor. On a CPU "device" the same bookkeeping runs with plain
    copies (tests exercise it without CUDA).

    ``transfers`` lists the streamed blocks' names in the order their copies were issued, and
    ``bytes_moved`` / ``copies`` / ``calls`` count what was copied, in how many copy operations,
    and how many forwards of the component ran.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        layout: Layout,
        device: torch.device,
        resident: set[int],
        ring_bytes: int,
        home: dict[int, torch.Tensor] | None = None,
        patched: bool = False,
    ):
        self.module, self.layout, self.device = module, layout, device
        self.nbytes = module_nbytes(module)  # sizes stay as they are (patches change values)
        self.cuda = device.type == "cuda"
        # the weights' CPU homes by id (ModelManager's): streamed blocks use them as their CPU copies
        self.home = home or {}
        # a use's patches are applied now: a block leaving the device copies its (patched) values
        # home first, and ``resync`` says a home was read while patched, so it is refreshed after the undo
        self.patched = patched
        self.resync = False
        self.resident: set[int] = set()
        self.streamed: list[int] = []
        self.tensors: list[list[_Tensor]] = []
        self.region: list[int] = []  # bytes each block takes in the ring
        self.spans: dict[int, torch.Tensor] = {}  # streamed block -> its home as one span laid out like its ring slot
        for block in layout.blocks:
            entries, offset = [], 0
            for t in _tensors(block.module):
                entries.append(_Tensor(t, offset))
                offset += _aligned(t)
            self.tensors.append(entries)
            self.region.append(offset)
        # where each block's tensors are registered (its modules' ``_parameters`` / ``_buffers``
        # entries, as (table, name, index into the block's tensors)): a streamed block runs with
        # those entries holding views into the ring, put back to the tensors themselves after it
        self.entries: list[list[tuple[dict[str, Any], str, int]]] = []
        for block, entries in zip(layout.blocks, self.tensors, strict=True):
            position = {id(t.tensor): k for k, t in enumerate(entries)}
            self.entries.append(
                [
                    (table, name, position[id(value)])
                    for sub in block.module.modules()
                    for table in (sub._parameters, sub._buffers)
                    for name, value in table.items()
                    if value is not None and id(value) in position
                ]
            )
        in_blocks = {id(t.tensor) for entries in self.tensors for t in entries}
        self.outside = [t for t in _tensors(module) if id(t) not in in_blocks]  # the layers outside every block
        self.parked = False  # off the device, kept for the next placement (:meth:`park`)
        self.ring = torch.empty(0, dtype=torch.uint8, device=device)
        self.views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (block, ring offset) -> its tensors' views there
        self.slices: dict[tuple[int, int], torch.Tensor] = {}  # ring ranges copied into, kept like the views
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # the stream the component computes on, asked once per call (asking costs ~10 µs, twice per streamed block)
        self.compute: Any = None
        self.slots: deque[_Slot] = deque()  # issued copies not yet used, in issue order
        self.current: _Slot | None = None  # the streamed block running now
        self.released: list[tuple[int, int, Any]] = []  # ring ranges freed, with the event after their block
        self.order: list[int] = []
        self.next = 0  # position in ``order`` of the next block to copy
        self.seen: list[int] = []  # streamed blocks run so far in this call
        self.ran: list[int] = []  # all blocks run so far in this call (the layout's order once complete)
        self.transfers: list[str] = []
        self.bytes_moved = 0
        self.copies = 0  # copy operations issued (one per block whose home is one span)
        self.calls = 0
        self.hooks = [
            h
            for i, block in enumerate(layout.blocks)
            for h in (
                block.module.register_forward_pre_hook(self._pre_hook(i), prepend=True),  # before any other hook reads weights
                block.module.register_forward_hook(self._post_hook(i)),
            )
        ]
        self.configure(resident, ring_bytes)

    # ---- placement ---------------------------------------------------------------------------
    def configure(self, resident: set[int], ring_bytes: int) -> None:
        """Make ``resident`` the blocks kept on the device (moving only the blocks that change)
        and give the ring ``ring_bytes``; the layers outside every block go to the device (a
        parked streamer comes back this way)."""
        self.finish()
        for layer in self.outside:
            if not _on(layer, self.device):
                self.resync |= self.patched
                layer.data = layer.data.to(self.device, non_blocking=True)
        self.parked = False
        for i, entries in enumerate(self.tensors):
            for t in entries:
                if i in resident:
                    source = t.master if t.master is not None else t.tensor.data
                    self.resync |= self.patched and not _on(source, self.device)
                    t.tensor.data = source.to(self.device, non_blocking=True)
                    t.master = None
                elif t.master is None:  # it was resident (or is new): it streams from its home
                    master = self.home.get(id(t.tensor))
                    if master is None:  # no home given: a pinned CPU copy made once
                        master = t.tensor.data.to("cpu")
                        if self.cuda and not master.is_pinned():
                            master = master.pin_memory()
                    elif self.patched and not _same(master, t.tensor.data):  # keep the use's patched values
                        master.copy_(t.tensor.data)
                    t.master = master
                    t.tensor.data = master
        self.resident = set(resident)
        self.streamed = [i for i in range(len(self.layout.blocks)) if i not in self.resident]
        self.spans = {i: span for i in self.streamed if (span := self._span(i)) is not None}
        if ring_bytes != self.ring.numel():
            self.views, self.slices = {}, {}
            self.ring = torch.empty(0, dtype=torch.uint8, device=self.device)  # freed before the new one is made
            self.ring = torch.empty(ring_bytes, dtype=torch.uint8, device=self.device)
        learned = [i for i in self.layout.order if i not in self.resident]  # the order blocks last ran in, if known
        if sorted(learned) == self.streamed:
            self.order = learned
        elif set(self.order) != set(self.streamed):
            self.order = list(self.streamed)
        self.next = 0

    def _span(self, i: int) -> torch.Tensor | None:
        """Block ``i``'s CPU copies as one byte span, when they lie in one storage exactly at
        their offsets in the block's ring region (:func:`pinned_home` packs a block's home so):
        the block then moves in one copy. None otherwise (it is copied tensor by tensor)."""
        entries = [t for t in self.tensors[i] if _nbytes(t.tensor) > 0]
        if not entries or entries[0].master is None:
            return None
        storage = entries[0].master.untyped_storage()
        start = entries[0].master.data_ptr() - entries[0].offset - storage.data_ptr()
        if start < 0 or start + self.region[i] > storage.nbytes():
            return None
        for t in entries:
            m = t.master
            if m is None or not m.is_contiguous() or m.untyped_storage().data_ptr() != storage.data_ptr():
                return None
            if m.data_ptr() - storage.data_ptr() != start + t.offset:
                return None
        return torch.empty(0, dtype=torch.uint8, device=entries[0].master.device).set_(storage, start, (self.region[i],), (1,))

    def device_bytes(self) -> int:
        """Bytes this component holds on the device: the resident layers and the ring."""
        streamed = sum(self.layout.blocks[i].nbytes for i in self.streamed)
        return self.nbytes - streamed + self.ring.numel()

    def finish(self) -> None:
        """End of a use: wait for copies in flight (patches may change the pinned copies next)
        and forget the queue, so the next call starts clean."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        if self.current is not None:  # a block that raised: its modules hold their own tensors again
            self._restore(self.current.block)
        self.slots.clear()
        self.released.clear()
        self.current = None
        if len(self.ran) == len(self.layout.blocks):  # the last call ran every block
            self.layout.order = self.ran
        self.seen, self.ran = [], []
        self.next = 0

    def park(self) -> None:
        """The component leaves the device but keeps its streamer: the tables made from walking
        its modules, the order its blocks run in and its hooks stay, so placing it again
        (:meth:`configure`) builds nothing (on a 2-core CPU, components taking turns under a
        budget spent 57-85 ms of host time per SD1.5-shaped image placing them, 47-54 ms with the
        streamer kept). Copies in flight end and the ring is freed; the caller points the resident
        blocks' and outside layers' tensors at their homes. Streamed blocks already hold their CPU
        copies between calls."""
        self.finish()
        self.views, self.slices = {}, {}
        self.ring = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.parked = True

    def remove(self) -> None:
        """Take the hooks off and bring every streamed block back as a plain CPU tensor."""
        self.park()
        for h in self.hooks:
            h.remove()
        for entries in self.tensors:
            for t in entries:
                if t.master is not None:
                    t.tensor.data = t.master
                    t.master = None
        self.spans = {}

    # ---- the ring ----------------------------------------------------------------------------
    def _allocate(self, size: int) -> int | None:
        """Start of a free range of ``size`` bytes after the newest allocation (wrapping to the
        start of the ring when the end has no room), or None when the ring is full."""
        held = ([self.current] if self.current is not None else []) + list(self.slots)
        capacity = self.ring.numel()
        if not held:
            return 0 if size <= capacity else None
        tail, head = held[0].start, held[-1].end
        if held[-1].start >= tail:  # not wrapped: free at the end, then at the start
            if capacity - head >= size:
                return head
            return 0 if tail >= size else None
        return head if tail - head >= size else None

    def _issue(self, i: int, start: int) -> None:
        """Start copying block ``i`` into the ring from ``start`` (a range :meth:`_allocate` found
        free), on the copy stream, which :meth:`_pump` has made current."""
        end = start + self.region[i]
        wait = None
        keep = []
        for s, e, event in self.released:  # ring space this copy reuses: wait until its block finished
            if s < end and start < e:
                wait = event
                if start <= s and e <= end:
                    continue
            keep.append((s, e, event))
        self.released = keep
        slot = _Slot(i, start, end)
        if wait is not None and self.copy_stream is not None:
            self.copy_stream.wait_event(wait)
        span = self.spans.get(i)
        if span is not None:  # the whole block in one copy
            target = self.slices.get((start, end))
            if target is None:
                if len(self.slices) >= 8 * len(self.tensors):  # (bounded, as the views)
                    self.slices = {}
                target = self.slices[(start, end)] = self.ring[start:end]
            target.copy_(span, non_blocking=True)
            self.copies += 1
        else:
            for t in self.tensors[i]:
                assert t.master is not None
                self._view(start + t.offset, t.master).copy_(t.master, non_blocking=True)
            self.copies += len(self.tensors[i])
        if self.copy_stream is not None:
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.copy_stream)
        self.slots.append(slot)
        self.transfers.append(self.layout.blocks[i].name)
        self.bytes_moved += self.layout.blocks[i].nbytes

    def _view(self, start: int, like: torch.Tensor) -> torch.Tensor:
        """Ring bytes from ``start`` as a tensor like ``like``, with its strides when it is a dense
        permutation (a transposed weight keeps its memory order, so kernels compute the same bits)."""
        flat = self.ring[start : start + _nbytes(like)].view(like.dtype)
        if not like.is_contiguous() and _dense(like):
            return flat.as_strided(like.shape, like.stride())
        return flat.view(like.shape)

    def _ring_tensor(self, start: int, t: _Tensor) -> torch.Tensor:
        """What a streamed block's module holds in place of ``t`` while the block runs from the
        ring slot at ``start``: a view of the slot (a Parameter, when ``t`` is one)."""
        view = self._view(start + t.offset, t.tensor.data)
        return torch.nn.Parameter(view, requires_grad=False) if isinstance(t.tensor, torch.nn.Parameter) else view

    def _restore(self, i: int) -> None:
        """Block ``i``'s modules hold their own tensors again (whose data are the pinned CPU copies)."""
        tensors = self.tensors[i]
        for table, name, k in self.entries[i]:
            table[name] = tensors[k].tensor

    def _pump(self) -> None:
        """Issue copies of the next blocks in order while the ring has room (at most one call ahead),
        all under one switch to the copy stream (a switch costs ~20 µs of host time on CUDA)."""
        if not self.order:
            return
        with ExitStack() as context:
            switched = False
            for _ in range(len(self.order)):
                i = self.order[self.next % len(self.order)]
                if (self.current is not None and self.current.block == i) or any(s.block == i for s in self.slots):
                    return
                start = self._allocate(self.region[i])
                if start is None:
                    return
                if not switched:
                    context.enter_context(torch.no_grad())
                    if self.copy_stream is not None:
                        context.enter_context(torch.cuda.stream(self.copy_stream))
                    switched = True
                self._issue(i, start)
                self.next = (self.next + 1) % len(self.order)

    # ---- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, i: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            self._ran(i)
            if i in self.resident:
                self._pump()
                return
            self._record(i)
            while self.slots and self.slots[0].block != i:  # copies made in an order the call did not follow
                self.slots.popleft()
            if not self.slots:  # not prefetched: copy it now, and go on from it
                self.next = self.order.index(i)
                self._pump()
                if not self.slots:  # the ring holds nothing else here, so it has room
                    raise RuntimeError(f"block {self.layout.blocks[i].name} does not fit the ring")
            slot = self.slots.popleft()
            if slot.ready is not None:
                self.compute.wait_event(slot.ready)
            views = self.views.get((i, slot.start))
            if views is None:  # a block lands at a few places of the ring, cycle after cycle: its views are kept
                if len(self.views) >= 8 * len(self.tensors):  # (bounded, should the places drift)
                    self.views = {}
                views = self.views[(i, slot.start)] = [self._ring_tensor(slot.start, t) for t in self.tensors[i]]
            for table, name, k in self.entries[i]:  # a dictionary store each, not a tensor swap
                table[name] = views[k]
            self.current = slot
            self._pump()

        return hook

    def _post_hook(self, i: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            if i in self.resident or self.current is None or self.current.block != i:
                return
            self._restore(i)
            done = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record(self.compute)
            self.released.append((self.current.start, self.current.end, done))
            self.current = None
            self._pump()

        return hook

    def _ran(self, i: int) -> None:
        """Learn the order all blocks run in (for the layout): a block seen twice starts a new call,
        whose compute stream is asked for once."""
        if i in self.ran:
            if len(self.ran) == len(self.layout.blocks):
                self.layout.order = self.ran
            self.ran = []
        if not self.ran and self.cuda:
            self.compute = torch.cuda.current_stream(self.device)
        self.ran.append(i)

    def _record(self, i: int) -> None:
        """Learn the order the streamed blocks run in: a block seen twice starts a new call."""
        if i in self.seen:
            if self.seen != self.order and set(self.seen) == set(self.order):
                self.order = self.seen
                self.next = (self.order.index(i) + 1) % len(self.order)
            self.seen = []
            self.calls += 1
        elif not self.seen:
            self.calls += 1
        self.seen.append(i)


# ---- placement policies --------------------------------------------------------------------------


@dataclass
class Plan:
    """Where a component goes: whole (``resident`` None) or partially, with the blocks in
    ``resident`` on the device, the others streamed through a ring of ``ring`` bytes."""

    resident: set[int] | None
    ring: int = 0


@dataclass
class _Entry:
    module: Any
    nbytes: int
    loader: Callable[[], Any] | None = None
    streamer: Streamer | None = None
    layout: Layout | None = None
    workspace: int = 0  # activation bytes its calls need (learned from their shapes)
    extra: int = 0  # measured overshoot of the workspace estimate, added to it
    economy: bool = False  # its last call ran the layout's economy (fewer activations, slower)
    watched: bool = False  # the workspace hooks are installed
    home: dict[int, torch.Tensor] | None = None  # id(tensor) -> its CPU home (pinned on CUDA), under a budget
    patched: bool = False  # a use's patches are applied now
    resync: bool = False  # a move during a patched use read homes: they are refreshed after the undo


class KeepOnDevice:
    """Move a component to the compute device when first used and leave it there."""

    name = "keep"
    stream = False
    on_cpu = False
    vram_budget: int | None = None

    def make_room(self, manager: ModelManager, key: str, nbytes: int) -> None:
        return None

    def plan(self, manager: ModelManager, key: str, weights_only: bool = False) -> Plan:
        return Plan(None)

    def fits(self, manager: ModelManager, key: str, workspace: int) -> bool:
        return True


class ModelOffload:
    """Placement under ``vram_budget`` bytes of device memory, weights and activations.

    A component that fits next to the components in use (and the activations its call needs) is
    placed whole, after moving least recently used components back to the CPU until the
    resident ones fit. With ``stream`` (the default) one that does not fit is partially loaded:
    its blocks stay resident in :meth:`residency_order` (the smallest first) as long as there is
    room, the rest stream through a ring that holds ``ring_blocks`` of its largest block (or more,
    with the room no further block fits in): two by default, so that one copy is in flight while
    a block runs. Every byte of ring is a byte less of resident weights streamed at every call, and
    measured on an H200 the bytes weigh more than the deeper prefetch: SD1.5 512² under 1 GiB
    0.93 s / image with two, 1.01 s with three, 1.19 s with four; SDXL 1024² under 3 GiB 2.13 s
    with two, 2.98 s with three (``python bench/vram.py --budgets none,1,1r2,1r4``; once streamed
    blocks were copied in one piece each, three stopped paying). Without ``stream`` a component is always placed
    whole (model-level offload only; the budget is then a wish, not a cap). ``on_cpu`` applies
    the policy and the streaming mechanics on a CPU device too (tests)."""

    name = "model_offload"

    def __init__(self, vram_budget: int, stream: bool = True, ring_blocks: int = 2, on_cpu: bool = False):
        self.vram_budget = vram_budget
        self.stream = stream
        self.ring_blocks = ring_blocks
        self.on_cpu = on_cpu

    #: Which blocks stay resident when not all fit: ``"size"`` keeps the smallest first, so the
    #: fewest blocks stream for the bytes that must (each streamed block costs host time at every
    #: call: its hooks, a copy, events); ``"rank"`` the lowest-ranked first (a U-Net's
    #: low-resolution blocks: large weights, little computation to hide their copies behind). On
    #: an H200, where the eager loop is bound by the host, "size" was faster for SD1.5 under 1 GiB
    #: in each of three invocations (1.33 / 1.38 / 1.41 × the unbudgeted time against 1.42 / 1.50 /
    #: 1.44 ×; a U-Net call 28.5 ms against 33.2 ms, 27.3 ms without a budget) and level with
    #: "rank" for SDXL under 3 GiB (1.26 / 1.40 / 1.49 × against 1.95 / 1.33 / 1.51 ×). A GPU
    #: whose loop is bound by its own computation, with a slower link, may prefer "rank".
    residency = "size"

    def residency_order(self, layout: Layout) -> list[int]:
        """The order blocks are kept resident in while there is room (the rest stream), by
        :attr:`residency`; ties go to the lower rank."""
        blocks = layout.blocks
        if self.residency == "size":
            return sorted(range(len(blocks)), key=lambda i: (blocks[i].nbytes, blocks[i].rank))
        return sorted(range(len(blocks)), key=lambda i: (blocks[i].rank, -blocks[i].nbytes))

    def make_room(self, manager: ModelManager, key: str, nbytes: int) -> None:
        """Offload least recently used components not in use until ``nbytes`` more fit."""
        for other in list(manager.on_device):
            if manager.device_bytes(exclude=key) + manager.in_use_workspace(exclude=key) + nbytes <= self.vram_budget:
                break
            if other != key and other not in manager.in_use:
                manager.offload(other)

    def fits(self, manager: ModelManager, key: str, workspace: int) -> bool:
        """Whether component ``key`` can run calls needing ``workspace`` bytes of activations
        within the budget, next to the components in use (with every block streamed if need be):
        :meth:`plan` raises exactly when this is False."""
        if not self.stream or not isinstance(manager.entries[key].module, torch.nn.Module):
            return True
        return manager.in_use_bytes(exclude=key) + workspace + manager.minimum_bytes(key) <= self.vram_budget

    def plan(self, manager: ModelManager, key: str, weights_only: bool = False) -> Plan:
        """Where component ``key``'s blocks go now (resident or streamed), next to the components
        in use and the activations its calls need; raises :class:`VramBudgetError` below the
        least it runs in. ``weights_only`` leaves the activations out (the check at load time:
        what a call adds depends on its input, and a tiled VAE decode needs less than the
        full-frame one a previous image may have reserved)."""
        entry = manager.entries[key]
        workspace = 0 if weights_only else entry.workspace + entry.extra
        others = manager.in_use_bytes(exclude=key)
        room = self.vram_budget - others - workspace
        if not self.stream or entry.nbytes <= room or not isinstance(entry.module, torch.nn.Module):
            return Plan(None)
        layout = manager.layout(key)
        fixed = layout.resident_bytes(entry.module)
        largest = max((b.nbytes for b in layout.blocks), default=0)
        ring_min = max((b.region for b in layout.blocks), default=0)
        minimum = others + workspace + fixed + ring_min
        if not layout.blocks or minimum > self.vram_budget:
            parts = [f"layers that never stream {fixed / MB:.1f} MB", f"its largest block {largest / MB:.1f} MB"]
            if workspace:
                parts.append(f"activations {workspace / MB:.1f} MB")
            if others:
                parts.append(f"other components in use {others / MB:.1f} MB")
            raise VramBudgetError(
                f"'{key}'", self.vram_budget, max(minimum, others + workspace + entry.nbytes * (not layout.blocks)), ", ".join(parts)
            )
        ring = min(room - fixed, max(ring_min, self.ring_blocks * ring_min))
        space = room - fixed - ring
        resident: set[int] = set()
        for i in self.residency_order(layout):
            if layout.blocks[i].nbytes <= space:
                resident.add(i)
                space -= layout.blocks[i].nbytes
        return Plan(resident, ring + max(0, space) // ALIGN * ALIGN)


# ---- patches' backups ------------------------------------------------------------------------------

#: Set while :meth:`ModelManager.use` applies the patches of a component under a VRAM budget.
_BACKUPS_ON_HOST: ContextVar[bool] = ContextVar("graphsd_backups_on_host", default=False)


def patch_backup(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` for a patch that changes it in place to restore it from, bit for bit,
    when the use ends: beside it on its device, or in CPU memory while a VRAM budget is kept (a
    backup on the device is memory the budget did not plan for: SDXL with a LoRA under 3 GiB
    peaked at 3.86 GiB with its resident weights' backups on the GPU)."""
    if _BACKUPS_ON_HOST.get() and tensor.device.type != "cpu":
        return tensor.detach().to("cpu")
    return tensor.detach().clone()


# ---- the manager -----------------------------------------------------------------------------------


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
        self.listener: Callable[[Any], None] | None = None
        # objects made from a component (see derived), dropped with it
        self._derived: dict[str, dict[Hashable, Any]] = {}
        # loaders of evicted components, so that a later use reads them again from their files
        self._loaders: dict[str, Callable[[], Any]] = {}
        self._peak = 0  # the device's peak allocation last seen (to tell a new peak)
        self._lock = threading.RLock()

    # ---- events ---------------------------------------------------------------------------
    def _emit(self, action: str, key: str, nbytes: int = 0, device: str = "") -> None:
        if self.listener is not None:
            self.listener(ModelEvent(run_id="", action=action, key=key, device=device, nbytes=nbytes))

    def _emit_stream(self, action: str, key: str, entry: _Entry) -> None:
        streamer = entry.streamer
        if self.listener is None or streamer is None:
            return
        blocks = streamer.layout.blocks
        streamed = sum(blocks[i].nbytes for i in streamer.streamed)
        self.listener(
            StreamEvent(
                run_id="",
                action=action,
                key=key,
                device=str(self.device),
                resident_bytes=entry.nbytes - streamed,
                streamed_bytes=streamed,
                ring_bytes=streamer.ring.numel(),
                workspace_bytes=entry.workspace + entry.extra,
                resident_blocks=tuple(blocks[i].name for i in sorted(streamer.resident)),
                streamed_blocks=tuple(blocks[i].name for i in streamer.streamed),
                bytes_moved=streamer.bytes_moved,
                calls=streamer.calls,
            )
        )

    # ---- loading --------------------------------------------------------------------------
    def load(self, key: str, loader: Callable[[], Any], check: bool = True) -> str:
        """Load the component named ``key`` with ``loader()`` unless it is already held.

        ``key`` must identify the content (file fingerprint + component + dtype). The loaded
        object stays on the CPU until :meth:`use` places it. The loader is kept: a component
        evicted under the RAM budget is loaded again by it when it is used next. With ``check``
        a component that cannot run within the VRAM budget even with all its blocks streamed is
        refused here (:class:`VramBudgetError`, naming the minimum), so the loading node reports
        it before any node has computed anything with it."""
        with self._lock:
            held = key in self.entries
            if held:
                self.entries.move_to_end(key)
                self._emit("reuse", key, self.entries[key].nbytes, "cpu")
        if not held:
            module = loader()
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
            entry = _Entry(module, module_nbytes(module), loader)
            with self._lock:
                self.entries[key] = entry
                self._loaders[key] = loader
                self._emit("load", key, entry.nbytes, str(_device_of(module)))
                self._evict_ram(keep=key)
        if check:
            self._check_budget(key)
        return key

    def add(self, key: str, module: Any) -> str:
        """Register an object built in memory (e.g. by a training node) under ``key``; the node
        that built it uses it next, and placing it then checks the VRAM budget."""
        return self.load(key, lambda: module, check=False)

    def has(self, key: str) -> bool:
        return key in self.entries

    def _entry(self, key: str) -> _Entry:
        """The entry of ``key``, loaded again from its files when the RAM budget evicted it."""
        if key not in self.entries and key in self._loaders:
            self.load(key, self._loaders[key])
            self._emit("reload", key, self.entries[key].nbytes, "cpu")
        return self.entries[key]

    def get(self, key: str) -> Any:
        """The held component, wherever it currently lives, unpatched. Raises KeyError."""
        with self._lock:
            entry = self._entry(key)
            self.entries.move_to_end(key)
            return entry.module

    def _evict_ram(self, keep: str) -> None:
        if self.ram_budget is None:
            return
        for other in list(self.entries):
            if sum(e.nbytes for e in self.entries.values()) <= self.ram_budget:
                break
            if other != keep and other not in self.in_use:
                if other in self.on_device:
                    self.offload(other)
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
    def layout(self, key: str) -> Layout:
        """How the component ``key`` divides into blocks (computed once)."""
        entry = self.entries[key]
        if entry.layout is None:
            entry.layout = layout_of(entry.module)
        return entry.layout

    def footprint(self, key: str) -> int:
        """Bytes the component ``key`` holds on the device now (0 when it is not placed)."""
        entry = self.entries.get(key)
        if entry is None or key not in self.on_device:
            return 0
        return entry.streamer.device_bytes() if entry.streamer is not None else entry.nbytes

    def device_bytes(self, exclude: str | None = None) -> int:
        """Bytes of weights (and rings) held on the device by the placed components."""
        return sum(self.footprint(k) for k in self.on_device if k != exclude)

    def in_use_workspace(self, exclude: str | None = None) -> int:
        """Activation bytes reserved for the components in use."""
        return sum(self.entries[k].workspace + self.entries[k].extra for k in self.in_use if k != exclude and k in self.entries)

    def in_use_bytes(self, exclude: str | None = None) -> int:
        """What the components in use hold on the device, their activations included."""
        return sum(
            self.footprint(k) + self.entries[k].workspace + self.entries[k].extra for k in self.in_use if k != exclude and k in self.entries
        )

    def room(self, key: str) -> int | None:
        """Bytes the budget leaves for component ``key`` (weights and activations) next to the
        components in use; None without a budget."""
        budget = self.strategy.vram_budget
        if budget is None or (self.device.type == "cpu" and not self.strategy.on_cpu):
            return None
        return budget - self.in_use_bytes(exclude=key)

    def overshoot(self, key: str) -> int:
        """Bytes by which calls of component ``key`` went past their activation estimates (measured
        on CUDA, kept for later calls): a caller sizing work against :meth:`room` adds it."""
        entry = self.entries.get(key)
        return entry.extra if entry is not None else 0

    def expect(self, key: str, workspace: int) -> None:
        """The calls of the next use of ``key`` need at most ``workspace`` bytes of activations
        (a node that has just chosen how to divide its work, a tile size say, knows this): the
        reservation placement makes for them becomes that, down as well as up, where otherwise
        it only grows with the largest call seen (a call that needs more still grows it)."""
        entry = self.entries.get(key)
        if entry is not None:
            with self._lock:
                entry.workspace = workspace

    def minimum_bytes(self, key: str) -> int:
        """The least device memory component ``key`` runs in (weights only: the layers that
        never stream plus its largest block and the ring it needs)."""
        entry = self._entry(key)
        if not isinstance(entry.module, torch.nn.Module):
            return entry.nbytes
        layout = self.layout(key)
        if not layout.blocks:
            return entry.nbytes
        return layout.resident_bytes(entry.module) + max(b.region for b in layout.blocks)

    def _check_budget(self, key: str) -> None:
        """Raise :class:`VramBudgetError` if component ``key`` cannot run within the VRAM budget
        even with all its blocks streamed, by what its weights alone need (the activations a call
        needs on top are checked when it is placed)."""
        with self._lock:
            entry = self._entry(key)
            if (self.device.type == "cpu" and not self.strategy.on_cpu) or not isinstance(entry.module, torch.nn.Module):
                return
            self.strategy.plan(self, key, weights_only=True)  # raises below the minimum; moves nothing

    def place(self, key: str) -> Any:
        with self._lock:
            entry = self._entry(key)
            if (self.device.type == "cpu" and not self.strategy.on_cpu) or not isinstance(entry.module, torch.nn.Module):
                return entry.module
            self._place(key, entry, self.strategy.plan(self, key))
            self.on_device[key] = None
            self.on_device.move_to_end(key)
            return entry.module

    # ---- homes: where weights live off the device under a budget ---------------------------------
    def _homes(self, entry: _Entry) -> dict[int, torch.Tensor]:
        """The component's CPU homes (made once, from wherever its weights are, and pinned on
        CUDA), with every tensor of it pointed at its home; each block of its layout gets one
        contiguous span laid out like its slot in a :class:`Streamer`'s ring."""
        if entry.home is None:
            tensors = _tensors(entry.module)
            index = {id(t): n for n, t in enumerate(tensors)}
            if entry.layout is None:
                entry.layout = layout_of(entry.module)
            groups = [[index[id(t)] for t in _tensors(b.module)] for b in entry.layout.blocks]  # one span per block
            homes = pinned_home(tensors, pin=self.device.type == "cuda", groups=groups, adopt=True)  # each tensor now at its home
            entry.resync |= entry.patched  # made from patched values: refreshed after the undo
            entry.home = {id(t): home for t, home in zip(tensors, homes, strict=True)}
        return entry.home

    def _to_device(self, entry: _Entry) -> None:
        """Place the whole component: asynchronous copies from its homes on the compute stream."""
        home = self._homes(entry)
        for t in _tensors(entry.module):
            if not _on(t, self.device):
                entry.resync |= entry.patched
                t.data = home.get(id(t), t.data).to(self.device, non_blocking=True)

    def _to_home(self, entry: _Entry) -> None:
        """Point every tensor of the component at its home (nothing is copied unless a use's
        patches are applied: then their values go home first, and are refreshed after the undo)."""
        home = self._homes(entry)
        for t in _tensors(entry.module):
            target = home.get(id(t))
            if target is None:  # a tensor added since the homes were made
                target = home[id(t)] = pinned_home([t.data], pin=self.device.type == "cuda")[0]
            elif entry.patched and not _same(target, t.data):
                target.copy_(t.data)
                entry.resync = True
            t.data = target

    def _resync(self, entry: _Entry) -> None:
        """After a patched use whose moves read or wrote homes: copy the (undone) weights on the
        device back to their homes, so homes equal the unpatched weights again."""
        streamer = entry.streamer
        if not (entry.resync or (streamer is not None and streamer.resync)) or entry.home is None:
            return
        for t in _tensors(entry.module):
            home = entry.home.get(id(t))
            if home is not None and not _same(home, t.data):
                home.copy_(t.data)
        entry.resync = False
        if streamer is not None:
            streamer.resync = False

    def _place(self, key: str, entry: _Entry, plan: Plan) -> None:
        """Carry out ``plan`` for ``key`` (nothing moves when it is placed so already)."""
        # under a budget weights get homes (pinned memory needs CUDA itself, not only the name)
        homed = self.strategy.vram_budget is not None and (self.device.type != "cuda" or torch.cuda.is_available())
        if plan.resident is None:
            if entry.streamer is not None:
                self.strategy.make_room(self, key, entry.nbytes + entry.workspace + entry.extra)
                entry.streamer.remove()
                entry.streamer = None
                self._to_device(entry) if homed else entry.module.to(self.device)
                self._emit("place", key, entry.nbytes, str(self.device))
            else:  # placed whole now or already: with the room its activations need now (grown since, perhaps)
                self.strategy.make_room(self, key, entry.nbytes + entry.workspace + entry.extra)
                if key not in self.on_device:
                    self._to_device(entry) if homed else entry.module.to(self.device)
                    self._emit("place", key, entry.nbytes, str(self.device))
            self._watch(key, entry)
            return
        for other in list(self.on_device):  # a component that streams gets all the room the budget has
            if other != key and other not in self.in_use:
                self.offload(other)
        streamer = entry.streamer
        if streamer is None:
            # placed whole before: off the device first, so the move never holds both
            if homed:
                self._to_home(entry)
            elif key in self.on_device:
                entry.module.to("cpu")
            home = entry.home if homed else None
            entry.streamer = Streamer(entry.module, self.layout(key), self.device, plan.resident, plan.ring, home, entry.patched)
        elif streamer.parked or streamer.resident != plan.resident or streamer.ring.numel() != plan.ring:
            streamer.configure(plan.resident, plan.ring)
        else:
            return
        self._watch(key, entry)
        self._emit("place_partial", key, entry.streamer.device_bytes() if entry.streamer is not None else 0, str(self.device))
        self._emit_stream("plan", key, entry)

    def _watch(self, key: str, entry: _Entry) -> None:
        """Hooks on the calls whose arguments give the activations (the layout's workspace
        entries): a call that needs more than the plan left room for re-plans first."""
        if entry.watched or self.strategy.vram_budget is None:
            return
        layout = self.layout(key)
        for name, estimate in layout.workspace.items():
            target = entry.module.get_submodule(name) if name else entry.module
            target.register_forward_pre_hook(self._workspace_hook(key, estimate, layout.economy.get(name)), with_kwargs=True)
            target.register_forward_hook(self._peak_hook(key))
        entry.watched = True

    def _workspace_hook(
        self, key: str, estimate: Callable[[tuple, dict], int], economy: Callable[[tuple, dict, bool], bool] | None = None
    ) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            entry = self.entries.get(key)
            if entry is None or key not in self.on_device:
                return
            if economy is not None:
                economy(args, kwargs, False)  # the usual way, unless it does not fit
            need = int(estimate(args, kwargs))
            economized = economy is not None and not self.strategy.fits(self, key, need + entry.extra) and economy(args, kwargs, True)
            if economized:
                need = int(estimate(args, kwargs))
                if not entry.economy:
                    self._emit("economy", key, need, str(self.device))
            entry.economy = economized
            if need > entry.workspace:  # the reserve is the largest call's so far: no re-plan back and forth
                with self._lock:
                    entry.workspace = need
                    self._replan(key, entry)
            if self.device.type == "cuda":
                self._peak = torch.cuda.max_memory_allocated(self.device)

        return hook

    def _peak_hook(self, key: str) -> Callable[..., None]:
        """After a call on CUDA: if the device's peak allocation rose above the budget during it,
        the estimate was short by that much; the next call plans with it added."""

        def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            budget = self.strategy.vram_budget
            if self.device.type != "cuda" or budget is None:
                return
            peak = torch.cuda.max_memory_allocated(self.device)
            entry = self.entries.get(key)
            if entry is not None and peak > self._peak and peak > budget:
                entry.extra += peak - budget + 16 * MB
                self._emit("workspace_grown", key, peak - budget, str(self.device))
            self._peak = max(self._peak, peak)

        return hook

    def _replan(self, key: str, entry: _Entry) -> None:
        plan = self.strategy.plan(self, key)
        if plan.resident is None and entry.streamer is None:
            self.strategy.make_room(self, key, entry.nbytes + entry.workspace + entry.extra)
        self._place(key, entry, plan)

    def offload(self, key: str) -> None:
        with self._lock:
            if key in self.on_device:
                self.on_device.pop(key)
                entry = self.entries.get(key)
                if entry is not None and isinstance(entry.module, torch.nn.Module):
                    if entry.streamer is not None:  # kept, with what it learned, for the next placement
                        entry.streamer.park()
                    self._to_home(entry) if entry.home is not None else entry.module.to("cpu")
                    self._emit("offload", key, entry.nbytes, "cpu")

    def _set_patched(self, entry: _Entry, patched: bool) -> None:
        entry.patched = patched
        if entry.streamer is not None:
            entry.streamer.patched = patched

    def _end_patched(self, entry: _Entry) -> None:
        """A use's patches are undone: homes read or written meanwhile get the restored weights."""
        if entry.patched:
            self._resync(entry)
            self._set_patched(entry, False)

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
        with different patches. A partially loaded component reports what it streamed
        (:class:`~graphsd.events.StreamEvent` ``use``) when the use ends."""
        key = ref.keys[role]
        with self._lock:
            self.in_use[key] = self.in_use.get(key, 0) + 1
        try:
            module = self.place(key)
            entry = self.entries[key]
            streamer = entry.streamer
            if streamer is not None:
                streamer.bytes_moved, streamer.calls, streamer.copies, streamer.transfers = 0, 0, 0, []
            with ExitStack() as undo:
                undo.callback(self._end_patched, entry)  # runs after every patch's undo
                budgeted = _BACKUPS_ON_HOST.set(self.strategy.vram_budget is not None)
                try:
                    for patch in ref.patches:
                        restore = patch.apply(role, module)
                        if restore is not None:
                            undo.callback(restore)
                            self._set_patched(entry, True)
                finally:
                    _BACKUPS_ON_HOST.reset(budgeted)
                try:
                    yield module
                finally:
                    if entry.streamer is not None:
                        entry.streamer.finish()  # copies in flight read the pinned weights the undo restores
                        self._emit_stream("use", key, entry)
        finally:
            with self._lock:
                self.in_use[key] -= 1
                if not self.in_use[key]:
                    del self.in_use[key]
