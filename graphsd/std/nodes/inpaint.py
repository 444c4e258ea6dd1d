"""Inpainting nodes with ComfyUI's names, inputs and semantics: SetLatentNoiseMask,
VAEEncodeForInpaint, InpaintModelConditioning, and the mask nodes ImageToMask and InvertMask.

A latent's ``noise_mask`` (1 = repaint, 0 = keep) makes UNetDenoiseLoop inpaint: only the masked
part is denoised, the rest stays the start latent (:mod:`graphsd.std.sampling.inpaint` says how
each convention does it). An inpainting checkpoint (a U-Net with 9 input channels) also sees the
mask and the masked picture at every step; InpaintModelConditioning hands them over in the
conditioning, VAEEncodeForInpaint in the latent itself.

Masks are ``[B, H, W]`` in [0, 1] (LoadImage's mask: 1 where the picture is transparent, as a
ComfyUI user paints it). VAEEncodeForInpaint and InpaintModelConditioning resize the mask to the
picture bilinearly and crop both to multiples of 8 around the centre, as ComfyUI does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.std.models.family import model_info
from graphsd.std.nodes.sd import encode_pixels
from graphsd.types import Conditioning, Image, Latent, Mask, Vae

GREY = 0.5
"""The pixel value the masked part of the picture is set to before encoding (ComfyUI's, and
diffusers' inpainting pipeline's 0 in [-1, 1])."""


def as_mask4(mask: torch.Tensor) -> torch.Tensor:
    """A mask ``[B, H, W]`` as ``[B, 1, H, W]`` (ComfyUI's ``reshape((-1, 1, H, W))``)."""
    return mask.reshape(-1, 1, *mask.shape[-2:])


def fit_mask(pixels: torch.Tensor, mask: torch.Tensor, down: int, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels`` ``[B, H, W, C]`` and ``mask`` resized to them (bilinear, ``[B, 1, H, W]``), both
    cropped around the centre to sides that are multiples of ``down``."""
    if mask.shape[0] not in (1, pixels.shape[0]):
        raise NodeError(
            f"the mask has batch {mask.shape[0]} but the picture has batch {pixels.shape[0]}; use one mask or one per picture", field=field
        )
    height, width = pixels.shape[1:3]
    if height < down or width < down:
        raise NodeError(f"the picture is {width}x{height}; it needs at least {down} pixels on each side", field="pixels")
    m = as_mask4(mask).to(pixels.dtype)
    if tuple(m.shape[-2:]) != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear")
    h, w = height // down * down, width // down * down
    top, left = (height % down) // 2, (width % down) // 2
    return pixels[:, top : top + h, left : left + w, :], m[:, :, top : top + h, left : left + w]


def grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The picture (RGB) with the pixels where the rounded mask is 1 set to grey, the others as
    they are."""
    rgb = pixels[..., :3] if pixels.shape[-1] != 1 else pixels.expand(-1, -1, -1, 3)
    return torch.where(mask.round().squeeze(1).unsqueeze(-1) == 1, torch.tensor(GREY, dtype=rgb.dtype), rgb)


class SetLatentNoiseMask(Node):
    type = "SetLatentNoiseMask"
    category = "latent/inpaint"
    description = (
        "Give a latent a noise mask (ComfyUI's Set Latent Noise Mask): UNetDenoiseLoop (and KSampler) then denoise only "
        "where the mask is 1 and keep the latent elsewhere. Unlike VAEEncodeForInpaint the picture under the mask is kept, so "
        "denoise below 1 changes it gradually."
    )

    class Inputs(NodeIO):
        samples: Latent = Field(description="The latent to inpaint (e.g. VAEEncode of the picture)")
        mask: Mask = Field(description="Where to repaint (1) and where to keep (0); any size, resized to the latent when sampling")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The same latent with the mask as its noise_mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(latent=replace(inputs.samples, noise_mask=as_mask4(inputs.mask.values)))


class VAEEncodeForInpaint(Node):
    type = "VAEEncodeForInpaint"
    category = "latent/inpaint"
    description = (
        "Encode a picture for inpainting (ComfyUI's VAE Encode (for Inpainting)): the masked pixels are set to grey before "
        "encoding and the mask, grown by grow_mask_by pixels and rounded, becomes the latent's noise mask. Use denoise 1: the "
        "masked part is repainted from scratch. With an inpainting checkpoint this latent is also the masked picture the U-Net sees."
    )

    class Inputs(NodeIO):
        pixels: Image = Field(description="The picture to inpaint")
        vae: Vae = Field(description="The VAE (from CheckpointLoader)")
        mask: Mask = Field(description="Where to repaint (1) and where to keep (0); resized to the picture")
        grow_mask_by: int = Field(6, ge=0, le=64, description="Grow the noise mask by this many pixels, so the repainted part blends in")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The grey-masked picture's latent, with the grown mask as noise_mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        down = model_info(inputs.vae, "vae").latent_downscale
        pixels, mask = fit_mask(inputs.pixels.pixels, inputs.mask.values, down, "mask")
        grown = mask
        if inputs.grow_mask_by:
            size = inputs.grow_mask_by
            kernel = torch.ones((1, 1, size, size), dtype=mask.dtype)
            grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((size - 1) / 2)), 0, 1)
            grown = grown[:, :, : mask.shape[2], : mask.shape[3]]
        samples = encode_pixels(ctx, inputs.vae, grey_out(pixels, mask), "pixels")
        return self.Outputs(latent=Latent(samples=samples, noise_mask=grown.round()))


