"""KSamplerAdvanced with no step in its window (``start_at_step`` ≥ ``end_at_step`` or ≥
``steps``): ComfyUI's sampler returns ``latent_image`` unchanged (comfy/samplers.py: a start step
at or past the last sigma returns the latent), so graphsd's import makes no node for it and links
its output to that latent. The prompt is the shape of ComfyUI's own
tests/inference/graphs/default_graph_sdxl1_0.json: a base sampler whose end_at_step (32) is past
its 20 steps, then a refiner starting at step 32."""

from __future__ import annotations

import copy

import pytest
import torch

from graphsd import Engine, Settings, WorkflowError
from graphsd.std.comfy import comfy_to_workflow


def advanced(model, positive, negative, latent, add_noise, start, end, leftover, steps=4):
    return {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "add_noise": add_noise,
            "noise_seed": 42,
            "steps": steps,
            "cfg": 7.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "start_at_step": start,
            "end_at_step": end,
            "return_with_leftover_noise": leftover,
            "model": [model, 0],
            "positive": [positive, 0],
            "negative": [negative, 0],
            "latent_image": [latent, 0],
        },
    }


def base_refiner_prompt() -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
        "15": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "10": advanced("4", "6", "15", "5", "enable", 0, 32, "enable"),
        "16": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "17": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["16", 1], "text": "a red circle"}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["16", 1], "text": ""}},
        "14": advanced("16", "17", "20", "10", "disable", 32, 10000, "disable"),
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["4", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "test_inference", "images": ["12", 0]}},
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out"))))


def test_refiner_starting_after_the_last_step_passes_the_base_latent_on():
    nodes = comfy_to_workflow(base_refiner_prompt())["nodes"]
    assert "14" not in nodes and "14_noise" not in nodes  # nothing samples
    assert nodes["12"]["inputs"]["latent"] == "@10.latent"  # the decoder reads the base sampler's latent
    assert nodes["10"]["type"] == "UNetDenoiseLoop" and nodes["10"]["inputs"]["end_step"] == 32


@pytest.mark.parametrize("start,end,steps", [(4, 10000, 4), (6, 6, 10), (7, 3, 10), (0, 0, 10)])
def test_every_empty_window_passes_the_latent_on(start, end, steps):
    """start ≥ min(end, steps): ComfyUI cuts the sigmas at end_at_step first, then finds no step
    from start_at_step on."""
    prompt = base_refiner_prompt()
    prompt["14"]["inputs"].update(start_at_step=start, end_at_step=end, steps=steps)
    assert comfy_to_workflow(prompt)["nodes"]["12"]["inputs"]["latent"] == "@10.latent"


def test_a_window_with_one_step_still_samples():
    prompt = base_refiner_prompt()
    prompt["14"]["inputs"].update(start_at_step=3, end_at_step=10000, steps=4)
    nodes = comfy_to_workflow(prompt)["nodes"]
    assert nodes["14"]["type"] == "UNetDenoiseLoop" and nodes["12"]["inputs"]["latent"] == "@14.latent"


def test_an_empty_window_fed_by_an_empty_latent_gives_that_latent(engine):
    """Text-to-image with nothing to run: ComfyUI returns the empty (zero) latent."""
    prompt = base_refiner_prompt()
    prompt["14"]["inputs"]["latent_image"] = ["5", 0]
    prompt["14"]["inputs"]["add_noise"] = "enable"
    doc = comfy_to_workflow(prompt)
    assert doc["nodes"]["12"]["inputs"]["latent"] == "@5.latent"
    result = engine.run(doc, outputs=["5"])
    assert torch.equal(result.outputs["5"]["latent"].samples, torch.zeros(1, 4, 8, 8))


def test_the_unused_sampler_is_still_checked():
    """ComfyUI validates every input of the node even when it samples nothing."""
    prompt = base_refiner_prompt()
    prompt["14"]["inputs"].update(sampler_name="dpm_adaptive", add_noise="sometimes", cfg=101.0)
    prompt["14"]["inputs"].pop("positive")
    with pytest.raises(WorkflowError) as info:
        comfy_to_workflow(prompt)
    fields = {i.field for i in info.value.issues if i.node == "14"}
    assert fields == {"sampler_name", "add_noise", "cfg", "positive"}, [str(i) for i in info.value.issues]


@pytest.mark.slow
def test_the_prompt_runs_and_saves_the_base_samplers_image(engine):
    """The saved picture is the base sampler's latent decoded: the same as a prompt whose decoder
    reads the base sampler directly (run in a fresh engine, so no cached result is shared)."""
    result = engine.run(base_refiner_prompt(), outputs=["12"])
    assert result.ok, [str(e) for e in result.errors]
    direct = copy.deepcopy(base_refiner_prompt())
    del direct["14"]
    direct["12"]["inputs"]["samples"] = ["10", 0]
    other = Engine(Settings(device="cpu", output_dir=engine.settings.output_dir))
    reference = other.run(direct, outputs=["12"])
    assert reference.ok
    assert torch.equal(result.outputs["12"]["image"].pixels, reference.outputs["12"]["image"].pixels)
