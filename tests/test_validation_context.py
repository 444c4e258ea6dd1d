"""Problems that need the engine's settings or what feeds a node are refused when the workflow is
validated (Engine.load: ``graphsd run`` / ``validate``, the server), not when it runs
(Node.check_context): a missing upscale model or mask picture, and CLIPTextEncodeSDXL fed by a
clip with one text encoder (SD1.x / SD2.x checkpoints, the SDXL refiner, CLIPLoader), also through
LoRAs. Checkpoint files are written here in the original single-file layout (text encoders under
``cond_stage_model.*`` / ``conditioner.embedders.*``), diffusers folders by tests/sd_tiny.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from graphsd import Engine, Settings, WorkflowError
from graphsd.graph import build_graph
from graphsd.std.comfy import comfy_to_workflow

SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_G = "conditioner.embedders.1.model.token_embedding.weight"
REFINER_G = "conditioner.embedders.0.model.token_embedding.weight"
UNET, VAE = "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Checkpoint files whose tensor names are those of each family's layout (validation reads
    only the names), and an empty folder for upscale models."""
    root = tmp_path_factory.mktemp("models")
    for name, keys in {
        "sd1.safetensors": (SD1_TEXT,),
        "xl.safetensors": (SDXL_L, SDXL_G),
        "xl_refiner.safetensors": (REFINER_G,),
    }.items():
        save_file({k: torch.zeros(1) for k in (*keys, UNET, VAE)}, str(root / name))
    (root / "upscale_models").mkdir()
    return root


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    (folder / "in").mkdir()
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(folder / "out"), input_dir=str(folder / "in")))


def sdxl_text_prompt(checkpoint: str, through_lora: bool = False) -> dict:
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "6": {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {
                "clip": ["4", 1],
                "width": 1024,
                "height": 1024,
                "crop_w": 0,
                "crop_h": 0,
                "target_width": 1024,
                "target_height": 1024,
                "text_g": "a red circle",
                "text_l": "a red circle",
            },
        },
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "seed": 1,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }
    if through_lora:
        prompt["10"] = {
            "class_type": "LoraLoader",
            "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "l.safetensors", "strength_model": 1.0, "strength_clip": 1.0},
        }
        prompt["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}}
        prompt["6"]["inputs"]["clip"] = ["11", 0]
    return prompt


def issues_of(engine, prompt) -> list:
    with pytest.raises(WorkflowError) as info:
        engine.load(prompt)
    return info.value.issues


@pytest.mark.parametrize("checkpoint", ["sd1.safetensors", "xl_refiner.safetensors", "graphsd-tiny"])
@pytest.mark.parametrize("through_lora", [False, True])
def test_sdxl_text_encoder_with_a_one_encoder_clip_is_refused_at_validation(engine, checkpoint, through_lora):
    [issue] = issues_of(engine, sdxl_text_prompt(checkpoint, through_lora))
    assert (issue.node, issue.field) == ("6", "clip")
    assert "two text encoders" in str(issue) and "node '4' (CheckpointLoader)" in str(issue) and "CLIPTextEncodeSDXLRefiner" in str(issue)


def test_sdxl_text_encoder_with_an_sdxl_base_checkpoint_validates(engine):
    engine.load(sdxl_text_prompt("xl.safetensors"))
    engine.load(sdxl_text_prompt("xl.safetensors", through_lora=True))


def test_what_validation_cannot_tell_is_left_to_the_run(engine, models):
    """A checkpoint that is not there (CheckpointLoader reports it) or is a pickle: no guess."""
    engine.load(sdxl_text_prompt("missing.safetensors"))
    (models / "old.ckpt").write_bytes(b"not read at validation")
    engine.load(sdxl_text_prompt("old.ckpt"))


def test_clip_loader_and_dual_clip_loader(engine):
    prompt = sdxl_text_prompt("xl.safetensors")
    prompt["12"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}}
    prompt["6"]["inputs"]["clip"] = ["12", 0]
    [issue] = [i for i in issues_of(engine, prompt) if i.node == "6"]
    assert issue.field == "clip" and "(CLIPLoader)" in str(issue)
    names = {"clip_name1": "l.safetensors", "clip_name2": "g.safetensors", "type": "sdxl"}
    prompt["12"] = {"class_type": "DualCLIPLoader", "inputs": names}
    assert not [i for i in _issues_or_none(engine, prompt) if i.node == "6"]


def _issues_or_none(engine, prompt) -> list:
    try:
        engine.load(prompt)
    except WorkflowError as err:
        return err.issues
    return []


@pytest.mark.slow
def test_diffusers_folders_say_how_many_text_encoders(tmp_path):
    import sd_tiny

    sd_tiny.save_sdxl_base(tmp_path / "xl")
    sd_tiny.save_sdxl_refiner(tmp_path / "refiner")
    engine = Engine(Settings(device="cpu", models_dir=str(tmp_path), output_dir=str(tmp_path / "out")))
    engine.load(sdxl_text_prompt("xl"))
    [issue] = issues_of(engine, sdxl_text_prompt("refiner"))
    assert (issue.node, issue.field) == ("6", "clip")


def upscale_prompt(model_name: str) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_missing_upscale_model_is_refused_at_validation(engine, models):
    [issue] = issues_of(engine, upscale_prompt("4x-UltraSharp.pth"))
    assert (issue.node, issue.field) == ("2", "model_name")
    assert "'4x-UltraSharp.pth' not found in" in str(issue) and "upscale_models" in str(issue) and "(there: none)" in str(issue)
    (models / "upscale_models" / "4x-UltraSharp.pth").write_bytes(b"")  # there: validation passes (the run reads it)
    engine.load(upscale_prompt("4x-UltraSharp.pth"))


def test_missing_mask_picture_is_refused_at_validation(engine):
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    [issue] = issues_of(engine, prompt)
    assert (issue.node, issue.field) == ("1", "image") and "'mask.png' does not exist" in str(issue)
    assert "--input-dir" in issue.hint


def test_context_checks_need_the_settings(engine):
    """build_graph without settings (a document checked on its own) skips them."""
    build_graph(comfy_to_workflow(upscale_prompt("nowhere.pth"), engine.nodes), engine.registry)
