"""Branch batching: independent nodes that share a model and settings run as one batched call
and are split back per node (events, cache entries, failures, max_batch), and a batched grid of
denoise branches gives each branch what it gives alone."""

from __future__ import annotations

import textwrap

import pytest
import sd_tiny
import torch
from reference import assert_same

from graphsd import Engine, Settings

PLUGIN = '''
from pydantic import Field

from graphsd import Node, NodeError, NodeIO, hookimpl


class Scale(Node):
    """x * 10, batchable with every Scale of the same group; ``fail`` fails the node."""

    type = "Scale"
    calls = []  # (run | batch, node ids), in the order they happen

    class Inputs(NodeIO):
        x: int = 0
        group: str = "a"
        fail: bool = False
        stop: bool = False  # interrupt the run (as Ctrl-C would) in the middle of the batch

    class Outputs(NodeIO):
        value: int

    @classmethod
    def batch_key(cls, inputs, ctx):
        return inputs.group

    @classmethod
    def run_batch(cls, inputs, ctxs):
        cls.calls.append(("batch", tuple(c.node_id for c in ctxs)))
        if any(i.stop for i in inputs):
            ctxs[0].interrupt_flag.set()
            for ctx in ctxs:
                ctx.progress(1, 2)
        if any(i.fail for i in inputs):
            raise NodeError("an item of the batch is bad")
        return [cls.Outputs(value=i.x * 10) for i in inputs]

    def run(self, inputs, ctx):
        self.calls.append(("run", (ctx.node_id,)))
        if inputs.fail:
            raise NodeError("this one is bad", field="fail")
        return self.Outputs(value=inputs.x * 10)


class Plus(Node):
    """a + 1: not batchable."""

    type = "Plus"

    class Inputs(NodeIO):
        a: int

    class Outputs(NodeIO):
        value: int

    def run(self, inputs, ctx):
        return self.Outputs(value=inputs.a + 1)


@hookimpl
def graphsd_register_nodes():
    return [Scale, Plus]
'''


def doc(nodes):
    return {"version": 1, "nodes": nodes}


@pytest.fixture
def toy(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "batch_toys.py").write_text(textwrap.dedent(PLUGIN))

    def make(**settings):
        engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), plugins_dirs=[str(folder)], **settings))
        engine.nodes["Scale"].calls.clear()
        return engine

    return make


def scales(n, extra=None):
    """Scale nodes s0..s{n-1} with x = i, and ``extra[i]``'s inputs."""
    extra = extra or {}
    return {f"s{i}": {"type": "Scale", "inputs": {"x": i, **extra.get(i, {})}} for i in range(n)}


# ---- the executor's protocol, on a model-free node ------------------------------------------
def test_ready_nodes_of_one_key_run_as_one_batch_with_their_own_events_and_results(toy):
    engine = toy()
    res = engine.run(doc(scales(4)), outputs=["s0", "s1", "s2", "s3"])
    assert res.ok
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s1", "s2", "s3"))]
    assert {n: v["value"] for n, v in res.outputs.items()} == {"s0": 0, "s1": 10, "s2": 20, "s3": 30}
    [batch] = [e for e in res.events if e.kind == "node_batch"]
    assert (batch.node_type, batch.node_ids, batch.size, batch.error) == ("Scale", ("s0", "s1", "s2", "s3"), 4, "")
    assert batch.to_dict()["kind"] == "node_batch"
    for node in ("s0", "s1", "s2", "s3"):
        kinds = [e.kind for e in res.events if e.kind.startswith("node_") and getattr(e, "node_id", None) == node]
        assert kinds == ["node_start", "node_done"]
    assert res.executed == ["s0", "s1", "s2", "s3"]


def test_max_batch_bounds_each_call_and_one_turns_batching_off(toy):
    engine = toy(max_batch=3)
    engine.run(doc(scales(7)), outputs=[f"s{i}" for i in range(7)])
    assert [ids for _, ids in engine.nodes["Scale"].calls] == [("s0", "s1", "s2"), ("s3", "s4", "s5"), ("s6",)]
    assert [kind for kind, _ in engine.nodes["Scale"].calls] == ["batch", "batch", "run"]  # a group of one runs alone
    for off in (0, 1):
        engine = toy(max_batch=off)
        res = engine.run(doc(scales(3)), outputs=["s0", "s1", "s2"])
        assert engine.nodes["Scale"].calls == [("run", ("s0",)), ("run", ("s1",)), ("run", ("s2",))]
        assert not [e for e in res.events if e.kind == "node_batch"]


def test_different_keys_do_not_batch_together(toy):
    engine = toy()
    nodes = scales(4, {1: {"group": "b"}, 3: {"group": "b"}})
    engine.run(doc(nodes), outputs=list(nodes))
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s2")), ("batch", ("s1", "s3"))]


