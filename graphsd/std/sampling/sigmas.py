"""ComfyUI's noise schedules: the ``scheduler`` names of its KSampler, computed from a discrete
model's sigma table (k-diffusion semantics).

A discrete diffusion model trained on ``T`` timesteps (1000 for SD1, SD2, SDXL) has the noise
levels ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, ``alpha_bar_t = prod(1 - beta_i, i ≤ t)``
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
appendix C.3.1 for the mapping of a VP model to sigmas). :class:`SigmaTable` holds them as
ComfyUI does (betas and their cumulative product in float64, then float32 for the sigmas), with
``sigma_min = sigma_0``, ``sigma_max = sigma_{T-1}``, a timestep → sigma map that interpolates
``log sigma`` linearly between integers, and a sigma → timestep map that picks the nearest
``log sigma`` (what the U-Net is given as its timestep).

Each schedule returns ``steps + 1`` decreasing noise levels ending at 0 (``beta`` may return
fewer, see there):

| name | sigmas |
| --- | --- |
| normal | timesteps ``linspace(T-1, 0, steps)`` mapped to sigmas, then 0 |
| sgm_uniform | timesteps ``linspace(T-1, 0, steps + 1)`` without the last, mapped to sigmas, then 0 (SGM / SDXL-Turbo spacing) |
| simple | table entries ``sigmas[T - 1 - int(i * T / steps)]``, then 0 |
| ddim_uniform | every ``T // steps``-th table entry from timestep 1 upwards, reversed, then 0 (DDIM's uniform spacing, Song et al. 2020) |
| karras | ``(sigma_max^(1/7) + i/(steps-1) * (sigma_min^(1/7) - sigma_max^(1/7)))^7``, then 0 (Karras et al. 2022, eq. 5, rho = 7) |
| exponential | ``exp(linspace(log sigma_max, log sigma_min, steps))``, then 0 |
| beta | table entries at timesteps ``round(ppf(1 - i/steps) * (T-1))``, ppf of Beta(0.6, 0.6), repeats dropped, then 0 (Lee et al. 2024) |
| linear_quadratic | ``sigma_max * (1 - s_i)``, ``s`` linear to 0.025 over half the steps, then quadratic to 1 (Genmo's Mochi, 2024) |
| kl_optimal | ``tan((1 - u) atan(sigma_max) + u atan(sigma_min))``, ``u = i/(steps-1)``, then 0 (Sabour et al. 2024, "Align Your Steps") |

All of them equal ComfyUI's ``calculate_sigmas`` for the same model and number of steps.

ComfyUI's custom-sampling scheduler nodes (:mod:`graphsd.std.nodes.comfy_sampling`) use
:func:`basic_sigmas` (BasicScheduler: a scheduler with a ``denoise`` fraction),
:func:`turbo_sigmas` (SDTurboScheduler) and the model-free :func:`karras_sigmas`,
:func:`exponential_sigmas` and :func:`polyexponential_sigmas` (k-diffusion's ``get_sigmas_*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal")
"""ComfyUI's ``scheduler`` names, all of which graphsd computes."""


LCM_KEY = "_comfy_lcm"
"""Scheduler-config key that ModelSamplingDiscrete ``lcm`` sets: the model is a latent consistency
model (ComfyUI's LCM sampling). Keys starting with ``_`` are private to diffusers' configs, so
diffusers' schedulers ignore it."""

ZERO_SNR_ALPHA_BAR = 4.8973451890853435e-08
"""The last alpha_bar of a zero-terminal-SNR table as ComfyUI keeps it: a tiny positive value
instead of 0, so that sigma_max stays finite (about 4519)."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What the U-Net predicts (diffusers' names): the noise, v (Salimans & Ho 2022), or x0."""


def zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps Are Flawed", Alg. 1):
    ``sqrt(alpha_bar)`` shifted so its last value is 0 and scaled so its first is unchanged; the
    last alpha_bar then becomes :data:`ZERO_SNR_ALPHA_BAR` (ComfyUI's
    ``rescale_zero_terminal_snr_sigmas``)."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZERO_SNR_ALPHA_BAR
    return rescaled


