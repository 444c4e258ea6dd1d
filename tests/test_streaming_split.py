"""A U-Net's ResNet blocks larger than every other streaming unit stream by their convolutions, so
they no longer set the ring's size (the ring holds two of the largest unit, and every byte of ring
is a byte of resident weights streamed at every call) and still compute the same numbers."""

import torch
from sd_tiny import unet as tiny_unet

import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts
from graphsd.memory import ModelManager, ModelOffload, layout_of, module_nbytes, region_bytes


def test_resnets_larger_than_every_other_unit_stream_by_their_convolutions():
    model = tiny_unet()
    names = {b.name: b for b in layout_of(model).blocks}
    kinds = ("BasicTransformerBlock", "Downsample2D", "Upsample2D")
    others = max(module_nbytes(m) for m in model.modules() if type(m).__name__ in kinds)
    resnets = {n: m for n, m in model.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    large = {n for n, m in resnets.items() if module_nbytes(m) > others}
    assert large and len(large) < len(resnets)  # the tiny U-Net has both kinds
    for name, resnet in resnets.items():
        if name in large:
            assert name not in names
            convs = {f"{name}.conv1", f"{name}.conv2"} | ({f"{name}.conv_shortcut"} if resnet.conv_shortcut is not None else set())
            assert convs <= set(names) and all(names[c].module is resnet.get_submodule(c.rsplit(".", 1)[1]) for c in convs)
        else:
            assert name in names  # small ResNets stay whole (fewer hooks per call)
    # no unit is larger than the largest unit of another kind: that one sets the ring
    assert max(region_bytes(b.module) for b in names.values()) == max(region_bytes(m) for m in model.modules() if type(m).__name__ in kinds)


def test_split_resnets_streamed_through_the_least_ring_give_the_unconstrained_numbers():
    model = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(10.0), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=ctx).sample
    m = ModelManager("cpu", strategy=ModelOffload(0, on_cpu=True))
    key = m.add("unet", model)
    layout = m.layout(key)
    # the least budget: the layers that never stream, the call's activations and a ring of one unit
    m.strategy.vram_budget = m.minimum_bytes(key) + layout.workspace[""]((x,), {"encoder_hidden_states": ctx})

    class Handle:
        keys, patches = {"unet": key}, ()

    with m.use(Handle, "unet") as unet, torch.no_grad():
        got = [unet(x, t, encoder_hidden_states=ctx).sample for _ in range(2)]
        streamer = m.entries[key].streamer
        transfers = list(streamer.transfers)
    assert all(torch.equal(g, expected) for g in got)
    assert any(name.endswith(".conv1") for name in transfers) and any(name.endswith(".conv_shortcut") for name in transfers)
    assert m.device_bytes() <= m.strategy.vram_budget


def test_the_smallest_blocks_stay_resident_so_the_fewest_stream():
    """The default residency keeps the smallest blocks on the device and streams the largest (each
    streamed block costs host time at every call); the numbers are the unconstrained ones."""
    from test_vram import Recording, managed, recording_layout

    torch.manual_seed(0)
    model = Recording([16, 48, 16, 32, 16])  # blocks of 16x48, 48x16, 16x32, 32x16 and 16x16 weights
    layout = recording_layout(model, ranks=[4, 1, 1, 4, 4])
    sizes = [b.nbytes for b in layout.blocks]
    ring = max(region_bytes(b.module) for b in layout.blocks)  # a ring of one block (ring_blocks=1 below)
    by_size = sorted(range(5), key=lambda i: (sizes[i], layout.blocks[i].rank))
    keep = by_size[:3]
    budget = layout.resident_bytes(model) + ring + sum(sizes[i] for i in keep)
    x = torch.randn(3, 8)
    expected = model(x)
    m, handle, _ = managed(model, budget, layout)
    m.strategy.ring_blocks = 1
    assert m.strategy.residency == "size"
    with m.use(handle, "unet") as mod:
        got = [mod(x) for _ in range(2)]
    streamer = m.entries["model"].streamer
    assert streamer.resident == set(keep) and sorted(streamer.streamed) == sorted(set(range(5)) - set(keep))
    assert min(sizes[i] for i in streamer.streamed) >= max(sizes[i] for i in keep)  # the largest stream
    assert all(torch.equal(g, expected) for g in got)
    m.strategy.residency = "rank"  # the other order keeps other blocks under the same budget
    assert m.strategy.residency_order(layout)[:3] != keep
