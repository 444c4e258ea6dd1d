"""ComfyUI's samplers (its KSampler ``sampler_name`` values) as short k-diffusion-style functions.

Every sampler integrates the probability-flow ODE (or an SDE) of a diffusion model in the noise
level sigma (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", EDM): ``x`` is ``x0 + sigma * n``, ``model(x, sigma)`` returns the denoised estimate
``D(x, sigma)`` (with classifier-free guidance applied) and the unguided one (for the CFG++
samplers), and ``d = (x - D) / sigma`` is ``dx/dsigma``. Exponential integrators work in
``t = -log sigma`` (Lu et al. 2022, DPM-Solver++). ``sigmas`` decrease to (usually) 0.

Stochastic samplers take their noise from ``noise(sigma, sigma_next)``, a unit Gaussian of
``x``'s shape (see :mod:`graphsd.std.sampling.kdiffusion` for how it is seeded). A sampler is a
function ``sampler(model, x, sigmas, noise, callback)`` returning the final ``x``;
``callback(i, denoised)`` is called after step ``i`` with the guided denoised estimate at the
step's start (what k-diffusion reports to ComfyUI's callback: its previews and SamplerCustom's
``denoised_output``).

| name | method | reference |
| --- | --- | --- |
| euler, ddim | Euler on the ODE (ComfyUI samples ``ddim`` with Euler) | Karras et al. 2022, Alg. 2 without churn |
| euler_cfg_pp | Euler with CFG++ (renoise with the unguided estimate) | Chung et al. 2024, "CFG++" |
| euler_ancestral | Euler to sigma_down, then fresh noise of size sigma_up | k-diffusion; Ho et al. 2020 ancestral sampling |
| euler_ancestral_cfg_pp | the same with CFG++ | Chung et al. 2024 |
| heun | Heun's 2nd order (Euler on the last step to 0) | Karras et al. 2022, Alg. 1 |
| heunpp2 | Heun with a 3rd stage, weights sigma_i / (k sigma_0) | ComfyUI's heunpp2 |
| dpm_2 | DPM-Solver-2 (midpoint in log sigma) | Lu et al. 2022 / Karras et al. 2022 |
| dpm_2_ancestral | dpm_2 to sigma_down plus ancestral noise | k-diffusion |
| lms | linear multistep of order 4 in sigma (Lagrange interpolation of d) | k-diffusion (Adams–Bashforth, variable step) |
| dpm_fast | DPM-Solver-fast: steps of order 3, 3, ..., 2 or 1, uniform in log sigma | Lu et al. 2022, sec. 3.4 |
| dpmpp_2s_ancestral (_cfg_pp) | DPM-Solver++(2S), single step, ancestral | Lu et al. 2022b, Alg. 1 |
| dpmpp_sde, dpmpp_sde_gpu | DPM-Solver++ SDE (2 stages, r = 1/2, Brownian noise) | Lu et al. 2022b; k-diffusion |
| dpmpp_2m (_cfg_pp) | DPM-Solver++(2M), multistep | Lu et al. 2022b, Alg. 2 |
| dpmpp_2m_sde (_gpu) | DPM-Solver++(2M) SDE, midpoint | Lu et al. 2022b, appendix; k-diffusion |
| dpmpp_2m_sde_heun (_gpu) | the same, Heun correction | k-diffusion |
| dpmpp_3m_sde (_gpu) | DPM-Solver++(3M) SDE | k-diffusion |
| ddpm | DDPM ancestral sampling, in the VP parameterisation | Ho et al. 2020, eq. 7 |
| lcm | LCM: denoise, then re-noise to the next sigma | Luo et al. 2023, Alg. 1 |
| ipndm | improved PNDM: Adams–Bashforth up to order 4 with constant-step coefficients | Zhang & Chen 2022 (DEIS), iPNDM |
| res_multistep (_cfg_pp, _ancestral, _ancestral_cfg_pp) | RES 2nd-order multistep exponential integrator | Zhang et al. 2023 |
| gradient_estimation (_cfg_pp) | Euler with gradient estimation, gamma = 2 | Permenter & Yuan 2023 |
| uni_pc, uni_pc_bh2 | UniPC multistep predictor-corrector, B(h) = h or e^h - 1 (ComfyUI's port) | Zhao et al. 2023 |

The ``_gpu`` variants differ in ComfyUI only in where the Brownian noise is drawn; graphsd
draws it on the CPU for both, so they are the same function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import numpy as np
import torch

Model = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Noise = Callable[[float, float], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """``dx/dsigma`` of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic one to ``sigma_down`` and fresh noise of size
    ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2`` (the DDPM posterior variance
    for eta = 1, Song et al. 2020 eq. 16)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(sigma_next**2 - up**2), up