def test_a_failing_item_fails_alone(toy):
    engine = toy()
    nodes = {**scales(3, {1: {"fail": True}}), "after": {"type": "Plus", "inputs": {"a": "@s1.value"}}}
    res = engine.run(doc(nodes), outputs=["s0", "s2", "after"])
    assert res.status == "failed"
    [failure] = res.errors
    assert (failure.node_id, failure.skipped) == ("s1", ("after",))
    assert "this one is bad" in failure.message
    assert res.outputs["s0"]["value"] == 0 and res.outputs["s2"]["value"] == 20
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s1", "s2")), ("run", ("s0",)), ("run", ("s1",)), ("run", ("s2",))]
    batch_events = [e for e in res.events if e.kind == "node_batch"]
    assert [bool(e.error) for e in batch_events] == [False, True] and "bad" in batch_events[1].error
    assert [e.node_id for e in res.events if e.kind == "node_start"] == ["s0", "s1", "s2"]  # started once each


def test_an_interrupted_batch_stops_the_run_without_running_its_items_again(toy):
    engine = toy()
    res = engine.run(doc(scales(3, {2: {"stop": True}})), outputs=["s0", "s1", "s2"])
    assert res.status == "interrupted"
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s1", "s2"))]
    assert res.executed == [] and not [e for e in res.events if e.kind == "node_done"]
    assert [e.kind for e in res.events][-2:] == ["interrupted", "run_done"]


def test_each_node_has_its_own_cache_entry(toy):
    engine = toy()
    nodes = scales(3)
    engine.run(doc(nodes), outputs=list(nodes))
    again = engine.run(doc(nodes), outputs=list(nodes))
    assert again.cached == ["s0", "s1", "s2"] and again.executed == []
    nodes["s1"]["inputs"]["x"] = 7
    changed = engine.run(doc(nodes), outputs=list(nodes))
    assert changed.executed == ["s1"] and changed.cached == ["s0", "s2"]
    assert changed.outputs["s1"]["value"] == 70
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s1", "s2")), ("run", ("s1",))]


def test_batches_form_in_waves_of_ready_nodes(toy):
    """Nodes that cannot batch run first; a batch waits until its members are all ready."""
    engine = toy()
    nodes = {
        "p0": {"type": "Plus", "inputs": {"a": 1}},
        "p1": {"type": "Plus", "inputs": {"a": 2}},
        "s0": {"type": "Scale", "inputs": {"x": "@p0.value"}},
        "s1": {"type": "Scale", "inputs": {"x": "@p1.value"}},
        "s2": {"type": "Scale", "inputs": {"x": 5}},
    }
    res = engine.run(doc(nodes), outputs=["s0", "s1", "s2"])
    assert engine.nodes["Scale"].calls == [("batch", ("s0", "s1", "s2"))]
    assert res.executed == ["p0", "p1", "s0", "s1", "s2"]
    assert [res.outputs[n]["value"] for n in ("s0", "s1", "s2")] == [20, 30, 50]


def test_hooks_see_every_node_of_a_batch(toy, tmp_path):
    folder = tmp_path / "plugins"
    (folder / "watch.py").write_text(
        textwrap.dedent(
            """
            from graphsd import hookimpl

            SEEN = []

            @hookimpl
            def graphsd_before_node(node_id, node_type, inputs):
                SEEN.append(("before", node_id))

            @hookimpl
            def graphsd_after_node(node_id, node_type, outputs, duration_s):
                SEEN.append(("after", node_id, outputs["value"]))
            """
        )
    )
    engine = toy()
    engine.run(doc(scales(2)), outputs=["s0", "s1"])
    [watch] = [p for p in engine.pm.get_plugins() if getattr(p, "SEEN", None) is not None]
    assert watch.SEEN == [("before", "s0"), ("before", "s1"), ("after", "s0", 0), ("after", "s1", 10)]


# ---- denoise branches on a tiny SD model (float64, so rounding is the only difference) -------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    return root


def grid(branches, sampler="euler", steps=3, img2img=False):
    """One branch per (prompt, seed): TextEncode → LatentNoise → UNetDenoiseLoop → VAEDecode;
    with ``img2img``, each branch runs image-to-image (denoise 0.4) from its own text-to-image latent of 2 steps."""
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "blurry"}},
    }
    for i, (prompt, seed) in enumerate(branches):
        nodes[f"pos{i}"] = {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": prompt}}
        nodes[f"noise{i}"] = {"type": "LatentNoise", "inputs": {"seed": seed, "width": 64, "height": 64}}
        nodes[f"denoise{i}"] = {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@model.unet",
                "positive": f"@pos{i}.cond",
                "negative": "@neg.cond",
                "noise": f"@noise{i}.noise",
                "steps": steps,
                "cfg": 6.0,
                "sampler": sampler,
            },
        }
        nodes[f"image{i}"] = {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": f"@denoise{i}.latent"}}
        if img2img:  # the start: the branch's own text-to-image latent of 2 steps
            nodes[f"start{i}"] = {"type": "UNetDenoiseLoop", "inputs": {**nodes[f"denoise{i}"]["inputs"], "steps": 2}}
            nodes[f"denoise{i}"]["inputs"].update(latent=f"@start{i}.latent", denoise=0.4)
    return doc(nodes)


BRANCHES = [("a red circle", 1), ("a red circle", 2), ("a blue square on grey", 3), ("green", 4)]


def sd_engine(models, tmp_path, max_batch):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path / f"out{max_batch}"), max_batch=max_batch))


