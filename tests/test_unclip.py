"""SD2.1-unCLIP end to end (ComfyUI's unCLIPCheckpointLoader): a tiny checkpoint of SD2.1-unCLIP's
shape, written in the original single-file layout (``label_emb`` = the U-Net's projection class
embedding, ``embedder.model.visual.*`` = the OpenCLIP image encoder, ``noise_augmentor.*`` = the
embedding statistics), loads; a denoise run with unCLIPConditioning is the diffusers U-Net loop
written out here, ``UNet(x, t, context, class_labels=noise-augmented image embedding)`` (zeros for
the negative, as ComfyUI), and a ComfyUI API prompt of the unCLIP nodes runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file
from test_clip_vision import diffusers_noised, tiny_encoder, to_open_clip
from test_single_file import tiny_clip, tiny_vae

from graphsd import Engine, Settings
from graphsd.errors import WorkflowError
from graphsd.std.models.single_file import bundled_config, save_single_file

pytestmark = pytest.mark.slow  # one tiny checkpoint written and loaded: about 2 s in all

U32 = 2.0**-24
WIDTH = 24  # the tiny image encoder's embedding width (projection_dim)
SEED, STRENGTH, AUGMENTATION, STEPS, CFG = 7, 0.8, 0.3, 3, 4.0


def tiny_unclip_unet() -> UNet2DConditionModel:
    """SD2-shaped U-Net (linear projections, 32-wide context) with SD2.1-unCLIP's class embedding:
    a projection of the 2 × WIDTH class labels. What a single file's shapes do not tell is SD2's:
    32 norm groups, 64-wide attention heads (one head where a width is not a multiple of 64)."""
    torch.manual_seed(5)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 1),
        use_linear_projection=True,
        upcast_attention=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * WIDTH,
    ).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    unet, encoder = tiny_unclip_unet(), tiny_encoder(seed=4)
    components = {
        "family": "sd2",
        "unet": unet,
        "vae": tiny_vae(),
        "text_encoder": tiny_clip("gelu", seed=2),
        "scheduler_config": bundled_config("sd2", "scheduler"),
    }
    staged = save_single_file(components, tmp_path_factory.mktemp("staging") / "plain.safetensors")
    tensors = dict(load_file(staged))  # the tensors only: no graphsd metadata, as an original checkpoint
    for key, value in to_open_clip(encoder.state_dict()).items():
        if key.startswith("visual."):
            tensors["embedder.model." + key] = value
    gen = torch.Generator().manual_seed(9)
    mean, std = torch.randn(1, WIDTH, generator=gen) * 0.1, torch.rand(1, WIDTH, generator=gen) + 0.5
    tensors["noise_augmentor.data_mean"], tensors["noise_augmentor.data_std"] = mean, std
    save_file(tensors, root / "checkpoints" / "tiny_unclip.safetensors")
    inputs = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(3)
    PILImage.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(inputs / "photo.png")
    engine = Engine(Settings(device="cpu", models_dir=str(root), output_dir=str(root / "out"), input_dir=str(inputs)))
    return {
        "root": root,
        "inputs": inputs,
        "unet": unet,
        "encoder": encoder,
        "mean": mean[0],
        "std": std[0],
        "engine": engine,
        "tensors": tensors,
    }


def test_the_checkpoint_is_in_the_original_layout(setup):
    """label_emb.0.0 / 0.2 are the class embedding's two linear layers (the U-Net's own weights)."""
    t, unet = setup["tensors"], setup["unet"]
    assert torch.equal(t["model.diffusion_model.label_emb.0.0.weight"], unet.class_embedding.linear_1.weight)
    assert torch.equal(t["model.diffusion_model.label_emb.0.2.bias"], unet.class_embedding.linear_2.bias)
    assert "embedder.model.visual.transformer.resblocks.0.attn.in_proj_weight" in t


def workflow(picture: str, strength: float = STRENGTH) -> dict:
    return {
        "version": 1,
        "nodes": {
            "load": {"type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "tiny_unclip.safetensors"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@load.clip", "text": "a red circle"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@load.clip", "text": "blurry"}},
            "picture": {"type": "LoadImage", "inputs": {"path": picture}},
            "see": {"type": "CLIPVisionEncode", "inputs": {"clip_vision": "@load.clip_vision", "image": "@picture.image"}},
            "un": {
                "type": "unCLIPConditioning",
                "inputs": {
                    "conditioning": "@pos.cond",
                    "clip_vision_output": "@see.clip_vision_output",
                    "strength": strength,
                    "noise_augmentation": AUGMENTATION,
                },
            },
            "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": 64, "height": 64}},
            "run": {
                "type": "UNetDenoiseLoop",
                "inputs": {
                    "unet": "@load.model",
                    "positive": "@un.conditioning",
                    "negative": "@neg.cond",
                    "noise": "@noise.noise",
                    "steps": STEPS,
                    "cfg": CFG,
                    "sampler": "euler",
                    "convention": "diffusers",
                },
            },
        },
    }


def test_a_denoise_run_is_the_unet_loop_with_augmented_image_embeddings_as_class_labels(setup):
    """The run equals diffusers' Euler loop written out with the reference U-Net (the module the
    file was written from), the text contexts graphsd encoded, and class labels built with
    diffusers' parts: StableUnCLIPImageNormalizer + DDPM squared-cosine noising at level
    round(999 × 0.3) with ComfyUI's noise (seed − 10), its level's embedding, × strength; zeros for
    the negative. The loop repeats the same float32 operations; the labels differ by the ᾱ
    cumulative product diffusers keeps in float32 (≤ 1000 roundings of 2⁻²⁴), which passes through
    the class embedding's two linear layers and a few steps of the U-Net."""
    result = setup["engine"].run(workflow(str(setup["inputs"] / "photo.png")), outputs=["run", "pos", "neg", "see", "noise"])
    assert result.ok, [str(e) for e in result.errors]
    out = result.outputs
    embeds = out["see"]["clip_vision_output"].image_embeds
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(SEED - 10))
    labels = diffusers_noised(embeds, setup["mean"], setup["std"], round(999 * AUGMENTATION), noise) * STRENGTH
    unet = setup["unet"]
    scheduler = EulerDiscreteScheduler.from_config(bundled_config("sd2", "scheduler"))
    scheduler.set_timesteps(STEPS)
    x = out["noise"]["noise"].samples * scheduler.init_noise_sigma
    context = torch.cat([out["neg"]["cond"].embeddings, out["pos"]["cond"].embeddings])
    class_labels = torch.cat([torch.zeros_like(labels), labels])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = unet(model_input, t, encoder_hidden_states=context, class_labels=class_labels).sample.chunk(2)
            x = scheduler.step(uncond + CFG * (cond - uncond), t, x).prev_sample
    ours = out["run"]["latent"].samples
    scale = float(x.abs().max())
    assert float((ours - x).abs().max()) <= 1000 * U32 * STEPS * 64 * scale, float((ours - x).abs().max())
    without = setup["engine"].run(workflow(str(setup["inputs"] / "photo.png"), strength=0.0), outputs=["run"])  # the image matters
    assert float((without.outputs["run"]["latent"].samples - ours).abs().max()) > 1e-3


