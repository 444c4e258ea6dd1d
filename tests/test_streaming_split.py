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