def assert_branches_equal(batched, alone, n):
    for i in range(n):
        assert_same(batched.outputs[f"denoise{i}"]["latent"].samples, alone.outputs[f"denoise{i}"]["latent"].samples, f"latent {i}")
        assert_same(batched.outputs[f"image{i}"]["image"].pixels, alone.outputs[f"image{i}"]["image"].pixels, f"image {i}")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_batched_grid_equals_each_branch_alone(models, tmp_path, sampler):
    """Ancestral and SDE samplers draw each branch's step noise from its own generators."""
    targets = [f"image{i}" for i in range(len(BRANCHES))]
    batched = sd_engine(models, tmp_path, 16).run(grid(BRANCHES, sampler), outputs=targets)
    alone = sd_engine(models, tmp_path, 1).run(grid(BRANCHES, sampler), outputs=targets)
    assert batched.ok and alone.ok
    assert_branches_equal(batched, alone, len(BRANCHES))
    groups = {e.node_type: e.node_ids for e in batched.events if e.kind == "node_batch"}
    assert groups == {
        "UNetDenoiseLoop": ("denoise0", "denoise1", "denoise2", "denoise3"),
        "VAEDecode": ("image0", "image1", "image2", "image3"),
    }
    assert not [e for e in alone.events if e.kind == "node_batch"]
    # the branches differ from each other (a batch that mixed them up could not pass the check above, but make sure)
    latents = [batched.outputs[f"denoise{i}"]["latent"].samples for i in range(len(BRANCHES))]
    assert all(not torch.equal(latents[0], other) for other in latents[1:])


@pytest.mark.slow
def test_batched_image_to_image_equals_each_branch_alone(models, tmp_path):
    targets = [f"image{i}" for i in range(3)]
    batched = sd_engine(models, tmp_path, 16).run(grid(BRANCHES[:3], img2img=True), outputs=targets)
    alone = sd_engine(models, tmp_path, 1).run(grid(BRANCHES[:3], img2img=True), outputs=targets)
    assert batched.ok and alone.ok
    assert_branches_equal(batched, alone, 3)
    batches = [(e.node_type, e.node_ids) for e in batched.events if e.kind == "node_batch"]
    assert batches[:2] == [("UNetDenoiseLoop", ("start0", "start1", "start2")), ("UNetDenoiseLoop", ("denoise0", "denoise1", "denoise2"))]


@pytest.mark.slow
def test_a_changed_seed_reruns_that_branch_alone_and_equals_its_unbatched_run(models, tmp_path):
    engine = sd_engine(models, tmp_path, 16)
    targets = [f"image{i}" for i in range(3)]
    engine.run(grid(BRANCHES[:3]), outputs=targets)
    changed = [BRANCHES[0], (BRANCHES[1][0], 99), BRANCHES[2]]
    res = engine.run(grid(changed), outputs=targets)
    assert res.executed == ["noise1", "denoise1", "image1"]
    assert not [e for e in res.events if e.kind == "node_batch"]
    alone = sd_engine(models, tmp_path, 1).run(grid(changed), outputs=targets)
    assert_same(res.outputs["denoise1"]["latent"].samples, alone.outputs["denoise1"]["latent"].samples, "latent 1")
    for i in range(3):  # the other branches' images come from the cache, made in a batch
        assert_same(res.outputs[f"image{i}"]["image"].pixels, alone.outputs[f"image{i}"]["image"].pixels, f"image {i}")


@pytest.mark.slow
def test_branches_that_differ_in_settings_or_shape_do_not_batch(models, tmp_path):
    doc_ = grid(BRANCHES[:3])
    doc_["nodes"]["denoise1"]["inputs"]["cfg"] = 3.0  # another setting
    doc_["nodes"]["noise2"]["inputs"]["width"] = 48  # another latent shape
    res = sd_engine(models, tmp_path, 16).run(doc_, outputs=["image0", "image1", "image2"])
    assert res.ok
    batches = [(e.node_type, e.node_ids) for e in res.events if e.kind == "node_batch"]
    assert batches == [("VAEDecode", ("image0", "image1"))]  # their latents have one shape; image2's has another
