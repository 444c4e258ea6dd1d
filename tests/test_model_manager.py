"""ModelManager policies: load once, RAM budget (LRU eviction), model-level offload under a VRAM
budget, exact patch undo, and the executor's out-of-memory retry."""

from __future__ import annotations

import torch

from graphsd import Engine, Node, NodeIO, Settings
from graphsd.events import ModelEvent
from graphsd.memory import ModelManager, ModelOffload
from graphsd.types import UNet


class Placed(torch.nn.Module):
    """A module that records where it was asked to go instead of moving (so placement policy
    can be tested on a machine without an accelerator)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))  # n float32 = 4n bytes
        self.where = "cpu"

    def to(self, device, *args, **kwargs):  # noqa: D102 - records instead of moving
        self.where = str(device)
        return self


def manager(**kw) -> tuple[ModelManager, list[ModelEvent]]:
    m = ModelManager(**kw)
    events: list[ModelEvent] = []
    m.listener = events.append
    return m, events


def ref(m, key):
    return UNet(m, {"unet": key})


def test_load_once_then_reuse():
    m, events = manager()
    calls = []
    for _ in range(2):
        m.load("k", lambda: calls.append(1) or Placed(4))
    assert len(calls) == 1 and [e.action for e in events] == ["load", "reuse"]


def test_ram_budget_evicts_least_recently_used():
    m, events = manager(ram_budget=100)  # room for two 40-byte modules
    for key in ("a", "b"):
        m.load(key, lambda: Placed(10))
    m.get("a")  # a is now more recent than b
    m.load("c", lambda: Placed(10))
    assert [e.key for e in events if e.action == "evict"] == ["b"]
    assert m.has("a") and m.has("c") and not m.has("b")


def test_model_offload_keeps_only_what_fits_on_the_device():
    m, events = manager(device="cuda:0", strategy=ModelOffload(vram_budget=100))
    mods = {k: m.get(m.load(k, lambda: Placed(10))) for k in ("te", "unet", "vae")}  # 40 B each
    for key in ("te", "unet", "vae"):
        with m.use(ref(m, key), "unet") as module:
            assert module.where == "cuda:0"
    # placing the VAE needed room: the least recently used (text encoder) went back to the CPU
    assert [(e.action, e.key) for e in events if e.action in ("place", "offload")] == [
        ("place", "te"),
        ("place", "unet"),
        ("offload", "te"),
        ("place", "vae"),
    ]
    assert mods["te"].where == "cpu" and list(m.on_device) == ["unet", "vae"]


def test_component_in_use_is_never_offloaded():
    m, _ = manager(device="cuda:0", strategy=ModelOffload(vram_budget=80))  # room for two 40-byte modules
    a = m.get(m.load("a", lambda: Placed(10)))
    b = m.get(m.load("b", lambda: Placed(10)))
    m.load("c", lambda: Placed(10))
    with m.use(ref(m, "a"), "unet"):
        with m.use(ref(m, "b"), "unet"):
            pass
        with m.use(ref(m, "c"), "unet"):  # room is made by offloading b (a is less recently used, but in use)
            assert a.where == "cuda:0" and b.where == "cpu"


class _AddOne:
    def fingerprint(self):
        return "add-one"

    def apply(self, role, module):
        before = module.weight.detach().clone()
        module.weight.data += 1.0
        return lambda: module.weight.data.copy_(before)


def test_patches_apply_during_use_and_undo_exactly():
    m, _ = manager()
    lin = m.get(m.load("lin", lambda: torch.nn.Linear(3, 3)))
    original = lin.weight.detach().clone()
    handle = ref(m, "lin")
    patched = handle.with_patches(_AddOne(), _AddOne())
    with m.use(patched, "unet") as mod:
        assert torch.equal(mod.weight, (original + 1.0) + 1.0)  # the two patches, in order
    assert torch.equal(lin.weight, original) and handle.patches == ()


class OomOnce(Node):
    type = "OomOnce"
    description = "Raises CUDA out-of-memory on its first run, then succeeds."
    calls = 0

    class Inputs(NodeIO):
        pass

    class Outputs(NodeIO):
        value: int

    def run(self, inputs, ctx):
        OomOnce.calls += 1
        if OomOnce.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.Outputs(value=OomOnce.calls)


def test_out_of_memory_frees_memory_and_retries_once(tmp_path):
    plugin = tmp_path / "oom_plugin.py"
    plugin.write_text(
        "from graphsd import hookimpl\n"
        "from test_model_manager import OomOnce\n"
        "@hookimpl\n"
        "def graphsd_register_nodes():\n"
        "    return [OomOnce]\n"
    )
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(tmp_path)]))
    res = engine.run({"version": 1, "nodes": {"n": {"type": "OomOnce"}}}, outputs=["n"])
    assert res.ok and res.outputs["n"]["value"] == 2
    assert [e.action for e in res.events if isinstance(e, ModelEvent)] == ["oom_retry"]
