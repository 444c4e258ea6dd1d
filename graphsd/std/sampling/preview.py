"""Live previews of the denoise loop: a cheap linear latent → RGB map fitted once per VAE, or
the VAE's own decoder where no linear map describes its latents.

A latent cell of the Stable Diffusion VAEs holds, to a good approximation, an affine function of
the mean colour of the pixels it decodes to. ComfyUI's "latent2rgb" previews use published
factors of that map for each released family; graphsd fits them instead, for whatever VAE the
model at hand has:

1. :data:`CALIBRATION_IMAGES` images (the corners and centre of the RGB cube as solid colours,
   then smooth gradients between random corner colours, from a fixed seed) are encoded by the
   VAE (the posterior's mode, scaled as the denoise loop's latents are) and decoded again;
2. each latent cell is paired with the mean colour of the decoded pixels it covers (so the map
   estimates what VAEDecode will show);
3. least squares gives ``rgb ≈ latent · W + b`` over all cells; its RMS residual is kept as
   :attr:`LatentRGB.rms_error` (colour units in [0, 1]).

The fit costs one encode and one decode of a small batch, the first time a run asks for previews
with that VAE; it is kept for as long as the VAE stays loaded.

Some VAEs are not linear in colour: graphsd-tiny's (trained on a few flat colours) leaves an RMS
error of about 0.26 with any affine map, fitted on calibration images or even on its own
generated images, against a colour spread of about 0.32: such a preview would show the wrong
colours. When the fit's error exceeds :data:`MAX_LINEAR_RMS`, previews are decoded by the VAE
itself instead (exact, and cheap for a small VAE), from the latent shrunk to at most
:data:`MAX_PREVIEW_SIDE` pixels, which bounds the cost.

Each step the diffusers loop passes the scheduler's output; the preview shows the scheduler's
estimate of the final latent (diffusers' ``pred_original_sample``, second in a step's tuple, from
Euler, Euler ancestral, Heun, DDIM and LMS) when it gives one, otherwise the current latent. The
ComfyUI-convention loop passes its denoiser's last (guided) estimate of the final latent. Only the
first image of a batch is shown, as a JPEG: by the linear map at latent resolution (one pixel
per cell; the client scales it up), by the decoder at full resolution, either at most
:data:`MAX_PREVIEW_SIDE` pixels on the longer side.
"""

from __future__ import annotations

import io
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from graphsd.context import Context
from graphsd.std.models.family import ModelInfo, model_info
from graphsd.types import UNet, Vae, weight_dtype

#: Calibration batch: 9 solid colours (RGB cube corners and mid-grey), the rest gradients.
CALIBRATION_IMAGES = 16
#: Latent cells along each side of a calibration image.
CALIBRATION_CELLS = 8
#: ComfyUI's cap on a preview's longer side.
MAX_PREVIEW_SIDE = 512
JPEG_QUALITY = 90
#: Largest RMS colour error (on the calibration cells) at which the linear map is used
MAX_LINEAR_RMS = 0.1

