"""Stable Diffusion nodes: load a checkpoint, make noise and latents, denoise, and go between
pixels and latents with the VAE.

A text-to-image chain is ``CheckpointLoader → TextEncode (×2) → LatentNoise →
UNetDenoiseLoop → VAEDecode``; image-to-image adds ``VAEEncode`` and feeds its latent to both
``LatentNoise`` (for the shape) and ``UNetDenoiseLoop`` (as the start latent, with
``denoise`` < 1).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import GraphsdError, NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint
from graphsd.resources import feature_map_bytes, latent_working_set, require_memory
from graphsd.std.models.compile import fast
from graphsd.std.models.family import SD_LATENT_CHANNELS, SD_LATENT_DOWNSCALE, model_info
from graphsd.std.models.loading import load_checkpoint, resolve_model_path
from graphsd.std.models.streaming import decode_tile, encode_tile
from graphsd.std.sampling.guidance import is_plain, max_passes
from graphsd.std.sampling.inpaint import is_inpainting_unet
from graphsd.std.sampling.kdiffusion import denoise_comfy
from graphsd.std.sampling.ksamplers import KSAMPLERS, NOT_SUPPORTED
from graphsd.std.sampling.loop import DenoiseError, DenoiseSettings, denoise, denoise_batch
from graphsd.std.sampling.schedulers import SAMPLERS, SCHEDULES, UnsupportedSchedule
from graphsd.std.sampling.sigmas import COMFY_SCHEDULERS
from graphsd.types import Clip, Conditioning, Image, Latent, Noise, UNet, Vae, weight_dtype, working_dtype

MAX_SEED = 2**64 - 1
BUILTIN_SAMPLERS = "euler, euler_ancestral, heun, ddim, lms, dpmpp_2m, dpmpp_2m_sde, unipc"


class CheckpointLoader(Node):
    type = "CheckpointLoader"
    category = "loaders"
    description = (
        "Load a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL base or refiner): a diffusers model "
        "folder or a single .safetensors file, offline. Each component is loaded once per engine and "
        "shared by every node that uses it."
    )

    class Inputs(NodeIO):
        path: str = Field(
            description=(
                "Model to load: a built-in name (graphsd-tiny), a name under the models folder "
                "(models/<name> or models/checkpoints/<name>), or a path to a diffusers folder "
                "(with model_index.json) or a single .safetensors file"
            )
        )
        dtype: Literal["fp32", "fp16", "bf16", "fp64"] = Field(
            "fp32",
            description=(
                "Weight precision: fp32 (CPU-friendly), fp16 or bf16 (half the memory, GPU), fp64 (slow; a "
                "reference precision for checking results, in which latents and images are computed too)"
            ),
        )

    class Outputs(NodeIO):
        unet: UNet = Field(description="The noise-prediction U-Net, with its scheduler config")
        clip: Clip = Field(description="Tokenizer(s) and text encoder(s)")
        vae: Vae = Field(description="The VAE that maps pixels to latents and back")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The resolved model's path, file sizes and mtimes: a replaced file is a new model."""
        path = literals.get("path")
        if not isinstance(path, str):
            return ""
        try:
            return file_fingerprint(resolve_model_path(path, ctx.models_dir))
        except GraphsdError:
            return "missing"

    @classmethod
    def check_context(
        cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings
    ) -> list[tuple[str, str, str | None]]:
        """A model that is not there is refused at validation, with the places the run looks at."""
        path = literals.get("path")
        if not isinstance(path, str):
            return []
        try:
            resolve_model_path(path, settings.models_dir)
        except GraphsdError as e:
            return [("path", str(e), None)]
        return []

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        allow_pickle = ctx.settings.allow_pickle  # only the user's setting (--allow-pickle), never the workflow
        try:
            path = ctx.readable(resolve_model_path(inputs.path, ctx.models_dir), "path")
            loaded = load_checkpoint(ctx.models, path, inputs.dtype, allow_pickle=allow_pickle)
        except NodeError:
            raise
        except GraphsdError as e:
            raise NodeError(str(e), field="path") from None
        return self.Outputs(unet=loaded.unet, clip=loaded.clip, vae=loaded.vae)


def _latent_size(width: int, height: int) -> tuple[int, int]:
    return height // SD_LATENT_DOWNSCALE, width // SD_LATENT_DOWNSCALE


