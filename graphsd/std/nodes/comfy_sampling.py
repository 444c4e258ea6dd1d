"""ComfyUI's custom sampling (SamplerCustom and its parts) as graphsd nodes of the same names and
inputs, so that ComfyUI prompts and editor files using them run as they are.

ComfyUI splits its KSampler into parts that travel along links of their own types, registered
here with their ComfyUI names:

| socket | ComfyUI type | made by | what it holds |
| --- | --- | --- | --- |
| Sampler | SAMPLER | KSamplerSelect | a ComfyUI ``sampler_name`` (:mod:`graphsd.std.sampling.ksamplers`) |
| Sigmas | SIGMAS | the schedulers (BasicScheduler, ...), SplitSigmas, FlipSigmas | the noise levels to step through (1-D, float32) |
| NoiseGenerator | NOISE | RandomNoise, DisableNoise | where the starting noise comes from (a seed, or none) |
| Guider | GUIDER | BasicGuider, CFGGuider | the model, its conditioning and the guidance scale |

SamplerCustom (model, noise seed, guidance as inputs) and SamplerCustomAdvanced (noise and guider
as links) run the sampler through the sigmas with the same code as KSampler
(:func:`graphsd.std.sampling.kdiffusion.sample_sigmas`): SamplerCustom with BasicScheduler and
KSamplerSelect computes exactly what KSampler computes for the same settings (but for the
samplers that drop a sigma, dpm_2 and dpm_2_ancestral, whose schedule KSampler computes with one
step more, as ComfyUI does). The start is ComfyUI's: ``latent + noise * sigma_0`` (``* sqrt(1 +
sigma_0^2)`` when sigma_0 is the model's largest sigma); the per-step noise of ancestral and SDE
samplers is seeded with the noise seed (DisableNoise: seed 0). Both return the latent and the
denoised estimate of the last step (``denoised_output``, the latent itself when no step ran).
RandomNoise draws batch item *i* with seed + i, as graphsd's LatentNoise does (ComfyUI draws a
whole batch from one generator: the same for a batch of one).

ModelSamplingDiscrete patches a U-Net handle's scheduler config with what its U-Net predicts
(eps, v_prediction, x0), LCM sampling, and a zero-terminal-SNR table
(:class:`graphsd.std.sampling.sigmas.SigmaTable` reads them). docs/samplers.md documents all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.resources import feature_map_bytes, require_memory
from graphsd.std.models.family import model_info
from graphsd.std.nodes.sd import MAX_SEED, LatentNoise, _first_channels, _not_finite
from graphsd.std.sampling.kdiffusion import model_sigma_table, sample_sigmas
from graphsd.std.sampling.ksamplers import KSAMPLERS, NOT_SUPPORTED
from graphsd.std.sampling.loop import DenoiseError, DenoiseSettings
from graphsd.std.sampling.sigmas import (
    COMFY_SCHEDULERS,
    LCM_KEY,
    SigmaTable,
    basic_sigmas,
    beta,
    exponential_sigmas,
    karras_sigmas,
    polyexponential_sigmas,
    turbo_sigmas,
)
from graphsd.types import Conditioning, Latent, Noise, Socket, UNet

SamplerName = Literal[tuple(KSAMPLERS)]  # type: ignore[valid-type]
SchedulerName = Literal[COMFY_SCHEDULERS]  # type: ignore[valid-type]

SD_SIGMA_MIN, SD_SIGMA_MAX = 0.0291675, 14.614642
"""The smallest and largest sigma of SD's noise table: the defaults of ComfyUI's model-free
scheduler nodes."""


# ---- socket types ---------------------------------------------------------------------------------
@dataclass(eq=False)
class Sampler(Socket):
    """A sampler to run (ComfyUI's SAMPLER): one of ComfyUI's ``sampler_name`` values."""

    name: str


@dataclass(eq=False)
class Sigmas(Socket):
    """Noise levels to step through, in order (ComfyUI's SIGMAS): a 1-D float32 tensor."""

    values: torch.Tensor

    def check(self) -> str | None:
        if not isinstance(self.values, torch.Tensor) or self.values.ndim != 1:
            return "sigmas must be a 1-D tensor"
        return None

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass(eq=False)
class NoiseGenerator(Socket):
    """Where a sampler's starting noise comes from (ComfyUI's NOISE): Gaussian noise seeded with
    ``seed`` (RandomNoise), or none (DisableNoise, seed 0). The seed also seeds the per-step noise."""

    seed: int
    enabled: bool = True

    def generate(self, latent: Latent, ctx: Context) -> Noise:
        """Noise of the latent's shape: LatentNoise's for the seed, or zeros."""
        if not self.enabled:
            return Noise(samples=torch.zeros(latent.samples.shape, dtype=torch.float32), seed=self.seed)
        return LatentNoise().run(LatentNoise.Inputs(seed=self.seed, latent=latent), ctx).noise


@dataclass(eq=False)
class Guider(Socket):
    """What the sampler's denoiser is (ComfyUI's GUIDER): the U-Net, the conditioning and the
    classifier-free guidance scale (no negative, or cfg 1: no guidance)."""

    unet: UNet
    positive: Conditioning
    negative: Conditioning | None = None
    cfg: float = 1.0


COMFY_SAMPLING_TYPES = {"Sampler": "SAMPLER", "Sigmas": "SIGMAS", "NoiseGenerator": "NOISE", "Guider": "GUIDER"}
"""The socket types above → their ComfyUI names."""


# ---- samplers -------------------------------------------------------------------------------------
class KSamplerSelect(Node):
    type = "KSamplerSelect"
    category = "sampling"
    description = "Choose a sampler by ComfyUI's sampler_name, for SamplerCustom (docs/samplers.md says what each matches)."

    class Inputs(NodeIO):
        sampler_name: SamplerName = Field("euler", description="ComfyUI's sampler name")

    class Outputs(NodeIO):
        sampler: Sampler = Field(description="The sampler")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        """ComfyUI names graphsd cannot run get their reason (the choices alone would not say it)."""
        name = literals.get("sampler_name")
        if isinstance(name, str) and name in NOT_SUPPORTED:
            return [
                (
                    "sampler_name",
                    f"ComfyUI sampler {name!r} is not supported by graphsd: {NOT_SUPPORTED[name]}",
                    f"use one of: {', '.join(KSAMPLERS)}",
                )
            ]
        return []

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(sampler=Sampler(inputs.sampler_name))


# ---- schedulers -----------------------------------------------------------------------------------
def _table(unet: UNet, field: str) -> SigmaTable:
    try:
        return model_sigma_table(unet, field)
    except DenoiseError as e:
        raise NodeError(str(e), field=e.field) from None


def _positive(value: float, field: str, what: str) -> None:
    if value <= 0:
        raise NodeError(f"{field} must be above 0 for {what}", field=field)


class BasicScheduler(Node):
    type = "BasicScheduler"
    category = "sampling"
    description = (
        "The sigmas of one of ComfyUI's schedulers for the model (as KSampler computes them); denoise < 1 keeps the "
        "last steps+1 sigmas of a schedule of int(steps/denoise) steps (image-to-image), denoise 0 gives none."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The model whose noise table the schedule is computed from")
        scheduler: SchedulerName = Field("normal", description="ComfyUI's scheduler name")
        steps: int = Field(20, ge=1, le=10000, description="Steps to run")
        denoise: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the schedule the steps cover (1 = all of it)")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="steps + 1 sigmas, decreasing to 0")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        if 0 < inputs.denoise < 1 and inputs.steps / inputs.denoise > 10000:
            raise NodeError(
                f"denoise {inputs.denoise:g} with {inputs.steps} steps needs a schedule of {inputs.steps / inputs.denoise:.3g} "
                "steps (at most 10000)",
                field="denoise",
            )
        table = _table(inputs.model, "model")
        return self.Outputs(sigmas=Sigmas(basic_sigmas(table, inputs.scheduler, inputs.steps, inputs.denoise)))


class KarrasScheduler(Node):
    type = "KarrasScheduler"
    category = "sampling"
    description = "Karras et al. 2022 sigmas (eq. 5) between sigma_max and sigma_min, then 0, for any model."

    class Inputs(NodeIO):
        steps: int = Field(20, ge=1, le=10000, description="Steps")
        sigma_max: float = Field(SD_SIGMA_MAX, ge=0.0, le=5000.0, description="First sigma (SD's largest by default)")
        sigma_min: float = Field(SD_SIGMA_MIN, ge=0.0, le=5000.0, description="Last sigma before 0 (SD's smallest by default)")
        rho: float = Field(7.0, ge=0.0, le=100.0, description="Spacing exponent (7: dense near sigma_min)")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="steps + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        _positive(inputs.rho, "rho", "the Karras schedule")
        return self.Outputs(sigmas=Sigmas(karras_sigmas(inputs.steps, inputs.sigma_min, inputs.sigma_max, inputs.rho)))


class ExponentialScheduler(Node):
    type = "ExponentialScheduler"
    category = "sampling"
    description = "Sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0, for any model."

    class Inputs(NodeIO):
        steps: int = Field(20, ge=1, le=10000, description="Steps")
        sigma_max: float = Field(SD_SIGMA_MAX, ge=0.0, le=5000.0, description="First sigma (SD's largest by default)")
        sigma_min: float = Field(SD_SIGMA_MIN, ge=0.0, le=5000.0, description="Last sigma before 0 (SD's smallest by default)")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="steps + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        for field in ("sigma_max", "sigma_min"):
            _positive(getattr(inputs, field), field, "an exponential schedule (it is spaced in log sigma)")
        return self.Outputs(sigmas=Sigmas(exponential_sigmas(inputs.steps, inputs.sigma_min, inputs.sigma_max)))


class PolyexponentialScheduler(Node):
    type = "PolyexponentialScheduler"
    category = "sampling"
    description = "Sigmas whose log is a polynomial of degree rho in the step (rho 1: exponential), then 0, for any model."

    class Inputs(NodeIO):
        steps: int = Field(20, ge=1, le=10000, description="Steps")
        sigma_max: float = Field(SD_SIGMA_MAX, ge=0.0, le=5000.0, description="First sigma (SD's largest by default)")
        sigma_min: float = Field(SD_SIGMA_MIN, ge=0.0, le=5000.0, description="Last sigma before 0 (SD's smallest by default)")
        rho: float = Field(1.0, ge=0.0, le=100.0, description="Degree of the polynomial")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="steps + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        for field in ("sigma_max", "sigma_min"):
            _positive(getattr(inputs, field), field, "a polyexponential schedule (it is spaced in log sigma)")
        return self.Outputs(sigmas=Sigmas(polyexponential_sigmas(inputs.steps, inputs.sigma_min, inputs.sigma_max, inputs.rho)))


class SDTurboScheduler(Node):
    type = "SDTurboScheduler"
    category = "sampling"
    description = (
        "Sigmas of the timesteps SD-Turbo / SDXL-Turbo were distilled on (999, 899, ..., 99), from the 10 - int(10 denoise)-th on, then 0."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The model whose noise table gives the sigmas")
        steps: int = Field(1, ge=1, le=10, description="Steps (1 for one-step generation)")
        denoise: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the 10 distilled timesteps to start from")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="At most steps + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(sigmas=Sigmas(turbo_sigmas(_table(inputs.model, "model"), inputs.steps, inputs.denoise)))


class BetaSamplingScheduler(Node):
    type = "BetaSamplingScheduler"
    category = "sampling"
    description = (
        "The beta scheduler with its shape parameters: timesteps at the quantiles of Beta(alpha, beta) (Lee et al. 2024), "
        "repeats dropped, then 0 (alpha = beta = 0.6 is the beta scheduler of KSampler)."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The model whose noise table gives the sigmas")
        steps: int = Field(20, ge=1, le=10000, description="Steps (repeated timesteps give fewer)")
        alpha: float = Field(0.6, ge=0.0, le=50.0, description="First shape parameter of the Beta distribution")
        beta: float = Field(0.6, ge=0.0, le=50.0, description="Second shape parameter of the Beta distribution")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="At most steps + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        for field in ("alpha", "beta"):
            _positive(getattr(inputs, field), field, "a Beta distribution")
        table = _table(inputs.model, "model")
        return self.Outputs(sigmas=Sigmas(beta(table, inputs.steps, inputs.alpha, inputs.beta)))


class SplitSigmas(Node):
    type = "SplitSigmas"
    category = "sampling"
    description = "Split sigmas at a step: the first step+1 sigmas and the sigmas from the step on (they share that sigma)."

    class Inputs(NodeIO):
        sigmas: Sigmas = Field(description="Sigmas to split")
        step: int = Field(0, ge=0, le=10000, description="Index of the sigma where the first part ends and the second starts")

    class Outputs(NodeIO):
        high_sigmas: Sigmas = Field(description="sigmas[:step+1]")
        low_sigmas: Sigmas = Field(description="sigmas[step:]")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        values = inputs.sigmas.values
        return self.Outputs(high_sigmas=Sigmas(values[: inputs.step + 1]), low_sigmas=Sigmas(values[inputs.step :]))


class SplitSigmasDenoise(Node):
    type = "SplitSigmasDenoise"
    category = "sampling"
    description = "Split sigmas so that the second part holds the last round(steps × denoise) steps."

    class Inputs(NodeIO):
        sigmas: Sigmas = Field(description="Sigmas to split")
        denoise: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps in the second part")

    class Outputs(NodeIO):
        high_sigmas: Sigmas = Field(description="The sigmas before the last round(steps × denoise) steps")
        low_sigmas: Sigmas = Field(description="The last round(steps × denoise) + 1 sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        values = inputs.sigmas.values
        kept = round(max(values.shape[-1] - 1, 0) * inputs.denoise)
        # ComfyUI slices [:-kept] and [-(kept + 1):]: with kept 0 the first part is empty
        return self.Outputs(
            high_sigmas=Sigmas(values[: values.shape[-1] - kept] if kept else values[:0]), low_sigmas=Sigmas(values[-(kept + 1) :])
        )


class FlipSigmas(Node):
    type = "FlipSigmas"
    category = "sampling"
    description = "Reverse the sigmas (to run a sampler from the image towards noise); a first sigma of 0 becomes 0.0001."

    class Inputs(NodeIO):
        sigmas: Sigmas = Field(description="Sigmas to reverse")

    class Outputs(NodeIO):
        sigmas: Sigmas = Field(description="The reversed sigmas")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        values = inputs.sigmas.values.flip(0)
        if values.numel() and values[0] == 0:
            values[0] = 0.0001
        return self.Outputs(sigmas=Sigmas(values))


# ---- noise and guiders ----------------------------------------------------------------------------
class RandomNoise(Node):
    type = "RandomNoise"
    category = "sampling"
    description = "Seeded Gaussian starting noise for SamplerCustomAdvanced (LatentNoise's: item i of a batch uses seed + i)."

    class Inputs(NodeIO):
        noise_seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed; also seeds the per-step noise")

    class Outputs(NodeIO):
        noise: NoiseGenerator = Field(description="The noise source")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(noise=NoiseGenerator(inputs.noise_seed))


class DisableNoise(Node):
    type = "DisableNoise"
    category = "sampling"
    description = "No starting noise: the sampler starts from the latent as it is (per-step noise seeded with 0)."

    class Inputs(NodeIO):
        pass

    class Outputs(NodeIO):
        noise: NoiseGenerator = Field(description="The empty noise source")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(noise=NoiseGenerator(0, enabled=False))


class BasicGuider(Node):
    type = "BasicGuider"
    category = "sampling"
    description = "The model with one conditioning and no classifier-free guidance (one U-Net pass per step)."

    class Inputs(NodeIO):
        model: UNet = Field(description="The model")
        conditioning: Conditioning = Field(description="What the image should show")

    class Outputs(NodeIO):
        guider: Guider = Field(description="The guider")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(guider=Guider(inputs.model, inputs.conditioning))


class CFGGuider(Node):
    type = "CFGGuider"
    category = "sampling"
    description = "The model with classifier-free guidance: D_uncond + cfg (D_cond - D_uncond) (cfg 1: the positive alone)."

    class Inputs(NodeIO):
        model: UNet = Field(description="The model")
        positive: Conditioning = Field(description="What the image should show")
        negative: Conditioning = Field(description="What to steer away from")
        cfg: float = Field(8.0, ge=0.0, le=100.0, description="Guidance scale")

    class Outputs(NodeIO):
        guider: Guider = Field(description="The guider")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(guider=Guider(inputs.model, inputs.positive, inputs.negative, inputs.cfg))


# ---- the model's sampling ---------------------------------------------------------------------------
class ModelSamplingDiscrete(Node):
    type = "ModelSamplingDiscrete"
    category = "sampling"
    description = (
        "Say how the model is to be sampled (ComfyUI's ModelSamplingDiscrete): what its U-Net predicts (eps, "
        "v_prediction, x0), or a latent consistency model (lcm: the 50 distilled timesteps and the consistency "
        "boundary condition), and whether its noise table has zero terminal SNR (zsnr, Lin et al. 2024). A patch "
        "on the handle: the weights are shared. The comfyui convention (KSampler, SamplerCustom) uses all of it; "
        "the diffusers convention takes the prediction type and zsnr, where diffusers' scheduler has them."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The model to patch")
        sampling: Literal["eps", "v_prediction", "lcm", "x0"] = Field("eps", description="What the U-Net's output is")
        zsnr: bool = Field(False, description="Rescale the noise table to zero terminal SNR (for models trained that way)")

    class Outputs(NodeIO):
        model: UNet = Field(description="The patched model")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        info = model_info(inputs.model, "model")
        config = dict(info.scheduler_config)
        config["prediction_type"] = PREDICTIONS[inputs.sampling]
        config["rescale_betas_zero_snr"] = inputs.zsnr
        config[LCM_KEY] = inputs.sampling == "lcm"
        patched = replace(inputs.model, info=replace(info, scheduler_config=config))
        _table(patched, "model")  # a noise table this cannot describe is refused here, not in the sampler
        return self.Outputs(model=patched)


PREDICTIONS = {"eps": "epsilon", "lcm": "epsilon", "v_prediction": "v_prediction", "x0": "sample"}
"""ModelSamplingDiscrete's ``sampling`` → the diffusers ``prediction_type`` (an LCM predicts the noise)."""


# ---- the samplers -------------------------------------------------------------------------------
def custom_sample(
    ctx: Context, guider: Guider, noise: NoiseGenerator, sampler: Sampler, sigmas: Sigmas, latent: Latent, fields: dict[str, str]
) -> tuple[Latent, Latent]:
    """Run ``sampler`` through ``sigmas`` from ``latent`` (SamplerCustom and SamplerCustomAdvanced):
    the output latent and the last step's denoised estimate. ``fields`` maps the roles (unet,
    latent, sigmas, and the fields of the denoise loop's errors) to the node inputs that problems
    are reported on."""
    values = sigmas.values.tolist()
    if not values:  # ComfyUI: no sigmas, the latent unchanged
        return latent, latent
    if not all(math.isfinite(v) and v >= 0 for v in values) or 0.0 in values[:-1]:
        raise NodeError(
            f"sigmas must be finite, positive, and 0 only at the end; got {[round(v, 4) for v in values]}", field=fields["sigmas"]
        )
    info = model_info(guider.unet, fields["unet"])
    channels, latent_channels = info.unet_in_channels, latent.samples.shape[1]
    if latent_channels != channels and channels != 2 * latent_channels + 1:  # 2c+1: an inpainting U-Net
        raise NodeError(f"the latent has {latent_channels} channels but this model takes {channels}", field=fields["latent"])
    batch, _, h, w = latent.samples.shape
    guided = guider.negative is not None and guider.cfg != 1.0
    width, dtype = _first_channels(ctx, guider.unet, "unet")
    require_memory(
        ctx.device,
        feature_map_bytes(batch * (2 if guided else 1), width, h, w, dtype),
        f"the U-Net on a batch of {batch} latent(s) of {w}x{h}",
        "lower the size or the batch",
        field=fields["latent"],
    )
    settings = DenoiseSettings(steps=len(values) - 1, cfg=guider.cfg, add_noise=noise.enabled)
    try:
        x, denoised = sample_sigmas(
            ctx, guider.unet, sampler.name, values, guider.positive, guider.negative, noise.generate(latent, ctx), latent, settings
        )
    except DenoiseError as e:
        raise NodeError(str(e), field=fields.get(e.field or "", e.field)) from None
    if not torch.isfinite(x).all():
        raise NodeError(_not_finite("the sampled latent", guider.unet), field=fields["unet"])
    output = Latent(x, noise_mask=latent.noise_mask)
    return output, output if denoised is None else Latent(denoised, noise_mask=latent.noise_mask)


class SamplerCustom(Node):
    type = "SamplerCustom"
    category = "sampling"
    description = (
        "Run a sampler (KSamplerSelect) through given sigmas (BasicScheduler, ...) with classifier-free guidance: "
        "KSampler in parts, as ComfyUI's SamplerCustom. With BasicScheduler and KSamplerSelect it computes what "
        "KSampler computes."
    )

    class Inputs(NodeIO):
        model: UNet = Field(description="The model")
        add_noise: bool = Field(True, description="Add seeded noise to the latent first (off: start from the latent as it is)")
        noise_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the starting and the per-step noise")
        cfg: float = Field(8.0, ge=0.0, le=100.0, description="Classifier-free guidance scale (1 = positive alone)")
        positive: Conditioning = Field(description="What the image should show")
        negative: Conditioning = Field(description="What to steer away from")
        sampler: Sampler = Field(description="The sampler (KSamplerSelect)")
        sigmas: Sigmas = Field(description="The noise levels to step through (BasicScheduler, ...)")
        latent_image: Latent = Field(description="The start latent (EmptyLatentImage for text-to-image)")

    class Outputs(NodeIO):
        output: Latent = Field(description="The sampled latent")
        denoised_output: Latent = Field(description="The denoised estimate of the last step")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        guider = Guider(inputs.model, inputs.positive, inputs.negative, inputs.cfg)
        output, denoised = custom_sample(
            ctx,
            guider,
            NoiseGenerator(inputs.noise_seed, inputs.add_noise),
            inputs.sampler,
            inputs.sigmas,
            inputs.latent_image,
            {
                "unet": "model",
                "convention": "model",
                "positive": "positive",
                "negative": "negative",
                "latent": "latent_image",
                "noise": "latent_image",
                "sigmas": "sigmas",
            },
        )
        return self.Outputs(output=output, denoised_output=denoised)


class SamplerCustomAdvanced(Node):
    type = "SamplerCustomAdvanced"
    category = "sampling"
    description = "Run a sampler through given sigmas with a noise source (RandomNoise, DisableNoise) and a guider (CFGGuider, ...)."

    class Inputs(NodeIO):
        noise: NoiseGenerator = Field(description="The starting noise (RandomNoise or DisableNoise)")
        guider: Guider = Field(description="The model and its guidance (CFGGuider, BasicGuider)")
        sampler: Sampler = Field(description="The sampler (KSamplerSelect)")
        sigmas: Sigmas = Field(description="The noise levels to step through (BasicScheduler, ...)")
        latent_image: Latent = Field(description="The start latent (EmptyLatentImage for text-to-image)")

    class Outputs(NodeIO):
        output: Latent = Field(description="The sampled latent")
        denoised_output: Latent = Field(description="The denoised estimate of the last step")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        output, denoised = custom_sample(
            ctx,
            inputs.guider,
            inputs.noise,
            inputs.sampler,
            inputs.sigmas,
            inputs.latent_image,
            {
                "unet": "guider",
                "convention": "guider",
                "positive": "guider",
                "negative": "guider",
                "latent": "latent_image",
                "noise": "latent_image",
                "sigmas": "sigmas",
            },
        )
        return self.Outputs(output=output, denoised_output=denoised)


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return [Sampler, Sigmas, NoiseGenerator, Guider]


@hookimpl
def graphsd_comfy_types() -> dict[str, str]:
    return dict(COMFY_SAMPLING_TYPES)


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [
        KSamplerSelect,
        BasicScheduler,
        KarrasScheduler,
        ExponentialScheduler,
        PolyexponentialScheduler,
        SDTurboScheduler,
        BetaSamplingScheduler,
        ModelSamplingDiscrete,
        SplitSigmas,
        SplitSigmasDenoise,
        FlipSigmas,
        RandomNoise,
        DisableNoise,
        BasicGuider,
        CFGGuider,
        SamplerCustom,
        SamplerCustomAdvanced,
    ]
