"""graphsd's Stable Diffusion nodes give the same latents as diffusers' pipelines.

Each test runs a workflow through ``Engine.run`` on tiny random models saved as diffusers
folders, then runs the matching diffusers pipeline on the same folder with the same seed and
the conditioning graphsd's TextEncode produced (so the denoise loop is compared on its own;
one test also lets diffusers encode the prompt itself), and compares the latents. Both sides
run in float64, so they must agree to within rounding (``reference.py`` says why and how far).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image as PILImage

import sd_tiny
from graphsd import Engine, Settings
from reference import assert_same, diffusers_noise_in_float32

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

SEED = 1234

#: The scheduler a diffusers user would pick for each graphsd sampler name.
REFERENCE = {
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "euler_ancestral": lambda c: EulerAncestralDiscreteScheduler.from_config(c),
    "heun": lambda c: HeunDiscreteScheduler.from_config(c),
    "ddim": lambda c: DDIMScheduler.from_config(c),
    "lms": lambda c: LMSDiscreteScheduler.from_config(c),
    "dpmpp_2m": lambda c: DPMSolverMultistepScheduler.from_config(c),
    "dpmpp_2m_sde": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="sde-dpmsolver++"),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
}


@pytest.fixture(scope="module", autouse=True)
def same_noise():
    with diffusers_noise_in_float32():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return sd_tiny.save_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(out)))


def run(engine, nodes, *outputs):
    result = engine.run({"version": 1, "nodes": nodes}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


def prompts(model, positive="a red circle", negative="blurry"):
    return {
        "model": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": "fp64"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": positive}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": negative}},
    }


def sampler_node(steps, sampler, cfg=7.5, **extra):
    inputs = {"unet": "@model.unet", "positive": "@pos.cond", "negative": "@neg.cond", "noise": "@noise.noise"}
    return {"type": "UNetDenoiseLoop", "inputs": {**inputs, "steps": steps, "cfg": cfg, "sampler": sampler, **extra}}


def txt2img_nodes(model, sampler, steps=5, size=64, seed=SEED, **extra):
    return {
        **prompts(model),
        "noise": {"type": "LatentNoise", "inputs": {"seed": seed, "width": size, "height": size}},
        "denoise": sampler_node(steps, sampler, **extra),
    }


@functools.cache
def reference_pipeline(folder, cls):
    """The pipeline diffusers itself loads from ``folder`` (loaded once per test session)."""
    extra = {} if "XL" in cls.__name__ else {"safety_checker": None}
    return cls.from_pretrained(folder, local_files_only=True, **extra).to(dtype=torch.float64)


def sd_pipeline(cls, folder, sampler, schedule="normal"):
    """A diffusers pipeline on ``folder`` whose scheduler is the reference for ``sampler``
    (built by the pipeline's constructor, which applies diffusers' own config fixes)."""
    base = reference_pipeline(folder, {StableDiffusionImg2ImgPipeline: StableDiffusionPipeline}.get(cls, cls))
    karras = {"use_karras_sigmas": True} if schedule == "karras" else {}
    scheduler = REFERENCE[sampler](dict(base.scheduler.config, **karras))
    pipe = cls.from_pipe(base, scheduler=scheduler, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(out, pooled=False):
    kwargs = {"prompt_embeds": out["pos"]["cond"].embeddings, "negative_prompt_embeds": out["neg"]["cond"].embeddings}
    if pooled:
        kwargs["pooled_prompt_embeds"] = out["pos"]["cond"].pooled
        kwargs["negative_pooled_prompt_embeds"] = out["neg"]["cond"].pooled
    return kwargs


def max_diff(a, b):
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


@pytest.mark.parametrize(
    "sampler,schedule",
    [(s, "normal") for s in REFERENCE] + [("euler", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "karras")],
)
def test_txt2img_matches_stable_diffusion_pipeline(engine, models, sampler, schedule):
    out = run(engine, txt2img_nodes("sd1", sampler, schedule=schedule), "denoise", "pos", "neg")
    pipe = sd_pipeline(StableDiffusionPipeline, models / "sd1", sampler, schedule)
    reference = pipe(
        **embeds(out), num_inference_steps=5, guidance_scale=7.5, height=64, width=64,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    ours = out["denoise"]["latent"].samples
    assert ours.shape == reference.shape == (1, 4, 8, 8)
    assert_same(ours, reference)


def test_txt2img_with_prompt_text_matches_pipeline_end_to_end(engine, models):
    """Text encoding included: diffusers encodes the prompts itself."""
    out = run(engine, txt2img_nodes("sd1", "euler"), "denoise")
    pipe = sd_pipeline(StableDiffusionPipeline, models / "sd1", "euler")
    reference = pipe(
        prompt="a red circle", negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5,
        height=64, width=64, generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(out["denoise"]["latent"].samples, reference)


def test_batch_items_use_seed_plus_index(engine, models):
    nodes = txt2img_nodes("sd1", "euler_ancestral")
    nodes["noise"]["inputs"]["batch_size"] = 2
    out = run(engine, nodes, "denoise", "pos", "neg")
    pipe = sd_pipeline(StableDiffusionPipeline, models / "sd1", "euler_ancestral")
    reference = pipe(
        **{k: v.repeat(2, 1, 1) for k, v in embeds(out).items()}, num_inference_steps=5, guidance_scale=7.5,
        height=64, width=64, generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)], output_type="latent",
    ).images
    assert_same(out["denoise"]["latent"].samples, reference)


def test_no_guidance_without_negative_or_at_cfg_1(engine, models):
    nodes = txt2img_nodes("sd1", "euler", cfg=1.0)
    without_negative = txt2img_nodes("sd1", "euler")
    del without_negative["denoise"]["inputs"]["negative"]
    a = run(engine, nodes, "denoise", "pos", "neg")
    b = run(engine, without_negative, "denoise")
    pipe = sd_pipeline(StableDiffusionPipeline, models / "sd1", "euler")
    reference = pipe(
        prompt_embeds=a["pos"]["cond"].embeddings, num_inference_steps=5, guidance_scale=1.0,
        height=64, width=64, generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(a["denoise"]["latent"].samples, reference)
    assert_same(b["denoise"]["latent"].samples, reference)


def write_png(path, size=64):
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim", "dpmpp_2m"])
def test_img2img_matches_img2img_pipeline(engine, models, tmp_path, sampler):
    nodes = {
        **prompts("sd1"),
        "load": {"type": "LoadImage", "inputs": {"path": write_png(tmp_path / "in.png")}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@encode.latent"}},
        "denoise": sampler_node(10, sampler, latent="@encode.latent", denoise=0.6),
    }
    out = run(engine, nodes, "denoise", "encode", "pos", "neg")
    pipe = sd_pipeline(StableDiffusionImg2ImgPipeline, models / "sd1", sampler)
    reference = pipe(
        **embeds(out), image=out["encode"]["latent"].samples, strength=0.6, num_inference_steps=10,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(out["denoise"]["latent"].samples, reference)


def vae_input(path) -> torch.Tensor:
    """The PNG at ``path`` as a diffusers VAE takes it: [1, 3, H, W], float64 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(PILImage.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1)[None].double() * 2 - 1


