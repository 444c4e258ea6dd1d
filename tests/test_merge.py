"""Model merging (ModelMergeSimple / Blocks / Subtract / Add, CLIPMergeSimple / Subtract / Add) on
tiny SD1 checkpoints saved as diffusers folders: the merged weights are ComfyUI's formulas computed
here in float64 from the two models as diffusers loads them; merges are patches (model1 unchanged
after use, branches with and without a merge, a model merged with itself); ComfyUI prompts naming
the classes run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import sd_tiny
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from reference import assert_same
from transformers import CLIPTextModel

from graphsd import Engine, Settings
from graphsd.memory import ModelManager
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.nodes.merge import MergePatch
from graphsd.types import UNet

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def save_sd1(folder: Path, seed: int) -> Path:
    """A tiny SD1 model whose U-Net, text encoder and VAE are drawn from ``seed``."""
    pipe = StableDiffusionPipeline(
        vae=sd_tiny.vae(seed),
        text_encoder=sd_tiny.text_encoder(seed=seed),
        tokenizer=sd_tiny.tokenizer(),
        unet=sd_tiny.unet(seed),
        scheduler=PNDMScheduler(**sd_tiny.SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return sd_tiny.save_pipeline(pipe, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_sd1(root / "a", 1)
    save_sd1(root / "b", 2)
    save_sd1(root / "c", 3)
    sd_tiny.save_sdxl_base(root / "xl")
    return root


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out"))))


def weights(models: Path, name: str, part: str = "unet") -> dict[str, torch.Tensor]:
    """Parameters of a model's U-Net or text encoder as diffusers / transformers load them, float64."""
    cls = UNet2DConditionModel if part == "unet" else CLIPTextModel
    module = cls.from_pretrained(models / name / part, torch_dtype=torch.float64)
    return {n: p.detach() for n, p in module.named_parameters()}


def loaders(*names: str) -> dict:
    return {n: {"type": "CheckpointLoader", "inputs": {"path": n, "dtype": "fp64"}} for n in names}


def merged(engine: Engine, nodes: dict, node: str, output: str = "model", role: str = "unet") -> dict[str, torch.Tensor]:
    """The weights the merged handle of ``node`` has while a node uses it."""
    result = engine.run({"version": 1, "nodes": nodes}, outputs=[node])
    assert result.ok, [str(e) for e in result.errors]
    handle = result.outputs[node][output]
    with engine.models.use(handle, role) as module:
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_weights(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for name, w in expected.items():
        assert_same(ours[name], w, name)


# ---- formulas ----------------------------------------------------------------------------------
def test_merge_patch_blends_shared_parameters_keeps_the_others_and_restores_exactly():
    torch.manual_seed(0)
    one = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    two = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5)).double()  # [1] has another shape
    manager = ModelManager()
    first, second = UNet(manager, {"unet": manager.add("one", one)}), UNet(manager, {"unet": manager.add("two", two)})
    w1 = {n: p.detach().clone() for n, p in one.named_parameters()}
    w2 = {n: p.detach().clone() for n, p in two.named_parameters()}
    handle = first.with_patches(MergePatch(second, (0.3, 0.7), "test"))
    with manager.use(handle, "unet") as module:
        ours = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert_weights(ours, {n: 0.3 * w + 0.7 * w2[n] if n.startswith("0.") else w for n, w in w1.items()})
    assert all(torch.equal(p, w1[n]) for n, p in one.named_parameters())
    assert all(torch.equal(p, w2[n]) for n, p in two.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("node", "inputs", "formula"),
    [
        ("ModelMergeSimple", {"ratio": 0.3}, lambda w1, w2: 0.3 * w1 + 0.7 * w2),  # ratio = model1's share
        ("ModelMergeSimple", {"ratio": 1.0}, lambda w1, w2: w1),
        ("ModelMergeSubtract", {"multiplier": 1.5}, lambda w1, w2: 1.5 * w1 - 1.5 * w2),
        ("ModelMergeSubtract", {"multiplier": -2.0}, lambda w1, w2: -2.0 * w1 + 2.0 * w2),
        ("ModelMergeAdd", {}, lambda w1, w2: w1 + w2),
    ],
)
def test_unet_merges_follow_comfyuis_formulas(engine, models, node, inputs, formula):
    nodes = {**loaders("a", "b"), "m": {"type": node, "inputs": {"model1": "@a.unet", "model2": "@b.unet", **inputs}}}
    w1, w2 = weights(models, "a"), weights(models, "b")
    assert_weights(merged(engine, nodes, "m"), {n: formula(w1[n], w2[n]) for n in w1})


