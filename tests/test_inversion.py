"""DDIM inversion (DDIMInversion): the inverted noise equals what diffusers' own DDIMInverseScheduler
loop computes, and on graphsd-tiny, denoising it with the same prompt gives the picture back while
an edited prompt changes only what the prompt changed (workflows/ddim_inversion.yaml)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import sd_tiny
import torch
from diffusers import DDIMInverseScheduler, UNet2DConditionModel
from graphsd_train.evaluate import read_shape
from PIL import Image as PILImage
from PIL import ImageDraw
from reference import assert_same

from graphsd import Engine, Settings
from graphsd.std.nodes.inversion import inverse_scheduler
from graphsd.std.sampling.guidance import DenoiseError

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
PROMPT = "a red circle on a white background"
EDIT = "a blue circle on a white background"


def run(engine, nodes, *outputs):
    result = engine.run({"version": 1, "nodes": nodes}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


# ---- the backward pass equals diffusers' ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    sd_tiny.save_sdxl_base(root / "xl")
    return root


@pytest.fixture(scope="module")
def tiny_engine(tiny_models, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(tiny_models), output_dir=str(tmp_path_factory.mktemp("out"))))


def random_png(path: Path, size: int = 64) -> str:
    rng = np.random.default_rng(3)
    PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


@torch.no_grad()
def diffusers_inversion(folder: Path, latent, steps, cfg, pos, neg, time_ids=None):
    """diffusers' inversion loop, as its inversion pipelines (DiffEdit, Pix2Pix-Zero) run it:
    DDIMInverseScheduler from the model's scheduler config (x0 unclipped, as DDIM sampling of
    latents is), the U-Net at each of its timesteps, guidance on [uncond, cond]."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).to(torch.float64)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDIMInverseScheduler.from_config(config, clip_sample=False)
    scheduler.set_timesteps(steps)
    guided = neg is not None
    context = torch.cat([neg.embeddings, pos.embeddings]) if guided else pos.embeddings
    added = None
    if time_ids is not None:
        pooled = torch.cat([neg.pooled, pos.pooled]) if guided else pos.pooled
        added = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids] * context.shape[0], dtype=torch.float64)}
    x = latent
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]) if guided else x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        if guided:
            uncond, cond = eps.chunk(2)
            eps = uncond + cfg * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.slow
@pytest.mark.parametrize("model,cfg", [("sd1", 1.0), ("sd1", 3.5), ("xl", 3.5)])
def test_inverted_noise_matches_diffusers_inverse_scheduler(tiny_engine, tiny_models, tmp_path, model, cfg):
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": "fp64"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "blurry"}},
        "load": {"type": "LoadImage", "inputs": {"path": random_png(tmp_path / "in.png")}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "invert": {
            "type": "DDIMInversion",
            "inputs": {
                "unet": "@model.unet",
                "positive": "@pos.cond",
                "negative": "@neg.cond",
                "latent": "@encode.latent",
                "steps": 5,
                "cfg": cfg,
            },
        },
    }
    out = run(tiny_engine, nodes, "invert", "encode", "pos", "neg")
    time_ids = [64, 64, 0, 0, 64, 64] if model == "xl" else None  # SDXL: original size, crop, target size
    reference = diffusers_inversion(
        tiny_models / model,
        out["encode"]["latent"].samples,
        5,
        cfg,
        out["pos"]["cond"],
        out["neg"]["cond"] if cfg != 1.0 else None,
        time_ids,
    )
    noise = out["invert"]["noise"]
    assert noise.samples.shape == (1, 4, 8, 8)
    assert_same(noise.samples, reference)


