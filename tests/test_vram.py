"""The VRAM budget as a cap (graphsd.memory.ModelOffload): which blocks stay resident and which
stream, the order and size of the copies, the budget kept in the bookkeeping, the minimum-budget
error before any work, and that streaming changes no numbers (a tiny U-Net, a LoRA on it).

A CPU "device" runs the same mechanics (``on_cpu=True``): streamed weights are copied into a ring
buffer just before their block runs and point back at their CPU copies after it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from graphsd.errors import NodeError
from graphsd.memory import Block, Layout, ModelManager, ModelOffload, VramBudgetError, module_nbytes, region_bytes
from graphsd.types import UNet


class Recording(torch.nn.Module):
    """A chain of linear blocks that records, while each block runs, whether its weight lives in
    the streamer's ring (streamed) or not (resident)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.inp = torch.nn.Linear(8, widths[0])  # outside every block: never streams
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:] + widths[:1], strict=True))
        self.log: list[tuple[int, int]] = []  # (block, weight data_ptr) as each block ran
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self.log.append((i, m.weight.data_ptr())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def recording_layout(model: Recording, ranks: list[float] | None = None) -> Layout:
    return Layout(
        [
            Block(f"blocks.{i}", b, sum(p.numel() * 4 for p in b.parameters()), ranks[i] if ranks else 1.0)
            for i, b in enumerate(model.blocks)
        ]
    )


def managed(model: torch.nn.Module, budget: int, layout: Layout | None = None) -> tuple[ModelManager, UNet, list]:
    m = ModelManager("cpu", strategy=ModelOffload(budget, on_cpu=True))
    events: list = []
    m.listener = events.append
    key = m.add("model", model)
    if layout is not None:
        m.entries[key].layout = layout
    return m, UNet(m, {"unet": key}), events


def tiny_unet_call() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The suite's tiny SD U-Net (with the SD layouts registered), the inputs of one call
    (sample, timestep, text context; a batch of two) and that call's unconstrained output."""
    from sd_tiny import unet as tiny_unet

    import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts

    model = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=ctx).sample
    return model, (x, t, ctx), expected


def misordered_six() -> tuple[Recording, ModelManager, UNet, torch.Tensor, torch.Tensor]:
    """Six equal recording blocks whose layout lists them in the reverse of the order they run,
    managed under a budget with room for the layers outside them and two blocks (all six stream),
    with a call's input and its unconstrained output."""
    torch.manual_seed(0)
    model = Recording([16, 16, 16, 16, 16, 16])
    layout = recording_layout(model)
    layout.blocks.reverse()  # the layout guesses the order wrong
    budget = layout.resident_bytes(model) + 2 * max(region_bytes(b.module) for b in layout.blocks)
    m, handle, _ = managed(model, budget, layout)
    x = torch.randn(2, 8)
    return model, m, handle, x, model(x)


def in_ring(m: ModelManager, ptr: int) -> bool:
    ring = m.entries["model"].streamer.ring
    return ring.data_ptr() <= ptr < ring.data_ptr() + ring.numel()