def _require_latent_memory(shape: tuple[int, ...]) -> None:
    """Refuse a latent whose denoise could not even hold its per-step tensors in RAM."""
    batch, _, h, w = shape
    require_memory(
        torch.device("cpu"), latent_working_set(shape),
        f"denoising a batch of {batch} latent(s) of {w * SD_LATENT_DOWNSCALE}x{h * SD_LATENT_DOWNSCALE} pixels",
        "lower width/height or batch_size",
    )


def _first_channels(ctx: Context, handle: Any, role: str) -> tuple[int, torch.dtype]:
    """Channels of the full-resolution blocks of a U-Net or VAE, and its weight dtype."""
    module = ctx.models.get(handle.keys[role])
    return int(module.config.block_out_channels[0]), weight_dtype(module)


class LatentNoise(Node):
    type = "LatentNoise"
    category = "latent"
    description = (
        "Seeded Gaussian noise for the denoise loop. Drawn on the CPU, so a seed gives the same "
        "noise on every device. Batch item i uses its own generator seeded with seed + i (so item i "
        "of a batch equals a batch of one with seed + i, and batch 1 matches diffusers given "
        "torch.Generator().manual_seed(seed)); ancestral and SDE samplers continue those generators."
    )

    class Inputs(NodeIO):
        seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed (same seed → same noise, on any device)")
        width: int = Field(512, ge=8, le=16384, multiple_of=8, description="Image width in pixels (multiple of 8)")
        height: int = Field(512, ge=8, le=16384, multiple_of=8, description="Image height in pixels (multiple of 8)")
        batch_size: int = Field(1, ge=1, le=64, description="Number of images")
        channels: int = Field(SD_LATENT_CHANNELS, ge=1, le=64, description="Latent channels (4 for SD1, SD2 and SDXL)")
        latent: Latent | None = Field(
            None, description="Optional: copy the shape (batch, channels, size) of this latent instead of width/height/batch_size"
        )

    class Outputs(NodeIO):
        noise: Noise = Field(description="Unit-variance noise [batch, channels, height/8, width/8] and its generators' state")

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        if inputs.latent is not None:
            batch, channels, h, w = inputs.latent.samples.shape
        else:
            batch, channels = inputs.batch_size, inputs.channels
            h, w = _latent_size(inputs.width, inputs.height)
        _require_latent_memory((batch, channels, h, w))
        gens = [torch.Generator("cpu").manual_seed((inputs.seed + i) % (MAX_SEED + 1)) for i in range(batch)]
        samples = torch.cat([torch.randn((1, channels, h, w), generator=g, dtype=torch.float32) for g in gens])
        state = torch.stack([g.get_state() for g in gens])
        return self.Outputs(noise=Noise(samples=samples, seed=inputs.seed, generator_state=state))


class EmptyLatent(Node):
    type = "EmptyLatent"
    category = "latent"
    description = "An all-zero latent of a given size: a shape to start text-to-image from."

    class Inputs(NodeIO):
        width: int = Field(512, ge=8, le=16384, multiple_of=8, description="Image width in pixels (multiple of 8)")
        height: int = Field(512, ge=8, le=16384, multiple_of=8, description="Image height in pixels (multiple of 8)")
        batch_size: int = Field(1, ge=1, le=64, description="Number of images")
        channels: int = Field(SD_LATENT_CHANNELS, ge=1, le=64, description="Latent channels (4 for SD1, SD2 and SDXL)")

    class Outputs(NodeIO):
        latent: Latent = Field(description="Zeros [batch, channels, height/8, width/8]")

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        h, w = _latent_size(inputs.width, inputs.height)
        _require_latent_memory((inputs.batch_size, inputs.channels, h, w))
        return self.Outputs(latent=Latent(torch.zeros(inputs.batch_size, inputs.channels, h, w)))