def _t(sigma: float) -> float:
    return -math.log(sigma)


def euler(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, cfg_pp: bool = False) -> torch.Tensor:
    """Euler: ``x += d (sigma_next - sigma)`` (Karras et al. 2022, Algorithm 2, S_churn = 0).
    CFG++ (Chung et al. 2024): ``x = D_cfg + sigma_next * (x - D_uncond) / sigma``."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        x = denoised + to_d(x, s, uncond) * s_next if cfg_pp else x + to_d(x, s, denoised) * (s_next - s)
        callback(i, denoised)
    return x


def euler_ancestral(
    model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, cfg_pp: bool = False
) -> torch.Tensor:
    """Euler to ``sigma_down``, then add ``sigma_up`` of fresh noise (k-diffusion's ancestral
    Euler, eta = 1); CFG++ as in :func:`euler`."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        down, up = ancestral_step(s, s_next)
        x = denoised + to_d(x, s, uncond) * down if cfg_pp else x + to_d(x, s, denoised) * (down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * up
        callback(i, denoised)
    return x


def heun(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """Heun's method: Euler predictor, trapezoidal corrector (Karras et al. 2022, Algorithm 1);
    a plain Euler step to sigma = 0, where d is undefined."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        d = to_d(x, s, denoised)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x2 = x + d * (s_next - s)
            d2 = to_d(x2, s_next, model(x2, s_next)[0])
            x = x + (d + d2) / 2 * (s_next - s)
        callback(i, denoised)
    return x


def heunpp2(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """Heun++ (ComfyUI's heunpp2): Euler for the last step, a 2-stage step before it, else 3
    stages at sigma_i, sigma_{i+1}, sigma_{i+2} whose slopes are weighted ``1 - w2 - w3``,
    ``w2 = sigma_{i+1} / (3 sigma_0)``, ``w3 = sigma_{i+2} / (3 sigma_0)`` (2-stage:
    ``w2 = sigma_{i+1} / (2 sigma_0)``)."""
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        denoised, _ = model(x, s)
        d = to_d(x, s, denoised)
        dt = s1 - s
        if s1 == end:
            x = x + d * dt
        elif sigmas[i + 2] == end:
            x2 = x + d * dt
            d2 = to_d(x2, s1, model(x2, s1)[0])
            w2 = s1 / (2 * sigmas[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            s2 = sigmas[i + 2]
            x2 = x + d * dt
            d2 = to_d(x2, s1, model(x2, s1)[0])
            x3 = x2 + d2 * (s2 - s1)
            d3 = to_d(x3, s2, model(x3, s2)[0])
            w2, w3 = s1 / (3 * sigmas[0]), s2 / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
        callback(i, denoised)
    return x


def _dpm2_step(model: Model, x: torch.Tensor, s: float, target: float, d: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver-2 step from ``s`` to ``target`` > 0: the slope at the log-sigma midpoint."""
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x2 = x + d * (mid - s)
    d2 = to_d(x2, mid, model(x2, mid)[0])
    return x + d2 * (target - s)


def dpm_2(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022; k-diffusion's form, midpoint in log sigma); Euler to 0."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        d = to_d(x, s, denoised)
        x = x + d * (s_next - s) if s_next == 0 else _dpm2_step(model, x, s, s_next, d)
        callback(i, denoised)
    return x


def dpm_2_ancestral(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """DPM-Solver-2 to ``sigma_down``, then ancestral noise ``sigma_up`` (k-diffusion)."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        down, up = ancestral_step(s, s_next)
        d = to_d(x, s, denoised)
        x = x + d * (down - s) if down == 0 else _dpm2_step(model, x, s, down, d)
        if s_next > 0:
            x = x + noise(s, s_next) * up
        callback(i, denoised)
    return x


def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1 at
    sigma_{i-j} and 0 at the other ``order - 1`` past nodes (exact polynomial integration)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def lms(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, order: int = 4) -> torch.Tensor:
    """Linear multistep in sigma: ``x += sum_j c_j d_{i-j}``, ``c_j`` the integral of the
    Lagrange polynomial through the last ``min(i + 1, 4)`` slopes (k-diffusion's LMS, the
    variable-step Adams–Bashforth method)."""
    ds: list[torch.Tensor] = []
    for i, (s, _) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        ds = [to_d(x, s, denoised), *ds][:order]
        current = min(i + 1, order)
        x = x + sum(lms_coefficient(current, sigmas, i, j) * ds[j] for j in range(current))
        callback(i, denoised)
    return x


def dpm_fast(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4 and Algorithms 4-5 in their data-noise form):
    the ``n = len(sigmas) - 1`` model evaluations go to steps of order 3 (and a last one of
    order 2 or 1) uniform in ``t = -log sigma`` from the first sigma to the smallest positive
    one. Only the two ends of the schedule matter; the result is left at that smallest sigma,
    as in k-diffusion and ComfyUI."""
    positive = [s for s in sigmas if s > 0]
    if len(sigmas) < 2 or not positive:
        return x
    nfe = len(sigmas) - 1
    t_start, t_end = _t(sigmas[0]), _t(positive[-1])
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = math.exp(-t)
        return (x - model(x, sigma)[0]) / sigma

    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        h = t_next - t
        denoised = model(x, math.exp(-t))[0]
        e = (x - denoised) / math.exp(-t)
        sn = math.exp(-t_next)
        if order == 1:
            x = x - sn * math.expm1(h) * e
        elif order == 2:
            s1 = t + h / 2
            u1 = x - math.exp(-s1) * math.expm1(h / 2) * e
            e1 = eps(u1, s1)
            x = x - sn * math.expm1(h) * e - sn * math.expm1(h) * (e1 - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e
            e1 = eps(u1, s1)
            u2 = x - math.exp(-s2) * math.expm1(r2 * h) * e - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e)
            e2 = eps(u2, s2)
            x = x - sn * math.expm1(h) * e - sn / r2 * (math.expm1(h) / h - 1) * (e2 - e)
        callback(i, denoised)
    return x


def dpmpp_2s_ancestral(
    model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, cfg_pp: bool = False
) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) to ``sigma_down``, then ancestral
    noise. CFG++: the data-prediction updates start from ``x + D_cfg - D_uncond``."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        down, up = ancestral_step(s, s_next)
        if down == 0:
            x = denoised + to_d(x, s, uncond) * down if cfg_pp else x + to_d(x, s, denoised) * (down - s)
        else:
            t, t_next = _t(s), _t(down)
            h = t_next - t
            mid = math.exp(-(t + h / 2))
            base = x + (denoised - uncond) if cfg_pp else x
            x2 = (mid / s) * base - math.expm1(-h / 2) * denoised
            denoised2 = model(x2, mid)[0]
            x = (down / s) * base - math.expm1(-h) * denoised2
        if s_next > 0:
            x = x + noise(s, s_next) * up
        callback(i, denoised)
    return x


def dpmpp_sde(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, eta = 1, r = 1/2): a first-order
    ancestral step to the intermediate sigma, then the step to sigma_next with the mixed
    estimate ``(1 - 1/(2r)) D_1 + 1/(2r) D_2`` (Lu et al. 2022b, eq. 9), each with Brownian noise."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        if s_next == 0:
            x = x + to_d(x, s, denoised) * (s_next - s)
        else:
            t, t_next = _t(s), _t(s_next)
            h = t_next - t
            s_mid = math.exp(-(t + h * r))
            fac = 1 / (2 * r)
            down, up = ancestral_step(s, s_mid)
            x2 = (down / s) * x - math.expm1(t - _t(down)) * denoised
            x2 = x2 + noise(s, s_mid) * up
            denoised2 = model(x2, s_mid)[0]
            down, up = ancestral_step(s, s_next)
            mixed = (1 - fac) * denoised + fac * denoised2
            x = (down / s) * x - math.expm1(t - _t(down)) * mixed
            x = x + noise(s, s_next) * up
        callback(i, denoised)
    return x


def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, cfg_pp: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): ``x = (sigma_next/sigma) x - expm1(-h) D'``
    with ``D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1} / h_i``; first order at the
    first and last step. CFG++ (Chung et al. 2024): ``x = D_cfg + e^{-h} (x - D_uncond)``, corrected
    by ``-expm1(-h) / (2r) (D_cfg - D_uncond,{i-1})``."""
    old = None
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = _t(s_next) - _t(s)
            r = (_t(s) - _t(sigmas[i - 1])) / h if old is not None else 0.0
            if cfg_pp:
                x = denoised + math.exp(-h) * (x - uncond)
                if old is not None:
                    x = x - math.expm1(-h) / (2 * r) * (denoised - old)
            elif old is None:
                x = (s_next / s) * x - math.expm1(-h) * denoised
            else:
                x = (s_next / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old)
        old = uncond if cfg_pp else denoised
        callback(i, denoised)
    return x


def dpmpp_2m_sde(
    model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, solver: str = "midpoint", eta: float = 1.0
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, appendix; k-diffusion's ``sample_dpmpp_2m_sde``):
    ``x = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D_i`` plus a 2nd-order
    correction from ``D_i - D_{i-1}`` (midpoint or Heun form) and noise of size
    ``sigma_next sqrt(1 - e^{-2 eta h})``."""
    old, h_last = None, 0.0
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = _t(s_next) - _t(s)
            eta_h = eta * h
            x = (s_next / s) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                phi = -math.expm1(-h - eta_h)
                if solver == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(s, s_next) * s_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = denoised
        callback(i, denoised)
    return x


def dpmpp_3m_sde(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``): the exponential-integrator
    step with ``phi_2`` / ``phi_3`` corrections from the last three estimates (Lu et al. 2022b)
    and noise ``sigma_next sqrt(1 - e^{-2 eta h})``."""
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = _t(s_next) - _t(s)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and d_1 is not None and d_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and d_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + noise(s, s_next) * s_next * math.sqrt(-math.expm1(-2 * h * eta))
            h_1, h_2 = h, h_1
        d_1, d_2 = denoised, d_1
        callback(i, denoised)
    return x


def ddpm(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7 and Algorithm 2) in the VP variables
    ``x_vp = x / sqrt(1 + sigma^2)``, ``alpha_bar = 1 / (1 + sigma^2)``, then back to sigma scale."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        eps = to_d(x, s, denoised)
        ab, ab_next = 1 / (s * s + 1), 1 / (s_next * s_next + 1)
        alpha = ab / ab_next
        x_vp = x / math.sqrt(1 + s * s)
        x = (1 / math.sqrt(alpha)) * (x_vp - (1 - alpha) * eps / math.sqrt(1 - ab))
        if s_next > 0:
            x = x + math.sqrt((1 - alpha) * (1 - ab_next) / (1 - ab)) * noise(s, s_next)
            x = x * math.sqrt(1 + s_next * s_next)
        callback(i, denoised)
    return x


def lcm(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback) -> torch.Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023, Algorithm 1): take the denoised
    estimate, then noise it to the next sigma with fresh noise."""
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised = x = model(x, s)[0]
        if s_next > 0:
            x = x + noise(s, s_next) * s_next
        callback(i, denoised)
    return x


IPNDM_COEFFICIENTS = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])
"""Adams–Bashforth weights of orders 1 to 4 (newest slope first)."""


