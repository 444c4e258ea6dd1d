"""Inpainting: a latent's noise mask honoured at every step by both denoise loops, inpainting
U-Nets (9 input channels), and the nodes with ComfyUI's names (SetLatentNoiseMask,
VAEEncodeForInpaint, InpaintModelConditioning, ImageToMask, InvertMask).

References: the diffusers convention against diffusers' ``StableDiffusionInpaintPipeline`` on tiny
random models with a 4-channel and a 9-channel U-Net (the pipeline gets graphsd's encoded latents,
so the loops are compared on their own); the ComfyUI convention against ComfyUI's rule written
here (its ``KSamplerX0Inpaint`` around an Euler sampler of its own); the nodes against ComfyUI's
formulas written here. Both sides run in float64 (``reference.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import sd_tiny
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
)
from PIL import Image as PILImage
from reference import assert_same, diffusers_noise_in_float32

from graphsd import Engine, Settings
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.sampling.sigmas import SigmaTable, comfy_sigmas

SEED = 77
SIZE = 64
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"

#: The scheduler a diffusers user picks for each graphsd sampler name (DDIM without clipping x0
#: to [-1, 1], as StableDiffusionPipeline's constructor sets it for latents).
SCHEDULERS = {
    "euler": EulerDiscreteScheduler.from_config,
    "euler_ancestral": EulerAncestralDiscreteScheduler.from_config,
    "ddim": functools.partial(DDIMScheduler.from_config, clip_sample=False),
    "heun": HeunDiscreteScheduler.from_config,
    "dpmpp_2m": DPMSolverMultistepScheduler.from_config,
}


@pytest.fixture(scope="module", autouse=True)
def same_noise():
    with diffusers_noise_in_float32():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD1-style model, and the same with a 9-channel (inpainting) U-Net."""
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    inpaint = StableDiffusionInpaintPipeline(
        vae=sd_tiny.vae(),
        text_encoder=sd_tiny.text_encoder(),
        tokenizer=sd_tiny.tokenizer(),
        unet=sd_tiny.unet(seed=5, in_channels=9),
        scheduler=PNDMScheduler(**sd_tiny.SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd_tiny.save_pipeline(inpaint, root / "inpaint")
    return root


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out"))))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A random RGBA picture whose transparent part (LoadImage's mask = 1) is a soft-edged
    rectangle, so that masks are binarised or resized where it matters."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[12:44, 20:52] = 0
    alpha[11, 20:52] = alpha[44, 20:52] = 100  # rows half transparent
    rgba[..., 3] = alpha
    path = tmp_path_factory.mktemp("in") / "picture.png"
    PILImage.fromarray(rgba, "RGBA").save(path)
    return str(path)


def run(engine, nodes, *outputs):
    result = engine.run({"version": 1, "nodes": nodes}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


def base(model, picture):
    """Prompts and the picture's latent. The picture is encoded by the fp32 VAE, so that its latent
    survives the float32 round trip the inpainting pipeline puts its ``image`` through."""
    return {
        "model": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": "fp64"}},
        "vae32": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": "fp32"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "blurry"}},
        "load": {"type": "LoadImage", "inputs": {"path": picture}},
        "encode": {"type": "VAEEncode", "inputs": {"vae": "@vae32.vae", "image": "@load.image"}},
    }


def loop(latent, positive="@pos.cond", negative="@neg.cond", **extra):
    inputs = {"unet": "@model.unet", "positive": positive, "negative": negative, "noise": "@noise.noise", "latent": latent}
    return {"type": "UNetDenoiseLoop", "inputs": {**inputs, "cfg": 7.5, **extra}}


@functools.cache
def loaded(folder):
    return StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None).to(dtype=torch.float64)


def pipeline(folder, sampler):
    """The inpainting pipeline on ``folder`` with the scheduler a diffusers user picks for
    ``sampler``, built by the pipeline's constructor (which applies diffusers' config fixes)."""
    base = loaded(folder)
    scheduler = SCHEDULERS[sampler](base.scheduler.config)
    pipe = StableDiffusionInpaintPipeline.from_pipe(base, scheduler=scheduler, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_mask(out):
    return out["load"]["mask"].values[:, None].double()  # [1, 1, 64, 64]


# ---- diffusers convention: StableDiffusionInpaintPipeline ------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "denoise"), [("euler", 1.0), ("euler", 0.6), ("euler_ancestral", 0.7), ("ddim", 1.0),
                                                  ("heun", 0.8), ("dpmpp_2m", 1.0)])
def test_masked_latent_matches_the_inpaint_pipeline_with_a_4_channel_unet(engine, models, picture, sampler, denoise):
    nodes = {
        **base("sd1", picture),
        "masked": {"type": "SetLatentNoiseMask", "inputs": {"samples": "@encode.latent", "mask": "@load.mask"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@encode.latent"}},
        "denoise": loop("@masked.latent", steps=6, sampler=sampler, denoise=denoise),
    }
    out = run(engine, nodes, "denoise", "encode", "load", "pos", "neg")
    start = out["encode"]["latent"].samples.double()
    reference = pipeline(models / "sd1", sampler)(
        prompt_embeds=out["pos"]["cond"].embeddings, negative_prompt_embeds=out["neg"]["cond"].embeddings,
        image=start, mask_image=pixel_mask(out), masked_image_latents=start, height=SIZE, width=SIZE,
        strength=denoise, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images
    ours = out["denoise"]["latent"].samples
    assert_same(ours, reference)
    # the pipeline's mask: binarised at 0.5, nearest neighbour to the latent; outside it the start latent, exactly
    kept = F.interpolate((pixel_mask(out) >= 0.5).double(), size=(8, 8)).expand_as(ours) == 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(ours[kept], start[kept])


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "denoise"), [("euler", 1.0), ("ddim", 0.7), ("euler_ancestral", 1.0)])
def test_inpaint_model_conditioning_matches_the_inpaint_pipeline_with_a_9_channel_unet(engine, models, picture, sampler, denoise):
    nodes = {
        **base("inpaint", picture),
        "inpaint": {"type": "InpaintModelConditioning", "inputs": {"positive": "@pos.cond", "negative": "@neg.cond", "vae": "@vae32.vae",
                                                                  "pixels": "@load.image", "mask": "@load.mask"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@inpaint.latent"}},
        "denoise": loop("@inpaint.latent", "@inpaint.positive", "@inpaint.negative", steps=5, sampler=sampler, denoise=denoise),
    }
    out = run(engine, nodes, "denoise", "inpaint", "load", "pos", "neg")
    positive = out["inpaint"]["positive"]
    assert positive.extras["concat_mask"].shape == (1, 1, SIZE, SIZE)
    reference = pipeline(models / "inpaint", sampler)(
        prompt_embeds=out["pos"]["cond"].embeddings, negative_prompt_embeds=out["neg"]["cond"].embeddings,
        image=out["inpaint"]["latent"].samples.double(), mask_image=pixel_mask(out),
        masked_image_latents=positive.extras["concat_latent_image"].double(),
        height=SIZE, width=SIZE, strength=denoise, num_inference_steps=5, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images
    assert_same(out["denoise"]["latent"].samples, reference)


# ---- ComfyUI convention: KSamplerX0Inpaint's rule, written here ------------------------------
def comfy_euler(unet, table, latent, noise, mask, context, cfg, sigmas, concat=None):
    """ComfyUI's KSampler with ``euler`` and a noise mask, for an epsilon U-Net: Euler steps on
    the denoised estimate ``D = x - sigma eps(x / sqrt(sigma^2 + 1))`` with classifier-free
    guidance, around each evaluation ``x = x m + (latent + noise sigma)(1 - m)`` and
    ``D = D m + latent (1 - m)`` (KSamplerX0Inpaint); an inpainting U-Net also gets
    ``round(mask)`` and the masked picture. The noise levels and the timestep of each are
    graphsd's (``sigmas.py``, checked against ComfyUI's formulas in test_samplers_comfy.py)."""
    x = latent + noise * math.sqrt(1 + sigmas[0] ** 2)  # the schedule starts at the largest sigma
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        x_in = x * mask + (latent + noise * s) * (1 - mask)
        model_input = torch.cat([x_in, x_in]) / math.sqrt(s * s + 1)
        if concat is not None:
            model_input = torch.cat([model_input, concat.repeat(2, 1, 1, 1)], dim=1)
        with torch.no_grad():
            eps = unet(model_input, table.timestep(s), encoder_hidden_states=context).sample
        uncond, cond = (torch.cat([x_in, x_in]) - eps * s).chunk(2)
        denoised = (uncond + cfg * (cond - uncond)) * mask + latent * (1 - mask)
        x = x + (x - denoised) / s * (s_next - s)
    return x


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd1", "inpaint"])
def test_comfyui_convention_inpaints_by_comfyuis_rule(engine, models, picture, model):
    nodes = {
        **base(model, picture),
        "masked": {"type": "SetLatentNoiseMask", "inputs": {"samples": "@encode.latent", "mask": "@load.mask"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@encode.latent"}},
        "denoise": loop("@masked.latent", steps=4, sampler="euler", schedule="karras", convention="comfyui"),
    }
    out = run(engine, nodes, "denoise", "encode", "noise", "load", "pos", "neg")
    pipe = pipeline(models / model, "euler")
    table = SigmaTable(dict(pipe.scheduler.config))
    latent = out["encode"]["latent"].samples.double()
    mask = F.interpolate(pixel_mask(out), size=(8, 8), mode="bilinear")  # soft: the half-transparent rows count
    assert ((mask > 0) & (mask < 1)).any()
    concat = None
    if model == "inpaint":  # the start latent is the masked picture here (SetLatentNoiseMask on the picture's latent)
        concat = torch.cat([mask.round(), latent], dim=1)
    context = torch.cat([out["neg"]["cond"].embeddings, out["pos"]["cond"].embeddings])
    sigmas = comfy_sigmas(table, "karras", 4).tolist()
    reference = comfy_euler(pipe.unet, table, latent, out["noise"]["noise"].samples.double(), mask, context, 7.5, sigmas, concat)
    assert_same(out["denoise"]["latent"].samples, reference)


@pytest.mark.slow
@pytest.mark.parametrize("convention", ["diffusers", "comfyui"])
def test_continuing_without_added_noise_keeps_the_unmasked_part_as_it_is(engine, picture, convention):
    """add_noise off (KSamplerAdvanced's add_noise disable): the kept part is never noised, as
    ComfyUI's sampler then gets zero noise; it stays the start latent at every step."""
    nodes = {
        **base("sd1", picture),
        "masked": {"type": "SetLatentNoiseMask", "inputs": {"samples": "@encode.latent", "mask": "@load.mask"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@encode.latent"}},
        "denoise": loop("@masked.latent", steps=6, start_step=3, add_noise=False, sampler="euler", convention=convention),
    }
    out = run(engine, nodes, "denoise", "encode", "load")
    start, ours = out["encode"]["latent"].samples.double(), out["denoise"]["latent"].samples
    kept = (F.interpolate(pixel_mask(out), size=(8, 8), mode="bilinear") == 0).expand_as(ours)
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(ours[kept], start[kept])
    assert not torch.allclose(ours[~kept], start[~kept])


# ---- the nodes --------------------------------------------------------------------------------
@pytest.mark.slow
def test_vae_encode_for_inpaint_greys_the_mask_and_grows_it(engine, models, picture):
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        "load": {"type": "LoadImage", "inputs": {"path": picture}},
        "for_inpaint": {"type": "VAEEncodeForInpaint", "inputs": {"pixels": "@load.image", "vae": "@model.vae", "mask": "@load.mask",
                                                                  "grow_mask_by": 5}},
        "grey": {"type": "VAEEncodeForInpaint", "inputs": {"pixels": "@load.image", "vae": "@model.vae", "mask": "@load.mask",
                                                           "grow_mask_by": 0}},
    }
    out = run(engine, nodes, "for_inpaint", "grey", "load")
    mask = pixel_mask(out).round()
    # growing by 5 pixels: each pixel within 2 to the left/top and 2 to the right/bottom of a masked one
    grown = F.max_pool2d(mask, kernel_size=5, stride=1, padding=2)
    assert torch.equal(out["for_inpaint"]["latent"].noise_mask.double(), grown)
    assert torch.equal(out["grey"]["latent"].noise_mask.double(), mask)
    pixels = out["load"]["image"].pixels.double().permute(0, 3, 1, 2)
    greyed = torch.where(mask == 1, 0.5, pixels)
    vae = pipeline(models / "sd1", "euler").vae
    with torch.no_grad():
        reference = vae.encode(greyed * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    assert_same(out["grey"]["latent"].samples, reference)


def test_set_latent_noise_mask_and_the_mask_nodes():
    from graphsd.std.nodes.inpaint import ImageToMask, InvertMask, SetLatentNoiseMask
    from graphsd.types import Image, Latent, Mask

    pixels = torch.rand(2, 16, 24, 3, generator=torch.Generator().manual_seed(0))
    green = ImageToMask().run(ImageToMask.Inputs(image=Image(pixels), channel="green"), None).mask.values
    assert torch.equal(green, pixels[..., 1])
    assert torch.equal(InvertMask().run(InvertMask.Inputs(mask=Mask(green)), None).mask.values, 1 - green)
    latent = Latent(torch.zeros(2, 4, 2, 3))
    masked = SetLatentNoiseMask().run(SetLatentNoiseMask.Inputs(samples=latent, mask=Mask(green)), None).latent
    assert masked.samples is latent.samples and masked.noise_mask.shape == (2, 1, 16, 24) and latent.noise_mask is None


def test_an_rgb_image_has_no_alpha_mask():
    from graphsd.errors import NodeError
    from graphsd.std.nodes.inpaint import ImageToMask
    from graphsd.types import Image

    with pytest.raises(NodeError) as err:
        ImageToMask().run(ImageToMask.Inputs(image=Image(torch.zeros(1, 8, 8, 3)), channel="alpha"), None)
    assert err.value.field == "channel"


@pytest.mark.slow
def test_an_inpainting_unet_without_a_mask_is_refused_with_what_to_do(engine, picture):
    nodes = {
        **base("inpaint", picture),
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@encode.latent"}},
        "denoise": loop("@encode.latent", steps=2, sampler="euler"),
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["denoise"])
    assert not result.ok
    (error,) = result.errors
    assert error.node_id == "denoise" and "latent" in error.message
    assert "InpaintModelConditioning" in error.message and "9 input channels" in error.message


# ---- ComfyUI prompts ---------------------------------------------------------------------------
def inpaint_prompt(picture, encoder):
    """ComfyUI's inpainting graph on graphsd-tiny: LoadImage (its mask) → ``encoder`` → KSampler."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a blue circle on a white background"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "10": {"class_type": "LoadImage", "inputs": {"image": picture}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0],
                                                   "seed": 3, "steps": 3, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                                                   "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "inpaint"}},
    }
    if encoder == "VAEEncodeForInpaint":
        inputs = {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6}
        prompt["11"] = {"class_type": "VAEEncodeForInpaint", "inputs": inputs}
    elif encoder == "SetLatentNoiseMask":
        prompt["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        prompt["11"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["12", 0], "mask": ["10", 1]}}
    else:
        prompt["11"] = {"class_type": "InpaintModelConditioning", "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2],
                                                                            "pixels": ["10", 0], "mask": ["10", 1], "noise_mask": True}}
        prompt["3"]["inputs"].update(positive=["11", 0], negative=["11", 1], latent_image=["11", 2])
    return prompt


@pytest.mark.parametrize("encoder", ["VAEEncodeForInpaint", "SetLatentNoiseMask", "InpaintModelConditioning"])
def test_comfyui_inpainting_prompts_import_onto_the_native_nodes(picture, encoder):
    nodes = comfy_to_workflow(inpaint_prompt(picture, encoder), Engine(Settings(device="cpu")).registry.nodes)["nodes"]
    assert nodes["11"]["type"] == encoder
    assert nodes["3"]["inputs"]["latent"] == "@11.latent"
    if encoder == "InpaintModelConditioning":
        assert (nodes["3"]["inputs"]["positive"], nodes["3"]["inputs"]["negative"]) == ("@11.positive", "@11.negative")
    else:
        assert nodes["11"]["inputs"]["mask"] == "@10.mask"


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["VAEEncodeForInpaint", "InpaintModelConditioning"])
def test_comfyui_inpainting_prompt_keeps_the_unmasked_part(tmp_path, picture, encoder):
    """KSampler on a masked latent keeps the start latent outside the mask: where the (rounded,
    for VAEEncodeForInpaint grown) mask is 0 at the latent's resolution, ComfyUI's rule ends at
    the start latent itself (Euler's last step to sigma 0 lands on the blended estimate)."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    prompt = inpaint_prompt(picture, encoder)
    result = engine.run(prompt, outputs=["3", "11"])
    assert result.ok, [str(e) for e in result.errors]
    start = result.outputs["11"]["latent"]
    mask = F.interpolate(start.noise_mask, size=start.samples.shape[-2:], mode="bilinear")
    kept = (mask == 0).expand_as(start.samples)
    ours = result.outputs["3"]["latent"].samples
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(ours[kept], start.samples[kept], rtol=0, atol=1e-5)
    assert not torch.allclose(ours[~kept], start.samples[~kept], atol=1e-2)


# ---- the example workflow ----------------------------------------------------------------------
@pytest.mark.slow
def test_inpaint_workflow_repaints_the_circle_and_keeps_the_rest(tmp_path):
    """workflows/inpaint.yaml on graphsd-tiny: the red circle it generates first is repainted with
    the prompt's blue, and outside the noise mask the latent stays the encoded picture's, exactly
    (the diffusers convention ends on the start latent there)."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    result = engine.run(WORKFLOWS / "inpaint.yaml", outputs=["save", "picture", "mask", "encode", "denoise", "image"])
    assert result.ok, [str(e) for e in result.errors]
    assert [p.endswith(".png") for p in result.files] == [True]
    start, out = result.outputs["encode"]["latent"], result.outputs["denoise"]["latent"].samples
    kept = (F.interpolate(start.noise_mask, size=out.shape[-2:]) == 0).expand_as(out)
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(out[kept], start.samples[kept])
    circle = result.outputs["mask"]["mask"].values[0] > 0.5
    before, after = result.outputs["picture"]["image"].pixels[0][circle], result.outputs["image"]["image"].pixels[0][circle]
    assert before[:, 0].mean() > before[:, 2].mean()  # red
    assert after[:, 2].mean() > after[:, 0].mean()  # blue