class UNetDenoiseLoop(Node):
    type = "UNetDenoiseLoop"
    category = "sampling"
    description = (
        "Denoise with the U-Net and a sampler, with classifier-free guidance. Without a start latent "
        "it is text-to-image; with one it is image-to-image (denoise < 1 keeps part of it). "
        "start_step/end_step split one schedule between models (SDXL base → refiner). With convention "
        "diffusers (the default) it gives the same numbers as diffusers' Stable Diffusion pipelines; with "
        "convention comfyui, sampler and schedule are ComfyUI's sampler_name and scheduler, with ComfyUI's "
        "sigmas (k-diffusion semantics); docs/samplers.md says what each name matches."
    )

    class Inputs(NodeIO):
        unet: UNet = Field(description="The U-Net (from CheckpointLoader, possibly patched by LoRA)")
        positive: Conditioning = Field(description="What the image should show (TextEncode)")
        negative: Conditioning | None = Field(
            None, description="What to steer away from; without it (or with cfg 1) guidance is off and each step is one U-Net pass"
        )
        noise: Noise = Field(description="Initial noise (LatentNoise); its generators also feed ancestral/SDE samplers")
        latent: Latent | None = Field(
            None,
            description="Start latent for image-to-image or to continue a partly denoised latent; none = text-to-image. With a "
            "noise_mask (SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning) only the masked part is "
            "denoised and the rest kept (inpainting)",
        )
        steps: int = Field(20, ge=1, le=1000, description="Steps of the full schedule")
        cfg: float = Field(7.0, ge=0.0, le=100.0, description="Classifier-free guidance scale (1 = no guidance)")
        sampler: str = Field(
            "euler",
            description=f"Sampler name. diffusers convention: {BUILTIN_SAMPLERS}, or one a plugin registers; "
            f"comfyui convention: {', '.join(KSAMPLERS)}",
        )
        schedule: Literal[
            "normal", "karras", "simple", "sgm_uniform", "exponential", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal"
        ] = Field(
            "normal",
            description="Noise levels. diffusers convention: normal (the model's own spacing) or karras (Karras et al. 2022); "
            "comfyui convention: any of ComfyUI's schedulers (its normal is not the diffusers one)",
        )
        denoise: float = Field(
            1.0, ge=0.0, le=1.0, description="Image-to-image strength: run the last int(steps*denoise) steps (1 = all of them)"
        )
        start_step: int = Field(0, ge=0, le=10000, description="Skip the schedule's first start_step steps (needs a start latent)")
        end_step: int = Field(10000, ge=1, le=10000, description="Stop before this step (≥ steps: run to the end)")
        add_noise: bool = Field(
            True, description="Add noise to the start latent; turn off to continue a partly denoised latent (refiner)"
        )
        aesthetic_score: float = Field(6.0, ge=0.0, le=10.0, description="SDXL refiner only: aesthetic score of the positive")
        negative_aesthetic_score: float = Field(
            2.5, ge=0.0, le=10.0, description="SDXL refiner only: aesthetic score of the negative"
        )
        # the last input, so that saved editor files (widget values by position) keep their order
        convention: Literal["diffusers", "comfyui"] = Field(
            "diffusers",
            description="diffusers: diffusers' schedulers, same numbers as its pipelines; comfyui: ComfyUI's samplers and "
            "sigmas, per-step noise seeded with the noise's seed as ComfyUI seeds it with the KSampler seed",
        )
        leftover_noise: bool = Field(
            True,
            description="With end_step before the end: on, the latent keeps the noise of that step (for a refiner to continue "
            "with add_noise off); off, the last step goes to sigma 0 and finishes the image (ComfyUI's KSamplerAdvanced "
            "return_with_leftover_noise disable; convention comfyui only)",
        )

    class Outputs(NodeIO):
        latent: Latent = Field(description="The denoised latent (scaled latent space)")

    @classmethod
    def check_literals(cls, literals: dict[str, Any], registry: Any) -> list[tuple[str, str, str | None]]:
        """A sampler / schedule pair that cannot run is reported before anything runs, with what works."""
        sampler, schedule = literals.get("sampler"), literals.get("schedule", "normal")
        convention = literals.get("convention", "diffusers")
        if not isinstance(sampler, str) or not isinstance(schedule, str) or convention not in ("diffusers", "comfyui"):
            return []
        problems = sampler_problems(sampler, schedule, convention, registry.samplers)
        steps, end_step = literals.get("steps", 20), literals.get("end_step", 10000)
        cut = isinstance(steps, int) and isinstance(end_step, int) and end_step < steps
        if convention == "diffusers" and literals.get("leftover_noise") is False and cut:
            problems.append(("leftover_noise", "leftover_noise off (a last step to sigma 0 at end_step) needs convention comfyui",
                             "set convention to comfyui, or leftover_noise on"))
        return problems

    @classmethod
    def batch_key(cls, inputs: Inputs, ctx: Context) -> Hashable | None:
        """Branches batch when they share the U-Net handle (components and patches), every
        setting, the noise's shape and dtype, and plain conditionings of equal shapes; the
        diffusers convention with a built-in sampler only (their per-step noise is drawn per batch
        item from its own generator). Areas, masks, ControlNets, inpainting, start latents with a
        mask, the comfyui convention, plugin samplers and runs with previews run alone."""
        noise, latent = inputs.noise, inputs.latent
        if inputs.convention != "diffusers" or ctx.wants_previews:
            return None
        if inputs.sampler not in SAMPLERS or ctx.samplers.get(inputs.sampler) is not SAMPLERS[inputs.sampler]:
            return None
        if latent is not None and (latent.noise_mask is not None or latent.samples.shape != noise.samples.shape):
            return None
        if model_info(inputs.unet, "unet").unet_in_channels != noise.samples.shape[1]:  # an inpainting U-Net
            return None
        conds = [c for c in (inputs.positive, inputs.negative) if c is not None]
        if not all(is_plain(c) for c in conds):
            return None
        shapes = []
        for c in conds:
            extras = tuple(sorted(c.extras.items()))
            if not all(_plain_value(v) for _, v in extras):
                return None
            pooled = None if c.pooled is None else (tuple(c.pooled.shape), str(c.pooled.dtype))
            shapes.append((tuple(c.embeddings.shape), str(c.embeddings.dtype), pooled, extras))
        settings = inputs.model_dump(exclude={"unet", "positive", "negative", "noise", "latent"})
        return (
            inputs.unet.fingerprint(),
            tuple(sorted(settings.items())),
            tuple(noise.samples.shape),
            str(noise.samples.dtype),
            noise.generator_state is None,
            None if latent is None else str(latent.samples.dtype),
            inputs.negative is None,
            tuple(shapes),
        )

    @classmethod
    def batch_item_bytes(cls, inputs: Inputs, ctx: Context) -> int:
        """The U-Net's working set for one branch (what :meth:`run` requires of the device)."""
        return cls._working_set(inputs, ctx, 1)

    @classmethod
    def run_batch(cls, inputs: list[Inputs], ctxs: list[Context]) -> list[NodeIO]:
        """Branches of one batch key denoised as one loop on their stacked latents."""
        node = cls()
        for one, ctx in zip(inputs, ctxs, strict=True):
            node._check(one, ctx)
        first, ctx = inputs[0], ctxs[0]
        need = cls._working_set(first, ctx, len(inputs))
        batch, _, h, w = first.noise.samples.shape
        require_memory(ctx.device, need, f"the U-Net on {len(inputs)} branches of {batch} latent(s) of {w}x{h}", "lower max_batch")
        scheduler = ctx.samplers[first.sampler](scheduler_config=dict(model_info(first.unet, "unet").scheduler_config),
                                                schedule=first.schedule)
        try:
            results = denoise_batch(ctxs, first.unet, scheduler, [i.positive for i in inputs], [i.negative for i in inputs],
                                    [i.noise for i in inputs], [i.latent for i in inputs], _denoise_settings(first))
        except UnsupportedSchedule as e:
            raise NodeError(str(e), field="schedule") from None
        except DenoiseError as e:
            raise NodeError(str(e), field=e.field) from None
        if not all(torch.isfinite(samples).all() for samples in results):
            raise NodeError(_not_finite("the denoised latent", first.unet), field="unet")
        return [cls.Outputs(latent=Latent(samples)) for samples in results]

    @classmethod
    def _working_set(cls, inputs: Inputs, ctx: Context, branches: int) -> int:
        """A lower bound of the device memory the U-Net needs for ``branches`` such runs at once."""
        batch, _, h, w = inputs.noise.samples.shape
        guided = inputs.negative is not None and inputs.cfg != 1.0
        width, dtype = _first_channels(ctx, inputs.unet, "unet")
        return feature_map_bytes(branches * batch * max_passes(inputs.positive, inputs.negative, guided), width, h, w, dtype)

    def _check(self, inputs: Inputs, ctx: Context) -> None:
        """Refuse a sampler that cannot run and noise the U-Net cannot take."""
        for field, message, hint in sampler_problems(inputs.sampler, inputs.schedule, inputs.convention, ctx.samplers):
            raise NodeError(f"{message}; {hint}", field=field)
        info = model_info(inputs.unet, "unet")
        channels, noise_channels = info.unet_in_channels, inputs.noise.samples.shape[1]
        if noise_channels != channels and not is_inpainting_unet(channels, noise_channels):
            inpainting = f" (or {(channels - 1) // 2} for an inpainting U-Net)" if channels % 2 else ""
            raise NodeError(
                f"the noise has {noise_channels} channels but this U-Net takes {channels}; set LatentNoise channels to {channels}"
                f"{inpainting}, or make the noise from the start latent",
                field="noise",
            )

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        self._check(inputs, ctx)
        info = model_info(inputs.unet, "unet")
        batch, _, h, w = inputs.noise.samples.shape
        require_memory(
            ctx.device, self._working_set(inputs, ctx, 1),
            f"the U-Net on a batch of {batch} latent(s) of {w}x{h}", "lower the size or the batch", field="noise",
        )
        settings = _denoise_settings(inputs)
        try:
            if inputs.convention == "comfyui":
                samples = denoise_comfy(ctx, inputs.unet, inputs.sampler, inputs.schedule, inputs.positive, inputs.negative,
                                        inputs.noise, inputs.latent, settings)
            else:
                factory = ctx.samplers[inputs.sampler]
                scheduler = factory(scheduler_config=dict(info.scheduler_config), schedule=inputs.schedule)
                samples = denoise(ctx, inputs.unet, scheduler, inputs.positive, inputs.negative, inputs.noise, inputs.latent, settings)
        except UnsupportedSchedule as e:
            raise NodeError(str(e), field="schedule") from None
        except DenoiseError as e:
            raise NodeError(str(e), field=e.field) from None
        if not torch.isfinite(samples).all():
            raise NodeError(_not_finite("the denoised latent", inputs.unet), field="unet")
        return self.Outputs(latent=Latent(samples))


