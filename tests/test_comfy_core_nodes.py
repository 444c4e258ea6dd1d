"""ComfyUI core nodes graphsd imports (PreviewImage, CLIPSetLastLayer, LatentUpscale,
LatentUpscaleBy): the import makes the expected graphsd nodes, the nodes compute what ComfyUI
documents (checked against torch's interpolate and formulas written here), and prompts using them
run on graphsd-tiny."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from reference import assert_same
from transformers import CLIPTextModel, CLIPTokenizer

from graphsd import Engine, Settings, WorkflowError
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.models.loading import builtin_models_dir
from graphsd.std.nodes.comfy_core import LatentUpscale, LatentUpscaleBy
from graphsd.types import Latent
from graphsd.workflow import PNG_WORKFLOW_KEY

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


def base_prompt() -> dict:
    """The example ComfyUI text-to-image prompt on graphsd-tiny at 64×64, 2 steps."""
    prompt = json.loads((WORKFLOWS / "comfy_txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "graphsd-tiny"
    prompt["5"]["inputs"].update(width=64, height=64, batch_size=1)
    prompt["3"]["inputs"].update(steps=2, seed=5)
    return prompt


def with_last_layer(prompt: dict, stop: int) -> dict:
    """``prompt`` with checkpoint → CLIPSetLastLayer → LoraLoader-free text encodes."""
    prompt = copy.deepcopy(prompt)
    prompt["20"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": stop}}
    for cid in ("6", "7"):
        prompt[cid]["inputs"]["clip"] = ["20", 0]
    return prompt


# ---- import ----------------------------------------------------------------------------------
def test_clip_set_last_layer_becomes_the_text_encodes_clip_skip():
    doc = comfy_to_workflow(with_last_layer(base_prompt(), -2))
    for cid in ("6", "7"):
        assert doc["nodes"][cid]["type"] == "TextEncode"
        assert doc["nodes"][cid]["inputs"]["clip"] == "@4.clip"
        assert doc["nodes"][cid]["inputs"]["clip_skip"] == 2
    assert "20" not in doc["nodes"]


def test_clip_set_last_layer_reaches_through_a_lora_and_the_nearest_one_wins():
    prompt = with_last_layer(base_prompt(), -3)
    prompt["21"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["20", 0], "lora_name": "x.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
    }
    prompt["22"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["21", 1], "stop_at_clip_layer": -2}}
    prompt["6"]["inputs"]["clip"] = ["21", 1]  # through the LoRA: -3
    prompt["7"]["inputs"]["clip"] = ["22", 0]  # the later setting: -2
    doc = comfy_to_workflow(prompt)
    assert doc["nodes"]["21"]["inputs"]["clip"] == "@4.clip"
    assert doc["nodes"]["6"]["inputs"]["clip_skip"] == 3
    assert (doc["nodes"]["7"]["inputs"]["clip"], doc["nodes"]["7"]["inputs"]["clip_skip"]) == ("@21.clip", 2)
    plain = comfy_to_workflow(base_prompt())
    assert "clip_skip" not in plain["nodes"]["6"]["inputs"]  # TextEncode's default: the last layer


@pytest.mark.parametrize("stop", [0, 1, -25])
def test_clip_set_last_layer_out_of_range_is_refused(stop):
    with pytest.raises(WorkflowError, match="stop_at_clip_layer"):
        comfy_to_workflow(with_last_layer(base_prompt(), stop))


def test_clip_set_last_layer_in_a_cycle_is_refused_not_looped():
    prompt = base_prompt()
    prompt["20"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["21", 0], "stop_at_clip_layer": -2}}
    prompt["21"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["20", 0], "stop_at_clip_layer": -1}}
    prompt["6"]["inputs"]["clip"] = ["20", 0]
    with pytest.raises(WorkflowError):
        comfy_to_workflow(prompt)


def test_preview_image_and_latent_upscales_import_onto_graphsd_nodes():
    prompt = base_prompt()
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    prompt["30"] = {
        "class_type": "LatentUpscale",
        "inputs": {"samples": ["3", 0], "upscale_method": "bicubic", "width": 96, "height": 0, "crop": "center"},
    }
    prompt["31"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["30", 0], "upscale_method": "area", "scale_by": 2.0}}
    nodes = comfy_to_workflow(prompt)["nodes"]
    assert nodes["9"] == {"type": "PreviewImage", "inputs": {"image": "@8.image"}}
    assert nodes["30"] == {
        "type": "LatentUpscale",
        "inputs": {"latent": "@3.latent", "method": "bicubic", "width": 96, "height": 0, "crop": "center"},
    }
    assert nodes["31"] == {"type": "LatentUpscaleBy", "inputs": {"latent": "@30.latent", "method": "area", "scale_by": 2.0}}


def test_a_prompt_whose_only_output_is_a_preview_is_accepted():
    prompt = base_prompt()
    prompt["9"]["class_type"], prompt["9"]["inputs"] = "PreviewImage", {"images": ["8", 0]}
    assert comfy_to_workflow(prompt)["nodes"]["9"]["type"] == "PreviewImage"


def test_bislerp_and_out_of_range_sizes_are_refused_with_the_field():
    prompt = base_prompt()
    prompt["30"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "bislerp", "scale_by": 9.0}}
    with pytest.raises(WorkflowError) as err:
        comfy_to_workflow(prompt)
    fields = {issue.field for issue in err.value.issues}
    assert {"upscale_method", "scale_by"} <= fields


# ---- node semantics ----------------------------------------------------------------------------
def latent(h: int, w: int, mask: bool = False) -> Latent:
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)
    return Latent(samples=samples, noise_mask=torch.rand(2, 1, h, w, generator=g, dtype=torch.float64) if mask else None)


def upscale(node: type, **inputs):
    return node().run(node.Inputs(**inputs), None).latent


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_latent_upscale_is_torch_interpolate_to_a_pixel_size_over_8(method):
    lat = latent(8, 8)
    out = upscale(LatentUpscale, latent=lat, method=method, width=128, height=96, crop="disabled")
    assert_same(out.samples, F.interpolate(lat.samples, size=(12, 16), mode=method))


def test_latent_upscale_center_crop_trims_the_longer_side_first():
    lat = latent(8, 12, mask=True)  # aspect 1.5 → 1: x = round((12 - 12 · (1 / 1.5)) / 2) = 2
    out = upscale(LatentUpscale, latent=lat, method="bilinear", width=64, height=64, crop="center")
    assert_same(out.samples, F.interpolate(lat.samples[..., :, 2:10], size=(8, 8), mode="bilinear"))
    assert_same(out.noise_mask, F.interpolate(lat.noise_mask[..., :, 2:10], size=(8, 8), mode="bilinear"))
    tall = latent(12, 8)  # aspect 2/3 → 1: y = round((12 - 12 · (2/3)) / 2) = 2
    out = upscale(LatentUpscale, latent=tall, method="nearest-exact", width=80, height=80, crop="center")
    assert_same(out.samples, F.interpolate(tall.samples[..., 2:10, :], size=(10, 10), mode="nearest-exact"))


def test_latent_upscale_zero_side_keeps_the_aspect_ratio_and_sizes_are_at_least_64_pixels():
    lat = latent(8, 16)
    assert upscale(LatentUpscale, latent=lat, method="area", width=256, height=0, crop="disabled").samples.shape[-2:] == (16, 32)
    assert upscale(LatentUpscale, latent=lat, method="area", width=0, height=128, crop="disabled").samples.shape[-2:] == (16, 32)
    assert upscale(LatentUpscale, latent=lat, method="area", width=0, height=0, crop="disabled").samples is lat.samples
    assert upscale(LatentUpscale, latent=lat, method="area", width=16, height=16, crop="disabled").samples.shape[-2:] == (8, 8)


def test_latent_upscale_by_rounds_each_side():
    lat = latent(8, 13)
    out = upscale(LatentUpscaleBy, latent=lat, method="bicubic", scale_by=1.5)  # 12 × round(19.5) = 20
    assert_same(out.samples, F.interpolate(lat.samples, size=(12, 20), mode="bicubic"))


# ---- end to end on graphsd-tiny ----------------------------------------------------------------
@pytest.fixture
def engine(tmp_path):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path / "out")))


@pytest.mark.slow
def test_preview_image_prompt_writes_into_the_output_temp_folder(engine, tmp_path):
    prompt = base_prompt()
    prompt["9"]["class_type"], prompt["9"]["inputs"] = "PreviewImage", {"images": ["8", 0]}
    prompt["5"]["inputs"]["batch_size"] = 2
    result = engine.run(prompt)
    assert result.ok, [str(e) for e in result.errors]
    temp = tmp_path / "out" / "temp"
    assert sorted(Path(f) for f in result.files) == [temp / "preview_00001.png", temp / "preview_00002.png"]
    with PILImage.open(temp / "preview_00001.png") as im:
        assert im.size == (64, 64)
        assert json.loads(im.text[PNG_WORKFLOW_KEY])["nodes"]["9"]["type"] == "PreviewImage"
    prompt["3"]["inputs"]["seed"] = 6
    assert engine.run(prompt).ok  # another picture adds files, never replaces
    assert len(list(temp.glob("preview_*.png"))) == 4


@pytest.mark.slow
def test_clip_set_last_layer_prompt_encodes_the_penultimate_layer(engine):
    """ComfyUI's stop_at_clip_layer -2 on SD1.x: the hidden state of the penultimate layer, through
    the final layer norm, for the prompt padded to 77 tokens (computed here with transformers)."""
    prompt = with_last_layer(base_prompt(), -2)
    result = engine.run(prompt)
    assert result.ok, [str(e) for e in result.errors]
    doc = comfy_to_workflow(prompt)
    doc["nodes"]["4"]["inputs"]["dtype"] = "fp64"
    cond = engine.run(doc, outputs=["6"]).outputs["6"]["cond"].embeddings
    tiny = builtin_models_dir() / "graphsd-tiny"
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny / "text_encoder", torch_dtype=torch.float64).eval()
    ids = tokenizer(prompt["6"]["inputs"]["text"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        assert_same(cond, norm(out.hidden_states[-2]), "stop_at_clip_layer -2")
        assert (cond - out.last_hidden_state).abs().max() > 1e-3  # the setting changes the encoding