def ipndm(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, max_order: int = 4) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential
    Integrator", the improved PNDM of their appendix): Adams–Bashforth in sigma with the
    constant-step weights of order ``min(i + 1, 4)``; the step to 0 returns the denoised estimate."""
    ds: list[torch.Tensor] = []
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, _ = model(x, s)
        ds = [to_d(x, s, denoised), *ds][:max_order]
        if s_next == 0:
            x = denoised
        else:
            weights = IPNDM_COEFFICIENTS[len(ds) - 1]
            x = x + (s_next - s) * sum(w * d for w, d in zip(weights, ds, strict=True))
        callback(i, denoised)
    return x


def res_multistep(
    model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, eta: float = 0.0, cfg_pp: bool = False
) -> torch.Tensor:
    """RES multistep (Zhang et al. 2023, "Improving Sample Quality of Diffusion Models Using
    Refined Exponential Solvers", arXiv:2308.02157, the 2nd-order multistep scheme): in
    ``t = -log sigma``, ``x = e^{-h} x + h (b1 D_i + b2 D_{i-1})`` with ``b1 = phi_1(-h) -
    phi_2(-h)/c2``, ``b2 = phi_2(-h)/c2``, ``c2`` the previous step over this one; Euler for
    the first step and the step to 0. ``eta`` = 1 makes it ancestral; CFG++ uses the unguided
    estimate and starts from ``x + D_cfg - D_uncond``."""

    def phi1(v: float) -> float:
        return math.expm1(v) / v

    def phi2(v: float) -> float:
        return (phi1(v) - 1) / v

    old, old_down = None, 0.0
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        down, up = ancestral_step(s, s_next, eta)
        if down == 0 or old is None:
            x = denoised + to_d(x, s, uncond) * down if cfg_pp else x + to_d(x, s, denoised) * (down - s)
        else:
            t, t_old, t_next, t_prev = _t(s), _t(old_down), _t(down), _t(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = phi1(-h) - phi2(-h) / c2 if c2 else 0.0
            b2 = phi2(-h) / c2 if c2 else 0.0
            base, current = (x + (denoised - uncond), uncond) if cfg_pp else (x, denoised)
            x = math.exp(-h) * base + h * (b1 * current + b2 * old)
        if s_next > 0 and up:
            x = x + noise(s, s_next) * up
        old, old_down = (uncond if cfg_pp else denoised), down
        callback(i, denoised)
    return x


def gradient_estimation(
    model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, gamma: float = 2.0, cfg_pp: bool = False
) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan 2023, "Interpreting and Improving Diffusion Models
    from an Optimization Perspective", Algorithm 2): Euler with the slope ``gamma d_i + (1 -
    gamma) d_{i-1}``, gamma = 2; the step to 0 returns the denoised estimate. CFG++ takes the
    slope from the unguided estimate."""
    old = None
    for i, (s, s_next) in enumerate(pairwise(sigmas)):
        denoised, uncond = model(x, s)
        d = to_d(x, s, uncond if cfg_pp else denoised)
        dt = s_next - s
        if s_next == 0:
            x = denoised
        else:
            x = denoised + d * s_next if cfg_pp else x + d * dt
            if old is not None:
                x = x + (gamma - 1) * (d - old) * dt
        old = d
        callback(i, denoised)
    return x


UNIPC_LAST_SIGMA = 0.001
"""ComfyUI's UniPC cannot step to sigma 0 (log sigma is infinite there): it stops at this sigma."""


def uni_pc(model: Model, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Callback, variant: str = "bh1") -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models", Algorithms 2 and 3), multistep, data prediction, as ComfyUI runs it on
    its sigmas: in the variance-preserving scale ``x / sqrt(1 + sigma^2)`` with ``lambda = -log
    sigma``, order ``min(3, steps - 1)`` (lower orders for the first and last steps), the
    corrector UniC after every step but the last (it reuses the model's value at the predicted
    point, so one model call per step), a last sigma of 0 replaced by
    :data:`UNIPC_LAST_SIGMA`. ``variant`` is the paper's B(h): ``bh1`` = h (ComfyUI's
    ``uni_pc``), ``bh2`` = e^h - 1 (``uni_pc_bh2``). As in ComfyUI, the first call only evaluates
    the model and the last call takes two steps, so one step (two sigmas) leaves ``x`` as it is
    (rescaled to the last sigma)."""
    sig = [float(s) for s in sigmas]
    if len(sig) < 2:
        return x
    if sig[-1] == 0:
        sig[-1] = UNIPC_LAST_SIGMA
    steps = len(sig) - 1
    order = min(3, steps - 1)

    def alpha(s: float) -> float:
        return 1.0 / math.sqrt(1.0 + s * s)

    def denoise(xv: torch.Tensor, s: float) -> torch.Tensor:
        return model(xv / alpha(s), s)[0]

    xv = x * alpha(sig[0])
    history = [(sig[0], denoise(xv, sig[0]))]  # (sigma, D) of the last `order` points
    callback(0, history[-1][1])
    for i in range(1, steps):
        for k in (i, steps) if i == steps - 1 else (i,):
            step_order = k if k < order else min(order, steps + 1 - k)
            xv, at_new = _unipc_step(denoise, xv, history, sig[k], step_order, k < steps, variant, alpha)
            if at_new is not None:
                history = [*history, (sig[k], at_new)][-order:]
        callback(i, history[-1][1])
    return xv / alpha(sig[-1])


def _unipc_step(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    xv: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    s: float,
    order: int,
    corrector: bool,
    variant: str,
    alpha: Callable[[float], float],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step from the last point of ``history`` to ``s``: the predictor UniP of
    ``order`` (the exponential-integrator step of DPM-Solver++ plus ``order - 1`` differences of
    earlier D values), then, with ``corrector``, UniC of ``order`` with the model's value at the
    predicted point. Returns x and that value (None without the corrector). The coefficients solve
    ``R rho = b`` with ``R[i][m] = r_m^i`` and ``b_i = i! phi_{i+1}(-h) (-h) / B(h)`` (paper,
    eq. 10); order 2's predictor and order 1's corrector use rho = 1/2, as the paper's code does."""
    s0, d0 = history[-1]
    h = math.log(s0) - math.log(s)  # lambda(s) - lambda(s0), lambda = -log sigma
    rks, diffs = [], []
    for j in range(1, order):
        sj, dj = history[-(j + 1)]
        rk = (math.log(s0) - math.log(sj)) / h
        rks.append(rk)
        diffs.append((dj - d0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    powers = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
    rhs = np.array(b)
    a_t = alpha(s)
    base = xv * (s * a_t / (s0 * alpha(s0))) - d0 * (a_t * h_phi_1)
    x_t = base
    if diffs:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], rhs[:-1]).tolist()
        x_t = base - sum(r * d for r, d in zip(rhos_p, diffs, strict=True)) * (a_t * b_h)
    if not corrector:
        return x_t, None
    at_t = denoise(x_t, s)
    rhos_c = [0.5] if order == 1 else np.linalg.solve(powers, rhs).tolist()
    correction = sum((r * d for r, d in zip(rhos_c[:-1], diffs, strict=True)), rhos_c[-1] * (at_t - d0))
    return base - correction * (a_t * b_h), at_t


KSAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "euler_cfg_pp": partial(euler, cfg_pp=True),
    "euler_ancestral": euler_ancestral,
    "euler_ancestral_cfg_pp": partial(euler_ancestral, cfg_pp=True),
    "heun": heun,
    "heunpp2": heunpp2,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpm_fast": dpm_fast,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": partial(dpmpp_2s_ancestral, cfg_pp=True),
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_sde_gpu": dpmpp_sde,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_cfg_pp": partial(dpmpp_2m, cfg_pp=True),
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": partial(dpmpp_2m_sde, solver="heun"),
    "dpmpp_2m_sde_heun_gpu": partial(dpmpp_2m_sde, solver="heun"),
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": dpmpp_3m_sde,
    "ddpm": ddpm,
    "lcm": lcm,
    "ipndm": ipndm,
    "res_multistep": res_multistep,
    "res_multistep_cfg_pp": partial(res_multistep, cfg_pp=True),
    "res_multistep_ancestral": partial(res_multistep, eta=1.0),
    "res_multistep_ancestral_cfg_pp": partial(res_multistep, eta=1.0, cfg_pp=True),
    "gradient_estimation": gradient_estimation,
    "gradient_estimation_cfg_pp": partial(gradient_estimation, cfg_pp=True),
    "ddim": euler,
    "uni_pc": uni_pc,
    "uni_pc_bh2": partial(uni_pc, variant="bh2"),
}
"""ComfyUI ``sampler_name`` → sampler function, for every name graphsd runs."""

BROWNIAN = {
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
}
"""Samplers whose noise is a Brownian motion in sigma (increments over [sigma_next, sigma])."""

DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
"""Samplers for which ComfyUI computes one step more and drops the next-to-last sigma."""

NOT_SUPPORTED = {
    "dpm_adaptive": "adaptive step-size control (its own error estimates and step count) is not implemented",
    "ipndm_v": "the variable-step iPNDM coefficients are not implemented",
    "deis": "DEIS's tabulated exponential-integrator coefficients are not implemented",
    "er_sde": "the extended-reverse-time SDE solver is not implemented",
    "seeds_2": "SEEDS is not implemented",
    "seeds_3": "SEEDS is not implemented",
    "sa_solver": "SA-Solver is not implemented",
    "sa_solver_pece": "SA-Solver is not implemented",
}
"""ComfyUI names graphsd refuses (at validation), and why."""

COMFY_SAMPLER_NAMES = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
"""Every ``sampler_name`` of ComfyUI's KSampler (its current list), in its order."""