def test_a_comfyui_prompt_with_the_unclip_nodes_runs(setup):
    """unCLIPCheckpointLoader → CLIPVisionEncode → unCLIPConditioning → KSampler → VAEDecode → PreviewImage, as the
    ComfyUI frontend sends it; the image's strength changes the picture."""

    def prompt(strength: float) -> dict:
        return {
            "1": {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "tiny_unclip.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 3], "image": ["2", 0], "crop": "center"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "6": {
                "class_type": "unCLIPConditioning",
                "inputs": {"conditioning": ["4", 0], "clip_vision_output": ["3", 0], "strength": strength, "noise_augmentation": 0.1},
            },
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["1", 0],
                    "positive": ["6", 0],
                    "negative": ["5", 0],
                    "latent_image": ["7", 0],
                    "seed": 3,
                    "steps": 2,
                    "cfg": 5.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        }

    engine = setup["engine"]
    images = []
    for strength in (1.0, 0.0):
        result = engine.run(prompt(strength), outputs=["9"])  # imported as the server imports a prompt
        assert result.ok, [str(e) for e in result.errors]
        image = result.outputs["9"]["image"].pixels
        assert image.shape == (1, 16, 16, 3) and torch.isfinite(image).all()  # an 8 × 8 latent; the tiny VAE scales by 2
        images.append(image)
    assert float((images[0] - images[1]).abs().max()) > 1e-4


def test_a_diffusers_folder_is_refused_at_validation(tmp_path):
    """unCLIPCheckpointLoader reads single files: a folder (the built-in graphsd-tiny) is refused
    before anything runs, on ckpt_name."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path), models_dir=str(tmp_path)))
    workflow = {"version": 1, "nodes": {"ckpt": {"type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "graphsd-tiny"}}}}
    with pytest.raises(WorkflowError) as excinfo:
        engine.load(workflow)
    [issue] = excinfo.value.issues
    assert (issue.node, issue.field) == ("ckpt", "ckpt_name") and "diffusers folder" in issue.message
