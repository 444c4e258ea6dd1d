"""ComfyUI's latent batch and composition nodes, and its ``.latent`` files, as graphsd nodes of the
same names, inputs and outputs: RepeatLatentBatch, LatentFromBatch, LatentComposite, LatentBlend,
SaveLatent and LoadLatent.

**The .latent format** (ComfyUI's SaveLatent / LoadLatent): a safetensors file holding the latents
``[batch, channels, height, width]`` as ``latent_tensor`` and an empty tensor named
``latent_format_version_0``. ComfyUI keeps latents as the VAE makes them (unscaled), while graphsd's
:class:`~graphsd.types.Latent` is in the model's scaled space, ``(z - shift_factor) ×
scaling_factor``; so SaveLatent writes ``latent / scaling_factor + shift_factor`` and LoadLatent
reads ``(latent_tensor - shift_factor) × scaling_factor``, with the factors of the VAE linked to
their optional ``vae`` input, or SD1/SD2's (0.18215, no shift) without one. Files written before
the version marker existed hold latents already scaled by 0.18215; LoadLatent unscales them as
ComfyUI does (× 1 / 0.18215) first. graphsd writes float32 latents and reads them as float32.

Latent batches carry no per-item noise index in graphsd (LatentNoise seeds item i with seed + i):
a latent taken from a batch is noised as the first item of a new batch, not as the item it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from pydantic import Field

from graphsd.context import Context, Settings
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO, Upstream
from graphsd.paths import file_fingerprint, safe_output_path, write_numbered
from graphsd.resources import require_memory
from graphsd.std.files import Issues, first_file, missing_file
from graphsd.std.models.family import SD_SCALING_FACTOR, model_info
from graphsd.std.nodes.comfy_core import MAX_LATENT_PIXELS as MAX_RESOLUTION
from graphsd.std.nodes.comfy_core import PREVIEW_FOLDER, center_crop
from graphsd.types import Latent, Vae
from graphsd.workflow import PNG_WORKFLOW_KEY

LATENT_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"
LATENT_SUFFIX = "_.latent"
"""What follows the number in a saved file's name: ComfyUI's ``<prefix>_00001_.latent``."""
ANNOTATIONS = {" [input]": "input", " [output]": "output", " [temp]": "temp"}
"""The ComfyUI frontend's annotations of a file name: the folder it lies in."""


def _scaling(vae: Vae | None) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the latent space: the linked VAE's, or SD1/SD2's."""
    if vae is None:
        return SD_SCALING_FACTOR, 0.0
    info = model_info(vae, "vae")
    return info.scaling_factor, info.shift_factor


def _batch_masks(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A noise mask for each of ``batch`` latents: a mask of one is shared, a shorter batch of
    masks is repeated until it covers the batch (as ComfyUI does)."""
    if mask is None or mask.shape[0] in (1, batch):
        return mask
    return mask.repeat(math.ceil(batch / mask.shape[0]), 1, 1, 1)[:batch]


def _check_pair(one: torch.Tensor, two: torch.Tensor, field: str, what: str) -> None:
    """Two latents that can be combined: the same channels and batch sizes that broadcast."""
    if one.shape[1] != two.shape[1]:
        raise NodeError(f"{what} has {two.shape[1]} channels but the other latent {one.shape[1]}; use latents of one model", field=field)
    if two.shape[0] not in (1, one.shape[0]):
        raise NodeError(
            f"{what} is a batch of {two.shape[0]} and the other latent a batch of {one.shape[0]}; give one latent or as many",
            field=field,
        )