def block_of(name: str) -> str:
    """The ModelMergeBlocks ratio a diffusers U-Net parameter takes: its place in the original LDM
    U-Net (input_blocks = conv_in + down blocks, middle_block, output_blocks + final layers);
    the time embedding is outside the three lists and takes input's ratio."""
    if name.startswith(("conv_in.", "down_blocks.", "time_embedding.")):
        return "input"
    if name.startswith("mid_block."):
        return "middle"
    assert name.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")), name
    return "out"


@pytest.mark.slow
def test_block_merge_takes_each_blocks_ratio(engine, models):
    ratios = {"input": 0.2, "middle": 0.5, "out": 0.9}
    nodes = {**loaders("a", "b"), "m": {"type": "ModelMergeBlocks", "inputs": {"model1": "@a.unet", "model2": "@b.unet", **ratios}}}
    w1, w2 = weights(models, "a"), weights(models, "b")
    expected = {n: ratios[block_of(n)] * w1[n] + (1 - ratios[block_of(n)]) * w2[n] for n in w1}
    assert {block_of(n) for n in w1} == set(ratios)
    assert_weights(merged(engine, nodes, "m"), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("node", "inputs", "formula"),
    [
        ("CLIPMergeSimple", {"ratio": 0.25}, lambda w1, w2: 0.25 * w1 + 0.75 * w2),
        ("CLIPMergeSubtract", {"multiplier": 0.5}, lambda w1, w2: 0.5 * w1 - 0.5 * w2),
        ("CLIPMergeAdd", {}, lambda w1, w2: w1 + w2),
    ],
)
def test_clip_merges_follow_comfyuis_formulas(engine, models, node, inputs, formula):
    nodes = {**loaders("a", "b"), "m": {"type": node, "inputs": {"clip1": "@a.clip", "clip2": "@b.clip", **inputs}}}
    w1, w2 = weights(models, "a", "text_encoder"), weights(models, "b", "text_encoder")
    ours = merged(engine, nodes, "m", "clip", "text_encoder")
    assert_weights(ours, {n: formula(w1[n], w2[n]) for n in w1})


@pytest.mark.slow
def test_add_difference_merge_chains_and_model2s_own_patches_are_merged_in(engine, models):
    """The classic 'add difference': c + (a - b), with the difference itself a merged handle."""
    nodes = {
        **loaders("a", "b", "c"),
        "diff": {"type": "ModelMergeSubtract", "inputs": {"model1": "@a.unet", "model2": "@b.unet", "multiplier": 1.0}},
        "m": {"type": "ModelMergeAdd", "inputs": {"model1": "@c.unet", "model2": "@diff.model"}},
    }
    wa, wb, wc = weights(models, "a"), weights(models, "b"), weights(models, "c")
    assert_weights(merged(engine, nodes, "m"), {n: wc[n] + (wa[n] - wb[n]) for n in wa})


@pytest.mark.slow
def test_a_merge_saved_with_checkpoint_save_loads_back_merged(engine, models):
    """ComfyUI's merge-and-save: the saved checkpoint holds the merged weights."""
    nodes = {
        **loaders("a", "b"),
        "m": {"type": "ModelMergeSimple", "inputs": {"model1": "@a.unet", "model2": "@b.unet", "ratio": 0.4}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@m.model", "clip": "@a.clip", "vae": "@a.vae", "filename": "merged"}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["save"])
    assert result.ok, [str(e) for e in result.errors]
    saved = {"back": {"type": "CheckpointLoader", "inputs": {"path": result.outputs["save"]["path"], "dtype": "fp64"}}}
    w1, w2 = weights(models, "a"), weights(models, "b")
    back = engine.run({"version": 1, "nodes": saved}, outputs=["back"]).outputs["back"]["unet"]
    ours = {n: p.detach() for n, p in engine.models.get(back.keys["unet"]).named_parameters()}
    assert_weights(ours, {n: 0.4 * w1[n] + 0.6 * w2[n] for n in w1})


# ---- patches: shared weights stay intact -------------------------------------------------------
@pytest.mark.slow
def test_model1_is_restored_after_use_and_unmerged_branches_see_it_unchanged(engine, models):
    nodes = {**loaders("a", "b"), "m": {"type": "ModelMergeSimple", "inputs": {"model1": "@a.unet", "model2": "@b.unet", "ratio": 0.5}}}
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["m", "a", "b"])
    plain, other, mixed = result.outputs["a"]["unet"], result.outputs["b"]["unet"], result.outputs["m"]["model"]
    before = {n: p.clone() for n, p in engine.models.get(plain.keys["unet"]).named_parameters()}
    with engine.models.use(mixed, "unet") as module:
        assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())
    for n, p in engine.models.get(plain.keys["unet"]).named_parameters():
        assert torch.equal(p, before[n]), n  # bit for bit
    with engine.models.use(plain, "unet") as module:
        assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert_weights(
        {n: p.detach() for n, p in engine.models.get(other.keys["unet"]).named_parameters()}, weights(models, "b")
    )  # model2 untouched too