def _denoise_settings(inputs: UNetDenoiseLoop.Inputs) -> DenoiseSettings:
    return DenoiseSettings(
        steps=inputs.steps,
        cfg=inputs.cfg,
        denoise=inputs.denoise,
        start_step=inputs.start_step,
        end_step=inputs.end_step,
        leftover_noise=inputs.leftover_noise,
        add_noise=inputs.add_noise,
        aesthetic_score=inputs.aesthetic_score,
        negative_aesthetic_score=inputs.negative_aesthetic_score,
    )


def _plain_value(value: Any) -> bool:
    """A conditioning extra that a batch key can compare (numbers, text, tuples of them)."""
    if isinstance(value, (tuple, list)):
        return all(_plain_value(v) for v in value)
    return isinstance(value, (int, float, str, bool, type(None)))


def sampler_problems(sampler: str, schedule: str, convention: str, registered: Any) -> list[tuple[str, str, str | None]]:
    """Why ``sampler`` with ``schedule`` cannot run in ``convention`` (empty if it can), as
    (field, message, what works) for validation."""
    if convention == "comfyui":
        if sampler in NOT_SUPPORTED:
            return [("sampler", f"ComfyUI sampler {sampler!r} is not supported by graphsd: {NOT_SUPPORTED[sampler]}",
                     f"use one of: {', '.join(KSAMPLERS)}")]
        if sampler not in KSAMPLERS:
            return [("sampler", f"unknown ComfyUI sampler {sampler!r}", f"use one of: {', '.join(KSAMPLERS)}")]
        if schedule not in COMFY_SCHEDULERS:
            return [("schedule", f"unknown ComfyUI scheduler {schedule!r}", f"use one of: {', '.join(COMFY_SCHEDULERS)}")]
        return []
    if sampler not in registered:
        hint = f"available: {', '.join(sorted(registered))}"
        if sampler in KSAMPLERS:
            hint += f"; {sampler!r} is a ComfyUI sampler: set convention to comfyui"
        return [("sampler", f"unknown sampler {sampler!r}", hint)]
    if schedule not in SCHEDULES:
        return [("schedule", f"schedule {schedule!r} is a ComfyUI scheduler",
                  f"the diffusers convention has {', '.join(SCHEDULES)}; set convention to comfyui for {schedule!r}")]
    factory = SAMPLERS.get(sampler)
    if schedule == "karras" and factory is registered.get(sampler) and factory is not None and not factory.keywords["karras"]:
        karras = ", ".join(n for n, f in SAMPLERS.items() if f.keywords["karras"])
        return [("schedule", f"the diffusers {sampler} sampler has no karras schedule",
                 f"use schedule normal, a sampler with karras ({karras}), or convention comfyui (every sampler has karras there)")]
    return []


