"""ControlNets (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): the files ComfyUI's ControlNetLoader reads, loaded as diffusers ``ControlNetModel``\\ s,
and what applying one to a conditioning records (:class:`Control`).

A ControlNet is a trainable copy of the U-Net's encoder (its down blocks and middle block) that
also reads a hint image (edges, depth, pose, ...) through a small convolutional encoder, and whose
outputs pass through zero-initialised 1×1 convolutions into residuals that are added to the
U-Net's skip connections and middle block. Three layouts are read, for SD1.x, SD2.x and SDXL:

- **the original layout** (lllyasviel's ControlNet 1.0 / 1.1 ``.pth`` and ``.safetensors``, the
  SD2 and SDXL ones converted from it): the U-Net encoder's LDM names (``input_blocks``,
  ``middle_block``, ``time_embed``, ``label_emb``) plus ``input_hint_block`` (the hint encoder:
  convolutions at every even index), ``zero_convs.N.0`` (one per down-block output) and
  ``middle_block_out.0``, with or without the ``control_model.`` prefix;
- **diffusers' layout in one file** (a ``ControlNetModel``'s ``diffusion_pytorch_model.safetensors``
  on its own, which is how most SDXL ControlNets are shared);
- **a diffusers ``ControlNetModel`` folder** (``config.json`` and its weights).

A single file's config is its family's bundled U-Net config with every size the tensors reveal
(as for U-Net files, :mod:`graphsd.std.models.components`); what shapes cannot tell, the attention
heads, is the family's. The family follows from the tensors as for U-Nets: SDXL's added
conditioning (``label_emb``), SD2's 1024-wide text context, else SD1. ComfyUI's rule for shuffle
ControlNets is kept: a file whose name ends with ``_shuffle`` (or ``_shuffle_fp16``) averages its
residuals over the picture (diffusers' ``global_pool_conditions``).

**Difference ControlNets** (``diff_control_*``: the original layout with a ``difference`` tensor,
the weights stored as differences to the base model's U-Net) need that U-Net:
:func:`load_controlnet` adds its weights (with the patches recorded on its handle, as ComfyUI adds
the loaded model's) to the ControlNet's of the same names, which DiffControlNetLoader does.

Refused by name, since they are not ControlNets of this kind: Control-LoRAs (``lora_controlnet``),
T2I-Adapters, ControlNet++ "union" models, and the ControlNets of SD3, Flux and other transformer
models.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graphsd.std.models.components import SDXL_POOLED, SDXL_TIME_EMBED, _diffusers_unet_to_ldm, _within
from graphsd.std.models.family import Family
from graphsd.std.models.formats import ModelFileError, read_weights
from graphsd.std.models.ldm_layout import unet_module_map
from graphsd.std.models.single_file import _build_diffusers, _derive, _indices, _rename, derive_unet_config, describe_keys
from graphsd.types import Image, ModelRef

#: ComfyUI's marker of a difference ControlNet: a tensor of this name in the file.
DIFFERENCE_KEY = "difference"
#: A tensor every file of each layout has, after its prefix.
ORIGINAL_MARKER = "zero_convs.0.0.weight"
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
#: Names that mark files of other kinds: (key fragment, what the file is).
NOT_CONTROLNETS = (
    ("lora_controlnet", "a Control-LoRA"),
    ("task_embedding", "a ControlNet++ union model"),
    ("control_add_embedding", "a ControlNet++ union model"),
    ("controlnet_x_embedder", "a ControlNet of a transformer model (SD3, Flux, ...)"),
    ("controlnet_blocks.", "a ControlNet of a transformer model (SD3, Flux, ...)"),
    ("adapter.body.", "a T2I-Adapter"),
    ("body.0.block1.weight", "a T2I-Adapter"),
    ("body.0.in_conv.weight", "a T2I-Adapter"),
)


class ControlNet(ModelRef):
    """A loaded ControlNet (ControlNetLoader): the ModelManager holds the ``ControlNetModel``
    under ``keys["controlnet"]``. ComfyUI's ``CONTROL_NET``."""


@dataclass(eq=False)
class Control:
    """A ControlNet applied to a conditioning (ComfyUI's ``control``, what ControlNetApply records):
    the net, its hint ``[B, C, H, W]`` (float in [0, 1], channels first, on the CPU, resized when
    sampling to the latent's size × the net's hint downscale), the ``strength`` its residuals are
    multiplied by, the part of the schedule it acts in (``start_percent`` / ``end_percent`` of
    the noise levels, ComfyUI's ``timestep_percent_range``), whether it is also given to a negative
    conditioning that has none (ComfyUI's ``control_apply_to_uncond``) and the ControlNet it was
    applied on top of (``previous``: their residuals add up). One object per application: the
    denoise loops evaluate conditionings together only when they share it."""

    net: ControlNet
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    to_uncond: bool = False
    previous: Control | None = None

    def chain(self) -> list[Control]:
        """This control and the ones it was applied on top of, the first applied first."""
        chain: list[Control] = []
        control: Control | None = self
        while control is not None:
            chain.insert(0, control)
            control = control.previous
        return chain

    def nbytes(self) -> int:
        return sum(c.hint.numel() * c.hint.element_size() for c in self.chain())


