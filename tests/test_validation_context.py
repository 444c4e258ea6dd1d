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
    (root / "loras").mkdir()
    (root / "loras" / "l.safetensors").write_bytes(b"")  # validation only asks whether it is there
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
    """A checkpoint that is not there (only CheckpointLoader reports it) or is a pickle: no guess."""
    [issue] = issues_of(engine, sdxl_text_prompt("missing.safetensors"))
    assert (issue.node, issue.field) == ("4", "path")
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


MODEL = {"m": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}}}
#: Each file loader: its node, the input naming the file, the other inputs, where a name is found
#: (relative to the models folder, or "input/..." for the input folder) and what the message names.
LOADERS = [
    ("CheckpointLoader", "path", {}, "checkpoints/c.safetensors", "checkpoints"),
    ("LoraLoader", "lora", {"unet": "@m.unet", "clip": "@m.clip"}, "loras/x.safetensors", "loras"),
    ("HypernetworkLoader", "hypernetwork", {"unet": "@m.unet"}, "hypernetworks/x.pt", "hypernetworks"),
    ("LoraLoaderModelOnly", "lora_name", {"model": "@m.unet"}, "loras/x.safetensors", "loras"),
    ("VAELoader", "vae_name", {}, "vae/x.safetensors", "vae"),
    ("UNETLoader", "unet_name", {}, "diffusion_models/x.safetensors", "diffusion_models"),
    ("CLIPLoader", "clip_name", {}, "text_encoders/x.safetensors", "text_encoders"),
    ("DualCLIPLoader", "clip_name2", {"clip_name1": "other.safetensors"}, "clip/x.safetensors", "clip"),
    ("ControlNetLoader", "control_net_name", {}, "controlnet/x.safetensors", "controlnet"),
    ("DiffControlNetLoader", "control_net_name", {"model": "@m.unet"}, "controlnet/x.safetensors", "controlnet"),
    ("CLIPVisionLoader", "clip_name", {}, "clip_vision/x.safetensors", "clip_vision"),
    ("LoadImage", "path", {}, "input/x.png", "input"),
    ("LoadLatent", "latent", {}, "input/x.latent", "input"),
]


@pytest.mark.parametrize(("node_type", "field", "others", "place", "folder"), LOADERS, ids=[row[0] for row in LOADERS])
def test_a_missing_file_is_refused_at_validation_and_a_present_one_validates(tmp_path, node_type, field, others, place, folder):
    """The issue names the node and the input, where graphsd looked and what is there; once the file
    is there the workflow validates (the run reads it)."""
    models, inputs = tmp_path / "models", tmp_path / "input"
    (models / "clip").mkdir(parents=True)
    inputs.mkdir()
    (models / "clip" / "other.safetensors").write_bytes(b"")  # DualCLIPLoader's first name, and something "there"
    engine = Engine(Settings(device="cpu", models_dir=str(models), input_dir=str(inputs), output_dir=str(tmp_path / "out")))
    name = str(inputs / "x.png") if node_type == "LoadImage" else place.rsplit("/", 1)[1]
    doc = {"version": 1, "nodes": {**MODEL, "n": {"type": node_type, "inputs": {**others, field: name}}}}
    with pytest.raises(WorkflowError) as info:
        engine.load(doc)
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("n", field)
    assert name.rsplit("/", 1)[-1] in issue.message and folder in issue.message
    target = inputs / place.removeprefix("input/") if place.startswith("input/") else models / place
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"")
    engine.load(doc)


def test_a_name_through_a_link_is_left_to_the_run(engine):
    doc = {
        "version": 1,
        "nodes": {
            "name": {"type": "PrimitiveString", "inputs": {"value": "nowhere.safetensors"}},
            "vae": {"type": "VAELoader", "inputs": {"vae_name": "@name.value"}},
        },
    }
    engine.load(doc)
