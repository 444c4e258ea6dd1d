"""The example workflows (workflows/*.yaml, workflows/comfy_txt2img.json) run with tiny models,
and ComfyUI API prompts convert to graphsd workflows that compute what diffusers computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image as PILImage

import sd_tiny
from reference import assert_same, diffusers_noise_in_float32
from graphsd import Engine, Settings, WorkflowError
from graphsd.std.comfy import comfy_to_workflow

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd_tiny.save_all(tmp_path_factory.mktemp("models"))


@pytest.fixture
def engine(models, tmp_path):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path / "out")))


@pytest.fixture
def input_png(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "input.png"
    PILImage.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def saved_image(result):
    assert result.ok, [str(e) for e in result.errors]
    [path] = result.files
    with PILImage.open(path) as im:
        assert im.size == (64, 64)
    return path


def test_txt2img_workflow(engine, models):
    params = {"model": str(models / "sd1"), "width": 64, "height": 64, "steps": 3}
    saved_image(engine.run(WORKFLOWS / "txt2img.yaml", params=params))


def test_img2img_workflow(engine, models, input_png):
    params = {"model": "sd1", "image": input_png, "steps": 4, "denoise": 0.5}
    saved_image(engine.run(WORKFLOWS / "img2img.yaml", params=params))


def test_sdxl_base_refiner_workflow(engine, models):
    params = {"base": "xl", "refiner": "refiner", "width": 64, "height": 64, "steps": 4, "switch_at": 3}
    events = []
    saved_image(engine.run(WORKFLOWS / "sdxl_base_refiner.yaml", params=params, on_event=events.append))
    steps = {}
    for e in events:
        if e.kind == "progress":
            steps.setdefault(e.node_id, []).append(e.info["step"])
    assert steps == {"base_denoise": [0, 1, 2], "refine": [3]}


def comfy_prompt(model, **ksampler):
    prompt = json.loads((WORKFLOWS / "comfy_txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = model
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=4, **ksampler)
    return prompt


def in_fp64(prompt: dict) -> dict:
    """The graphsd workflow of a ComfyUI prompt with its checkpoints loaded in float64, the
    precision of the comparisons with diffusers (``reference.py``), and its KSampler on diffusers'
    schedules (``convention: diffusers``): what these tests compare is how the import maps the
    prompt (steps, cfg, seed, denoise, links) onto the loop, against diffusers' pipelines. The
    ComfyUI sigmas and samplers the import uses by default are checked against their published
    formulas in test_samplers_comfy.py."""
    doc = comfy_to_workflow(prompt)
    for node in doc["nodes"].values():
        if node["type"] == "CheckpointLoader":
            node["inputs"]["dtype"] = "fp64"
        if node["type"] == "UNetDenoiseLoop":
            assert node["inputs"]["convention"] == "comfyui"
            node["inputs"]["convention"] = "diffusers"
    return doc


def test_comfy_txt2img_runs_and_matches_diffusers(engine, models):
    prompt = comfy_prompt("sd1", sampler_name="euler", cfg=7.5, seed=3)
    prompt["7"]["inputs"]["text"] = "blurry"
    saved_image(engine.run(prompt))
    latent = engine.run(in_fp64(prompt), outputs=["3"]).outputs["3"]["latent"].samples
    pipe = StableDiffusionPipeline.from_pretrained(models / "sd1", local_files_only=True, safety_checker=None).to(dtype=torch.float64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with diffusers_noise_in_float32():
        reference = pipe(
            prompt=prompt["6"]["inputs"]["text"], negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
            height=64, width=64, generator=torch.Generator().manual_seed(3), output_type="latent",
        ).images
    assert_same(latent, reference)


def test_comfy_ksampler_partial_denoise_runs_the_last_steps_of_a_longer_schedule(engine, models, input_png):
    """ComfyUI's KSampler at denoise d runs `steps` steps of a schedule of int(steps / d):
    diffusers img2img with that many steps and strength d does the same."""
    prompt = comfy_prompt("sd1", sampler_name="euler", cfg=7.5, seed=3, denoise=0.5, latent_image=["10", 0])
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": input_png}}
    loop = comfy_to_workflow(prompt)["nodes"]["3"]["inputs"]
    assert (loop["steps"], loop["start_step"], loop["latent"]) == (8, 4, "@10.latent")
    out = engine.run(in_fp64(prompt), outputs=["3", "10"]).outputs
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(models / "sd1", local_files_only=True, safety_checker=None).to(dtype=torch.float64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with diffusers_noise_in_float32():
        reference = pipe(
            prompt=prompt["6"]["inputs"]["text"], negative_prompt="", image=out["10"]["latent"].samples, strength=0.5,
            num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(3), output_type="latent",
        ).images
    assert_same(out["3"]["latent"].samples, reference)


def test_comfy_conversion_maps_links_and_nodes():
    prompt = comfy_prompt("graphsd-tiny", sampler_name="uni_pc", scheduler="karras")
    prompt["12"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 0.5},
    }
    prompt["3"]["inputs"]["model"] = ["12", 0]
    prompt["6"]["inputs"]["clip"] = ["12", 1]
    prompt["6"]["inputs"]["text"] = "@home ${not_a_param}"
    nodes = comfy_to_workflow(prompt)["nodes"]
    assert nodes["4"] == {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}}
    assert nodes["12"]["inputs"] == {
        "unet": "@4.unet", "clip": "@4.clip", "lora": "style.safetensors", "strength_model": 0.8, "strength_clip": 0.5,
    }
    assert nodes["6"]["inputs"] == {"clip": "@12.clip", "text": "@@home $${not_a_param}"}
    assert nodes["3_noise"] == {"type": "LatentNoise", "inputs": {"seed": 42, "latent": "@5.latent"}}
    loop = nodes["3"]["inputs"]
    assert loop["unet"] == "@12.unet" and loop["noise"] == "@3_noise.noise" and "latent" not in loop
    assert (loop["sampler"], loop["schedule"], loop["convention"], loop["steps"]) == ("uni_pc", "karras", "comfyui", 4)
    assert nodes["9"] == {"type": "SaveImage", "inputs": {"image": "@8.image", "prefix": "ComfyUI", "naming": "comfyui"}}


def test_comfy_problems_are_reported_together():
    prompt = comfy_prompt("graphsd-tiny", sampler_name="dpm_adaptive", scheduler="not_a_scheduler")
    prompt["20"] = {"class_type": "UpscaleModelLoader", "inputs": {}}
    prompt["21"] = {"class_type": "ControlNetApply", "inputs": {}}
    prompt["22"] = {"class_type": "UpscaleModelLoader", "inputs": {}}
    prompt["8"]["inputs"]["samples"] = ["99", 0]
    with pytest.raises(WorkflowError) as info:
        comfy_to_workflow(prompt)
    issues = info.value.issues
    [unknown] = [i for i in issues if i.code == "unknown_type"]
    assert "ControlNetApply (node 21)" in str(unknown) and "UpscaleModelLoader (node 20, 22)" in str(unknown)
    assert "KSampler" in unknown.hint
    sampler = next(i for i in issues if i.field == "sampler_name")
    assert "dpm_adaptive" in str(sampler) and "uni_pc" in str(sampler) and "dpmpp_2m_sde" in str(sampler)
    assert any(i.field == "scheduler" and "karras" in str(i) for i in issues)
    assert any(i.node == "8" and i.code == "missing_node" for i in issues)


@pytest.mark.parametrize(
    "prompt",
    [
        {"1": {"class_type": ["KSampler"], "inputs": {}}},
        {"1": {"class_type": "KSampler", "inputs": [1, 2]}},
        {"prompt": {"1": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 5], "vae": ["7", 0]}}}},
    ],
)
def test_malformed_comfy_prompts_raise_workflow_error(prompt):
    with pytest.raises(WorkflowError) as info:
        comfy_to_workflow(prompt)
    assert all(issue.node == "1" for issue in info.value.issues)
