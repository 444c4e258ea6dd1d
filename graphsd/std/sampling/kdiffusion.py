"""The ComfyUI-convention denoise loop: ComfyUI's sigmas and samplers in k-diffusion's sigma space.

With ``convention: comfyui`` UNetDenoiseLoop runs the sampler named by ComfyUI's ``sampler_name``
(:mod:`graphsd.std.sampling.ksamplers`) on the noise levels of ComfyUI's ``scheduler``
(:mod:`graphsd.std.sampling.sigmas`), as ComfyUI's KSampler does:

- the model is a denoiser ``D(x, sigma)`` (Karras et al. 2022, EDM, table 1 for a VP model):
  the U-Net sees ``x / sqrt(sigma^2 + 1)`` at the timestep whose table sigma is nearest in log
  space, and its output gives ``D = x - sigma * eps`` (epsilon prediction) or
  ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v`` (v prediction, Salimans & Ho 2022),
  or x0 itself, or an LCM's boundary condition (``SigmaTable.denoised``, which ComfyUI's
  ModelSamplingDiscrete switches);
- classifier-free guidance on the denoised estimates: ``D = D_uncond + cfg (D_cond - D_uncond)``
  (equal to guiding eps, since D is affine in eps); CFG++ samplers also use ``D_uncond``;
- the start: ``x = noise * sqrt(1 + sigma_0^2)`` when the schedule starts at the model's largest
  sigma (text-to-image, as ComfyUI), else ``x = latent + noise * sigma_0`` (image-to-image);
- ``steps`` / ``denoise`` / ``start_step`` / ``end_step`` cut the sigma list as they cut the
  diffusers schedule (``end_step`` stops at that sigma, leaving noise for a refiner, or with
  ``leftover_noise`` off makes that last step go to sigma 0, as ComfyUI's KSamplerAdvanced);
- SamplerCustom gives the sigmas itself (:func:`sample_sigmas`, which both share);
- a start latent with a ``noise_mask`` is inpainted by ComfyUI's rule (``KSamplerX0Inpaint``:
  :mod:`~graphsd.std.sampling.inpaint`), an inpainting U-Net gets ComfyUI's mask and
  masked-picture channels, and several conditionings per side (ConditioningCombine, areas,
  masks) are averaged as ComfyUI averages them (:mod:`~graphsd.std.sampling.guidance`), and the
  ControlNets applied to them act in their windows of noise levels (:mod:`~graphsd.std.sampling.control`).

**Seeds.** The initial noise is the ``noise`` input (LatentNoise: ``torch.Generator().manual_seed
(seed)`` per batch item). Ancestral and SDE samplers draw their per-step noise from one CPU
generator seeded with the same ``seed``, drawing float32 Gaussians of the whole batch's shape,
step after step, as ComfyUI does on a CPU with the KSampler seed (so a batch of one with the same
seed starts from the same numbers as ComfyUI). The Brownian-motion samplers (``*_sde``) sample a
Brownian path in sigma from that generator by Brownian-bridge refinement; it is exact Brownian
motion, but not the same numbers as ComfyUI's torchsde tree. Same seed and inputs, same latent.
"""

from __future__ import annotations

import bisect
import math
from contextlib import ExitStack
from functools import partial

import torch

from graphsd.context import Context
from graphsd.std.models.compile import fast
from graphsd.std.models.family import model_info
from graphsd.std.sampling.control import ControlRun, sigma_position
from graphsd.std.sampling.guidance import Cells, Guidance, UNetBatch, crop, plan_guidance
from graphsd.std.sampling.inpaint import KeepOutsideMask, inpaint_channels, is_inpainting_unet, latent_mask
from graphsd.std.sampling.ksamplers import BROWNIAN, DISCARD_PENULTIMATE, KSAMPLERS
from graphsd.std.sampling.loop import DenoiseError, DenoiseSettings, check_start_latent
from graphsd.std.sampling.preview import Previewer
from graphsd.std.sampling.sigmas import SigmaTable, comfy_sigmas
from graphsd.types import Conditioning, Latent, Noise, UNet, weight_dtype, working_dtype


class GaussianNoise:
    """Fresh unit Gaussians of ``shape`` for each step, from one generator seeded with ``seed``."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.shape, self.dtype, self.device = shape, dtype, device

    def draw(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32).to(self.device, self.dtype)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return self.draw()


class BrownianNoise(GaussianNoise):
    """Normalised increments ``(W(sigma) - W(sigma_next)) / sqrt(sigma - sigma_next)`` of one
    Brownian path W on [sigma_lo, sigma_hi]. A new time between two known ones is drawn from
    the Brownian bridge (mean: linear interpolation, variance ``(t - a)(b - t) / (b - a)``), so
    the increments over any set of intervals are jointly those of a Brownian motion whatever
    order they are asked in (what the two-stage SDE solvers need)."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, lo: float, hi: float):
        super().__init__(seed, shape, dtype, device)
        self.times = [lo, hi]
        self.values = [torch.zeros(shape, dtype=torch.float64), self._normal() * math.sqrt(hi - lo)]

    def _normal(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32).double()

    def _at(self, t: float) -> torch.Tensor:
        t = min(max(t, self.times[0]), self.times[-1])
        k = bisect.bisect_left(self.times, t)
        if self.times[k] == t:
            return self.values[k]
        a, b = self.times[k - 1], self.times[k]
        wa, wb = self.values[k - 1], self.values[k]
        value = wa + (t - a) / (b - a) * (wb - wa) + self._normal() * math.sqrt((t - a) * (b - t) / (b - a))
        self.times.insert(k, t)
        self.values.insert(k, value)
        return value

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        lo, hi = sorted((sigma, sigma_next))
        if hi - lo <= 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        increment = (self._at(hi) - self._at(lo)) / math.sqrt(hi - lo)
        return increment.to(self.device, self.dtype)