@pytest.mark.slow
def test_a_model_whose_timesteps_cannot_be_mirrored_is_refused(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models / "sd1", tmp_path / "linspace")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "timestep_spacing": "linspace"}))
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out")))
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(folder)}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
        "load": {"type": "LoadImage", "inputs": {"path": random_png(tmp_path / "in.png")}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "invert": {"type": "DDIMInversion", "inputs": {"unet": "@model.unet", "positive": "@pos.cond", "latent": "@encode.latent"}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["invert"])
    [failure] = result.errors
    assert (failure.node_id, failure.error_type) == ("invert", "NodeError")
    assert failure.message.startswith("input 'unet': ")
    assert "'linspace'" in failure.message and "leading or trailing" in failure.message


def test_more_steps_than_training_timesteps_is_refused_with_the_field():
    with pytest.raises(DenoiseError, match="at most 100") as e:
        inverse_scheduler({"num_train_timesteps": 100, "timestep_spacing": "trailing"}, 200)
    assert e.value.field == "steps"


def test_inverse_timesteps_are_ddims_in_reverse():
    """The hand-off relies on it: each backward step undoes one of the ddim sampler's steps."""
    from diffusers import DDIMScheduler

    for config in ({"timestep_spacing": "trailing"}, {"timestep_spacing": "leading", "steps_offset": 1}):
        for steps in (1, 3, 7, 10, 20, 50):
            forward = DDIMScheduler.from_config(config)
            forward.set_timesteps(steps)
            assert inverse_scheduler(config, steps).timesteps.tolist() == forward.timesteps.flip(0).tolist()


# ---- the round trip on graphsd-tiny -----------------------------------------------------------

DISC = (34, 34, 94, 94)  # bounding box of the drawn disc, pixels (left, top, right, bottom)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> str:
    """A red disc on white drawn with PIL: a picture graphsd-tiny never generated."""
    path = tmp_path_factory.mktemp("drawn") / "red_circle.png"
    image = PILImage.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).ellipse(DISC, fill=(220, 30, 30))
    image.save(path)
    return str(path)


def pixels(path) -> np.ndarray:
    with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255


def mse(a, b) -> float:
    return float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())


def psnr_of(squared_error: float) -> float:
    return 10 * math.log10(1 / squared_error)


def psnr(a, b) -> float:
    return psnr_of(mse(a, b))


@pytest.mark.slow
def test_ddim_inversion_workflow_reconstructs_and_edits(tmp_path, drawn):
    """The example workflow, at 10 steps. The bound on the reconstruction: the picture goes through
    the VAE (encode, then decode at the end), which alone loses some detail; inverting and
    regenerating may add error of its own, but at most as much again, i.e. the reconstruction's
    squared error is at most twice the VAE round trip's (its PSNR at most 3 dB lower; saving it as
    8-bit PNG adds at most (1/510)² per pixel, a thousandth of that). The bound is checked to
    mean something: the same prompt denoised from other noise (an unrelated picture of the same
    kind) is outside it."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out")))
    result = engine.run(WORKFLOWS / "ddim_inversion.yaml", params={"image": drawn, "prompt": PROMPT, "edit": EDIT, "steps": 10})
    assert result.ok, [str(e) for e in result.errors]
    files = {Path(f).name: f for f in result.files}
    assert sorted(files) == ["ddim_inversion_edit_00001.png", "ddim_inversion_reconstruction_00001.png"]

    baselines = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": PROMPT}},
        "load": {"type": "LoadImage", "inputs": {"path": drawn}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "vae_round_trip": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@encode.latent"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": 5, "latent": "@encode.latent"}},
        "other": {
            "type": "UNetDenoiseLoop",
            "inputs": {"unet": "@model.unet", "positive": "@pos.cond", "noise": "@noise.noise", "steps": 10, "cfg": 1.0, "sampler": "ddim"},
        },
        "unrelated": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@other.latent"}},
    }
    out = run(engine, baselines, "vae_round_trip", "unrelated")
    original = pixels(drawn)
    bound = 2 * mse(out["vae_round_trip"]["image"].pixels[0], original)
    unrelated = out["unrelated"]["image"].pixels[0].numpy()
    reconstruction = pixels(files["ddim_inversion_reconstruction_00001.png"])
    assert mse(unrelated, original) > bound, f"the bound ({psnr_of(bound):.1f} dB) does not tell an unrelated picture apart"
    assert mse(reconstruction, original) <= bound, f"reconstruction {psnr(reconstruction, original):.1f} dB < {psnr_of(bound):.1f} dB"

    # the edit recolours the disc and leaves it where it was: each edge of its bounding box within
    # 4 px (1/32 of the image) of the drawn one's, which the unrelated picture's circle is not
    def reading(image):
        return read_shape((np.asarray(image) * 255).round().astype(np.uint8))

    def moved(a, b):
        return max(abs(x - y) for x, y in zip(a.bbox, b.bbox, strict=True))

    before, after = reading(original), reading(pixels(files["ddim_inversion_edit_00001.png"]))
    assert (before.color, before.shape, before.background) == ("red", "circle", "white")
    assert (after.color, after.shape, after.background) == ("blue", "circle", "white")
    assert moved(after, before) <= 4 < moved(reading(unrelated), before)