class VAEEncode(Node):
    type = "VAEEncode"
    category = "latent"
    description = "Encode an image into the model's scaled latent space (the mode of the VAE's posterior, deterministic)."

    class Inputs(NodeIO):
        vae: Vae = Field(description="The VAE (from CheckpointLoader)")
        image: Image = Field(description="RGB image; width and height must be multiples of 8 (alpha is dropped)")
        tiled: bool = Field(False, description="Encode in tiles (for images too large to encode at once)")
        tile_size: int = Field(512, ge=16, le=4096, multiple_of=8, description="Tiled mode: tile edge in pixels")
        tile_overlap: int = Field(128, ge=0, le=2048, multiple_of=8, description="Tiled mode: overlap between tiles in pixels, blended")

    class Outputs(NodeIO):
        latent: Latent = Field(description="Latent [batch, 4, height/8, width/8], × the VAE scale factor")

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        pixels = inputs.image.pixels
        info = model_info(inputs.vae, "vae")
        down = info.latent_downscale
        height, width = pixels.shape[1:3]
        if height % down or width % down:
            raise NodeError(
                f"image is {width}x{height}; VAEEncode needs multiples of {down} (resize or crop it to "
                f"{width // down * down}x{height // down * down})",
                field="image",
            )
        return self.Outputs(latent=Latent(encode_pixels(ctx, inputs.vae, pixels, "image", _asked_tiles(inputs, down))))