def test_vae_encode_is_scaled_posterior_mode_and_tiled_matches_diffusers_tiling(engine, models, tmp_path):
    path = write_png(tmp_path / "in.png")
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        "load": {"type": "LoadImage", "inputs": {"path": path}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "tiled": {
            "type": "VAEEncode",
            "inputs": {"vae": "@model.vae", "image": "@load.image", "tiled": True, "tile_size": 32, "tile_overlap": 8},
        },
    }
    out = run(engine, nodes, "encode", "tiled")
    vae = reference_pipeline(models / "sd1", StableDiffusionPipeline).vae
    x = vae_input(path)
    with torch.no_grad():
        reference = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 4, 0.25
        tiled = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert max_diff(reference, tiled) > 1e-3  # the tiles really are encoded apart
    for name, expected in (("encode", reference), ("tiled", tiled)):
        ours = out[name]["latent"].samples
        assert ours.shape == (1, 4, 8, 8)
        assert_same(ours, expected, name)


def test_vae_decode_matches_vae_and_tiled_matches_diffusers_tiling(engine, models, tmp_path):
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        "load": {"type": "LoadImage", "inputs": {"path": write_png(tmp_path / "in.png")}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@model.vae", "image": "@load.image"}},
        "plain": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@encode.latent"}},
        "tiled": {
            "type": "VAEDecode",
            "inputs": {"vae": "@model.vae", "latent": "@encode.latent", "tiled": True, "tile_size": 32, "tile_overlap": 8},
        },
    }
    out = run(engine, nodes, "encode", "plain", "tiled")
    vae = AutoencoderKL.from_pretrained(models / "sd1" / "vae", local_files_only=True).to(torch.float64)
    z = out["encode"]["latent"].samples / vae.config.scaling_factor
    with torch.no_grad():
        plain = vae.decode(z).sample
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 4, 0.25
        tiled = vae.decode(z).sample
    assert max_diff(plain, tiled) > 1e-3  # the tiles really are decoded apart
    for name, reference in (("plain", plain), ("tiled", tiled)):
        image = out[name]["image"].pixels
        assert image.shape == (1, 64, 64, 3)
        assert_same(image, (reference / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), name)


