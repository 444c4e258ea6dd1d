"""ComfyUI's ``uni_pc`` and ``uni_pc_bh2`` samplers (UniPC, Zhao et al. 2023, B(h) = h and e^h - 1).

The reference is diffusers' UniPCMultistepScheduler (its own implementation of the paper), run
here on the same sigmas: order 3 with lower orders at the ends, data prediction, ``solver_type``
bh1 / bh2, in the variance-preserving scale ``x / sqrt(1 + sigma^2)`` where it works, with
ComfyUI's last sigma of 0.001 in place of 0. The ComfyUI prompts run on graphsd-tiny.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from reference import assert_same

from graphsd import Engine, Settings
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.sampling.ksamplers import KSAMPLERS, NOT_SUPPORTED, UNIPC_LAST_SIGMA
from graphsd.std.sampling.sigmas import SigmaTable, comfy_sigmas

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
VARIANTS = {"uni_pc": "bh1", "uni_pc_bh2": "bh2"}


def denoiser(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth nonlinear D(x, sigma) (a Gaussian's denoiser plus a bend), so that every
    coefficient of the update shows in the result."""
    d = 0.3 + 0.25 / (0.25 + sigma**2) * (x - 0.3) + 0.2 * torch.sin(x) / (1 + sigma)
    return d, d


def diffusers_unipc(variant: str, sigmas: list[float], x: torch.Tensor) -> torch.Tensor:
    """diffusers' UniPC through ``sigmas`` (the last one > 0), from ``x`` at sigmas[0], in the
    variance-exploding scale x0 + sigma n that ComfyUI's samplers take and return."""
    scheduler = UniPCMultistepScheduler(solver_order=3, solver_type=variant, prediction_type="sample", lower_order_final=True)
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = torch.arange(len(sigmas) - 1, 0, -1)  # labels only: the step index picks the sigmas
    xv = x / math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(scheduler.timesteps):
        s = sigmas[i]
        xv = scheduler.step(denoiser(xv * math.sqrt(1 + s**2), s)[0], t, xv).prev_sample
    return xv * math.sqrt(1 + sigmas[-1] ** 2)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("steps", [2, 3, 4, 8, 20])
def test_uni_pc_equals_diffusers_unipc_of_the_same_variant(name, steps):
    """KSampler's schedule for uni_pc (one step more, the next-to-last sigma dropped), ending at 0:
    graphsd's sampler and diffusers' scheduler with the same B(h) agree to rounding."""
    sigmas = comfy_sigmas(SigmaTable(SD), "karras", steps, discard_penultimate=True).double().tolist()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps)) * math.sqrt(1 + sigmas[0] ** 2)
    ours = KSAMPLERS[name](denoiser, x.clone(), sigmas, None, lambda i, denoised: None)
    reference = diffusers_unipc(VARIANTS[name], [*sigmas[:-1], UNIPC_LAST_SIGMA], x.clone())
    assert_same(ours, reference, f"{name}, {steps} steps")
    other = diffusers_unipc("bh2" if VARIANTS[name] == "bh1" else "bh1", [*sigmas[:-1], UNIPC_LAST_SIGMA], x.clone())
    assert float((ours - other).abs().max()) > 1e-4, "the two variants must differ"


def test_uni_pc_stops_with_leftover_noise_at_a_last_sigma_above_zero():
    """A schedule cut before its end (KSamplerAdvanced's leftover noise) ends at that sigma."""
    sigmas = comfy_sigmas(SigmaTable(SD), "normal", 10).double().tolist()[:7]
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * math.sqrt(1 + sigmas[0] ** 2)
    for name, variant in VARIANTS.items():
        assert_same(KSAMPLERS[name](denoiser, x.clone(), sigmas, None, lambda i, d: None), diffusers_unipc(variant, sigmas, x.clone()))


def test_one_step_takes_no_step_as_in_comfyui():
    """ComfyUI's UniPC spends its first call on the model's value and its last on two steps, so
    with one step (two sigmas) it evaluates the model once and returns x rescaled from the
    variance-preserving scale at sigma_0 to that at the last sigma (0.001)."""
    calls: list[float] = []

    def model(x, sigma):
        calls.append(sigma)
        return denoiser(x, sigma)

    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    out = KSAMPLERS["uni_pc"](model, x, [14.6, 0.0], None, lambda i, d: None)
    assert calls == [14.6]
    torch.testing.assert_close(out, x * math.sqrt(1 + UNIPC_LAST_SIGMA**2) / math.sqrt(1 + 14.6**2), rtol=1e-15, atol=0)


def test_uni_pc_names_are_no_longer_refused():
    assert "uni_pc" not in NOT_SUPPORTED and "uni_pc_bh2" not in NOT_SUPPORTED


# ---------------------------------------------------------------- ComfyUI prompts


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out"))))


def prompt(sampler_name: str, scheduler: str) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "seed": 3,
                "steps": 4,
                "cfg": 6.0,
                "sampler_name": sampler_name,
                "scheduler": scheduler,
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }


@pytest.mark.parametrize("sampler_name", sorted(VARIANTS))
@pytest.mark.parametrize("scheduler", ["normal", "simple", "beta"])
def test_prompt_imports_uni_pc_with_comfyuis_sigmas(engine, sampler_name, scheduler):
    """Both names, with any scheduler, become UNetDenoiseLoop convention comfyui (ComfyUI's
    sigmas; before, uni_pc ran as diffusers' UniPC with normal / karras only)."""
    doc = comfy_to_workflow(prompt(sampler_name, scheduler))
    loop = doc["nodes"]["3"]["inputs"]
    assert (loop["sampler"], loop["schedule"], loop["convention"]) == (sampler_name, scheduler, "comfyui")
    engine.load(doc)


@pytest.mark.slow
def test_prompt_runs_uni_pc_bh2_on_graphsd_tiny(engine):
    latents = {}
    for name in VARIANTS:
        result = engine.run(prompt(name, "simple"), outputs=["3"])
        assert result.ok, [str(e) for e in result.errors]
        latents[name] = result.outputs["3"]["latent"].samples
        assert torch.isfinite(latents[name]).all()
    assert not torch.equal(latents["uni_pc"], latents["uni_pc_bh2"])
