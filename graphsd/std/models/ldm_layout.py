"""Module names of the original LDM U-Net and the diffusers ``UNet2DConditionModel`` names
they stand for: one table, read in both directions.

The LDM / SGM ``UNetModel`` (CompVis ``ldm``, Stability ``sgm``) keeps its layers in three
lists: ``input_blocks`` (``conv_in``, then per down block its resnet (+ attention) layers and a
downsampler unless it is the last block), ``middle_block`` (resnet, attention, resnet) and
``output_blocks`` (per up block ``layers + 1`` resnet (+ attention) layers, the last of which also
holds the upsampler unless it is the final block). Single-file checkpoints
(:mod:`graphsd.std.models.single_file`) are written and read through :func:`unet_module_map`;
LoRA files whose keys use these names (kohya's SDXL trainer: ``lora_unet_input_blocks_4_1_...``)
are matched through the same table read backwards, :func:`ldm_flat_names`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: diffusers ``ResnetBlock2D`` sub-module → LDM ``ResBlock`` sub-module.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
#: Layers outside the three block lists.
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value: int | list[int] | tuple[int, ...], n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_module_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path → LDM module path for a ``UNet2DConditionModel`` config
    (``layers_per_block`` may differ per block). With ``L`` layers per block, down block ``b``
    owns ``input_blocks[1 + b(L+1) + j]`` (resnet ``.0``, attention ``.1``) and its downsampler
    ``input_blocks[(b+1)(L+1)].0.op``; up block ``b`` owns ``output_blocks[b(L+1) + j]`` for
    ``j <= L``, its upsampler sitting after the attention (``.2``) or the resnet (``.1``) of the
    last one."""
    down, up = config["down_block_types"], config["up_block_types"]
    layers = _per_block(config["layers_per_block"], len(down))
    table = dict(_TOP)

    def resnet(diffusers: str, ldm: str) -> None:
        table[diffusers] = ldm
        table.update({f"{diffusers}.{a}": f"{ldm}.{b}" for a, b in _RESNET.items()})

    index = 1
    for b, kind in enumerate(down):
        for j in range(layers[b]):
            resnet(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0")
            if "CrossAttn" in kind:
                table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if b < len(down) - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for b, kind in enumerate(up):
        attention = "CrossAttn" in kind
        count = layers[len(up) - 1 - b] + 1
        for j in range(count):
            resnet(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0")
            if attention:
                table[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
            if b < len(up) - 1 and j == count - 1:
                table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    return table


def ldm_flat_names(config: Mapping[str, Any]) -> dict[str, str]:
    """:func:`unet_module_map` read backwards and flattened the kohya way (``.`` → ``_``):
    ``input_blocks_4_1`` → ``down_blocks_1_attentions_0``."""
    return {ldm.replace(".", "_"): diffusers.replace(".", "_") for diffusers, ldm in unet_module_map(config).items()}


def rename_flat(flat: str, table: Mapping[str, str]) -> str | None:
    """``flat`` (a flattened LDM module name) with its longest leading part found in ``table``
    (:func:`ldm_flat_names`) replaced by the diffusers name; None when no part is found."""
    parts = flat.split("_")
    for cut in range(len(parts), 0, -1):
        head = "_".join(parts[:cut])
        if head in table:
            return "_".join([table[head], *parts[cut:]])
    return None