def test_split_keeps_low_rank_blocks_resident_and_streams_the_rest_in_order():
    torch.manual_seed(0)
    model = Recording([16, 32, 16, 32, 16])  # five blocks of 2176 or 2112 bytes
    layout = recording_layout(model, ranks=[4, 1, 1, 4, 4])
    sizes = [b.nbytes for b in layout.blocks]
    fixed = layout.resident_bytes(model)
    ring = 2 * max(region_bytes(b.module) for b in layout.blocks)  # a ring of two of the largest block
    budget = fixed + ring + sizes[1] + sizes[2]  # room for exactly the two rank-1 blocks besides
    x = torch.randn(3, 8)
    expected = model(x)
    m, handle, events = managed(model, budget, layout)
    m.strategy.ring_blocks = 2
    m.strategy.residency = "rank"  # the low-rank blocks stay (the default keeps the smallest: tests/test_streaming_split.py)
    with m.use(handle, "unet") as mod:
        model.log.clear()
        first = mod(x)
        second = mod(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    streamer = m.entries["model"].streamer
    assert streamer.resident == {1, 2} and streamer.streamed == [0, 3, 4]
    streamed_while_running = {i for i, ptr in model.log if in_ring(m, ptr)}
    assert streamed_while_running == {0, 3, 4}
    # the bookkeeping keeps the budget: what is on the device is the fixed layers, two blocks and the ring
    assert m.device_bytes() == fixed + sizes[1] + sizes[2] + streamer.ring.numel() <= budget
    # copies in execution order, one call ahead at most: 0, 3, 4 for each call, then the next call's first
    plan, use = (e for e in events if e.kind == "stream")
    assert plan.resident_blocks == ("blocks.1", "blocks.2") and plan.streamed_blocks == ("blocks.0", "blocks.3", "blocks.4")
    assert use.calls == 2 and use.bytes_moved >= 2 * (sizes[0] + sizes[3] + sizes[4])
    # between calls the streamed weights are CPU tensors again (what patches change)
    assert not in_ring(m, model.blocks[0].weight.data_ptr())


def test_copies_follow_the_order_blocks_ran_in_not_the_layout_order():
    model, m, handle, x, expected = misordered_six()
    m.strategy.ring_blocks = 2
    with m.use(handle, "unet") as mod:
        outputs = [mod(x) for _ in range(3)]
        transfers = m.entries["model"].streamer.transfers
    assert all(torch.equal(y, expected) for y in outputs)
    run_order = [f"blocks.{i}" for i in range(6)]
    # the third call's copies were all made ahead, in the order the blocks ran
    assert transfers[-6 - 2 : -2] == run_order


def test_budget_below_the_smallest_working_set_is_refused_before_any_call():
    model = Recording([16, 64, 16])
    layout = recording_layout(model)
    minimum = layout.resident_bytes(model) + max(region_bytes(b.module) for b in layout.blocks)
    m, handle, _ = managed(model, minimum - 1, layout)
    model.log.clear()
    with pytest.raises(VramBudgetError) as info, m.use(handle, "unet"):
        pass
    assert isinstance(info.value, NodeError) and info.value.minimum == minimum
    assert "--vram-budget" in str(info.value) and f"at least {-(-minimum // 2**20)} MB" in str(info.value)
    assert model.log == []
    m.strategy.vram_budget = minimum  # exactly the minimum runs
    with m.use(handle, "unet") as mod:
        assert torch.equal(mod(torch.ones(1, 8)), Recording.forward(model, torch.ones(1, 8)))


def test_a_loader_run_again_checks_the_weights_not_the_activations_an_earlier_call_reserved():
    """A workflow run a second time runs its loader node again on the held component: the check
    at load time is about what the weights need. An earlier call's reservation (a full-frame VAE
    decode, which the next image will tile) must not refuse the component there; a call that
    really needs more than the budget is still refused when it is placed."""
    model = Recording([16, 64, 16])
    layout = recording_layout(model)
    minimum = layout.resident_bytes(model) + max(region_bytes(b.module) for b in layout.blocks)
    m, handle, _ = managed(model, minimum + 4096, layout)
    m.expect("model", 2 * minimum)  # what the last call needed: more than the budget leaves
    assert m.load("model", lambda: model) == "model"  # the loader node again: its weights fit
    with pytest.raises(VramBudgetError), m.use(handle, "unet"):
        pass
    m.expect("model", 1024)  # the next call is smaller (a tile): it runs
    with m.use(handle, "unet") as mod:
        assert torch.equal(mod(torch.ones(1, 8)), Recording.forward(model, torch.ones(1, 8)))


def test_activations_of_a_call_are_kept_room_for():
    """A layout's workspace estimate re-plans before a larger call: the component placed whole for
    a small batch is partially loaded for a large one, and weights + activations keep the budget."""
    torch.manual_seed(0)
    model = Recording([32, 32, 32, 32])
    layout = recording_layout(model)
    layout.workspace = {"": lambda args, kwargs: args[0].shape[0] * 1000}
    budget = module_nbytes(model) + 2 * 1000 + 100  # whole, with a batch of two
    m, handle, _ = managed(model, budget, layout)
    x = torch.randn(5, 8)
    expected = model(x)
    with m.use(handle, "unet") as mod:
        mod(x[:2])
        assert m.entries["model"].streamer is None
        got = mod(x)
        streamer = m.entries["model"].streamer
        assert streamer is not None and streamer.streamed
        assert m.device_bytes() + m.entries["model"].workspace <= budget
    assert torch.equal(got, expected)


def test_streamed_tiny_unet_gives_the_unconstrained_numbers():
    model, (x, t, ctx), expected = tiny_unet_call()
    m, handle, events = managed(model, 0)
    layout = m.layout("model")
    names = [b.name for b in layout.blocks]
    assert "down_blocks.0.resnets.0" in names and any(n.endswith("transformer_blocks.0") for n in names)
    workspace = layout.workspace[""]((x,), {})
    m.strategy.vram_budget = m.minimum_bytes("model") + workspace + 3 * max(region_bytes(b.module) for b in layout.blocks)
    with m.use(handle, "unet") as unet, torch.no_grad():
        got = unet(x, t, encoder_hidden_states=ctx).sample
        streamer = m.entries["model"].streamer
    assert streamer is not None and streamer.streamed and streamer.resident  # a real split
    assert torch.equal(got, expected)
    use = [e for e in events if e.kind == "stream" and e.action == "use"][-1]
    assert use.calls == 1 and use.bytes_moved >= use.streamed_bytes > 0


def test_lora_on_streamed_weights_gives_the_lora_result():
    from safetensors.torch import save_file
    from sd_tiny import text_encoder
    from sd_tiny import unet as tiny_unet
    from test_lora import graphsd_patch, kohya_sd1

    import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts

    model, te = tiny_unet(), text_encoder()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 32)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(kohya_sd1(model, te), path)
        patch, _ = graphsd_patch(path, {"unet": model, "text_encoder": te}, 0.8)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    undo = patch.apply("unet", model)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=ctx).sample
    undo()
    m, handle, _ = managed(model, 0)
    layout = m.layout("model")
    m.strategy.vram_budget = m.minimum_bytes("model") + layout.workspace[""]((x,), {}) + 2 * layout.blocks[0].nbytes
    with m.use(handle.with_patches(patch), "unet") as unet, torch.no_grad():
        got = unet(x, t, encoder_hidden_states=ctx).sample
        assert m.entries["model"].streamer.streamed
    assert torch.equal(got, expected)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # the undo restored every weight