class InpaintModelConditioning(Node):
    type = "InpaintModelConditioning"
    category = "conditioning/inpaint"
    description = (
        "Prepare inpainting with an inpainting checkpoint (ComfyUI's InpaintModelConditioning): the conditionings carry the "
        "mask and the latent of the grey-masked picture, which a 9-channel U-Net takes beside the latent at every step; the "
        "latent is the whole picture's, with the mask as noise mask when noise_mask is on (then any checkpoint inpaints)."
    )

    class Inputs(NodeIO):
        positive: Conditioning = Field(description="The positive conditioning")
        negative: Conditioning = Field(description="The negative conditioning")
        vae: Vae = Field(description="The VAE (from CheckpointLoader)")
        pixels: Image = Field(description="The picture to inpaint")
        mask: Mask = Field(description="Where to repaint (1) and where to keep (0); resized to the picture")
        noise_mask: bool = Field(True, description="Give the latent the mask as noise mask, so that sampling changes only the masked part")

    class Outputs(NodeIO):
        positive: Conditioning = Field(description="The positive conditioning with the mask and the masked picture")
        negative: Conditioning = Field(description="The negative conditioning with the mask and the masked picture")
        latent: Latent = Field(description="The picture's latent (with the mask as noise mask when noise_mask is on)")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        down = model_info(inputs.vae, "vae").latent_downscale
        pixels, mask = fit_mask(inputs.pixels.pixels, inputs.mask.values, down, "mask")
        masked = encode_pixels(ctx, inputs.vae, grey_out(pixels, mask), "pixels")
        whole = encode_pixels(ctx, inputs.vae, pixels, "pixels")
        extras = {"concat_latent_image": masked, "concat_mask": mask}

        def with_picture(cond: Conditioning) -> Conditioning:
            return Conditioning.of_entries([replace(e, extras={**e.extras, **extras}) for e in cond.entries()])

        return self.Outputs(
            positive=with_picture(inputs.positive),
            negative=with_picture(inputs.negative),
            latent=Latent(samples=whole, noise_mask=mask if inputs.noise_mask else None),
        )


class ImageToMask(Node):
    type = "ImageToMask"
    category = "mask"
    description = "One channel of an image as a mask (ComfyUI's Convert Image to Mask)."

    class Inputs(NodeIO):
        image: Image = Field(description="The image")
        channel: Literal["red", "green", "blue", "alpha"] = Field("red", description="The channel that becomes the mask")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The channel's values, [batch, height, width]")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        pixels = inputs.image.pixels
        index = ("red", "green", "blue", "alpha").index(inputs.channel)
        if pixels.shape[-1] == 1 and index < 3:
            index = 0  # a grey image: every colour channel is the grey value
        if index >= pixels.shape[-1]:
            raise NodeError(
                f"the image has no {inputs.channel} channel (it has {pixels.shape[-1]}); pick red, green or blue", field="channel"
            )
        return self.Outputs(mask=Mask(pixels[..., index].clone()))


class InvertMask(Node):
    type = "InvertMask"
    category = "mask"
    description = "1 - mask: what was kept is repainted and the other way round (ComfyUI's InvertMask)."

    class Inputs(NodeIO):
        mask: Mask = Field(description="The mask to invert")

    class Outputs(NodeIO):
        mask: Mask = Field(description="The inverted mask")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(mask=Mask(1.0 - inputs.mask.values))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning, ImageToMask, InvertMask]
