"""Conditioning operations with ComfyUI's names (ConditioningZeroOut, ConditioningAverage,
ConditioningConcat, ConditioningCombine, ConditioningSetArea, ConditioningSetAreaPercentage,
ConditioningSetAreaStrength, ConditioningSetMask) and how the denoise loops evaluate several
conditionings per side.

The nodes are checked against ComfyUI's formulas written here; the loops against ComfyUI's
``calc_cond_batch`` rules written here as a plain loop over the conditionings (each evaluated
alone on its area, weighted by strength × ramp or by its mask, averaged per cell, the negative
side given the positive area as ComfyUI's ``create_cond_with_same_area_if_none`` does), around
diffusers' Euler scheduler (diffusers convention) or Euler on ComfyUI's sigmas (comfyui
convention), on a tiny random SD model in float64 (``reference.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sd_tiny
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image as PILImage
from reference import assert_same

from graphsd import Engine, Settings
from graphsd.server.objectinfo import native_entry
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.nodes.conditioning import (
    ConditioningAverage,
    ConditioningCombine,
    ConditioningConcat,
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    ConditioningZeroOut,
)
from graphsd.std.sampling.sigmas import SigmaTable, comfy_sigmas
from graphsd.types import Area, Conditioning, Mask

SEED = 11
SIZE = 128  # 16 × 16 latent cells: room for areas with ramps


def cond(tokens=5, width=8, seed=0, pooled=True, **fields):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        torch.randn(1, tokens, width, generator=g), torch.randn(1, width, generator=g) if pooled else None, {"k": seed}, **fields
    )


def apply(node, **inputs):
    return node().run(node.Inputs(**inputs), None).conditioning


# ---- the nodes ---------------------------------------------------------------------------------
def test_zero_out_zeroes_embeddings_and_pooled_and_keeps_the_rest():
    c = cond(area=Area(2, 3, 1, 1), strength=0.5)
    out = apply(ConditioningZeroOut, conditioning=Conditioning.of_entries([c, cond(seed=1, pooled=False)]))
    first, second = out.entries()
    assert torch.equal(first.embeddings, torch.zeros(1, 5, 8)) and torch.equal(first.pooled, torch.zeros(1, 8))
    assert (first.area, first.strength, first.extras) == (c.area, 0.5, {"k": 0})
    assert second.pooled is None and not second.embeddings.any()


@pytest.mark.parametrize("tokens", [3, 5, 9])
def test_average_blends_with_the_first_entry_of_from_cut_or_zero_padded(tokens):
    to, source = cond(tokens=tokens, seed=1, strength=2.0), cond(tokens=5, seed=2)
    out = apply(ConditioningAverage, conditioning_to=to, conditioning_from=Conditioning.of_entries([source, cond(seed=3)]),
                conditioning_to_strength=0.25)
    padded = torch.zeros(1, tokens, 8)
    padded[:, : min(tokens, 5)] = source.embeddings[:, :tokens]
    assert torch.equal(out.embeddings, to.embeddings * 0.25 + padded * 0.75)
    assert torch.equal(out.pooled, to.pooled * 0.25 + source.pooled * 0.75)
    assert out.strength == 2.0 and out.extras == {"k": 1}


def test_average_pooled_follows_comfyui_when_one_side_has_none():
    with_pooled, without = cond(seed=1), cond(seed=2, pooled=False)
    kept = apply(ConditioningAverage, conditioning_to=with_pooled, conditioning_from=without, conditioning_to_strength=0.25)
    assert kept.pooled is with_pooled.pooled
    taken = apply(ConditioningAverage, conditioning_to=without, conditioning_from=with_pooled, conditioning_to_strength=0.25)
    assert torch.equal(taken.pooled, with_pooled.pooled * 0.25 + with_pooled.pooled * 0.75)


def test_concat_appends_the_tokens_of_from_to_each_entry():
    a, b, source = cond(tokens=3, seed=1), cond(tokens=4, seed=2, strength=0.5), cond(tokens=5, seed=3)
    out = apply(ConditioningConcat, conditioning_to=Conditioning.of_entries([a, b]), conditioning_from=source)
    first, second = out.entries()
    assert torch.equal(first.embeddings, torch.cat([a.embeddings, source.embeddings], dim=1))
    assert torch.equal(second.embeddings, torch.cat([b.embeddings, source.embeddings], dim=1))
    assert first.pooled is a.pooled and second.strength == 0.5


def test_concat_of_different_text_encoders_is_refused_with_the_field():
    from graphsd.errors import NodeError

    with pytest.raises(NodeError) as err:
        apply(ConditioningConcat, conditioning_to=cond(width=8), conditioning_from=cond(width=16))
    assert err.value.field == "conditioning_from"


def test_combine_lists_the_entries_of_both_in_order():
    a, b, c = cond(seed=1), cond(seed=2), cond(seed=3)
    out = apply(ConditioningCombine, conditioning_1=a, conditioning_2=apply(ConditioningCombine, conditioning_1=b, conditioning_2=c))
    assert [e.extras["k"] for e in out.entries()] == [1, 2, 3]
    assert out.embeddings is a.embeddings  # read as a plain conditioning, it is the first entry
    assert a.entries() == [a]


def test_set_area_divides_pixels_by_8_and_sets_every_entry():
    two = Conditioning.of_entries([cond(seed=1, mask_bounds=True), cond(seed=2)])
    out = apply(ConditioningSetArea, conditioning=two, width=100, height=64, x=20, y=8, strength=1.5)
    for e in out.entries():
        assert (e.area, e.strength, e.mask_bounds) == (Area(8, 12, 1, 2), 1.5, False)
    relative = apply(ConditioningSetAreaPercentage, conditioning=two, width=0.5, height=0.25, x=0.5, y=0.1, strength=0.7)
    assert {(e.area, e.strength) for e in relative.entries()} == {(Area(0.25, 0.5, 0.1, 0.5, relative=True), 0.7)}
    weaker = apply(ConditioningSetAreaStrength, conditioning=out, strength=0.2).entries()
    assert [(e.area, e.strength, e.embeddings) for e in weaker] == [(e.area, 0.2, e.embeddings) for e in out.entries()]


def test_set_mask_sets_mask_strength_and_bounds():
    mask = torch.rand(1, 16, 16)
    out = apply(ConditioningSetMask, conditioning=cond(strength=0.5), mask=Mask(mask), strength=0.8, set_cond_area="mask bounds")
    assert (out.mask is mask, out.mask_strength, out.mask_bounds, out.strength) == (True, 0.8, True, 0.5)


# ---- the loops: ComfyUI's rules, written here --------------------------------------------------
def ramp(size, offset, full):
    """ComfyUI's weights along one side of an area: 1, ramped down as (t + 1) / n over the n =
    min(8, size // 4) outer cells of an edge inside the latent."""
    n = min(8, size // 4)
    w = torch.ones(size, dtype=torch.float64)
    for t in range(n):
        if offset != 0:
            w[t] *= (t + 1) / n
        if offset + size < full:
            w[size - 1 - t] *= (t + 1) / n
    return w


def predict(unet, model_input, t, entries, finish=lambda out, cells: out):
    """One side's prediction: the U-Net on each (context, area, weight)'s crop of ``model_input``
    alone, its output (through ``finish``) averaged per cell with the weights,
    ``Σ w p / (1e-37 + Σ w)``."""
    total, count = torch.zeros_like(model_input), torch.full_like(model_input, 1e-37)
    for context, area, weight in entries:
        h, w, y, x = area or (model_input.shape[2], model_input.shape[3], 0, 0)
        cells = (slice(None), slice(None), slice(y, y + h), slice(x, x + w))
        with torch.no_grad():
            out = finish(unet(model_input[cells], t, encoder_hidden_states=context).sample, cells)
        total[cells] += out * weight
        count[cells] += weight
    return total / count


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd_tiny.save_sd1(tmp_path_factory.mktemp("models") / "sd1").parent


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out"))))


@pytest.fixture(scope="module")
def mask_picture(tmp_path_factory):
    """A picture whose alpha is random, so LoadImage's mask is soft everywhere."""
    rgba = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    path = tmp_path_factory.mktemp("in") / "mask.png"
    PILImage.fromarray(rgba, "RGBA").save(path)
    return str(path)


@pytest.fixture(scope="module")
def unet(models):
    return UNet2DConditionModel.from_pretrained(models / "sd1" / "unet").to(torch.float64).eval()


def scenario(mask_picture, convention, sampler="euler", schedule="normal"):
    """positive = area A (width 96, height 64 at x 32, y 16: 8 × 12 cells at row 2, column 4,
    strength 0.8) + B + C masked (strength 0.5); negative = N."""
    text = {"a": "a red circle", "b": "a blue square", "c": "green", "n": "blurry"}
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        **{k: {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": v}} for k, v in text.items()},
        "load": {"type": "LoadImage", "inputs": {"path": mask_picture}},
        "area": {"type": "ConditioningSetArea", "inputs": {"conditioning": "@a.cond", "width": 96, "height": 64, "x": 32, "y": 16,
                                                           "strength": 0.8}},
        "masked": {"type": "ConditioningSetMask", "inputs": {"conditioning": "@c.cond", "mask": "@load.mask", "strength": 0.5}},
        "ab": {"type": "ConditioningCombine", "inputs": {"conditioning_1": "@area.conditioning", "conditioning_2": "@b.cond"}},
        "abc": {"type": "ConditioningCombine", "inputs": {"conditioning_1": "@ab.conditioning", "conditioning_2": "@masked.conditioning"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": SIZE, "height": SIZE}},
        "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": "@model.unet", "positive": "@abc.conditioning", "negative": "@n.cond",
                                                          "noise": "@noise.noise", "steps": 3, "cfg": 5.0, "sampler": sampler,
                                                          "schedule": schedule, "convention": convention}},
    }
    return nodes


def reference_sides(out):
    """The conditionings of each side as ComfyUI evaluates them: (context, area, weight)."""
    emb = {k: out[k]["cond"].embeddings for k in "abcn"}
    area = (8, 12, 2, 4)
    a_weight = 0.8 * ramp(8, 2, 16)[:, None] * ramp(12, 4, 16)[None, :]  # the right edge lies on the border: no ramp there
    mask = F.interpolate(out["load"]["mask"].values[:, None], size=(16, 16), mode="bilinear")[:, 0].double()
    positive = [(emb["a"], area, a_weight), (emb["b"], None, 1.0), (emb["c"], None, mask * 0.5)]
    negative = [(emb["n"], None, 1.0), (emb["n"], area, a_weight)]  # the negative evaluated on A's area too
    return negative, positive


@pytest.mark.slow
def test_diffusers_convention_averages_combined_areas_and_masks_as_comfyui(engine, mask_picture, unet, models):
    out = engine.run({"version": 1, "nodes": scenario(mask_picture, "diffusers")}, outputs=["denoise", "noise", "load", "a", "b", "c", "n"])
    assert out.ok, [str(e) for e in out.errors]
    out = out.outputs
    negative, positive = reference_sides(out)
    scheduler = EulerDiscreteScheduler.from_pretrained(models / "sd1" / "scheduler")
    scheduler.set_timesteps(3)
    x = out["noise"]["noise"].samples.double() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        uncond, cond_ = predict(unet, x_in, t, negative), predict(unet, x_in, t, positive)
        x = scheduler.step(uncond + 5.0 * (cond_ - uncond), t, x).prev_sample
    assert_same(out["denoise"]["latent"].samples, x)


@pytest.mark.slow
def test_comfyui_convention_averages_denoised_estimates_of_combined_areas_and_masks(engine, mask_picture, unet, models):
    out = engine.run({"version": 1, "nodes": scenario(mask_picture, "comfyui", schedule="karras")},
                     outputs=["denoise", "noise", "load", "a", "b", "c", "n"])
    assert out.ok, [str(e) for e in out.errors]
    out = out.outputs
    negative, positive = reference_sides(out)
    table = SigmaTable(dict(EulerDiscreteScheduler.load_config(models / "sd1" / "scheduler")))
    sigmas = comfy_sigmas(table, "karras", 3).tolist()
    x = out["noise"]["noise"].samples.double() * math.sqrt(1 + sigmas[0] ** 2)
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        c_in, t = 1 / math.sqrt(s * s + 1), table.timestep(s)

        def denoised(eps, cells, x=x, s=s):
            return x[cells] - eps * s

        uncond, cond_ = (predict(unet, x * c_in, t, side, denoised) for side in (negative, positive))
        d = uncond + 5.0 * (cond_ - uncond)
        x = x + (x - d) / s * (s_next - s)
    assert_same(out["denoise"]["latent"].samples, x)


@pytest.mark.slow
def test_an_area_outside_the_picture_is_refused_with_the_side(engine):
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "p": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "x"}},
        "area": {"type": "ConditioningSetArea", "inputs": {"conditioning": "@p.cond", "width": 64, "height": 64, "x": 512, "y": 0}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": 1, "width": 64, "height": 64}},
        "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": "@model.unet", "positive": "@area.conditioning", "noise": "@noise.noise",
                                                          "steps": 1}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["denoise"])
    (error,) = result.errors
    assert error.node_id == "denoise" and "positive" in error.message and "outside" in error.message


