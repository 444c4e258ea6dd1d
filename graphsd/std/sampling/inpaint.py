"""Inpainting in the denoise loops: which part of the latent may change, and what an inpainting
U-Net sees besides the latent.

A start latent with a ``noise_mask`` (1 = denoise here, 0 = keep) is inpainted by both loops:

- **comfyui convention** (ComfyUI's ``KSamplerX0Inpaint``, comfy/samplers.py): before every model
  evaluation at noise level sigma, the kept part of ``x`` is replaced by the start latent noised to
  sigma with the run's initial noise, ``x = x m + (latent + noise sigma)(1 - m)``, and the kept
  part of the denoised estimate is the start latent, ``D = D m + latent (1 - m)``. The mask is
  resized to the latent bilinearly (soft masks stay soft).
- **diffusers convention** (diffusers' ``StableDiffusionInpaintPipeline`` with a 4-channel U-Net):
  after every scheduler step, ``x = (1 - m) add_noise(latent, noise, t_next) + m x``, where
  ``t_next`` is the schedule's next timestep; after the schedule's last step the start latent
  itself, so the result keeps it exactly where m = 0. The mask is binarised at 0.5 and resized
  to the latent by nearest neighbour, as the pipeline prepares it, and at full strength
  (``denoise`` 1, no ``start_step``) the start is pure noise, ``noise × init_noise_sigma``, as in
  that pipeline (plain image-to-image noises the start latent instead).

An **inpainting U-Net** takes ``2 C + 1`` input channels for ``C``-channel latents (SD 1.5 / 2
inpainting: 9): ``concat(x, mask, masked-picture latent)`` at every call, as the inpainting
pipeline builds it. The mask and the masked picture come from the conditioning
(InpaintModelConditioning's ``concat_mask`` / ``concat_latent_image``) or else from the start
latent's ``noise_mask`` and samples (VAEEncodeForInpaint's latent is the masked picture). ComfyUI
resizes that mask bilinearly and rounds it; the diffusers convention prepares it as above. Such a
U-Net's latent is blended as well in ComfyUI's convention (whenever the latent has a mask), not in
the diffusers one (the pipeline does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from graphsd.std.sampling.guidance import DenoiseError
from graphsd.types import Conditioning, Latent

Convention = Literal["diffusers", "comfyui"]


def is_inpainting_unet(in_channels: int, latent_channels: int) -> bool:
    """Whether a U-Net with ``in_channels`` takes mask + masked picture beside the latent."""
    return in_channels == 2 * latent_channels + 1


def to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t``'s first ``batch`` items, repeated in turn when it has fewer (ComfyUI's
    ``repeat_to_batch_size``)."""
    if t.shape[0] < batch:
        t = t.repeat(-(-batch // t.shape[0]), *([1] * (t.ndim - 1)))
    return t[:batch]


def latent_mask(
    mask: torch.Tensor, shape: tuple[int, ...], convention: Convention, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``mask`` (``[B, 1, H, W]`` or ``[B, H, W]``, any size) as ``[batch, 1, h, w]`` weights on a
    latent of ``shape``: bilinear (comfyui), or binarised at 0.5 then nearest (diffusers)."""
    batch, _, h, w = shape
    m = mask.reshape(-1, 1, *mask.shape[-2:]).to(device, dtype)
    if convention == "diffusers":
        m = (m >= 0.5).to(dtype)
    if tuple(m.shape[-2:]) != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear") if convention == "comfyui" else F.interpolate(m, size=(h, w))
    return to_batch(m, batch)


def inpaint_channels(
    cond: Conditioning,
    latent: Latent | None,
    shape: tuple[int, ...],
    convention: Convention,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """An inpainting U-Net's extra input channels for one conditioning: ``[B, 1 + C, h, w]``,
    the mask then the masked picture's latent."""
    batch, channels, h, w = shape
    image = cond.extras.get("concat_latent_image")
    mask = cond.extras.get("concat_mask")
    if image is None and latent is not None:
        image = latent.samples
    if mask is None and latent is not None:
        mask = latent.noise_mask
    if image is None or mask is None:
        raise DenoiseError(
            f"this inpainting U-Net ({2 * channels + 1} input channels) needs the picture to inpaint and a mask: encode them "
            "with VAEEncodeForInpaint or InpaintModelConditioning, or give the start latent a mask (SetLatentNoiseMask)",
            "latent",
        )
    if tuple(image.shape[1:]) != (channels, h, w):
        raise DenoiseError(
            f"the masked picture's latent is {tuple(image.shape[1:])} but the noise is {(channels, h, w)}; "
            "make the noise from the inpainting latent (LatentNoise's latent input)",
            "noise",
        )
    if convention == "comfyui":
        m = mask.reshape(-1, 1, *mask.shape[-2:]).to(device, dtype)
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear")
        m = to_batch(m.round(), batch)
    else:
        m = latent_mask(mask, shape, convention, device, dtype)
    return torch.cat([m, to_batch(image.to(device, dtype), batch)], dim=1)


@dataclass
class KeepOutsideMask:
    """ComfyUI's inpainting rule around each model evaluation (see the module docstring):
    ``mask`` ``[B, 1, h, w]`` where the latent may change, ``latent`` the start latent, ``noise``
    the run's initial noise."""

    mask: torch.Tensor
    latent: torch.Tensor
    noise: torch.Tensor

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x`` with its kept part at the start latent noised to ``sigma``."""
        return x * self.mask + (self.latent + self.noise * sigma) * (1 - self.mask)

    def denoised(self, denoised: torch.Tensor) -> torch.Tensor:
        """The estimate with its kept part at the start latent."""
        return denoised * self.mask + self.latent * (1 - self.mask)