def test_vae_decode_switches_to_tiles_when_the_full_frame_would_break_the_budget():
    from sd_tiny import vae as tiny_vae

    from graphsd.std.models.streaming import decode_tile, decoder_workspace

    vae = tiny_vae()
    m, _, _ = managed(vae, 0)
    full = decoder_workspace(vae)((torch.empty(1, 4, 64, 64),), {})
    weights = sum(p.numel() * 4 for p in vae.parameters())
    m.strategy.vram_budget = weights + full
    assert decode_tile(m, "model", (1, 4, 64, 64)) is None
    m.strategy.vram_budget = weights + full // 4
    tile = decode_tile(m, "model", (1, 4, 64, 64))
    assert tile is not None and 8 <= tile < 64
    assert weights + decoder_workspace(vae)((torch.empty(1, 4, tile, tile),), {}) <= m.strategy.vram_budget
    assert decode_tile(ModelManager("cpu"), "x", (1, 4, 64, 64)) is None  # no budget: never tiles


def test_vae_encode_switches_to_tiles_when_the_full_frame_would_break_the_budget():
    from sd_tiny import vae as tiny_vae

    from graphsd.std.models.streaming import encode_tile, encoder_workspace

    vae = tiny_vae()
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, 3, 64 * down, 64 * down)
    m, _, _ = managed(vae, 0)
    estimate = encoder_workspace(vae)
    full = estimate((torch.empty(shape, device="meta"),), {})
    weights = sum(p.numel() * 4 for p in vae.parameters())
    m.strategy.vram_budget = weights + full
    assert encode_tile(m, "model", shape, down) is None
    m.strategy.vram_budget = weights + full // 4
    tile = encode_tile(m, "model", shape, down)
    assert tile is not None and 8 <= tile < 64
    assert weights + estimate((torch.empty(1, 3, tile * down, tile * down, device="meta"),), {}) <= m.strategy.vram_budget
    assert m.entries["model"].workspace == estimate((torch.empty(1, 3, tile * down, tile * down, device="meta"),), {})
    assert encode_tile(ModelManager("cpu"), "x", shape, down) is None  # no budget: never tiles