# ---- ComfyUI prompts ---------------------------------------------------------------------------
def regional_prompt():
    """A ComfyUI regional prompt on graphsd-tiny, wired as users wire them: a black background
    asked for on the left half (ConditioningSetArea, pixels), a white one on the right half
    (ConditioningSetAreaPercentage), combined; the negative a zeroed prompt put through
    ConditioningAverage (strength 1: itself), ConditioningConcat and ConditioningSetAreaStrength."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle on a black background"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle on a white background"}},
        "10": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 128, "x": 0, "y": 0,
                                                               "strength": 1.0}},
        "11": {"class_type": "ConditioningSetAreaPercentage", "inputs": {"conditioning": ["7", 0], "width": 0.5, "height": 1.0,
                                                                         "x": 0.5, "y": 0.0, "strength": 1.0}},
        "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["10", 0], "conditioning_2": ["11", 0]}},
        "13": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "14": {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": ["13", 0], "conditioning_from": ["7", 0],
                                                               "conditioning_to_strength": 1.0}},
        "15": {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["14", 0], "conditioning_from": ["13", 0]}},
        "16": {"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["15", 0], "strength": 1.0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["12", 0], "negative": ["16", 0],
                                                   "latent_image": ["5", 0], "seed": 2, "steps": 10, "cfg": 7.5, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "regions"}},
    }


def test_conditioning_prompts_import_onto_the_native_nodes():
    prompt = regional_prompt()
    prompt["17"] = {"class_type": "ConditioningSetMask", "inputs": {"conditioning": ["6", 0], "mask": ["18", 1], "strength": 0.5,
                                                                    "set_cond_area": "mask bounds"}}
    prompt["18"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    nodes = comfy_to_workflow(prompt, Engine(Settings(device="cpu")).registry.nodes)["nodes"]
    assert [nodes[i]["type"] for i in ("10", "11", "12", "13", "14", "15", "16", "17")] == [
        "ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningCombine", "ConditioningZeroOut", "ConditioningAverage",
        "ConditioningConcat", "ConditioningSetAreaStrength", "ConditioningSetMask",
    ]
    assert nodes["12"]["inputs"] == {"conditioning_1": "@10.conditioning", "conditioning_2": "@11.conditioning"}
    assert nodes["17"]["inputs"]["mask"] == "@18.mask" and nodes["17"]["inputs"]["set_cond_area"] == "mask bounds"
    assert nodes["3"]["inputs"]["positive"] == "@12.conditioning" and nodes["3"]["inputs"]["negative"] == "@16.conditioning"


@pytest.mark.slow
def test_regional_prompt_runs_and_each_half_follows_its_prompt(tmp_path):
    """The left half's conditioning asks for a black background, the right half's for a white
    one: the picture's left half comes out darker than its right half."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    result = engine.run(regional_prompt(), outputs=["8", "9"])
    assert result.ok, [str(e) for e in result.errors]
    assert len(result.files) == 1
    pixels = result.outputs["8"]["image"].pixels[0]
    assert pixels[:, :64].mean() < pixels[:, 64:].mean()