class RepeatLatentBatch(Node):
    type = "RepeatLatentBatch"
    category = "latent/batch"
    description = "Repeat a batch of latents (ComfyUI's Repeat Latent Batch): the whole batch `amount` times, one after the other."

    class Inputs(NodeIO):
        samples: Latent = Field(description="Latents to repeat")
        amount: int = Field(1, ge=1, le=64, description="How many copies of the batch")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The batch repeated")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        latent = inputs.samples
        shape = (latent.samples.shape[0] * inputs.amount, *latent.samples.shape[1:])
        need = math.prod(shape) * latent.samples.element_size()
        require_memory(latent.samples.device, need, f"a batch of {shape[0]} latents", "lower amount", field="amount")
        mask = latent.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat(inputs.amount, 1, 1, 1)
        return self.Outputs(latent=Latent(samples=latent.samples.repeat(inputs.amount, 1, 1, 1), noise_mask=mask))


class LatentFromBatch(Node):
    type = "LatentFromBatch"
    category = "latent/batch"
    description = (
        "Take latents out of a batch (ComfyUI's Latent From Batch): `length` latents from batch_index on, both cut to what "
        "the batch holds. graphsd latents carry no batch index, so their noise is that of a new batch (see LatentNoise)."
    )

    class Inputs(NodeIO):
        samples: Latent = Field(description="A batch of latents")
        batch_index: int = Field(0, ge=0, le=63, description="Index of the first latent taken (past the end: the last one)")
        length: int = Field(1, ge=1, le=64, description="How many latents to take")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The latents taken")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        samples = inputs.samples.samples
        batch = samples.shape[0]
        start = min(batch - 1, inputs.batch_index)
        stop = start + min(batch - start, inputs.length)
        mask = _batch_masks(inputs.samples.noise_mask, batch)
        if mask is not None and mask.shape[0] > 1:
            mask = mask[start:stop].clone()
        return self.Outputs(latent=Latent(samples=samples[start:stop].clone(), noise_mask=mask))


class LatentComposite(Node):
    type = "LatentComposite"
    category = "latent"
    description = (
        "Paste one latent onto another (ComfyUI's Latent Composite): samples_from goes at pixel position (x, y) of "
        "samples_to (divided by 8 into latent cells) and is cut at its edges. With feather > 0 the pasted latent fades in "
        "over feather / 8 cells along each side that lies inside samples_to, linearly (k / (feather / 8) on the k-th cell)."
    )

    class Inputs(NodeIO):
        samples_to: Latent = Field(description="The latent pasted onto; its noise mask is kept")
        samples_from: Latent = Field(description="The latent pasted")
        x: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Left edge of the paste in pixels (multiple of 8)")
        y: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Top edge of the paste in pixels (multiple of 8)")
        feather: int = Field(0, ge=0, le=MAX_RESOLUTION, description="Width of the fade in pixels (multiple of 8); 0 = a hard edge")

    class Outputs(NodeIO):
        latent: Latent = Field(description="samples_to with samples_from pasted in")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        to, source = inputs.samples_to.samples, inputs.samples_from.samples
        _check_pair(to, source, "samples_from", "samples_from")
        x, y, feather = inputs.x // 8, inputs.y // 8, inputs.feather // 8
        height, width = to.shape[2], to.shape[3]
        if x >= width or y >= height:
            raise NodeError(
                f"({inputs.x}, {inputs.y}) lies outside samples_to, which is {width * 8}x{height * 8} pixels; the paste would be empty",
                field="x" if x >= width else "y",
            )
        piece = source[:, :, : height - y, : width - x].to(to.device, to.dtype)
        h, w = piece.shape[2], piece.shape[3]
        out = to.clone()
        if feather == 0:
            out[:, :, y : y + h, x : x + w] = piece
        else:
            rows = _fade(h, feather, y > 0, y + h < height).to(to.device, to.dtype)
            cols = _fade(w, feather, x > 0, x + w < width).to(to.device, to.dtype)
            weight = rows[:, None] * cols[None, :]
            out[:, :, y : y + h, x : x + w] = piece * weight + out[:, :, y : y + h, x : x + w] * (1 - weight)
        return self.Outputs(latent=Latent(samples=out, noise_mask=inputs.samples_to.noise_mask))