# fitted maps by VAE module: dropped with the module when the ModelManager evicts it
_MAPS: weakref.WeakKeyDictionary[torch.nn.Module, LatentRGB] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent · weight + bias`` per latent cell (``weight`` [channels, 3], float32)."""

    weight: torch.Tensor
    bias: torch.Tensor
    #: RMS of the fit's residual over the calibration cells, in [0, 1] colour units
    rms_error: float

    def apply(self, latent: torch.Tensor) -> torch.Tensor:
        """A latent [channels, h, w] as an RGB image [h, w, 3] in [0, 1]."""
        rgb = torch.einsum("chw,ck->hwk", latent.float().cpu(), self.weight) + self.bias
        return rgb.clamp(0, 1)


def calibration_images(size: int) -> torch.Tensor:
    """[CALIBRATION_IMAGES, 3, size, size] in [0, 1]: solid colours, then bilinear gradients
    between four corner colours drawn from a fixed seed."""
    solids = [torch.tensor([r, g, b], dtype=torch.float32) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)]
    solids.append(torch.full((3,), 0.5))
    images = [c.view(3, 1, 1).expand(3, size, size) for c in solids]
    gen = torch.Generator("cpu").manual_seed(0)
    ramp = torch.linspace(0, 1, size)
    v, u = ramp.view(size, 1), ramp.view(1, size)
    for _ in range(CALIBRATION_IMAGES - len(images)):
        c = torch.rand(4, 3, 1, 1, generator=gen)
        images.append(c[0] * (1 - v) * (1 - u) + c[1] * (1 - v) * u + c[2] * v * (1 - u) + c[3] * v * u)
    return torch.stack(images)


@torch.no_grad()
def fit_latent_rgb(ctx: Context, vae_ref: Vae, info: ModelInfo) -> LatentRGB:
    """Fit the map for the VAE ``vae_ref`` (see the module docstring)."""
    down = info.latent_downscale
    pixels = calibration_images(CALIBRATION_CELLS * down)
    with ctx.models.use(vae_ref, "vae") as vae:
        z = vae.encode((pixels * 2 - 1).to(ctx.device, vae.dtype)).latent_dist.mode()
        decoded = vae.decode(z, return_dict=False)[0]
    colours = F.avg_pool2d((decoded.double().cpu() / 2 + 0.5).clamp(0, 1), down)  # [n, 3, cells, cells]
    latents = (z.double().cpu() - info.shift_factor) * info.scaling_factor  # [n, c, cells, cells]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    residual = design @ solution - y
    return LatentRGB(solution[:-1].float(), solution[-1].float(), float(residual.pow(2).mean().sqrt()))


def latent_rgb(ctx: Context, unet_ref: UNet) -> LatentRGB | None:
    """The map for the latents of ``unet_ref``'s checkpoint (fitted on first use, then reused),
    or None when its handle names no VAE (a handle built by hand)."""
    info = model_info(unet_ref, "unet")
    if info.vae_key is None:
        return None
    module = ctx.models.get(info.vae_key)
    found = _MAPS.get(module)
    if found is None:
        found = _MAPS[module] = fit_latent_rgb(ctx, Vae(ctx.models, {"vae": info.vae_key}, info), info)
    return found


def preview_image(rgb: torch.Tensor) -> bytes:
    """An RGB image [h, w, 3] in [0, 1] as JPEG bytes, its longer side at most MAX_PREVIEW_SIDE."""
    h, w = rgb.shape[:2]
    image = PILImage.fromarray((rgb.nan_to_num(0.0) * 255).round().to(torch.uint8).numpy(), "RGB")
    if max(h, w) > MAX_PREVIEW_SIDE:
        scale = MAX_PREVIEW_SIDE / max(h, w)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), PILImage.Resampling.BOX)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class Previewer:
    """Sends a preview of each denoise step through ``ctx.preview``."""

    def __init__(self, ctx: Context, mapping: LatentRGB, vae_ref: Vae, info: ModelInfo):
        self.ctx = ctx
        self.mapping = mapping
        self.vae_ref = vae_ref
        self.info = info

    @classmethod
    def for_run(cls, ctx: Context, unet_ref: UNet) -> Previewer | None:
        """A previewer when the run asked for previews and the model's VAE is known, else None."""
        if not ctx.wants_previews:
            return None
        info = model_info(unet_ref, "unet")
        mapping = latent_rgb(ctx, unet_ref)
        if mapping is None or info.vae_key is None:
            return None
        return cls(ctx, mapping, Vae(ctx.models, {"vae": info.vae_key}, info), info)

    @property
    def linear(self) -> bool:
        """Whether previews use the linear map (else the VAE's decoder)."""
        return self.mapping.rms_error <= MAX_LINEAR_RMS

    def show(self, step_output: Any) -> None:
        """Preview a scheduler step's output tuple: its x0 estimate when it has one, else the new latent."""
        latent = step_output[0]
        if len(step_output) > 1 and isinstance(step_output[1], torch.Tensor) and step_output[1].shape == latent.shape:
            latent = step_output[1]
        self.show_latent(latent)

    def show_latent(self, latent: torch.Tensor) -> None:
        """Preview the first item of a latent batch [batch, c, h, w] (scaled latent space)."""
        rgb = self.mapping.apply(latent[0]) if self.linear else self.decode(latent[:1])
        self.ctx.preview(preview_image(rgb), "image/jpeg")

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's decoding [h, w, 3] in [0, 1] of a latent [1, c, h, w], shrunk first so that
        the image is at most MAX_PREVIEW_SIDE pixels on its longer side."""
        info = self.info
        cells = max(1, MAX_PREVIEW_SIDE // info.latent_downscale)
        if max(latent.shape[2:]) > cells:
            scale = cells / max(latent.shape[2:])
            size = (max(1, round(latent.shape[2] * scale)), max(1, round(latent.shape[3] * scale)))
            latent = F.interpolate(latent.float(), size=size, mode="area")
        with self.ctx.models.use(self.vae_ref, "vae") as vae:
            z = latent.to(self.ctx.device, torch.float32) / info.scaling_factor + info.shift_factor
            x = vae.decode(z.to(weight_dtype(vae)), return_dict=False)[0]
        return (x[0].float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
