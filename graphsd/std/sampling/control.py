"""ControlNets during sampling, run as ComfyUI runs them (``comfy/controlnet.py``, ``comfy/samplers.py``).

A conditioning carries the ControlNet applied to it (:class:`~graphsd.std.models.controlnet.Control`,
recorded by ControlNetApply / ControlNetApplyAdvanced), and conditionings are evaluated in one
U-Net call only when they share it (:mod:`~graphsd.std.sampling.guidance`). For such a call:

- each ControlNet of the chain (those applied on top of one another) whose window holds the step
  runs on the U-Net's own input: the (cropped) latent as the sampler scaled it, before an
  inpainting U-Net's extra channels; the same timestep, text context and SDXL added conditioning;
  its hint resized to the crop's size × the net's hint downscale (8 for every SD ControlNet), by
  ComfyUI's ``common_upscale(hint, w, h, "nearest-exact", "center")``: cropped to that aspect
  ratio about the centre, then resized nearest-exact; a hint batch smaller than the latent's is
  repeated, per conditioning, as ComfyUI's ``broadcast_image_to`` does;
- its residuals times ``strength`` are added to the U-Net's skip connections and middle block
  (a chain's residuals summed);
- the window: a ControlNet acts while the step's noise level lies between the levels at
  ``start_percent`` and ``end_percent`` of the schedule, ComfyUI's ``percent_to_sigma``: the
  sigma of timestep ``(1 - percent) (T - 1)`` of the model's ``T``-step table (log-linear between
  entries); percent 0 sets no upper bound, 1 no lower one. The diffusers-convention loop compares
  timesteps instead of sigmas, which is the same rule, since sigma grows with the timestep;
- when no ControlNet of the chain acts, the call is the plain U-Net call.

Which conditionings carry a ControlNet follows ComfyUI's ``process_conds``: a copy of a
conditioning made for the other side's area keeps the ControlNet of the conditioning it copies,
and ControlNetApply's (``to_uncond``) are also given to the negative side when that has none
(:func:`~graphsd.std.models.controlnet.share_with_uncond`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F

from graphsd.context import Context
from graphsd.std.models.controlnet import Control
from graphsd.std.nodes.comfy_core import center_crop
from graphsd.std.sampling.guidance import DenoiseError, Guidance, UNetBatch
from graphsd.types import weight_dtype

#: Percent of the schedule → the loop's position on it (a sigma, or a timestep).
Position = Callable[[float], float]
#: What a ControlNet must share with the U-Net it steers (diffusers config names).
SHARED = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")


def sigma_position(sigma_at: Callable[[float], float], table_size: int) -> Position:
    """Percent → sigma, for a loop that steps through sigmas: ``sigma_at`` is the model's
    timestep → sigma map (log-linear between its ``table_size`` entries)."""
    return lambda percent: sigma_at((1 - percent) * (table_size - 1))


def timestep_position(train_timesteps: int) -> Position:
    """Percent → timestep, for a loop that steps through timesteps."""
    return lambda percent: (1 - percent) * (train_timesteps - 1)


def window(control: Control, position: Position) -> tuple[float, float]:
    """(lowest, highest) position at which ``control`` acts (see the module docstring)."""

    def bound(percent: float) -> float:
        return math.inf if percent <= 0 else -math.inf if percent >= 1 else position(percent)

    return bound(control.end_percent), bound(control.start_percent)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_fits(net: Any, unet: Any) -> None:
    """Refuse a ControlNet whose encoder is not shaped like the U-Net's."""
    for name in SHARED:
        ours, theirs = _as_list(net.config.get(name)), _as_list(unet.config.get(name))
        if ours != theirs:
            raise DenoiseError(
                f"the ControlNet does not fit this U-Net: its {name} is {ours}, the U-Net's {theirs}; "
                "load a ControlNet made for this model's family (SD1.x, SD2.x or SDXL)",
                "positive",
            )


def hint_for(control: Control, height: int, width: int, batch: int, passes: int, downscale: int) -> torch.Tensor:
    """``control``'s hint for ``passes`` conditionings of ``batch`` latents of ``height × width``
    cells (see the module docstring)."""
    hint = center_crop(control.hint, width * downscale, height * downscale)
    hint = F.interpolate(hint, size=(height * downscale, width * downscale), mode="nearest-exact")
    if hint.shape[0] > 1:
        hint = hint[:batch]
        hint = hint.repeat(math.ceil(batch / hint.shape[0]), 1, 1, 1)[:batch]
    return hint.expand(batch, *hint.shape[1:]).repeat(passes, 1, 1, 1)


class ControlRun:
    """The ControlNets of one denoise run: placed on the device for the whole run (a context
    manager), and asked for residuals at each U-Net call. ``unet`` is the U-Net in use, ``position``
    maps a percent of the schedule to the loop's positions (:func:`sigma_position`,
    :func:`timestep_position`)."""

    def __init__(self, ctx: Context, plan: Guidance, unet: Any, position: Position):
        self.ctx, self.unet, self.position = ctx, unet, position
        self.controls = {id(c): c for b in plan.batches if b.control is not None for c in b.control.chain()}
        self.nets: dict[str, Any] = {}
        self.windows = {key: window(c, position) for key, c in self.controls.items()}
        self.hints: dict[tuple[int, ...], torch.Tensor] = {}
        self._stack = ExitStack()

    def __enter__(self) -> ControlRun:
        for control in self.controls.values():
            key = control.net.keys["controlnet"]
            if key not in self.nets:
                net = self._stack.enter_context(self.ctx.models.use(control.net, "controlnet"))
                check_fits(net, self.unet)
                self.nets[key] = net
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _hint(self, control: Control, net: Any, dtype: torch.dtype, x: torch.Tensor, passes: int) -> torch.Tensor:
        key = (id(control), *x.shape, passes)
        if key not in self.hints:
            downscale = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
            hint = hint_for(control, x.shape[2], x.shape[3], x.shape[0] // passes, passes, downscale)
            self.hints[key] = hint.to(x.device, dtype)
        return self.hints[key]

    def residuals(self, batch: UNetBatch, x: torch.Tensor, t: torch.Tensor, position: float) -> dict[str, Any]:
        """The U-Net's extra keyword arguments for ``batch`` on the latents ``x`` (as the U-Net
        takes them, before inpainting channels) at timestep ``t``, at ``position`` on the
        schedule: the summed residuals of the ControlNets that act there, or nothing."""
        if batch.control is None:
            return {}
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        unet_dtype = weight_dtype(self.unet)
        for control in batch.control.chain():
            low, high = self.windows[id(control)]
            if not low <= position <= high:
                continue
            net = self.nets[control.net.keys["controlnet"]]
            dtype = weight_dtype(net)  # not ``net.dtype``: diffusers' walks every submodule
            if x.shape[1] != net.config.in_channels:
                raise DenoiseError(f"the ControlNet takes {net.config.in_channels}-channel latents, these have {x.shape[1]}", "positive")
            added = None if batch.added is None else {k: v.to(dtype) for k, v in batch.added.items()}
            out_down, out_mid = net(
                x.to(dtype),
                t,
                encoder_hidden_states=batch.context.to(dtype),
                controlnet_cond=self._hint(control, net, dtype, x, len(batch.passes)),
                conditioning_scale=control.strength,
                added_cond_kwargs=added,
                return_dict=False,
            )
            here = [r.to(unet_dtype) for r in out_down]
            down = here if down is None else [a + b for a, b in zip(here, down, strict=True)]
            mid = out_mid.to(unet_dtype) if mid is None else out_mid.to(unet_dtype) + mid
        if down is None:
            return {}
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