def test_object_info_lists_them_with_comfyuis_inputs_ranges_and_types():
    engine = Engine(Settings(device="cpu"))
    types: dict[str, str] = {}
    for found in engine.pm.hook.graphsd_comfy_types():
        types.update(found)
    area = native_entry(ConditioningSetArea, "ConditioningSetArea", "x", types)
    assert area["input_order"]["required"] == ["conditioning", "width", "height", "x", "y", "strength"]
    assert area["input"]["required"]["conditioning"][0] == "CONDITIONING" and area["output"] == ["CONDITIONING"]
    width, strength = area["input"]["required"]["width"], area["input"]["required"]["strength"]
    assert width[0] == "INT" and (width[1]["default"], width[1]["min"], width[1]["max"]) == (64, 64, 16384)
    assert strength[0] == "FLOAT" and (strength[1]["default"], strength[1]["min"], strength[1]["max"]) == (1.0, 0.0, 10.0)
    mask = native_entry(ConditioningSetMask, "ConditioningSetMask", "x", types)
    assert mask["input_order"]["required"] == ["conditioning", "mask", "strength", "set_cond_area"]
    assert mask["input"]["required"]["mask"][0] == "MASK" and mask["input"]["required"]["set_cond_area"][0] == ["default", "mask bounds"]
    average = native_entry(ConditioningAverage, "ConditioningAverage", "x", types)
    assert average["input_order"]["required"] == ["conditioning_to", "conditioning_from", "conditioning_to_strength"]