class Denoiser:
    """``D(x, sigma)`` of a discrete U-Net (its parameterisation: ``SigmaTable.denoised``) with
    classifier-free guidance; returns the guided and the unguided estimate. ``context`` /
    ``added`` are one plain conditioning per side (stacked ``[uncond, cond]`` when ``guidance``)
    unless ``plan`` gives the conditionings; ``keep`` applies ComfyUI's inpainting rule around
    each evaluation."""

    def __init__(
        self,
        unet,
        table: SigmaTable,
        context,
        added,
        cfg: float,
        guidance: bool,
        work: torch.dtype,
        plan: Guidance | None = None,
        keep: KeepOutsideMask | None = None,
        controls: ControlRun | None = None,
    ):
        self.unet, self.table = unet, table
        self.dtype = weight_dtype(unet)
        self.cfg, self.guidance, self.work = cfg, guidance, work
        self.plan = plan if plan is not None else Guidance.single(context, added, guidance)
        self.keep = keep
        self.controls = controls  # the ControlNets of the plan's conditionings, running

    def unet_call(self, model_input: torch.Tensor, batch: UNetBatch, t: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """The U-Net call on one batch of (cropped) latents, already scaled by c_in, at noise level ``sigma``."""
        residuals = self.controls.residuals(batch, model_input, t, sigma) if self.controls is not None else {}
        if batch.concat is not None:  # an inpainting U-Net: + mask + masked-picture latent
            model_input = torch.cat([model_input, batch.concat], dim=1)
        out = self.unet(
            model_input.to(self.dtype),
            t,
            encoder_hidden_states=batch.context,
            added_cond_kwargs=batch.added,
            class_labels=batch.class_labels,
            return_dict=False,
            **residuals,
        )[0]
        return out.to(self.work)

    def __call__(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep is not None:
            x = self.keep.model_input(x, sigma)
        c_in = 1 / math.sqrt(sigma * sigma + 1)
        # one float32 number, as diffusers' schedulers give it (the same value: the time embedding
        # computes in float32 either way), so a compiled U-Net serves both conventions without
        # recompiling for the timestep's dtype or rank; a blocking copy would wait for the GPU every step
        t = self.table.timestep(sigma)[0].to(x.device, torch.float32, non_blocking=True)

        def finish(out: torch.Tensor, area: Cells | None) -> torch.Tensor:
            return self.table.denoised(crop(x, area), out, sigma)

        predictions = self.plan.predict(x * c_in, partial(self.unet_call, t=t, sigma=sigma), finish)
        if self.guidance:
            uncond, cond = predictions
            denoised = uncond + self.cfg * (cond - uncond)
        else:
            denoised = uncond = predictions[0]
        if self.keep is not None:
            denoised = self.keep.denoised(denoised)
        return denoised, uncond


def sigma_window(sigmas: torch.Tensor, settings: DenoiseSettings, img2img: bool) -> list[float]:
    """The part of ``sigmas`` (``steps + 1`` values) that runs: ``denoise`` < 1 keeps the last
    ``int(steps * denoise)`` steps, ``start_step`` / ``end_step`` cut further (like the
    diffusers convention's step window)."""
    s = settings
    if s.denoise < 1.0 and not img2img:
        raise DenoiseError("denoise < 1 needs a start latent to keep part of (connect 'latent', or set denoise to 1)", "denoise")
    if s.start_step > 0 and not img2img:
        raise DenoiseError("start_step > 0 needs a latent to continue from (connect 'latent')", "start_step")
    steps = len(sigmas) - 1
    first = max(steps - min(int(steps * s.denoise), steps), s.start_step)
    last = steps if s.end_step is None else min(s.end_step, steps)
    if first >= last:
        raise DenoiseError(
            f"no steps left to run: steps={s.steps}, denoise={s.denoise}, start_step={s.start_step}, "
            f"end_step={s.end_step}; raise denoise or end_step, or lower start_step",
            "start_step",
        )
    window = [float(v) for v in sigmas[first : last + 1]]
    if not s.leftover_noise and last < steps:
        window[-1] = 0.0  # ComfyUI's force_full_denoise: the step at end_step goes to sigma 0
    return window


@torch.no_grad()
def denoise_comfy(
    ctx: Context,
    unet_ref: UNet,
    sampler: str,
    schedule: str,
    positive: Conditioning,
    negative: Conditioning | None,
    noise: Noise,
    latent: Latent | None,
    settings: DenoiseSettings,
) -> torch.Tensor:
    """Run ComfyUI's ``sampler`` on ComfyUI's ``schedule`` (what its KSampler does) and return the
    latent (scaled latent space, on the CPU, in the U-Net's working precision)."""
    table = model_sigma_table(unet_ref, "convention")
    all_sigmas = comfy_sigmas(table, schedule, settings.steps, discard_penultimate=sampler in DISCARD_PENULTIMATE)
    sigmas = sigma_window(all_sigmas, settings, img2img=latent is not None)
    first = settings.steps - (len(sigmas) - 1)
    return sample_sigmas(ctx, unet_ref, sampler, sigmas, positive, negative, noise, latent, settings, first)[0]


def model_sigma_table(unet_ref: UNet, field: str) -> SigmaTable:
    """The noise levels of the U-Net's model; one ComfyUI-style sampling cannot use is refused
    as a mistake in ``field``."""
    try:
        return SigmaTable(dict(model_info(unet_ref, field).scheduler_config))
    except ValueError as e:
        raise DenoiseError(str(e), field) from None


@torch.no_grad()
def sample_sigmas(
    ctx: Context,
    unet_ref: UNet,
    sampler: str,
    sigmas: list[float],
    positive: Conditioning,
    negative: Conditioning | None,
    noise: Noise,
    latent: Latent | None,
    settings: DenoiseSettings,
    first_step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ComfyUI's ``sampler`` through the noise levels ``sigmas`` (at least one) from the
    start described in the module docstring, with ``settings.cfg`` / ``add_noise``; what KSampler
    (:func:`denoise_comfy`) and SamplerCustom share. Returns the latent and the guided denoised
    estimate the sampler reported for its last step (the one at that step's start, as k-diffusion
    reports it; None when no step ran), both on the CPU in the U-Net's working precision;
    ``first_step`` numbers the progress steps."""
    device = ctx.device
    info = model_info(unet_ref, "unet")
    unet_dtype = weight_dtype(ctx.models.get(unet_ref.keys["unet"]))
    work = working_dtype(unet_dtype)
    check_start_latent(latent, noise)
    table = model_sigma_table(unet_ref, "unet")

    samples = noise.samples.to(device, work)
    sigma0 = sigmas[0]
    full = math.isclose(sigma0, table.sigma_max, rel_tol=1e-5) or sigma0 > table.sigma_max
    if latent is None:
        x = samples * (math.sqrt(1 + sigma0**2) if full else sigma0)
    elif settings.add_noise:
        x = latent.samples.to(device, work) + samples * (math.sqrt(1 + sigma0**2) if full else sigma0)
    else:
        x = latent.samples.to(device, work)

    shape = tuple(x.shape)
    positive_sigmas = [s for s in sigmas if s > 0]
    if sampler in BROWNIAN and positive_sigmas:
        step_noise: GaussianNoise = BrownianNoise(noise.seed, shape, work, device, min(positive_sigmas), max(sigmas))
    else:
        step_noise = GaussianNoise(noise.seed, shape, work, device)

    guidance = negative is not None and settings.cfg != 1.0
    keep = None
    if latent is not None and latent.noise_mask is not None:
        # without added noise (KSamplerAdvanced add_noise disable) ComfyUI's sampler gets zero noise, so the kept part stays the latent
        kept_noise = samples if settings.add_noise else torch.zeros_like(samples)
        mask = latent_mask(latent.noise_mask, shape, "comfyui", device, work)
        keep = KeepOutsideMask(mask, latent.samples.to(device, work), kept_noise)
    concat = None
    if is_inpainting_unet(info.unet_in_channels, shape[1]):
        concat = partial(inpaint_channels, latent=latent, shape=shape, convention="comfyui", device=device, dtype=work)
    total = len(sigmas) - 1
    previewer = Previewer.for_run(ctx, unet_ref)  # None unless the run asked for previews
    with ctx.models.use(unet_ref, "unet") as unet, ExitStack() as stack:
        unet = fast(ctx, unet_ref, "unet", unet)  # compiled when Settings.compile asks
        scores = (settings.negative_aesthetic_score, settings.aesthetic_score)
        plan = plan_guidance(info, positive, negative, guidance, shape, scores, device, unet_dtype, concat, seed=noise.seed)
        controls = stack.enter_context(ControlRun(ctx, plan, unet, sigma_position(table.sigma, len(table.sigmas))))
        model = Denoiser(unet, table, None, None, settings.cfg, guidance, work, plan=plan, keep=keep, controls=controls)
        last: list[torch.Tensor] = []  # the denoised estimate the sampler reported for its last step

        def step_done(i: int, denoised: torch.Tensor) -> None:
            last[:] = [denoised]
            if previewer is not None:
                previewer.show_latent(denoised)
            ctx.progress(i + 1, total, step=i + first_step)

        x = KSAMPLERS[sampler](model, x, sigmas, step_noise, step_done)
    return x.cpu(), last[0].cpu() if last else None