def test_a_decode_that_went_past_its_estimate_tiles_next_time_and_is_placed_for_its_tile():
    """On CUDA a decode whose peak went past the budget leaves its overshoot on the VAE's entry;
    the next decode of the frame, which fitted by the estimate alone, then runs in tiles, and the
    VAE is placed with room for a tile's activations, not the earlier whole frame's."""
    from sd_tiny import vae as tiny_vae

    from graphsd.std.models.streaming import decode_tile, decoder_workspace

    vae = tiny_vae()
    m, handle, _ = managed(vae, 0)
    estimate = decoder_workspace(vae)
    full = estimate((torch.empty(1, 4, 64, 64),), {})
    weights = sum(p.numel() * 4 for p in vae.parameters())
    m.strategy.vram_budget = weights + full
    assert decode_tile(m, "model", (1, 4, 64, 64)) is None
    with m.use(handle, "unet"):  # placed whole with the whole frame's activations reserved
        assert m.entries["model"].workspace == full and m.entries["model"].streamer is None
    m.entries["model"].extra = full // 2  # what the CUDA peak hook records when the decode went past the budget by that much
    tile = decode_tile(m, "model", (1, 4, 64, 64))
    assert tile is not None and weights + estimate((torch.empty(1, 4, tile, tile),), {}) + full // 2 <= m.strategy.vram_budget
    with m.use(handle, "unet"):  # placed for the tile: no error, the reservation is the tile's
        assert m.entries["model"].workspace == estimate((torch.empty(1, 4, tile, tile),), {})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_homes_of_a_real_unet_pack_into_power_of_two_chunks_with_little_waste(family):
    """The pinned allocator rounds each allocation up to a power of two: homes are packed into
    chunks of such sizes, every block's span whole inside one chunk, holding under 2 % more than
    the weights (one chunk per block of SDXL's 66-94 MB blocks would hold 1.8 times them)."""
    from diffusers import UNet2DConditionModel

    import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts
    from graphsd.memory import _aligned, _tensors, chunk_plan, layout_of

    configs = {
        "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
        "sdxl": {
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs[family]).half()
    layout = layout_of(unet)
    in_blocks = {id(t) for b in layout.blocks for t in _tensors(b.module)}
    sizes = [region_bytes(b.module) for b in layout.blocks] + [_aligned(t) for t in _tensors(unet) if id(t) not in in_blocks and t.numel()]
    plan = chunk_plan(sizes)
    assert sorted(i for _, members in plan for i in members) == list(range(len(sizes)))  # each run once
    for capacity, members in plan:
        assert capacity & (capacity - 1) == 0 and sum(sizes[i] for i in members) <= capacity
    assert sum(c for c, _ in plan) <= 1.02 * sum(sizes)
    assert len(plan) <= 16


@pytest.mark.slow
def test_a_budget_below_what_a_models_weights_need_is_refused_by_its_loader_before_anything_runs(tmp_path):
    """The checkpoint's loader node names the minimum; no node that computes with the model starts."""
    from pathlib import Path

    from graphsd import Engine, Settings

    engine = Engine(Settings(output_dir=str(tmp_path)))
    engine.models.strategy = ModelOffload(64 * 1024, on_cpu=True)  # 64 KiB: below any block of graphsd-tiny
    events: list = []
    workflow = Path(__file__).resolve().parents[1] / "workflows" / "txt2img.yaml"
    result = engine.run(workflow, on_event=events.append)
    assert not result.ok and not list(tmp_path.iterdir())
    [failed] = [e for e in events if e.kind == "node_error"]
    assert failed.node_type == "CheckpointLoader"
    assert "--vram-budget" in failed.message and "raise the budget to at least" in failed.message
    started = {e.node_type for e in events if e.kind == "node_start"}
    assert not started & {"TextEncode", "UNetDenoiseLoop", "VAEDecode", "SaveImage"}
    engine.models.strategy.vram_budget = 2**40  # the same models then run
    assert engine.run(workflow).ok


def test_lora_with_replans_mid_use_and_offloads_between_uses_keeps_every_weight():
    """Under a budget weights live in their homes off the device: a LoRA use whose call re-plans
    (whole for a small batch, then partially loaded for a large one) gives the LoRA result, and
    after the undo, an offload and a second unpatched use, every weight is the original bit for bit."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file
    from sd_tiny import text_encoder
    from sd_tiny import unet as tiny_unet
    from test_lora import graphsd_patch, kohya_sd1

    import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts

    torch.manual_seed(0)
    model, te = tiny_unet(), text_encoder()
    t = torch.tensor(10)
    small, large = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(kohya_sd1(model, te), path)
        patch, _ = graphsd_patch(path, {"unet": model, "text_encoder": te}, 0.8)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    undo = patch.apply("unet", model)
    with torch.no_grad():
        expected = model(large, t, encoder_hidden_states=torch.zeros(4, 77, 32)).sample
    undo()
    with torch.no_grad():
        plain = model(small, t, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
    m, handle, _ = managed(model, 0)
    layout = m.layout("model")
    workspace = layout.workspace[""]
    # whole with the small batch's activations; the large batch's no longer fit beside all weights
    m.strategy.vram_budget = module_nbytes(model) + workspace((small,), {})
    assert module_nbytes(model) + workspace((large,), {}) > m.strategy.vram_budget
    m.add("other", torch.nn.Linear(4, 4))  # a second component takes turns on the device
    with m.use(handle.with_patches(patch), "unet") as unet, torch.no_grad():
        unet(small, t, encoder_hidden_states=torch.zeros(1, 77, 32))
        assert m.entries["model"].streamer is None
        got = unet(large, t, encoder_hidden_states=torch.zeros(4, 77, 32)).sample
        assert m.entries["model"].streamer is not None and m.entries["model"].streamer.streamed
    assert torch.equal(got, expected)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    m.offload("model")
    with m.use(UNet(m, {"unet": "other"}), "unet"):
        pass
    with m.use(handle, "unet") as unet, torch.no_grad():
        again = unet(small, t, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
    assert torch.equal(again, plain)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_each_streamed_block_moves_in_one_copy_from_a_home_laid_out_like_its_ring_slot():
    """Homes are packed so that a streamed block's CPU copies form one span with each tensor at
    its offset in the block's ring slot: the block moves in one copy, and while it runs its
    parameters are views into the slot, laid out as in the span."""
    torch.manual_seed(0)
    model, (x, t, ctx), expected = tiny_unet_call()
    m, handle, _ = managed(model, 0)
    layout = m.layout("model")
    two_slots = 2 * max(region_bytes(b.module) for b in layout.blocks)
    m.strategy.vram_budget = m.minimum_bytes("model") + layout.workspace[""]((x,), {}) + two_slots
    seen: dict[int, list[int]] = {}  # block -> its tensors' addresses while it ran

    def record(i: int):
        def hook(mod: torch.nn.Module, _args: tuple) -> None:
            seen.setdefault(i, [p.data_ptr() for p in mod.parameters()])

        return hook

    for i, block in enumerate(layout.blocks):
        block.module.register_forward_pre_hook(record(i))
    with m.use(handle, "unet") as unet, torch.no_grad():
        got = unet(x, t, encoder_hidden_states=ctx).sample
        streamer = m.entries["model"].streamer
        copies, transfers = streamer.copies, list(streamer.transfers)
    assert torch.equal(got, expected)
    assert streamer.streamed and set(streamer.spans) == set(streamer.streamed)
    assert copies == len(transfers) >= len(streamer.streamed)  # one copy per block moved
    ring = (streamer.ring.data_ptr(), streamer.ring.data_ptr() + streamer.ring.numel())
    for i in streamer.streamed:
        span = streamer.spans[i]
        assert span.numel() == streamer.region[i] == region_bytes(layout.blocks[i].module)
        offsets = {id(e.tensor): e.offset for e in streamer.tensors[i]}
        params = list(layout.blocks[i].module.parameters())
        # outside its forward every tensor is its home, at its slot offset within the span
        assert all(p.data_ptr() - span.data_ptr() == offsets[id(p)] for p in params)
        # while it ran: inside the ring, with the same relative layout
        assert all(ring[0] <= ptr < ring[1] for ptr in seen[i])
        assert [ptr - seen[i][0] for ptr in seen[i]] == [offsets[id(p)] - offsets[id(params[0])] for p in params]


def test_a_block_whose_home_is_not_one_span_is_copied_tensor_by_tensor():
    """A block holding a non-contiguous weight (a transposed view) gets no span; it streams
    tensor by tensor and gives the same result, next to blocks that move in one copy."""
    torch.manual_seed(0)
    model = Recording([16, 16, 16, 16])
    model.blocks[1].weight = torch.nn.Parameter(model.blocks[1].weight.detach().t().contiguous().t())
    assert not model.blocks[1].weight.is_contiguous()
    layout = recording_layout(model)
    budget = layout.resident_bytes(model) + 2 * max(region_bytes(b.module) for b in layout.blocks)
    m, handle, _ = managed(model, budget, layout)
    x = torch.randn(3, 8)
    expected = model(x)
    with m.use(handle, "unet") as mod:
        got = mod(x)
        streamer = m.entries["model"].streamer
        copies, moved = streamer.copies, [int(n.split(".")[1]) for n in streamer.transfers]
    assert torch.equal(got, expected)
    assert 1 in streamer.streamed and 1 not in streamer.spans and set(streamer.spans) == set(streamer.streamed) - {1}
    assert copies == sum(2 if i == 1 else 1 for i in moved)  # weight and bias one by one for block 1


def test_a_component_streamed_again_after_an_offload_keeps_its_streamer_and_copies_in_the_order_its_blocks_ran():
    """A component taking turns with others between images keeps its streamer through an
    offload (parked: its ring freed, every weight at its home), so placing it again walks none of
    its modules; the order learned while streaming is kept, so its very first call after the
    offload copies in the order the blocks ran and no copy made ahead is thrown away."""
    model, m, handle, x, expected = misordered_six()
    run_order = [f"blocks.{i}" for i in range(6)]
    with m.use(handle, "unet") as mod:
        assert torch.equal(mod(x), expected)
        kept = m.entries["model"].streamer
        first = list(kept.transfers)
    assert first[:6] != run_order  # the first call ever follows the layout's guess
    m.offload("model")
    assert m.entries["model"].streamer is kept and kept.parked and kept.ring.numel() == 0
    home = m.entries["model"].home
    assert all(p.data_ptr() == home[id(p)].data_ptr() for p in model.parameters())  # nothing left off its home
    with m.use(handle, "unet") as mod:
        assert torch.equal(mod(x), expected)
        streamer = m.entries["model"].streamer
        transfers, moved = list(streamer.transfers), streamer.bytes_moved
    assert streamer is kept and not kept.parked
    assert transfers[:6] == run_order
    call = sum(b.nbytes for b in m.layout("model").blocks)
    assert moved < 2 * call  # one call's blocks and the next call's first ones, nothing copied twice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_pages_of_a_mapped_file_leave_resident_memory_and_no_value_changes(tmp_path):
    """When a streamed block's weights are copied to their pinned home, the pages of the memory-
    mapped .safetensors they were read from leave the process's resident memory. Only file pages
    go: they come back from the file, so every value reads the same afterwards; a page written
    since it was mapped (copy-on-write: private) stays with its new values; memory of the
    process's own (a tensor made in memory) is never touched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from graphsd.memory import drop_file_pages

    values = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))  # 1 MiB: 256 pages
    save_file({"w": values}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("w")
    assert torch.equal(mapped, values)  # every page read in
    mapped[32, 0] = 7.0  # its page (in the middle) is now the process's own
    expected = values.clone()
    expected[32, 0] = 7.0
    dropped = drop_file_pages(mapped)
    page = os.sysconf("SC_PAGE_SIZE")
    # every page wholly inside the tensor but the written one (the two at its ends are shared with the file's other bytes)
    assert values.nbytes - 3 * page <= dropped <= values.nbytes - page
    assert torch.equal(mapped, expected)  # read again from the file, and the written page kept
    own = torch.randn(64, 4096)
    before = own.clone()
    assert drop_file_pages(own) == 0 and torch.equal(own, before)


def attention_unet_call() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A tiny SD U-Net with transformer blocks at both levels (float64, to compare with
    reference.assert_same), a 16×16 call and its unconstrained output."""
    from sd_tiny import unet as tiny_unet

    import graphsd.std.models.streaming  # noqa: F401 - registers the SD layouts

    both = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    model = tiny_unet(down_block_types=both[0], up_block_types=both[1]).double()
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen).double(), torch.randn(2, 77, 32, generator=gen).double()
    t = torch.tensor(10)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=ctx).sample
    return model, (x, t, ctx), expected


def test_a_unet_call_too_wide_for_the_budget_runs_its_feed_forward_in_chunks():
    """Under a budget that holds the U-Net's least working set but not a call's activations with
    the feed-forward whole, the call runs with it in chunks of tokens (an ``economy`` event says
    so) instead of failing, and gives the unconstrained output (the same products, fewer rows
    at a time); with room enough it runs whole, to the bit. Below even the chunked need the
    budget is refused, naming the minimum."""
    from reference import assert_same

    model, (x, t, ctx), expected = attention_unet_call()
    m, handle, events = managed(model, 0)
    layout = m.layout("model")
    estimate, economy = layout.workspace[""], layout.economy[""]
    whole = estimate((x,), {})
    assert economy((x,), {}, True)
    chunked = estimate((x,), {})
    economy((x,), {}, False)
    assert estimate((x,), {}) == whole and chunked < whole
    least = m.minimum_bytes("model")

    m.strategy.vram_budget = least + (whole + chunked) // 2  # the chunked call fits, the whole one does not
    with m.use(handle, "unet") as unet, torch.no_grad():
        got = unet(x, t, encoder_hidden_states=ctx).sample
    assert [e.action for e in events if e.kind == "model" and e.action == "economy"] == ["economy"]
    assert all(b._chunk_size for b in model.modules() if type(b).__name__ == "BasicTransformerBlock")
    assert_same(got, expected)

    m.strategy.vram_budget = least + whole + 2**20  # room enough: whole again, exactly
    with m.use(handle, "unet") as unet, torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, expected)
    assert not any(b._chunk_size for b in model.modules() if type(b).__name__ == "BasicTransformerBlock")

    m.entries["model"].workspace = 0  # forget the reservations of the calls above
    m.strategy.vram_budget = least + chunked // 2
    with pytest.raises(VramBudgetError), m.use(handle, "unet") as unet, torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
