"""The denoise loop: a diffusers scheduler driving the U-Net with classifier-free guidance.

The arithmetic is that of diffusers' Stable Diffusion pipelines (``StableDiffusionPipeline``,
``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLPipeline`` / ``...XLImg2ImgPipeline``), so
that with the same scheduler, conditioning and seed the latents are the same:

- text-to-image (no start latent): ``x = noise * scheduler.init_noise_sigma``;
- image-to-image (a start latent): the schedule's last ``int(steps * denoise)`` steps are run
  and ``x = scheduler.add_noise(latent, noise, t_first)`` (``add_noise=False`` continues a
  partly denoised latent as it is, e.g. an SDXL refiner after the base model);
- ``start_step`` / ``end_step`` cut the schedule of ``steps`` steps (like ComfyUI's
  KSamplerAdvanced, or diffusers' ``denoising_start`` / ``denoising_end``);
- classifier-free guidance (Ho & Salimans 2022): one U-Net call on the batch
  ``[uncond, cond]``, then ``eps = eps_uncond + cfg * (eps_cond - eps_uncond)``; without a
  negative conditioning or with ``cfg == 1`` only the conditional half is computed;
- SDXL's added conditioning (Podell et al. 2023, section 2.2): ``text_embeds`` = pooled text
  embedding, ``time_ids`` = original size + crop top-left + target size, or for the refiner
  original size + crop + aesthetic score;
- ancestral / SDE samplers draw their per-step noise from the CPU generator(s) that drew the
  initial noise, continued from ``Noise.generator_state``;
- inpainting (a start latent with a ``noise_mask``, or an inpainting U-Net) as diffusers'
  ``StableDiffusionInpaintPipeline`` does it (:mod:`~graphsd.std.sampling.inpaint`);
- several conditionings per side (ConditioningCombine, areas, masks) evaluated and averaged as
  ComfyUI does (:mod:`~graphsd.std.sampling.guidance`);
- ControlNets applied to the conditionings run beside the U-Net as ComfyUI runs them
  (:mod:`~graphsd.std.sampling.control`), so that ControlNetApply gives diffusers'
  ``StableDiffusionControlNetPipeline``'s latents.

Per step there is one ``scale_model_input``, one U-Net call per conditioning size (one in all
for a plain negative + positive), one guidance combination and one ``scheduler.step``;
everything else is prepared before the loop.

:func:`denoise_batch` runs several branches (independent runs that share the U-Net, sampler and
settings, each with its own noise, generators and plain conditionings) as one loop on their
latents stacked along the batch axis: one U-Net call per step for all of them
(:func:`~graphsd.std.sampling.guidance.merge_plans`), each branch's ancestral noise drawn from
its own generators, and the result split back per branch.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from graphsd.context import Context
from graphsd.std.models.compile import fast
from graphsd.std.models.family import model_info
from graphsd.std.sampling.control import ControlRun, timestep_position
from graphsd.std.sampling.guidance import DenoiseError, UNetBatch, merge_plans, plan_guidance
from graphsd.std.sampling.inpaint import inpaint_channels, is_inpainting_unet, latent_mask
from graphsd.std.sampling.preview import Previewer
from graphsd.types import Conditioning, Latent, Noise, UNet, weight_dtype, working_dtype


@dataclass
class DenoiseSettings:
    """What ``UNetDenoiseLoop`` asks for (see the node for each field's meaning)."""

    steps: int = 20
    cfg: float = 7.0
    denoise: float = 1.0
    start_step: int = 0
    end_step: int | None = None
    leftover_noise: bool = True
    add_noise: bool = True
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def generators_from(noise: Noise) -> list[torch.Generator] | None:
    """CPU generators continuing the ones that drew ``noise`` (one per batch item)."""
    if noise.generator_state is None:
        return None
    states = noise.generator_state.reshape(noise.samples.shape[0], -1)
    gens = []
    for state in states:
        g = torch.Generator("cpu")
        g.set_state(state.clone())
        gens.append(g)
    return gens


def check_start_latent(latent: Latent | None, noise: Noise) -> None:
    """Refuse a start latent the loops cannot use: one whose shape differs from the noise's."""
    if latent is not None and latent.samples.shape != noise.samples.shape:
        raise DenoiseError(
            f"latent {tuple(latent.samples.shape)} and noise {tuple(noise.samples.shape)} differ in shape; make the noise from this latent",
            "noise",
        )


def step_window(scheduler: Any, settings: DenoiseSettings, img2img: bool) -> tuple[int, int]:
    """First and last (exclusive) index into ``scheduler.timesteps`` to run.

    ``denoise`` < 1 skips the first ``steps - int(steps * denoise)`` steps (diffusers'
    img2img ``get_timesteps``); ``start_step`` / ``end_step`` cut further. A step of a
    2nd-order scheduler spans ``scheduler.order`` timesteps."""
    s = settings
    if s.denoise < 1.0 and not img2img:
        raise DenoiseError("denoise < 1 needs a start latent to keep part of (connect 'latent', or set denoise to 1)", "denoise")
    if s.start_step > 0 and not img2img:
        raise DenoiseError("start_step > 0 needs a latent to continue from (connect 'latent')", "start_step")
    skipped = s.steps - min(int(s.steps * s.denoise), s.steps)
    first = max(skipped, s.start_step)
    last = s.steps if s.end_step is None else min(s.end_step, s.steps)
    if first >= last:
        raise DenoiseError(
            f"no steps left to run: steps={s.steps}, denoise={s.denoise}, start_step={s.start_step}, "
            f"end_step={s.end_step}; raise denoise or end_step, or lower start_step",
            "start_step",
        )
    order = getattr(scheduler, "order", 1)
    return first * order, min(last * order, len(scheduler.timesteps))


def keep_start(scheduler: Any, x: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, noise: torch.Tensor | None, upcoming: int):
    """``x`` where ``mask`` is 1, the start latent noised to the schedule's timestep ``upcoming``
    elsewhere (the start latent itself after the schedule's end, or as it is without ``noise``,
    when the loop continues a latent without adding noise), as diffusers'
    ``StableDiffusionInpaintPipeline`` does after each step for a 4-channel U-Net."""
    t = scheduler.timesteps[upcoming : upcoming + 1]
    kept = scheduler.add_noise(start, noise, t) if len(t) and noise is not None else start
    return (1 - mask) * kept + mask * x


def denoise(
    ctx: Context,
    unet_ref: UNet,
    scheduler: Any,
    positive: Conditioning,
    negative: Conditioning | None,
    noise: Noise,
    latent: Latent | None,
    settings: DenoiseSettings,
) -> torch.Tensor:
    """Run the loop and return the denoised latent (scaled latent space, on the CPU, in the
    U-Net's working precision: float32, or float64 for a float64 U-Net)."""
    return denoise_batch([ctx], unet_ref, scheduler, [positive], [negative], [noise], [latent], settings)[0]


@torch.no_grad()
def denoise_batch(
    ctxs: list[Context],
    unet_ref: UNet,
    scheduler: Any,
    positives: list[Conditioning],
    negatives: list[Conditioning | None],
    noises: list[Noise],
    latents: list[Latent | None],
    settings: DenoiseSettings,
) -> list[torch.Tensor]:
    """Run the loop for one branch per context (as :func:`denoise`), several branches as one
    loop on their stacked latents, and return each branch's denoised latent.

    Several branches must agree in what they share (the caller's batch key): noise shape and
    dtype, start latent or none (without a noise mask), negative or none, plain conditionings
    of equal shapes, a U-Net whose input channels are the noise's (no inpainting U-Net) and a
    scheduler that treats batch items independently. One branch is exactly :func:`denoise`."""
    ctx = ctxs[0]
    device = ctx.device
    info = model_info(unet_ref, "unet")
    work = working_dtype(weight_dtype(ctx.models.get(unet_ref.keys["unet"])))
    for noise_i, latent_i in zip(noises, latents, strict=True):
        check_start_latent(latent_i, noise_i)
    if len(noises) == 1:
        noise, latent = noises[0], latents[0]
    else:  # the branches stacked along the batch axis
        noise = Noise(torch.cat([n.samples for n in noises]), noises[0].seed, _stacked_states(noises))
        starts = [latent_i.samples for latent_i in latents if latent_i is not None]
        latent = Latent(torch.cat(starts)) if starts else None
    samples = noise.samples.to(device, work)
    positive, negative = positives[0], negatives[0]
    guidance = negative is not None and settings.cfg != 1.0
    inpaint_unet = is_inpainting_unet(info.unet_in_channels, samples.shape[1])
    masked = latent is not None and latent.noise_mask is not None

    scheduler.set_timesteps(settings.steps, device=device)
    first, last = step_window(scheduler, settings, img2img=latent is not None)
    timesteps = scheduler.timesteps[first:last]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)

    if latent is None or (settings.add_noise and first == 0 and (masked or inpaint_unet)):
        x = samples * scheduler.init_noise_sigma  # text-to-image, or inpainting at full strength
    elif settings.add_noise:
        x = scheduler.add_noise(latent.samples.to(device, work), samples, timesteps[:1])
    else:
        x = latent.samples.to(device, work)

    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators_from(noise)

    shape = tuple(x.shape)
    keep = None  # where the latent may change, when the start latent's other part is kept (4-channel U-Net)
    if masked and not inpaint_unet:
        keep = latent_mask(latent.noise_mask, shape, "diffusers", device, work)
        start = latent.samples.to(device, work)
    previewer = Previewer.for_run(ctx, unet_ref)  # None unless the run asked for previews
    with ctx.models.use(unet_ref, "unet") as unet, ExitStack() as stack:
        unet = fast(ctx, unet_ref, "unet", unet)  # compiled when Settings.compile asks
        dtype = weight_dtype(unet)
        scores = (settings.negative_aesthetic_score, settings.aesthetic_score)
        concat = partial(inpaint_channels, latent=latent, shape=shape, convention="diffusers", device=device, dtype=work)
        if len(noises) == 1:
            plan = plan_guidance(
                info, positive, negative, guidance, shape, scores, device, dtype, concat if inpaint_unet else None, seed=noise.seed
            )
        else:  # each branch's plain conditionings planned for its own latent, then stacked
            branch = (noises[0].samples.shape[0], *shape[1:])
            plan = merge_plans(
                [
                    plan_guidance(info, pos, neg, guidance, branch, scores, device, dtype, None, seed=n.seed)
                    for pos, neg, n in zip(positives, negatives, noises, strict=True)
                ]
            )
        controls = stack.enter_context(ControlRun(ctx, plan, unet, timestep_position(scheduler.config.num_train_timesteps)))

        def unet_call(model_input: torch.Tensor, batch: UNetBatch, t: torch.Tensor, position: float) -> torch.Tensor:
            """The loop's U-Net call on one batch of (cropped) latents, as the scheduler scaled them."""
            residuals = controls.residuals(batch, model_input, t, position)  # ControlNets acting at this timestep
            if batch.concat is not None:  # an inpainting U-Net: + mask + masked-picture latent
                model_input = torch.cat([model_input, batch.concat], dim=1)
            eps = unet(
                model_input.to(dtype),
                t,
                encoder_hidden_states=batch.context,
                added_cond_kwargs=batch.added,
                class_labels=batch.class_labels,
                return_dict=False,
                **residuals,
            )[0]
            return eps.to(work)

        positions = timesteps.tolist()  # read once: float(t) in the loop would wait for the GPU at every step
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(x, t)
            predictions = plan.predict(model_input, partial(unet_call, t=t, position=positions[i]))
            if guidance:
                eps_uncond, eps_cond = predictions
                eps = eps_uncond + settings.cfg * (eps_cond - eps_uncond)
            else:
                eps = predictions[0]
            step = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)
            x = step[0]
            if keep is not None:
                x = keep_start(scheduler, x, keep, start, samples if settings.add_noise else None, first + i + 1)
            if previewer is not None:
                previewer.show(step)
            for each in ctxs:
                each.progress(i + 1, len(timesteps), step=i + first)
    if len(noises) == 1:
        return [x.cpu()]
    return [part.clone() for part in x.cpu().split(noises[0].samples.shape[0])]  # each its own storage


def _stacked_states(noises: list[Noise]) -> torch.Tensor | None:
    """The branches' generator states, one row per batch item in branch order (None unless
    every branch has them)."""
    if any(n.generator_state is None for n in noises):
        return None
    return torch.cat([n.generator_state.reshape(n.samples.shape[0], -1) for n in noises if n.generator_state is not None])