@pytest.mark.slow
def test_a_model_merged_with_itself_reads_a_copy(engine, models):
    nodes = {**loaders("a"), "m": {"type": "ModelMergeAdd", "inputs": {"model1": "@a.unet", "model2": "@a.unet"}}}
    w = weights(models, "a")
    assert_weights(merged(engine, nodes, "m"), {n: 2 * w[n] for n in w})
    assert_weights(merged(engine, nodes, "m"), {n: 2 * w[n] for n in w})  # and again: the original was restored


@pytest.mark.slow
def test_models_of_different_families_are_refused_with_the_field(engine):
    nodes = {
        "a": {"type": "CheckpointLoader", "inputs": {"path": "a"}},
        "xl": {"type": "CheckpointLoader", "inputs": {"path": "xl"}},
        "m": {"type": "ModelMergeSimple", "inputs": {"model1": "@a.unet", "model2": "@xl.unet", "ratio": 0.5}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["m"])
    assert not result.ok
    (failure,) = result.errors
    assert failure.node_id == "m" and failure.message.startswith("input 'model2':")
    assert "sd1" in failure.message and "sdxl" in failure.message


# ---- ComfyUI prompts ---------------------------------------------------------------------------
def comfy_prompt() -> dict:
    prompt = json.loads((WORKFLOWS / "comfy_txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "graphsd-tiny"
    prompt["5"]["inputs"].update(width=64, height=64, batch_size=1)
    prompt["3"]["inputs"].update(steps=2, seed=5)
    return prompt


def test_merge_classes_import_as_native_nodes_with_comfyuis_links():
    prompt = comfy_prompt()
    prompt["20"] = {
        "class_type": "ModelMergeBlocks",
        "inputs": {"model1": ["4", 0], "model2": ["4", 0], "input": 0.5, "middle": 1.0, "out": 0.0},
    }
    prompt["21"] = {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["4", 1], "clip2": ["4", 1], "ratio": 0.5}}
    prompt["3"]["inputs"]["model"] = ["20", 0]
    prompt["6"]["inputs"]["clip"] = ["21", 0]
    nodes = comfy_to_workflow(prompt, Engine(Settings(device="cpu")).registry.nodes)["nodes"]
    assert nodes["20"] == {
        "type": "ModelMergeBlocks",
        "inputs": {"model1": "@4.unet", "model2": "@4.unet", "input": 0.5, "middle": 1.0, "out": 0.0},
    }
    assert nodes["3"]["inputs"]["unet"] == "@20.model" and nodes["6"]["inputs"]["clip"] == "@21.clip"


@pytest.mark.slow
def test_a_comfy_prompt_merging_a_checkpoint_with_itself_at_half_gives_the_same_image(tmp_path):
    """0.5·w + 0.5·w is w exactly (scaling by a power of two and adding equal numbers round to
    nothing), so the merged model's image equals the plain one's, pixel for pixel."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    plain = comfy_prompt()
    merged_prompt = copy.deepcopy(plain)
    merged_prompt["20"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["4", 0], "ratio": 0.5}}
    merged_prompt["21"] = {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["4", 1], "clip2": ["4", 1], "ratio": 0.5}}
    merged_prompt["3"]["inputs"]["model"] = ["20", 0]
    merged_prompt["6"]["inputs"]["clip"] = ["21", 0]
    images = []
    for prompt in (plain, merged_prompt):
        result = engine.run(prompt, outputs=["8"])
        assert result.ok, [str(e) for e in result.errors]
        images.append(result.outputs["8"]["image"].pixels)
    assert torch.equal(images[0], images[1])