def test_sdxl_txt2img_matches_sdxl_pipeline(engine, models):
    for sampler in ("euler_ancestral", "dpmpp_2m"):  # euler: see the base + refiner test
        out = run(engine, txt2img_nodes("xl", sampler, steps=4), "denoise", "pos", "neg")
        pipe = sd_pipeline(StableDiffusionXLPipeline, models / "xl", sampler)
        reference = pipe(
            **embeds(out, pooled=True), num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
            generator=torch.Generator().manual_seed(SEED), output_type="latent",
        ).images
        assert_same(out["denoise"]["latent"].samples, reference, sampler)


def test_sdxl_base_then_refiner_matches_denoising_end_and_start(engine, models):
    base_nodes = txt2img_nodes("xl", "euler", steps=10, end_step=8)
    base = run(engine, base_nodes, "denoise", "pos", "neg")
    base_pipe = sd_pipeline(StableDiffusionXLPipeline, models / "xl", "euler")
    base_ref = base_pipe(
        **embeds(base, pooled=True), num_inference_steps=10, denoising_end=0.8, guidance_scale=7.5,
        height=64, width=64, generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(base["denoise"]["latent"].samples, base_ref)

    refine_nodes = {
        **base_nodes,
        "ref": {"type": "CheckpointLoader", "inputs": {"path": "refiner", "dtype": "fp64"}},
        "rpos": {"type": "TextEncode", "inputs": {"clip": "@ref.clip", "text": "a red circle"}},
        "rneg": {"type": "TextEncode", "inputs": {"clip": "@ref.clip", "text": "blurry"}},
        "refine": {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@ref.unet", "positive": "@rpos.cond", "negative": "@rneg.cond", "noise": "@noise.noise",
                "latent": "@denoise.latent", "steps": 10, "cfg": 7.5, "sampler": "euler", "start_step": 8,
                "add_noise": False,
            },
        },
    }
    refined = run(engine, refine_nodes, "refine", "rpos", "rneg")
    ref_pipe = sd_pipeline(StableDiffusionXLImg2ImgPipeline, models / "refiner", "euler")
    reference = ref_pipe(
        prompt_embeds=refined["rpos"]["cond"].embeddings, negative_prompt_embeds=refined["rneg"]["cond"].embeddings,
        pooled_prompt_embeds=refined["rpos"]["cond"].pooled, negative_pooled_prompt_embeds=refined["rneg"]["cond"].pooled,
        image=base_ref, num_inference_steps=10, denoising_start=0.8, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(refined["refine"]["latent"].samples, reference)