def _asked_tiles(inputs: Any, down: int) -> tuple[int, int] | None:
    """(tile edge, overlap) in latent cells when a VAE node's tiled mode is on (VAEEncode,
    VAEDecode: ``tiled``, ``tile_size`` and ``tile_overlap`` in pixels), else None."""
    if not inputs.tiled:
        return None
    if inputs.tile_overlap >= inputs.tile_size:
        raise NodeError(f"tile_overlap ({inputs.tile_overlap}) must be smaller than tile_size ({inputs.tile_size})", field="tile_overlap")
    return inputs.tile_size // down, inputs.tile_overlap // down


def encode_pixels(ctx: Context, vae_ref: Vae, pixels: torch.Tensor, field: str, tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """``pixels`` ``[B, H, W, C]`` (sides multiples of the VAE's downscale; grey expanded, alpha
    dropped) as scaled latents on the CPU: the mode of the VAE's posterior, deterministic. With
    ``tiles`` (edge, overlap, in latent cells) encoded in tiles (:func:`encode_tiled`); under a
    VRAM budget also when the whole frame's encode would not fit, in tiles that do, overlapping
    by a quarter (diffusers' tiling). Too little memory is a mistake in ``field``."""
    info = model_info(vae_ref, "vae")
    down = info.latent_downscale
    batch, height, width = pixels.shape[:3]
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, -1, 3)
    if tiles is None and (tile := encode_tile(ctx.models, vae_ref.keys["vae"], (batch, 3, height, width), down)) is not None:
        tiles = (tile, tile // 4)
    channels, dtype = _first_channels(ctx, vae_ref, "vae")
    frame = (height, width) if tiles is None else (min(height, tiles[0] * down), min(width, tiles[0] * down))
    require_memory(ctx.device, feature_map_bytes(batch, channels, *frame, dtype),
                   f"encoding {batch} image(s) of {width}x{height}", "encode in tiles (VAEEncode tiled: true) or use a smaller image",
                   field=field)
    with ctx.models.use(vae_ref, "vae") as vae, torch.no_grad():
        x = pixels[..., :3].permute(0, 3, 1, 2).to(ctx.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mode() if tiles is None else encode_tiled(vae, x, *tiles, down)
    return ((z.to(working_dtype(z.dtype)) - info.shift_factor) * info.scaling_factor).cpu()


def encode_tiled(vae: Any, x: torch.Tensor, tile: int, overlap: int, down: int) -> torch.Tensor:
    """The posterior mode of pixels ``x`` encoded in tiles of ``tile`` × ``tile`` latent cells
    (``tile × down`` pixels) that start every ``(tile - overlap) × down`` pixels, joined as
    :func:`join_tiles` does over ``overlap`` cells: the scheme of diffusers'
    ``AutoencoderKL.tiled_encode`` (a quarter's overlap there)."""
    size, stride = tile * down, (tile - overlap) * down
    rows = [
        [vae.encode(x[:, :, i : i + size, j : j + size]).latent_dist.mode() for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    return join_tiles(rows, overlap, tile - overlap)


class VAEDecode(Node):
    type = "VAEDecode"
    category = "latent"
    description = (
        "Decode a latent into an image. The tiled mode decodes overlapping tiles one at a time and "
        "blends their overlaps linearly, so large images fit in little memory (same tiling as "
        "diffusers' AutoencoderKL.enable_tiling)."
    )

    class Inputs(NodeIO):
        vae: Vae = Field(description="The VAE (from CheckpointLoader)")
        latent: Latent = Field(description="Latent in the model's scaled latent space")
        tiled: bool = Field(False, description="Decode in tiles (for images too large to decode at once)")
        tile_size: int = Field(512, ge=16, le=4096, multiple_of=8, description="Tiled mode: tile edge in pixels")
        tile_overlap: int = Field(64, ge=0, le=2048, multiple_of=8, description="Tiled mode: overlap between tiles in pixels, blended")

    class Outputs(NodeIO):
        image: Image = Field(description="Image [batch, height, width, 3] in [0, 1]")

    @classmethod
    def batch_key(cls, inputs: Inputs, ctx: Context) -> Hashable | None:
        """Whole (not tiled) decodes of latents of one shape and dtype with one VAE batch. Under a
        VRAM budget each decode runs alone (it may have to be tiled to fit)."""
        if inputs.tiled or ctx.settings.vram_budget_mb is not None:
            return None
        samples = inputs.latent.samples
        return (inputs.vae.fingerprint(), tuple(samples.shape), str(samples.dtype))

    @classmethod
    def batch_item_bytes(cls, inputs: Inputs, ctx: Context) -> int:
        """The decoder's full-resolution feature maps for one latent (what :meth:`run` requires)."""
        batch, _, h, w = inputs.latent.samples.shape
        down = model_info(inputs.vae, "vae").latent_downscale
        channels, dtype = _first_channels(ctx, inputs.vae, "vae")
        return feature_map_bytes(batch, channels, h * down, w * down, dtype)

    @classmethod
    def run_batch(cls, inputs: list[Inputs], ctxs: list[Context]) -> list[NodeIO]:
        """The latents decoded as one batch, each image as :meth:`run` decodes it alone."""
        first, ctx = inputs[0], ctxs[0]
        need = sum(cls.batch_item_bytes(one, ctx) for one in inputs)
        require_memory(ctx.device, need, f"decoding {len(inputs)} latents at once", "lower max_batch")
        x = _vae_decode(ctx, first.vae, torch.cat([one.latent.samples for one in inputs]), None, 0)
        if not torch.isfinite(x).all():
            raise NodeError(_not_finite("a decoded image", first.vae), field="vae")  # each one is decoded alone to tell which
        pixels = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        return [cls.Outputs(image=Image(part.clone())) for part in pixels.split(first.latent.samples.shape[0])]

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        info = model_info(inputs.vae, "vae")
        down = info.latent_downscale
        asked = _asked_tiles(inputs, down)
        batch, _, h, w = inputs.latent.samples.shape
        channels, dtype = _first_channels(ctx, inputs.vae, "vae")
        full = (min(inputs.tile_size, h * down), min(inputs.tile_size, w * down)) if inputs.tiled else (h * down, w * down)
        require_memory(ctx.device, feature_map_bytes(batch, channels, full[0], full[1], dtype),
                       f"decoding {batch} latent(s) into {w * down}x{h * down} images", "decode in tiles (tiled: true)", field="latent")
        if asked is not None:
            tile, overlap = asked
        else:  # under a VRAM budget a frame whose decode would not fit is decoded in tiles that do
            tile = decode_tile(ctx.models, inputs.vae.keys["vae"], tuple(inputs.latent.samples.shape))
            overlap = 0 if tile is None else min(inputs.tile_overlap // down, tile // 4)
        x = _vae_decode(ctx, inputs.vae, inputs.latent.samples, tile, overlap)
        if not torch.isfinite(x).all():
            if not torch.isfinite(inputs.latent.samples).all():
                raise NodeError("the latent to decode holds NaN or infinite values; the node that made it went wrong", field="latent")
            raise NodeError(_not_finite("the decoded image", inputs.vae), field="vae")
        pixels = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        return self.Outputs(image=Image(pixels))


def _not_finite(what: str, handle: Any) -> str:
    """Why a result holds NaN or infinities, and what to try (A1111 checks the same places)."""
    causes = []
    if handle.patches:
        causes.append(f"a patch on the model ({', '.join(p.fingerprint().split(':')[0] for p in handle.patches)}) "
                      "with broken or too strong weights: try without it or at a lower strength")
    causes.append("fp16 overflow: load the checkpoint with dtype fp32 or bf16 (an SD1/SDXL VAE often overflows in fp16)")
    return f"{what} holds NaN or infinite values (it would be a black image). Likely causes: " + "; ".join(causes)


def _vae_decode(ctx: Context, vae_ref: Vae, samples: torch.Tensor, tile: int | None, overlap: int) -> torch.Tensor:
    """Scaled latents decoded by the VAE (whole, compiled when Settings.compile asks, or in tiles
    of ``tile`` latent pixels overlapping by ``overlap``), in the VAE's working precision; NaN
    and infinite values are left for the caller to report."""
    info = model_info(vae_ref, "vae")
    with ctx.models.use(vae_ref, "vae") as vae, torch.no_grad():
        dtype = weight_dtype(vae)
        work = working_dtype(dtype)
        z = (samples.to(ctx.device, work) / info.scaling_factor + info.shift_factor).to(dtype)
        if tile is not None:
            x = decode_tiled(vae, z, tile, overlap, info.latent_downscale)
        else:
            x = fast(ctx, vae_ref, "vae", vae).decode(z, return_dict=False)[0]
    return x.to(work)


def decode_tiled(vae: Any, z: torch.Tensor, tile: int, overlap: int, down: int) -> torch.Tensor:
    """Decode ``z`` in ``tile``×``tile`` latent tiles that start every ``tile - overlap`` cells,
    joined by :func:`join_tiles` over ``overlap * down`` pixels: the scheme of diffusers'
    ``AutoencoderKL.tiled_decode``."""
    stride = tile - overlap
    rows = [
        [vae.decode(z[:, :, i : i + tile, j : j + tile], return_dict=False)[0] for j in range(0, z.shape[3], stride)]
        for i in range(0, z.shape[2], stride)
    ]
    return join_tiles(rows, overlap * down, stride * down)


def join_tiles(rows: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Overlapping tiles (``[B, C, h, w]``, in rows) as one tensor: each tile's top and left
    ``blend`` rows/columns are cross-faded linearly with the (already blended) tile above and to
    its left, then every tile is cut to ``keep`` × ``keep`` and the pieces are joined."""
    for r, row in enumerate(rows):
        for c, piece in enumerate(row):
            if r > 0:
                _cross_fade(rows[r - 1][c], piece, blend, dim=2)
            if c > 0:
                _cross_fade(row[c - 1], piece, blend, dim=3)
    return torch.cat([torch.cat([p[:, :, :keep, :keep] for p in row], dim=3) for row in rows], dim=2)


def _cross_fade(before: torch.Tensor, piece: torch.Tensor, width: int, dim: int) -> None:
    """In place: the first ``width`` slices of ``piece`` along ``dim`` fade from the last
    ``width`` slices of ``before`` (weight 1 - k/width) into ``piece`` (weight k/width)."""
    width = min(width, before.shape[dim], piece.shape[dim])
    if width == 0:
        return
    shape = [1] * piece.ndim
    shape[dim] = width
    ramp = (torch.arange(width, device=piece.device, dtype=torch.float64) / width).reshape(shape)
    head = piece.narrow(dim, 0, width)
    mixed = before.narrow(dim, before.shape[dim] - width, width) * (1 - ramp) + head * ramp
    head.copy_(mixed.to(piece.dtype))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [CheckpointLoader, LatentNoise, EmptyLatent, UNetDenoiseLoop, VAEEncode, VAEDecode]