def _fade(length: int, feather: int, start: bool, end: bool) -> torch.Tensor:
    """Weights along one side of a pasted latent: the k-th cell (k = 1, 2, ...) from a faded edge
    gets k / feather, multiplied where the fades from both ends overlap."""
    weights = torch.ones(length, dtype=torch.float64)
    ramp = torch.arange(1, feather + 1, dtype=torch.float64)[:length] / feather
    if start:
        weights[: len(ramp)] *= ramp
    if end:
        weights[length - len(ramp) :] *= ramp.flip(0)
    return weights


class LatentBlend(Node):
    type = "LatentBlend"
    category = "latent"
    description = (
        "Mix two latents (ComfyUI's Latent Blend): samples1 × blend_factor + samples2 × (1 - blend_factor); samples2 is "
        "first resized to samples1's size (bicubic, centre crop) when the sizes differ."
    )

    class Inputs(NodeIO):
        samples1: Latent = Field(description="The first latent; its size and noise mask are kept")
        samples2: Latent = Field(description="The second latent")
        blend_factor: float = Field(0.5, ge=0.0, le=1.0, description="Weight of samples1 (1 = samples1 only)")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The mix")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        one, two = inputs.samples1.samples, inputs.samples2.samples
        _check_pair(one, two, "samples2", "samples2")
        two = two.to(one.device, one.dtype)
        if one.shape[2:] != two.shape[2:]:
            height, width = one.shape[2], one.shape[3]
            cropped = center_crop(two, width, height)
            work = cropped.float() if cropped.dtype in (torch.float16, torch.bfloat16) else cropped
            two = F.interpolate(work, size=(height, width), mode="bicubic").to(one.dtype)
        f = inputs.blend_factor
        return self.Outputs(latent=Latent(samples=one * f + two * (1 - f), noise_mask=inputs.samples1.noise_mask))


class SaveLatent(Node):
    type = "SaveLatent"
    category = "latent"
    description = (
        "Write latents as a ComfyUI .latent file into the output directory, named as ComfyUI names them "
        "(<prefix>_00001_.latent, ...: the number after the highest there), never overwriting (atomically), with the "
        "workflow in the file's metadata. The file holds unscaled latents, as ComfyUI keeps them: "
        "link the vae of the model that made them (without it, SD1/SD2's scaling 0.18215 is assumed)."
    )
    output_node = True

    class Inputs(NodeIO):
        samples: Latent = Field(description="Latents to save")
        filename_prefix: str = Field(
            "latents/ComfyUI", min_length=1, description="File name prefix; may name a sub-folder; must stay inside the output directory"
        )
        vae: Vae | None = Field(None, description="The model's VAE, whose latent scaling the file undoes (default: SD1/SD2's)")

    class Outputs(NodeIO):
        paths: list[str] = Field(description="Path of the written file")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        scale, shift = _scaling(inputs.vae)
        target = safe_output_path(ctx.output_dir, inputs.filename_prefix, field="filename_prefix")
        raw = (inputs.samples.samples.detach().cpu().to(torch.float64) / scale + shift).to(torch.float32).contiguous()
        tensors = {LATENT_KEY: raw, VERSION_KEY: torch.tensor([])}
        metadata = {PNG_WORKFLOW_KEY: json.dumps(ctx.workflow, sort_keys=True)}

        def write(tmp: Path) -> None:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

        try:
            path = write_numbered(target.parent, target.name, LATENT_SUFFIX, write)
        except OSError as exc:
            raise NodeError(f"cannot write into {target.parent}: {exc.strerror or exc}", field="filename_prefix") from None
        ctx.wrote_file(path)
        return self.Outputs(paths=[str(path)])


def latent_file_candidates(name: str, settings: Settings) -> list[Path]:
    """Where LoadLatent looks for ``name``, in order: a name with the frontend's annotation
    (``x.latent [output]``) in that folder (input: the input folder; output: the output
    directory; temp: its ``temp/``); otherwise in the input folder, then as a path (absolute, or
    relative to the working directory)."""
    folder = None
    for annotation, where in ANNOTATIONS.items():
        if name.endswith(annotation):
            name, folder = name[: -len(annotation)], where
    path = Path(name)
    if path.is_absolute():
        return [path]
    if folder == "output":
        return [Path(settings.output_dir) / path]
    if folder == "temp":
        return [Path(settings.output_dir) / PREVIEW_FOLDER / path]
    in_input = Path(settings.input_dir) / path
    return [in_input] if folder == "input" else [in_input, path]


