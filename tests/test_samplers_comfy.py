"""ComfyUI's schedulers and samplers (UNetDenoiseLoop ``convention: comfyui``).

- Each scheduler's sigmas are recomputed here from the published formulas (numpy / scipy.special,
  not graphsd's code) on the SD noise table, itself rebuilt here from its betas.
- Each sampler runs on a problem with an exact answer: data x0 ~ N(mu, s^2) per coordinate, whose
  denoiser is ``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)`` and whose probability-flow ODE
  keeps ``(x - mu) / sqrt(s^2 + sigma^2)`` constant. Deterministic samplers must converge to that
  solution with their order; stochastic ones must produce samples distributed as N(mu, s^2).
- Every sampler x scheduler pair runs on a tiny random U-Net and gives finite latents, or is
  refused at validation; every ComfyUI name imports or is refused on import.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sd_tiny
import torch
from scipy.special import betaincinv

from graphsd import Engine, Settings
from graphsd.errors import WorkflowError
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.sampling.kdiffusion import BrownianNoise, Denoiser, GaussianNoise
from graphsd.std.sampling.ksamplers import COMFY_SAMPLER_NAMES, KSAMPLERS, NOT_SUPPORTED
from graphsd.std.sampling.sigmas import COMFY_SCHEDULERS, SigmaTable, comfy_sigmas

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ---------------------------------------------------------------- schedules


def sd_sigmas() -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), abar the cumulative product of 1 - beta, betas
    linear in sqrt between beta_start and beta_end (SD's scaled_linear), in float32 as ComfyUI
    stores them."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    abar = np.cumprod(1 - betas).astype(np.float32)
    return np.sqrt((1 - abar) / abar).astype(np.float64)


def sigma_at(table: np.ndarray, t: float) -> float:
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def expected(name: str, n: int) -> list[float]:
    s = sd_sigmas()
    smin, smax, T = s[0], s[-1], len(s)
    if name == "normal":
        return [sigma_at(s, t) for t in np.linspace(T - 1, 0, n)] + [0.0]
    if name == "sgm_uniform":
        return [sigma_at(s, t) for t in np.linspace(T - 1, 0, n + 1)[:-1]] + [0.0]
    if name == "simple":
        return [s[T - 1 - int(i * T / n)] for i in range(n)] + [0.0]
    if name == "ddim_uniform":
        return [s[t] for t in range(1, T, T // n)][::-1] + [0.0]
    if name == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        return [(smax ** (1 / 7) + i / (n - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7 for i in range(n)] + [0.0]
    if name == "exponential":
        return [math.exp(math.log(smax) + i / (n - 1) * (math.log(smin) - math.log(smax))) for i in range(n)] + [0.0]
    if name == "beta":  # timesteps at the Beta(0.6, 0.6) quantiles 1 - i/n, repeats dropped
        ts = [round(float(betaincinv(0.6, 0.6, 1 - i / n)) * (T - 1)) for i in range(n)]
        return [s[t] for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]] + [0.0]
    if name == "linear_quadratic":  # 1 - sigma/sigma_max: linear to 0.025 over n//2 steps, then quadratic to 1
        m = n // 2
        lin = [0.025 * i / m for i in range(m)]
        # the quadratic a i^2 + b i + c through (m, 0.025) with the line's slope there, reaching 1 at i = n
        a = (1 - 0.025 - 0.025 / m * (n - m)) / (n - m) ** 2
        quad = [0.025 + 0.025 / m * (i - m) + a * (i - m) ** 2 for i in range(m, n)]
        return [smax * (1 - v) for v in [*lin, *quad, 1.0]]
    if name == "kl_optimal":  # Sabour et al. 2024
        return [math.tan((1 - i / (n - 1)) * math.atan(smax) + i / (n - 1) * math.atan(smin)) for i in range(n)] + [0.0]
    raise AssertionError(name)


@pytest.mark.parametrize("name", COMFY_SCHEDULERS)
@pytest.mark.parametrize("steps", [4, 20])
def test_schedule_matches_published_formula(name, steps):
    """float32 sigmas (ComfyUI's precision): each passes through at most ~10 float32 roundings
    (relative 2^-24 each) of values whose logs are at most 3 in size, so they agree with the
    float64 formula to 10 * 3 * 2^-24 < 2e-6 relative; 1e-5 leaves room."""
    ours = comfy_sigmas(SigmaTable(SD), name, steps).double().numpy()
    ref = np.array(expected(name, steps))
    assert ours.shape == ref.shape, (ours.tolist(), ref.tolist())
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours[-1] == 0 and (np.diff(ours) < 0).all()


def test_table_ends_and_discarded_penultimate_sigma():
    table = SigmaTable(SD)
    ref = sd_sigmas()
    assert table.sigma_min == pytest.approx(ref[0], rel=1e-6) and table.sigma_max == pytest.approx(ref[-1], rel=1e-6)
    assert [int(table.timestep(table.sigma(t))) for t in (0, 1, 500, 999)] == [0, 1, 500, 999]
    # dpm_2 / uni_pc in ComfyUI: one step more, the next-to-last sigma dropped
    full = comfy_sigmas(table, "karras", 6)
    dropped = comfy_sigmas(table, "karras", 5, discard_penultimate=True)
    assert torch.equal(dropped, torch.cat([full[:-2], full[-1:]]))


# ---------------------------------------------------------------- analytic problem

MU, S = 0.3, 0.5


def gaussian_model(x, sigma):
    d = MU + S**2 / (S**2 + sigma**2) * (x - MU)
    return d, d


def exact(x, sigma_from, sigma_to):
    return MU + (x - MU) * math.sqrt(S**2 + sigma_to**2) / math.sqrt(S**2 + sigma_from**2)


def geometric(n, hi=10.0, lo=0.1):
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64)).tolist()


STOCHASTIC = {name for name in KSAMPLERS if "ancestral" in name or "sde" in name or name in ("ddpm", "lcm")}
SAMPLING = STOCHASTIC - {"lcm"}
"""Samplers of the diffusion SDE: with an exact denoiser they sample the data distribution. LCM
assumes a consistency model, see its own test."""

ORDER = {
    "euler": 1,
    "euler_cfg_pp": 1,
    "ddim": 1,
    "heunpp2": 1,
    "gradient_estimation": 1,
    "gradient_estimation_cfg_pp": 1,
    "heun": 2,
    "dpm_2": 2,
    "dpmpp_2m": 2,
    "dpmpp_2m_cfg_pp": 2,
    "res_multistep": 2,
    "res_multistep_cfg_pp": 2,
    # multistep methods of order 3-4 started with lower-order steps: the start's local error
    # O(h^2) bounds the global order at 2
    "lms": 2,
    "ipndm": 2,
    "dpm_fast": 2,  # order-3 steps, but ends on an order-1 step when the evaluations are a multiple of 3
    # UniPC-3 with its corrector, but ComfyUI's (and the paper's) last step is order 1 without it
    "uni_pc": 2,
    "uni_pc_bh2": 2,
}
"""Global order of accuracy of each deterministic sampler (heunpp2 weights its stages by sigma
ratios, not 1/2, and gradient estimation extrapolates with a constant gamma over unequal steps:
both consistent but first order)."""


def test_every_deterministic_sampler_has_an_order():
    assert set(ORDER) == set(KSAMPLERS) - STOCHASTIC


@pytest.mark.parametrize("name", sorted(ORDER))
def test_deterministic_sampler_converges_with_its_order(name):
    """Error at the end of 10 -> 0.1 against the exact ODE solution, for 30 and 60 steps: a
    method of order p divides it by about 2^p; allow 0.35 below p (the asymptotic regime is not
    reached exactly at these step counts), and require the 60-step error to be small."""
    x0 = MU + math.sqrt(S**2 + 100) * torch.linspace(-2, 2, 9, dtype=torch.float64)
    target = exact(x0, 10.0, 0.1)

    def unused_noise(a, b):
        raise AssertionError("a deterministic sampler drew noise")

    errors = []
    for n in (30, 60):
        out = KSAMPLERS[name](gaussian_model, x0.clone(), geometric(n), unused_noise, lambda i, denoised: None)
        errors.append(float((out - target).abs().max()))
    order = math.log2(errors[0] / errors[1])
    assert order > ORDER[name] - 0.35, (name, errors, order)
    assert errors[1] < 0.05 * float(target.abs().max()), errors


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "dpmpp_2m", "ipndm", "lms", "gradient_estimation", "res_multistep"])
def test_schedule_ending_at_zero_converges_to_the_data(name):
    """On ComfyUI's karras schedule (ending at 0, where d is undefined and samplers take a last
    special step) the result converges to mu + (x - mu) s / sqrt(s^2 + sigma_0^2): doubling the
    steps shrinks the error at least 1.5 times (a first-order method halves it) and 80 steps are
    within 5 % of the spread of the targets. Below that, the floor is the last step's own error:
    from sigma_min = 0.029 it returns D(x, sigma_min), off the exact end by a factor
    s / sqrt(s^2 + sigma^2) - s^2 / (s^2 + sigma^2) ~ sigma^2 / (2 s^2) = 0.0017 of |x - mu| <= 1.1,
    which more steps do not remove (allow twice that)."""
    table = SigmaTable(SD)
    errors = []
    for n in (40, 80):
        sigmas = comfy_sigmas(table, "karras", n).double().tolist()
        x0 = MU + math.sqrt(S**2 + sigmas[0] ** 2) * torch.linspace(-2, 2, 9, dtype=torch.float64)
        out = KSAMPLERS[name](gaussian_model, x0.clone(), sigmas, None, lambda i, denoised: None)
        errors.append(float((out - exact(x0, sigmas[0], 0.0)).abs().max()))
    floor = 2 * 0.0292**2 / (2 * S**2) * 1.1
    assert errors[1] < max(errors[0] / 1.5, floor) and errors[1] < 0.05 * 2, errors


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "res_multistep", "gradient_estimation"])
def test_cfg_pp_equals_the_plain_sampler_without_guidance(name):
    """CFG++ only changes which estimate re-noises; with D_uncond = D_cfg it is the plain sampler."""
    x0 = torch.linspace(-20, 20, 9, dtype=torch.float64)
    runs = []
    for variant in (name, name + "_cfg_pp"):
        noise = GaussianNoise(5, (9,), torch.float64, torch.device("cpu"))
        runs.append(KSAMPLERS[variant](gaussian_model, x0.clone(), geometric(12) + [0.0], noise, lambda i, denoised: None))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_stochastic_sampler_samples_the_data_distribution(name):
    """8192 chains from the exact marginal at sigma 20 down to 0 (40 karras steps): the samples'
    mean and standard deviation must be mu and s. Sampling error: standard errors s/sqrt(n) =
    0.0055 and s/sqrt(2n) = 0.0039, 5 of them < 0.03; discretisation bias of these first- and
    second-order weak solvers at a log-step of ln(20/0.03)/39 = 0.17 is a few hundredths of s at
    most; tolerance 0.05 for both. A wrong noise size (sigma for sigma_up, a missing
    sqrt(1 - e^{-2h})) moves the std by more than 0.2."""
    n = 8192
    sigmas = torch.tensor([(20 ** (1 / 7) + i / 39 * (0.03 ** (1 / 7) - 20 ** (1 / 7))) ** 7 for i in range(40)] + [0.0]).tolist()
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(S**2 + 400) * torch.randn(n, generator=g, dtype=torch.float64)
    noise_cls = BrownianNoise if "sde" in name else GaussianNoise
    extra = (sigmas[-2], sigmas[0]) if noise_cls is BrownianNoise else ()
    noise = noise_cls(1, (n,), torch.float64, torch.device("cpu"), *extra)
    out = KSAMPLERS[name](gaussian_model, x, sigmas, noise, lambda i, denoised: None)
    assert abs(float(out.mean()) - MU) < 0.05, float(out.mean())
    assert abs(float(out.std()) - S) < 0.05, float(out.std())


@pytest.mark.parametrize("name", sorted(set(KSAMPLERS) - {"dpm_fast"}))
def test_callback_reports_the_estimate_at_each_steps_start(name):
    """The callback of step i gets the guided estimate of the step's first model call, at
    sigma_i (what k-diffusion reports: ComfyUI's previews and SamplerCustom's denoised_output).
    dpm_fast places its own steps in log sigma, so it is left out."""
    calls, reported = [], []

    def model(x, sigma):
        d = gaussian_model(x, sigma)
        calls.append((sigma, d[0]))
        return d

    def callback(i, denoised):
        reported.append((i, len(calls), denoised))

    sigmas = geometric(5) + [0.0]
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(S**2 + sigmas[0] ** 2)
    noise = BrownianNoise(1, x.shape, torch.float64, torch.device("cpu"), sigmas[-2], sigmas[0])
    KSAMPLERS[name](model, x, sigmas, noise, callback)
    assert [i for i, _, _ in reported] == list(range(len(sigmas) - 1))
    done_before = [0] + [n for _, n, _ in reported[:-1]]
    for (i, _, denoised), first_call in zip(reported, done_before, strict=True):
        sigma, estimate = calls[first_call]
        assert sigma == sigmas[i] and denoised is estimate, (name, i)


def test_lcm_denoises_then_renoises():
    """LCM (Luo et al. 2023, Alg. 1): x_{i+1} = D(x_i, sigma_i) + sigma_{i+1} z_i. With D = mu +
    a_i (x - mu), a_i = s^2 / (s^2 + sigma_i^2), the variance follows v_{i+1} = a_i^2 v_i +
    sigma_{i+1}^2 and the mean stays mu; 8192 samples: 5 standard errors of the std is 0.02 v^0.5."""
    n = 8192
    sigmas = geometric(8, 20.0, 0.05) + [0.0]
    x = MU + math.sqrt(S**2 + 400) * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = KSAMPLERS["lcm"](gaussian_model, x, sigmas, GaussianNoise(1, (n,), torch.float64, torch.device("cpu")), lambda i, denoised: None)
    v = S**2 + 400
    for sigma, sigma_next in zip(sigmas, sigmas[1:], strict=False):
        v = (S**2 / (S**2 + sigma**2)) ** 2 * v + sigma_next**2
    assert abs(float(out.std()) - math.sqrt(v)) < 0.04 * math.sqrt(v) and abs(float(out.mean()) - MU) < 0.05


def test_brownian_noise_has_brownian_increments():
    """Increments over disjoint intervals, asked in any order, are independent unit normals, and
    splitting an interval in two gives the same total (W is one path)."""
    noise = BrownianNoise(3, (20000,), torch.float64, torch.device("cpu"), 0.1, 10.0)
    a = noise(10.0, 5.0)
    b = noise(5.0, 1.0)
    whole = noise(10.0, 1.0)
    torch.testing.assert_close(whole * 3.0, a * math.sqrt(5) + b * 2.0)  # sqrt(9) W = sqrt(5) W1 + sqrt(4) W2
    # 20000 draws: the std's standard error is 0.005, the correlation's 0.007; 5 of them
    assert abs(float(a.std()) - 1) < 0.025 and abs(float(b.std()) - 1) < 0.025
    assert abs(float((a * b).mean())) < 0.035


# ---------------------------------------------------------------- tiny U-Net, every pair


@pytest.fixture(scope="module")
def tiny_unet():
    """sd_tiny's U-Net with one level (a cross-attention down block, the mid block, a
    cross-attention up block): what the samplers call is a real U-Net with its conditioning;
    its depth is not what they are tested for, and one level runs in half the time."""
    return sd_tiny.unet(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", COMFY_SCHEDULERS)
def test_every_sampler_with_every_scheduler_runs_on_a_unet(tiny_unet, schedule):
    table = SigmaTable(SD)
    context = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    model = Denoiser(tiny_unet, table, context, None, cfg=5.0, guidance=True, work=torch.float32)
    for name, sampler in KSAMPLERS.items():
        sigmas = comfy_sigmas(table, schedule, 2, discard_penultimate=name in ("dpm_2", "dpm_2_ancestral")).tolist()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * math.sqrt(1 + sigmas[0] ** 2)
        noise = (
            BrownianNoise(1, x.shape, torch.float32, torch.device("cpu"), sigmas[-2], sigmas[0])
            if "sde" in name
            else GaussianNoise(1, x.shape, torch.float32, torch.device("cpu"))
        )
        steps = []
        with torch.no_grad():
            out = sampler(model, x, sigmas, noise, lambda i, denoised: steps.append(i))
        assert out.shape == x.shape and torch.isfinite(out).all(), (name, schedule)
        assert steps and steps[-1] == len(steps) - 1, (name, schedule)


# ---------------------------------------------------------------- the node and the ComfyUI import


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out"))))


def loop_nodes(sampler, schedule, convention="comfyui", seed=1, steps=3):
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": seed, "width": 64, "height": 64}},
            "d": {
                "type": "UNetDenoiseLoop",
                "inputs": {
                    "unet": "@model.unet",
                    "positive": "@pos.cond",
                    "negative": "@neg.cond",
                    "noise": "@noise.noise",
                    "steps": steps,
                    "cfg": 5.0,
                    "sampler": sampler,
                    "schedule": schedule,
                    "convention": convention,
                },
            },
        },
    }


@pytest.mark.parametrize(
    "sampler,schedule,convention,field,says",
    [
        ("dpm_adaptive", "karras", "comfyui", "sampler", "not supported by graphsd"),
        ("deis", "normal", "comfyui", "sampler", "not supported by graphsd"),
        ("no_such", "normal", "comfyui", "sampler", "unknown ComfyUI sampler"),
        ("euler_ancestral", "karras", "diffusers", "schedule", "no karras schedule"),
        ("ddim", "karras", "diffusers", "schedule", "no karras schedule"),
        ("euler", "simple", "diffusers", "schedule", "set convention to comfyui"),
        ("dpmpp_sde", "normal", "diffusers", "sampler", "set convention to comfyui"),
    ],
)
def test_pairs_that_cannot_run_are_refused_at_validation(engine, sampler, schedule, convention, field, says):
    with pytest.raises(WorkflowError) as info:
        engine.load(loop_nodes(sampler, schedule, convention))
    [issue] = info.value.issues
    assert issue.node == "d" and issue.field == field and says in str(issue), str(issue)
    assert "euler" in str(issue) or "normal, karras" in str(issue)  # what works is listed


@pytest.mark.slow
def test_node_runs_comfy_samplers_reproducibly_from_the_seed(engine, tmp_path):
    """Same seed, same latent in another engine (the per-step noise is seeded with it); another
    seed, another latent."""
    other = Engine(Settings(device="cpu", output_dir=str(tmp_path)))

    def latent(e, sampler, seed):
        result = e.run(loop_nodes(sampler, "karras", seed=seed), outputs=["d"])
        assert result.ok, [str(x) for x in result.errors]
        return result.outputs["d"]["latent"].samples

    for sampler in ("euler_ancestral", "dpmpp_2m_sde_gpu"):
        first = latent(engine, sampler, 1)
        assert torch.isfinite(first).all()
        assert torch.equal(first, latent(other, sampler, 1))
        assert not torch.equal(first, latent(engine, sampler, 2))


def ksampler_prompt(sampler_name, scheduler):
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
                "seed": 7,
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


@pytest.mark.parametrize("sampler_name", COMFY_SAMPLER_NAMES)
def test_every_comfy_sampler_name_imports_or_is_refused(engine, sampler_name):
    scheduler = "karras"
    if sampler_name in KSAMPLERS:
        doc = comfy_to_workflow(ksampler_prompt(sampler_name, scheduler))
        loop = doc["nodes"]["3"]["inputs"]
        assert (loop["sampler"], loop["schedule"], loop["convention"]) == (sampler_name, scheduler, "comfyui")
        engine.load(doc)  # passes graphsd's validation too
    else:
        assert sampler_name in NOT_SUPPORTED
        with pytest.raises(WorkflowError) as info:
            comfy_to_workflow(ksampler_prompt(sampler_name, scheduler))
        [issue] = info.value.issues
        assert issue.field == "sampler_name" and NOT_SUPPORTED[sampler_name] in str(issue) and "dpmpp_2m" in str(issue)


@pytest.mark.parametrize("scheduler", COMFY_SCHEDULERS)
def test_every_comfy_scheduler_imports(engine, scheduler):
    doc = comfy_to_workflow(ksampler_prompt("dpmpp_2m", scheduler))
    assert doc["nodes"]["3"]["inputs"]["schedule"] == scheduler
    engine.load(doc)


def test_comfy_names_cover_comfyui():
    """ComfyUI's 42 sampler names (its list when this was written) and its 9 schedulers."""
    assert len(COMFY_SAMPLER_NAMES) == len(set(COMFY_SAMPLER_NAMES)) == 42
    assert set(KSAMPLERS) | set(NOT_SUPPORTED) == set(COMFY_SAMPLER_NAMES) and not set(KSAMPLERS) & set(NOT_SUPPORTED)
    assert len(COMFY_SCHEDULERS) == 9
