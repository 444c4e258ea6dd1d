"""CheckpointSave: write a model (with its patches merged) as one single-file checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.std.models.formats import PICKLE_SUFFIXES
from graphsd.std.models.single_file import (
    component_roles,
    component_tensors,
    module_config,
    pad_tokens,
    write_single_file,
)
from graphsd.node import Node, NodeIO
from graphsd.paths import safe_output_path
from graphsd.types import Clip, UNet, Vae

SUFFIX = ".safetensors"


class CheckpointSave(Node):
    type = "CheckpointSave"
    category = "models"
    description = (
        "Write the U-Net, text encoder(s) and VAE as one .safetensors checkpoint in the original "
        "single-file layout (SD1, SD2, SDXL; loadable by CheckpointLoader, diffusers' from_single_file "
        "and other UIs). Weight patches on the handles (LoRA) are merged into what is written; "
        "patches that add layers instead of changing weights (hypernetworks) cannot be stored in a "
        "checkpoint and are refused. A tokenizer other than CLIP's (graphsd-tiny's) is stored in the "
        "file's metadata. The file is written atomically and never replaces an existing file unless "
        "overwrite is set."
    )
    output_node = True

    class Inputs(NodeIO):
        unet: UNet = Field(description="U-Net to save (with its patches)")
        clip: Clip = Field(description="Text encoder(s) to save (with their patches)")
        vae: Vae = Field(description="VAE to save")
        filename: str = Field(
            "checkpoints/graphsd.safetensors",
            min_length=1,
            description="File name inside the output directory (may name a sub-folder); .safetensors is appended if missing",
        )
        overwrite: bool = Field(
            False, description="Replace a file of this name; without it a taken name is saved as <name>_2.safetensors, ..."
        )

    class Outputs(NodeIO):
        path: str = Field(description="Path of the written checkpoint")

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        name = inputs.filename
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            raise NodeError(f"'{name}': checkpoints are written as {SUFFIX} only", field="filename")
        if not name.lower().endswith(SUFFIX):
            name += SUFFIX
        path = safe_output_path(ctx.output_dir, name, field="filename")
        family = _family(inputs)
        handles = {"unet": inputs.unet, "vae": inputs.vae, "text_encoder": inputs.clip, "text_encoder_2": inputs.clip}
        roles = component_roles(family)
        tensors: dict[str, Any] = {}
        configs: dict[str, Any] = {"family": family}
        for i, role in enumerate(roles):
            ctx.progress(i, len(roles), component=role)
            with ctx.models.use(handles[role], role) as module:
                _refuse_hooks(role, module)
                tensors.update(component_tensors(family, role, module))
                configs[role] = module_config(module)
        scheduler_config = inputs.unet.info.get("scheduler_config")
        if scheduler_config:
            configs["scheduler"] = dict(scheduler_config)
        if pads := pad_tokens(inputs.clip.info):
            configs["pad_tokens"] = pads
        path = write_single_file(path, tensors, configs, inputs.clip.info, overwrite=inputs.overwrite)
        ctx.wrote_file(path)
        return self.Outputs(path=str(path))


def _refuse_hooks(role: str, module: Any) -> None:
    """A patch that adds computation through forward hooks (a hypernetwork) has no place in a
    checkpoint; saving without it would silently write a different model."""
    if any(m._forward_pre_hooks or m._forward_hooks for m in module.modules()):
        raise NodeError(
            f"the {role} carries a patch that adds layers at run time (e.g. a hypernetwork); a checkpoint "
            "can only hold weights: save the model before applying it, and keep the patch as its own file",
            field="unet" if role == "unet" else "clip",
        )


def _family(inputs: Any) -> str:
    """The family of the handles (they must agree); SDXL needs both text encoders."""
    families = {inputs.unet.family, inputs.clip.family, inputs.vae.family}
    if len(families) > 1:
        raise NodeError(
            f"the U-Net, CLIP and VAE come from different model families ({', '.join(sorted(families))}); "
            "a checkpoint holds one family",
            field="clip",
        )
    family = inputs.unet.family
    encoders = {"text_encoder", "text_encoder_2"} & set(inputs.clip.keys)
    expected = {"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"}
    if family in ("sd1", "sd2", "sdxl") and encoders != expected:
        raise NodeError(f"a {family} checkpoint needs the text encoder(s) {', '.join(sorted(expected))}; this CLIP has {', '.join(sorted(encoders)) or 'none'}", field="clip")
    return family


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [CheckpointSave]