#: What to do about a .latent file that is not there.
HINT = "put the file in the input folder (--input-dir) or give its path"


def _missing(name: str, settings: Settings) -> str:
    """Where ``name`` was looked for, and the .latent files of the input folder."""
    looked = ", ".join(str(p) for p in latent_file_candidates(name, settings))
    folder = Path(settings.input_dir)
    there = sorted(p.name for p in folder.iterdir() if p.name.endswith(".latent")) if folder.is_dir() else []
    return f"latent file '{name}' does not exist (looked for {looked}; the input folder has {', '.join(there[:20]) or 'none'})"


class LoadLatent(Node):
    type = "LoadLatent"
    category = "latent"
    description = (
        "Read latents from a ComfyUI .latent file (SaveLatent's, or ComfyUI's own, either format version). Link the vae of "
        "the model that will use them: the file holds unscaled latents, which are scaled by its factors (without it, SD1/SD2's)."
    )

    class Inputs(NodeIO):
        latent: str = Field(
            description="The .latent file: a name in the input folder, or a path (absolute, or relative to the working "
            "directory); the frontend's 'name [output]' and 'name [temp]' name files in the output directory and its temp/"
        )
        vae: Vae | None = Field(None, description="The model's VAE, whose latent scaling is applied (default: SD1/SD2's)")

    class Outputs(NodeIO):
        latent: Latent = Field(description="The latents, float32, in the model's scaled latent space")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The file's identity (size and mtime), so a replaced file is read again; for a name that
        comes through a link, that of every file in the input folder."""
        name = literals.get("latent")
        if not isinstance(name, str):
            return "input:" + file_fingerprint(ctx.settings.input_dir)
        found = first_file(latent_file_candidates(name, ctx.settings))
        return file_fingerprint(found) if found is not None else f"missing:{name}"

    @classmethod
    def check_context(cls, literals: dict[str, Any], upstream: dict[str, Upstream], settings: Settings) -> Issues:
        """A file that is not there is refused at validation, as ComfyUI refuses it."""
        return missing_file(
            literals, "latent", lambda n: first_file(latent_file_candidates(n, settings)), lambda n: _missing(n, settings), HINT
        )

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        found = first_file(latent_file_candidates(inputs.latent, ctx.settings))
        if found is None:
            raise NodeError(_missing(inputs.latent, ctx.settings), field="latent")
        path = ctx.readable(found, "latent")
        size = path.stat().st_size
        require_memory(torch.device("cpu"), size, f"reading {path.name}", "use a smaller file", field="latent")
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise NodeError(f"'{path}' is not a readable .latent (safetensors) file: {exc}", field="latent") from None
        samples = tensors.get(LATENT_KEY)
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or not samples.is_floating_point():
            found_keys = ", ".join(sorted(tensors)) or "nothing"
            raise NodeError(
                f"'{path}' holds no latents [batch, channels, height, width] under '{LATENT_KEY}' (it holds {found_keys})",
                field="latent",
            )
        raw = samples.to(torch.float64)
        if VERSION_KEY not in tensors:  # written before the format had versions: scaled by SD1's factor
            raw = raw * (1.0 / SD_SCALING_FACTOR)
        scale, shift = _scaling(inputs.vae)
        latent = ((raw - shift) * scale).to(torch.float32)
        if not torch.isfinite(latent).all():
            raise NodeError(f"'{path}' holds NaN or infinite values", field="latent")
        return self.Outputs(latent=Latent(samples=latent))


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [RepeatLatentBatch, LatentFromBatch, LatentComposite, LatentBlend, SaveLatent, LoadLatent]