class SigmaTable:
    """The noise levels of a discrete model and how its U-Net's output becomes ``D(x, sigma)``,
    from its (diffusers) scheduler config (ComfyUI's ``model_sampling``): betas, ``prediction_type``,
    ``rescale_betas_zero_snr`` (:func:`zero_terminal_snr`) and :data:`LCM_KEY`. An LCM table holds
    only the 50 timesteps the model was distilled on (19, 39, ..., 999: ComfyUI's
    ``ModelSamplingDiscreteDistilled``); timesteps map to and from its entries."""

    def __init__(self, scheduler_config: dict[str, Any]):
        n = int(scheduler_config.get("num_train_timesteps", 1000))
        start = float(scheduler_config.get("beta_start", 0.00085))
        end = float(scheduler_config.get("beta_end", 0.012))
        kind = scheduler_config.get("beta_schedule", "scaled_linear")
        trained = scheduler_config.get("trained_betas")
        if trained is not None:
            betas = np.asarray(trained, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
            f = [math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(n + 1)]
            betas = np.array([min(1 - f[t + 1] / f[t], 0.999) for t in range(n)], dtype=np.float64)
        else:
            raise ValueError(
                f"unsupported beta_schedule {kind!r} for ComfyUI-style sampling (use scaled_linear, linear or squaredcos_cap_v2)"
            )
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"ComfyUI-style sampling needs an epsilon, v_prediction or sample (x0) model, this one predicts "
                f"{self.prediction_type!r}; use convention 'diffusers'"
            )
        alphas_cumprod = np.cumprod(1.0 - betas)
        if scheduler_config.get("rescale_betas_zero_snr"):
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
        alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.lcm = bool(scheduler_config.get(LCM_KEY))
        # timestep = stride * index + offset: every timestep, or the 50 an LCM was distilled on
        self.stride = max(len(sigmas) // 50, 1) if self.lcm else 1
        self.offset = self.stride - 1
        self.sigmas = sigmas[self.offset :: self.stride]
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: float) -> float:
        """Noise level at a (fractional) timestep: log-linear between the table's entries."""
        t = min(max((float(t) - self.offset) / self.stride, 0.0), len(self.sigmas) - 1.0)
        low, high = math.floor(t), math.ceil(t)
        w = t - low
        return float(((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp())

    def timestep(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The timestep whose sigma is nearest in log space (what the U-Net is conditioned on)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log().reshape(-1)
        return (log_sigma[None, :] - self.log_sigmas[:, None]).abs().argmin(dim=0) * self.stride + self.offset

    def denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        """``D(x, sigma)`` from the U-Net's output ``out`` on ``x / sqrt(sigma^2 + 1)`` (Karras et
        al. 2022, table 1, VP): ``x - sigma eps`` (epsilon); ``x / (sigma^2 + 1) - sigma /
        sqrt(sigma^2 + 1) v`` (v_prediction, Salimans & Ho 2022); the output itself (sample);
        for an LCM, the consistency model's boundary condition ``c_skip x + c_out x0`` with
        ``c_skip = 0.25 / (s^2 + 0.25)``, ``c_out = s / sqrt(s^2 + 0.25)``, ``s`` = 10 x the
        timestep (Luo et al. 2023, sigma_data 0.5, as ComfyUI's LCM sampling)."""
        if self.prediction_type == "v_prediction":
            c_in = 1 / math.sqrt(sigma * sigma + 1)
            return x * c_in**2 - out * (sigma * c_in)
        if self.prediction_type == "sample":
            return out
        x0 = x - out * sigma
        if not self.lcm:
            return x0
        scaled = 10.0 * float(self.timestep(sigma))
        return x0 * (scaled / math.sqrt(scaled**2 + 0.25)) + x * (0.25 / (scaled**2 + 0.25))


def _with_zero(values: list[float]) -> torch.Tensor:
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def normal(table: SigmaTable, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = float(table.timestep(table.sigma_max)), float(table.timestep(table.sigma_min))
    ts = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return _with_zero([table.sigma(float(t)) for t in ts])


def sgm_uniform(table: SigmaTable, steps: int) -> torch.Tensor:
    return normal(table, steps, sgm=True)


def simple(table: SigmaTable, steps: int) -> torch.Tensor:
    stride = len(table.sigmas) / steps
    return _with_zero([float(table.sigmas[-(1 + int(i * stride))]) for i in range(steps)])


def ddim_uniform(table: SigmaTable, steps: int) -> torch.Tensor:
    stride = max(len(table.sigmas) // steps, 1)
    return _with_zero([float(s) for s in table.sigmas[1::stride]][::-1])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho``, then 0 (k-diffusion's ``get_sigmas_karras``)."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero(((hi + ramp * (lo - hi)) ** rho).tolist())


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp().tolist())


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """``exp(log sigma_min + (1 - i/(steps-1))^rho (log sigma_max - log sigma_min))``, then 0:
    log sigma polynomial in the step (k-diffusion's ``get_sigmas_polyexponential``; rho 1 is
    :func:`exponential_sigmas`)."""
    ramp = torch.linspace(1, 0, steps) ** rho
    return _with_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).tolist())


def karras(table: SigmaTable, steps: int, rho: float = 7.0) -> torch.Tensor:
    return karras_sigmas(steps, table.sigma_min, table.sigma_max, rho)


def exponential(table: SigmaTable, steps: int) -> torch.Tensor:
    return exponential_sigmas(steps, table.sigma_min, table.sigma_max)


def beta(table: SigmaTable, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at the quantiles of a Beta(0.6, 0.6) distribution: dense at both ends of the
    schedule. Two quantiles that round to the same timestep give one sigma, so the schedule may
    have fewer than ``steps`` steps (as in ComfyUI)."""
    from scipy.stats import beta as beta_dist  # imported on first use: scipy is slow to import

    total = len(table.sigmas) - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta_) * total)
    sigmas: list[float] = []
    last = -1.0
    for t in ts:
        if t != last:
            sigmas.append(float(table.sigmas[int(t)]))
        last = t
    return _with_zero(sigmas)


def linear_quadratic(table: SigmaTable, steps: int, threshold: float = 0.025) -> torch.Tensor:
    if steps == 1:
        return torch.tensor([table.sigma_max, 0.0], dtype=torch.float32)
    linear_steps = steps // 2
    linear = [i * threshold / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold * steps
    quadratic_steps = steps - linear_steps
    a = diff / (linear_steps * quadratic_steps**2)
    b = threshold / linear_steps - 2 * diff / quadratic_steps**2
    c = a * linear_steps**2
    quadratic = [a * i**2 + b * i + c for i in range(linear_steps, steps)]
    return torch.tensor([1.0 - s for s in [*linear, *quadratic, 1.0]], dtype=torch.float32) * table.sigma_max


def kl_optimal(table: SigmaTable, steps: int) -> torch.Tensor:
    u = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    return _with_zero((u * math.atan(table.sigma_min) + (1 - u) * math.atan(table.sigma_max)).tan().tolist())


SCHEDULES: dict[str, Callable[[SigmaTable, int], torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}
"""ComfyUI ``scheduler`` name → ``schedule(table, steps)`` → sigmas (float32, decreasing, last 0)."""


def basic_sigmas(table: SigmaTable, schedule: str, steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's BasicScheduler: the last ``steps + 1`` sigmas of the schedule for
    ``int(steps / denoise)`` steps (all of it at denoise 1; none at denoise 0)."""
    if denoise <= 0:
        return torch.zeros(0, dtype=torch.float32)
    total = int(steps / denoise) if denoise < 1 else steps
    return SCHEDULES[schedule](table, total)[-(steps + 1) :]


def turbo_sigmas(table: SigmaTable, steps: int, denoise: float) -> torch.Tensor:
    """SDTurboScheduler (SD-Turbo / SDXL-Turbo, Sauer et al. 2023, distilled on the timesteps 999,
    899, ..., 99): ``steps`` of those timesteps from the ``10 - int(10 denoise)``-th on, mapped to
    sigmas, then 0."""
    start = 10 - int(10 * denoise)
    timesteps = list(range(999, 0, -100))[start : start + steps]
    return _with_zero([table.sigma(t) for t in timesteps])


def comfy_sigmas(table: SigmaTable, schedule: str, steps: int, discard_penultimate: bool = False) -> torch.Tensor:
    """The sigmas ComfyUI's KSampler uses for ``steps`` steps. Samplers that end on a 2nd-order
    step (DPM-2 and UniPC in ComfyUI) compute one step more and drop the next-to-last sigma."""
    if discard_penultimate:
        sigmas = SCHEDULES[schedule](table, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULES[schedule](table, steps)
