"""DDIM inversion: run the deterministic DDIM sampler backwards, from an image's latent to the
noise that DDIM turns into that image (Song et al. 2020, "Denoising Diffusion Implicit Models":
with eta 0 the sampler discretises an ODE, which can be run in either direction; Mokady et al.
2022, "Null-text Inversion", start their edits of real images from it).

An edit is ``VAEEncode → DDIMInversion → UNetDenoiseLoop (sampler ddim) → VAEDecode``: the
inverted noise, denoised with the prompt it was inverted with, gives the image back; denoised
with an edited prompt, it gives the image changed where the prompt changed.

The backward pass is diffusers' ``DDIMInverseScheduler`` built from the model's scheduler config
(x0 prediction unclipped, as graphsd's ``ddim`` sampler), so its timesteps are exactly the
forward ``DDIMScheduler``'s, in reverse, for the model's ``leading`` or ``trailing`` spacing.
Each step evaluates the U-Net on the current latent at the *next* (noisier) timestep, as
diffusers' inversion pipelines do; that approximation is the only source of reconstruction
error besides the VAE's, and it shrinks as the steps get smaller. The guided prediction itself
is made as UNetDenoiseLoop makes it (:func:`~graphsd.std.sampling.guidance.plan_guidance` for
combined, area and masked conditionings, ControlNets, the compiled U-Net when asked for).

The result is a :class:`~graphsd.types.Noise`: the denoise loop starts text-to-image from
``noise × init_noise_sigma``, and DDIM's ``init_noise_sigma`` is 1, so the inverted latent goes
in unscaled and nothing about the loop changes. (Other samplers read it as their starting noise
too, which is approximately right, but only DDIM retraces the inverted path.)
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.resources import feature_map_bytes, require_memory
from graphsd.std.models.compile import fast
from graphsd.std.models.family import model_info
from graphsd.std.nodes.sd import MAX_SEED, _first_channels, _not_finite
from graphsd.std.sampling.control import ControlRun, timestep_position
from graphsd.std.sampling.guidance import DenoiseError, UNetBatch, max_passes, plan_guidance
from graphsd.std.sampling.inpaint import is_inpainting_unet
from graphsd.std.sampling.loop import DenoiseSettings
from graphsd.std.sampling.preview import Previewer
from graphsd.types import Conditioning, Latent, Noise, UNet, weight_dtype, working_dtype

#: Timestep spacings for which DDIMInverseScheduler retraces DDIMScheduler's timesteps.
MIRRORED_SPACINGS = ("leading", "trailing")


def inverse_scheduler(scheduler_config: dict[str, Any], steps: int) -> Any:
    """diffusers' DDIMInverseScheduler for the model's training settings, set to ``steps``
    steps, mirroring graphsd's ``ddim`` sampler (``clip_sample`` off). A config or step count
    that cannot be inverted raises :class:`DenoiseError` naming the input to change."""
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing not in MIRRORED_SPACINGS:
        raise DenoiseError(
            f"this model's scheduler spaces its timesteps {spacing!r}; DDIM inversion retraces only "
            f"{' or '.join(MIRRORED_SPACINGS)} spacing, so this model cannot be inverted by this node",
            "unet",
        )
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise DenoiseError(f"steps ({steps}) is more than the model's {train_steps} training timesteps; use at most {train_steps}", "steps")
    from diffusers import DDIMInverseScheduler  # imported on first use, like the samplers

    scheduler = DDIMInverseScheduler.from_config(dict(scheduler_config), clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


class DDIMInversion(Node):
    type = "DDIMInversion"
    category = "sampling"
    description = (
        "Invert an image: run the DDIM sampler backwards (diffusers' DDIMInverseScheduler) from the image's "
        "latent to the noise that DDIM denoises into it. Give the result to UNetDenoiseLoop as its noise "
        "(no start latent), with sampler ddim, the same steps, prompt and cfg: it regenerates the image; "
        "with an edited prompt it edits it. Inversion is most faithful at cfg 1 (no guidance)."
    )

    class Inputs(NodeIO):
        unet: UNet = Field(description="The U-Net (from CheckpointLoader, possibly patched by LoRA), the one that will regenerate")
        positive: Conditioning = Field(description="A prompt that describes the image (TextEncode); regenerate with the same one")
        negative: Conditioning | None = Field(
            None, description="Only used when cfg is not 1: the negative prompt the regeneration will use"
        )
        latent: Latent = Field(description="The image's latent (VAEEncode)")
        steps: int = Field(20, ge=1, le=1000, description="DDIM steps; regenerate with the same number")
        cfg: float = Field(
            1.0,
            ge=0.0,
            le=100.0,
            description="Classifier-free guidance scale during inversion; regenerate with the same (1 = none, the faithful "
            "choice: the error of each backward step grows with the guidance scale)",
        )
        seed: int = Field(
            0,
            ge=0,
            le=MAX_SEED,
            description="Seeds the generators that an ancestral or SDE sampler would continue from the noise (DDIM uses none)",
        )

    class Outputs(NodeIO):
        noise: Noise = Field(description="The latent at DDIM's noisiest timestep, for UNetDenoiseLoop's noise (ddim takes it unscaled)")

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        info = model_info(inputs.unet, "unet")
        latent = inputs.latent
        if latent.noise_mask is not None:
            raise NodeError(
                "this latent carries an inpainting mask, which inversion does not use; invert the latent without it", field="latent"
            )
        batch, channels, h, w = latent.samples.shape
        if is_inpainting_unet(info.unet_in_channels, channels):
            raise NodeError(
                "this is an inpainting U-Net (it also takes a mask and a masked picture); invert with the base model's U-Net",
                field="unet",
            )
        if channels != info.unet_in_channels:
            raise NodeError(
                f"the latent has {channels} channels but this U-Net takes {info.unet_in_channels}; "
                "encode the image with the same checkpoint's VAE",
                field="latent",
            )
        guided = inputs.negative is not None and inputs.cfg != 1.0
        width, weight_dtype = _first_channels(ctx, inputs.unet, "unet")
        require_memory(
            ctx.device,
            feature_map_bytes(batch * max_passes(inputs.positive, inputs.negative, guided), width, h, w, weight_dtype),
            f"the U-Net on a batch of {batch} latent(s) of {w}x{h}",
            "use a smaller image or batch",
            field="latent",
        )
        try:
            scheduler = inverse_scheduler(dict(info.scheduler_config), inputs.steps)
            samples = invert(ctx, inputs.unet, scheduler, inputs.positive, inputs.negative, latent, inputs.cfg)
        except DenoiseError as e:
            raise NodeError(str(e), field=e.field) from None
        if not torch.isfinite(samples).all():
            raise NodeError(_not_finite("the inverted noise", inputs.unet), field="unet")
        gens = [torch.Generator("cpu").manual_seed((inputs.seed + i) % (MAX_SEED + 1)) for i in range(batch)]
        state = torch.stack([g.get_state() for g in gens])
        return self.Outputs(noise=Noise(samples=samples, seed=inputs.seed, generator_state=state))


@torch.no_grad()
def invert(
    ctx: Context,
    unet_ref: UNet,
    scheduler: Any,
    positive: Conditioning,
    negative: Conditioning | None,
    latent: Latent,
    cfg: float,
) -> torch.Tensor:
    """The backward DDIM pass over ``scheduler.timesteps`` (increasing): at each timestep t the
    guided noise prediction ε(x, t) of the current latent x moves x from the previous timestep's
    noise level to t's. The prediction is made as UNetDenoiseLoop makes it (the same guidance
    plan for combined, area and masked conditionings, the same ControlNets, the same compiled
    U-Net), so that the ddim sampler retraces the path. Guidance is on when ``negative`` is given
    and ``cfg`` is not 1. Returns the latent at the last (noisiest) timestep on the CPU, in the
    U-Net's working precision."""
    device = ctx.device
    info = model_info(unet_ref, "unet")
    work = working_dtype(weight_dtype(ctx.models.get(unet_ref.keys["unet"])))
    x = latent.samples.to(device, work)
    timesteps = scheduler.timesteps.to(device)
    guided = negative is not None and cfg != 1.0
    defaults = DenoiseSettings()  # the loop's SDXL-refiner aesthetic scores
    previewer = Previewer.for_run(ctx, unet_ref)  # None unless the run asked for previews
    with ctx.models.use(unet_ref, "unet") as unet, ExitStack() as stack:
        unet = fast(ctx, unet_ref, "unet", unet)  # compiled when Settings.compile asks
        dtype = weight_dtype(unet)
        scores = (defaults.negative_aesthetic_score, defaults.aesthetic_score)
        plan = plan_guidance(info, positive, negative, guided, tuple(x.shape), scores, device, dtype)
        controls = stack.enter_context(ControlRun(ctx, plan, unet, timestep_position(scheduler.config.num_train_timesteps)))

        def unet_call(model_input: torch.Tensor, batch: UNetBatch, t: torch.Tensor, position: float) -> torch.Tensor:
            residuals = controls.residuals(batch, model_input, t, position)  # ControlNets acting at this timestep
            eps = unet(
                model_input.to(dtype), t, encoder_hidden_states=batch.context, added_cond_kwargs=batch.added, return_dict=False, **residuals
            )[0]
            return eps.to(work)

        positions = timesteps.tolist()
        for i, t in enumerate(timesteps):
            predictions = plan.predict(x, partial(unet_call, t=t, position=positions[i]))  # DDIM does not scale its input
            if guided:
                eps_uncond, eps_cond = predictions
                eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            else:
                eps = predictions[0]
            x = scheduler.step(eps, t, x, return_dict=False)[0]
            if previewer is not None:
                previewer.show_latent(x)
            ctx.progress(i + 1, len(timesteps), step=i)
    return x.cpu()


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [DDIMInversion]