def hint_of(image: Image) -> torch.Tensor:
    """An image ``[B, H, W, C]`` as a ControlNet hint ``[B, 3, H, W]``: the colour channels of an
    RGBA image, a grey image repeated three times (ComfyUI passes the image's channels as they are;
    its images are RGB)."""
    pixels = image.pixels.float()
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    return pixels[..., :3].movedim(-1, 1).contiguous()


def share_with_uncond(positive: list[Any], negative: list[Any]) -> None:
    """In place: ComfyUI's ``apply_empty_x_to_equal_area`` for ControlNets. ``positive`` and
    ``negative`` are a side's conditionings (objects with ``area`` and ``control``). Unless a
    negative conditioning without an area has a ControlNet, each ControlNet with ``to_uncond`` on
    a positive conditioning without an area goes to the negative conditionings without an area
    and ControlNet, in turn (the k-th to the (k mod n)-th of them, a later one replacing an
    earlier one)."""
    given = [e.control for e in positive if e.area is None and e.control is not None and e.control.to_uncond]
    if not given or any(e.area is None and e.control is not None for e in negative):
        return
    free = [i for i, e in enumerate(negative) if e.area is None]
    originals = list(negative)
    for k, control in enumerate(given if free else []):
        i = free[k % len(free)]
        negative[i] = replace(originals[i], control=control)


# ---- reading files -----------------------------------------------------------------------------
def _foreign(tensors: dict[str, Any]) -> str | None:
    for fragment, what in NOT_CONTROLNETS:
        if any(fragment in k for k in tensors):
            return what
    return None


def _hint_convs(tensors: dict[str, torch.Tensor]) -> list[int]:
    return _indices(tensors, r"input_hint_block\.(\d+)\.weight")


