"""CheckpointSave: write a model (with its patches merged) as one single-file checkpoint, through
:func:`graphsd.std.models.single_file.save_single_file`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.paths import safe_output_path
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, Family, model_info
from graphsd.std.models.formats import PICKLE_SUFFIXES
from graphsd.std.models.hypernetwork import ADDS_COMPUTATION
from graphsd.std.models.single_file import FAMILIES, component_roles, save_single_file
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
        roles = component_roles(family)

        @contextmanager
        def open_component(role: str, handle: Any) -> Iterator[Any]:
            ctx.progress(roles.index(role), len(roles), component=role)
            with ctx.models.use(handle, role) as module:
                _refuse_hooks(role, module)
                yield module

        tokenizers = model_info(inputs.clip, "clip").tokenizers
        components = {
            "family": family,
            "unet": inputs.unet,
            "vae": inputs.vae,
            "text_encoder": inputs.clip,
            "text_encoder_2": inputs.clip,
            "scheduler_config": model_info(inputs.unet, "unet").scheduler_config,
            **{TOKENIZER_OF_ENCODER[role]: tokenizer for role, tokenizer in tokenizers.items()},
        }
        path = save_single_file(components, path, overwrite=inputs.overwrite, open_component=open_component)
        ctx.wrote_file(path)
        return self.Outputs(path=str(path))


def _refuse_hooks(role: str, module: Any) -> None:
    """A patch that adds computation through forward hooks (a hypernetwork) has no place in a
    checkpoint; saving without it would silently write a different model."""
    hooks = (h for m in module.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))
    if any(getattr(h, ADDS_COMPUTATION, False) for h in hooks):
        raise NodeError(
            f"the {role} carries a patch that adds layers at run time (e.g. a hypernetwork); a checkpoint "
            "can only hold weights: save the model before applying it, and keep the patch as its own file",
            field="unet" if role == "unet" else "clip",
        )


def _family(inputs: Any) -> Family:
    """The family of the handles (they must agree); SDXL needs both text encoders."""
    family = model_info(inputs.unet, "unet").family
    families = {family, model_info(inputs.clip, "clip").family, model_info(inputs.vae, "vae").family}
    if len(families) > 1:
        raise NodeError(
            f"the U-Net, CLIP and VAE come from different model families ({', '.join(sorted(families))}); "
            "a checkpoint holds one family",
            field="clip",
        )
    encoders = {"text_encoder", "text_encoder_2"} & set(inputs.clip.keys)
    expected = {"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"}
    if family in FAMILIES and encoders != expected:
        raise NodeError(
            f"a {family} checkpoint needs the text encoder(s) {', '.join(sorted(expected))}; "
            f"this CLIP has {', '.join(sorted(encoders)) or 'none'}",
            field="clip",
        )
    return family


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [CheckpointSave]