def _extra_names(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """diffusers module → original module for the parts a ControlNet adds to the U-Net's encoder:
    the hint encoder (``conv_in``, ``blocks``, ``conv_out``: the convolutions of
    ``input_hint_block`` in order), the zero convolutions and the middle block's output."""
    convs = _hint_convs(tensors)
    table = {"controlnet_mid_block": "middle_block_out.0"}
    if convs:
        table["controlnet_cond_embedding.conv_in"] = f"input_hint_block.{convs[0]}"
        table["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{convs[-1]}"
        table.update({f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{i}" for j, i in enumerate(convs[1:-1])})
    for i in _indices(tensors, r"zero_convs\.(\d+)\.0\.weight"):
        table[f"controlnet_down_blocks.{i}"] = f"zero_convs.{i}.0"
    return table


def _diffusers_to_original(tensors: dict[str, torch.Tensor], path: Path, field: str) -> dict[str, torch.Tensor]:
    """A diffusers-layout ControlNet's tensors under their original names."""
    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    encoder = _diffusers_unet_to_ldm({k: v for k, v in tensors.items() if not k.startswith(own)}, path, field)
    convs = sorted(_indices(tensors, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"))
    hint = {"conv_in": "0", "conv_out": str(2 * (len(convs) + 1))} | {f"blocks.{j}": str(2 * (j + 1)) for j in convs}
    for key, value in tensors.items():
        if key.startswith("controlnet_mid_block."):
            encoder["middle_block_out.0." + key.rsplit(".", 1)[1]] = value
        elif match := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            encoder[f"zero_convs.{match[1]}.0.{match[2]}"] = value
        elif match := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+)\.(weight|bias)", key):
            encoder[f"input_hint_block.{hint[match[1]]}.{match[2]}"] = value
    return encoder


def _family(tensors: dict[str, torch.Tensor], path: Path, field: str) -> tuple[Family, int | None]:
    """The family of a ControlNet in the original layout, and SDXL's pooled-embedding width."""
    to_k = next((v for k, v in tensors.items() if k.endswith("attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" not in tensors:
        return ("sd2" if to_k is not None and to_k.shape[1] == 1024 else "sd1"), None
    pooled = tensors["label_emb.0.0.weight"].shape[1] - 6 * SDXL_TIME_EMBED
    if pooled != SDXL_POOLED:
        raise ModelFileError(
            f"'{path.name}' is an SDXL-style ControlNet whose added conditioning is not SDXL base's (6 numbers "
            f"{SDXL_TIME_EMBED} wide beside a {SDXL_POOLED}-wide pooled text embedding); use its diffusers folder",
            field=field,
        )
    return "sdxl", pooled


def controlnet_config(tensors: dict[str, torch.Tensor], family: Family, pooled: int | None, pool: bool) -> dict[str, Any]:
    """The ``ControlNetModel`` config of a ControlNet in the original layout: its encoder's sizes
    read as a U-Net's (:func:`~graphsd.std.models.single_file.derive_unet_config`, given the input
    width as the output width it would read from the decoder a ControlNet lacks), the hint
    encoder's channels from its convolutions (the input convolution's, then every second block's,
    where it halves the size)."""
    from diffusers import ControlNetModel

    width = tensors["input_blocks.0.0.weight"].shape[1]
    unet = _derive(derive_unet_config, "", family, {**tensors, "out.2.weight": torch.empty(width, device="meta")}, pooled)
    if family == "sdxl":
        unet["addition_time_embed_dim"] = SDXL_TIME_EMBED
    params = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.items() if k in params}
    convs = _hint_convs(tensors)
    if len(convs) < 2 or len(convs) % 2:
        raise ModelFileError(f"unrecognised hint encoder: {len(convs)} convolutions in input_hint_block", field="path")
    out = [tensors[f"input_hint_block.{i}.weight"].shape[0] for i in convs]
    config.update(
        conditioning_channels=tensors[f"input_hint_block.{convs[0]}.weight"].shape[1],
        conditioning_embedding_out_channels=[out[0]] + out[2:-1:2],
        global_pool_conditions=pool,
    )
    return config


def _pools(path: Path) -> bool:
    """ComfyUI's rule for shuffle ControlNets (see the module docstring)."""
    return path.stem.endswith(("_shuffle", "_shuffle_fp16"))


def load_controlnet(path: Path, dtype: torch.dtype, allow_pickle: bool, field: str, base: dict[str, torch.Tensor] | None = None) -> Any:
    """A ``ControlNetModel`` from a single file in the original or the diffusers layout. ``base``
    is the state dict of the U-Net a difference ControlNet's weights are added to (diffusers
    names); a difference ControlNet without one is refused."""
    from diffusers import ControlNetModel

    tensors = read_weights(path, allow_pickle, field=field)[0]
    what = _foreign(tensors)
    if what is not None:
        raise ModelFileError(f"'{path.name}' is {what}, not a ControlNet; graphsd runs ControlNets of SD1.x, SD2.x and SDXL", field=field)
    original = _within(tensors, ORIGINAL_MARKER)
    difference = original is not None and DIFFERENCE_KEY in tensors
    if original is None:
        diffusers = _within(tensors, DIFFUSERS_MARKER)
        if diffusers is None:
            raise ModelFileError(f"'{path.name}' is not a ControlNet: it holds {describe_keys(tensors)}", field=field)
        original = _diffusers_to_original(diffusers, path, field)
    if difference and base is None:
        raise ModelFileError(
            f"'{path.name}' is a difference ControlNet (its weights are differences to a base model's U-Net): "
            "load it with DiffControlNetLoader and connect the model it was made for",
            field=field,
        )
    try:
        family, pooled = _family(original, path, field)
        config = controlnet_config(original, family, pooled, _pools(path))
        table = unet_module_map({**config, "up_block_types": []}) | _extra_names(original)
        module = _build_diffusers(ControlNetModel, config, lambda key: (_rename(key, table), ""), original, dtype, "ControlNet")
    except (ModelFileError, KeyError) as exc:
        raise ModelFileError(f"'{path.name}': {exc}", field=field) from None
    if difference and base is not None:
        add_base(module, base)
    return module


def add_base(module: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
    """In place: add the base U-Net's weights to a difference ControlNet's of the same names and
    shapes (the encoder it copies: ``conv_in``, the time embeddings, the down and middle blocks)."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            weight = base.get(name)
            if weight is not None and weight.shape == tensor.shape:
                tensor.add_(weight.to(tensor.device, tensor.dtype))


def is_difference(path: Path, allow_pickle: bool, field: str) -> bool:
    """Whether a ControlNet file is a difference ControlNet (the header alone for .safetensors)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return DIFFERENCE_KEY in set(f.keys())
        except Exception:  # missing, empty or damaged: read_weights says which, naming the file
            read_weights(path, allow_pickle=False, field=field)
            raise
    return path.is_file() and DIFFERENCE_KEY in read_weights(path, allow_pickle, field=field)[0]
