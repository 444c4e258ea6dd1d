"""Import of ComfyUI API prompts (the JSON that ComfyUI's "Save (API)" writes and ``POST /prompt``
takes) as graphsd workflow documents, and the description of the ComfyUI classes graphsd imports
in ComfyUI's ``/object_info`` shape (for ``graphsd serve``).

A prompt maps node ids to ``{"class_type": ..., "inputs": {...}}``; an input that is a list
``[node_id, output_index]`` is a link. Each supported class becomes one or two graphsd nodes
(:data:`CONVERTERS`), links become ``"@node.output"`` strings, and every problem (unknown
classes, unsupported samplers, dangling links) is reported at once in one WorkflowError.

| ComfyUI class | graphsd node(s) |
| --- | --- |
| CheckpointLoaderSimple | CheckpointLoader |
| CheckpointLoader | CheckpointLoader (``config_name`` is ignored: graphsd reads the model's layout from the file) |
| CLIPTextEncode | TextEncode |
| EmptyLatentImage | EmptyLatent |
| KSampler | LatentNoise + UNetDenoiseLoop |
| KSamplerAdvanced | LatentNoise + UNetDenoiseLoop (start_step, end_step, add_noise, leftover_noise) |
| VAEDecode / VAEDecodeTiled | VAEDecode |
| VAEEncode / VAEEncodeTiled | VAEEncode |
| LoadImage | LoadImage |
| SaveImage | SaveImage |
| LoraLoader | LoraLoader |
| HypernetworkLoader | HypernetworkLoader |
| PreviewImage | PreviewImage (writes into the output directory's ``temp/``) |
| CLIPSetLastLayer | the ``clip_skip`` of the TextEncode nodes it feeds |
| LatentUpscale / LatentUpscaleBy | LatentUpscale / LatentUpscaleBy |

CLIPSetLastLayer makes no node: its ``stop_at_clip_layer`` -k becomes ``clip_skip`` k of each
CLIPTextEncode whose clip comes from it, directly or through LoraLoaders (the nearest one
upstream wins, as in ComfyUI, where a LoRA's clip keeps the layer setting); a link to its output
is a link to its input. A graphsd-native node fed by it gets the clip without the setting.

A prompt may also name graphsd's own node types, as the ComfyUI frontend does for the nodes
``graphsd serve`` lists: ``class_type`` is the graphsd type (or ``graphsd.<type>``,
:data:`graphsd.hookspecs.COMFY_NATIVE_PREFIX`, where a ComfyUI class of the same name exists),
inputs carry graphsd's input names, and a link ``[id, i]`` names the i-th output of the node in
the order its ``Outputs`` declares them. Native and ComfyUI nodes link to each other freely.

KSamplerAdvanced keeps ComfyUI's meaning of its switches: ``add_noise`` disable starts from the
latent as it is (continuing a latent that still holds noise), ``return_with_leftover_noise``
disable makes the step at ``end_at_step`` go to sigma 0 (a finished image), enable stops at that
step's sigma (for a second sampler to continue). A window with no step in it (``start_at_step`` ≥
``end_at_step`` or ≥ ``steps``) returns ``latent_image`` unchanged, as in ComfyUI: such a node
makes no graphsd node, and a link to its output is a link to its ``latent_image`` (its other
inputs are still checked).

KSampler's ``denoise`` < 1 follows ComfyUI: a schedule of ``int(steps / denoise)`` steps of
which the last ``steps`` run (graphsd ``start_step``), so the numbers of steps agree. A
KSampler fed by EmptyLatentImage at full denoise is text-to-image (the latent only gives the
noise its shape), as in diffusers' text-to-image pipelines.

File names: LoadImage's ``image`` is a file in the input folder (``graphsd run --input-dir``,
default ``./input``; the server's input folder), as in ComfyUI, or, annotated as the frontend
writes them, in the output or temporary folder (``"x.png [input]"``, ``"sub/x.png [output]"``,
``"x.png [temp]"``). Windows separators in ``image``, ``ckpt_name`` and ``lora_name``
(``"sd15\\model.safetensors"``) become ``/``. In served prompts these names must stay inside their
folders (no absolute paths, no ``..``). SaveImage names its files as ComfyUI does
(``<prefix>_00001_.png``, see graphsd's SaveImage ``naming``).

Request bodies: a prompt wrapped as ComfyUI's ``POST /prompt`` body (``{"prompt": ...}``) or
as serverless workers take it (:data:`REQUEST_WRAPPERS`: ``{"input": {"workflow": ...}}``, a
``workflow_json`` string, ...) is unwrapped; a workflow found under any other key is refused with
that key named.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from graphsd.errors import Issue, WorkflowError
from graphsd.hookspecs import COMFY_NATIVE_PREFIX
from graphsd.std.nodes.comfy_core import UPSCALE_METHODS
from graphsd.std.sampling.ksamplers import COMFY_SAMPLER_NAMES, KSAMPLERS, NOT_SUPPORTED
from graphsd.std.sampling.sigmas import COMFY_SCHEDULERS

SAMPLER_NAMES = {name: name for name in COMFY_SAMPLER_NAMES if name in KSAMPLERS}
"""ComfyUI ``sampler_name`` → graphsd sampler: every name graphsd runs, in ComfyUI's order, as
UNetDenoiseLoop ``convention: comfyui`` under its ComfyUI name; the others
(:data:`graphsd.std.sampling.ksamplers.NOT_SUPPORTED`) are refused on import with the reason."""

SCHEDULER_NAMES = {name: name for name in COMFY_SCHEDULERS}
"""ComfyUI ``scheduler`` → graphsd schedule (all nine, with ComfyUI's sigmas)."""

MAX_RESOLUTION = 16384
MAX_SEED = 2**64 - 1
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "KSampler": {"seed": (0, MAX_SEED), "steps": (1, 10000), "cfg": (0.0, 100.0), "denoise": (0.0, 1.0)},
    "KSamplerAdvanced": {
        "noise_seed": (0, MAX_SEED),
        "steps": (1, 10000),
        "cfg": (0.0, 100.0),
        "start_at_step": (0, 10000),
        "end_at_step": (0, 10000),
    },
    "EmptyLatentImage": {"width": (16, MAX_RESOLUTION), "height": (16, MAX_RESOLUTION), "batch_size": (1, 4096)},
    "LoraLoader": {"strength_model": (-100.0, 100.0), "strength_clip": (-100.0, 100.0)},
    "HypernetworkLoader": {"strength": (-10.0, 10.0)},
    "VAEDecodeTiled": {"tile_size": (64, 4096), "overlap": (0, 4096)},
    "VAEEncodeTiled": {"tile_size": (64, 4096), "overlap": (0, 4096)},
    "CLIPSetLastLayer": {"stop_at_clip_layer": (-24, -1)},
    "LatentUpscale": {"width": (0, MAX_RESOLUTION), "height": (0, MAX_RESOLUTION)},
    "LatentUpscaleBy": {"scale_by": (0.01, 8.0)},
}
"""ComfyUI's widget ranges (min, max) of the number inputs of each class: a prompt with a value
outside them is refused on import, as ComfyUI refuses it."""

OUTPUT_CLASSES = {"SaveImage", "PreviewImage"}
"""ComfyUI classes that are output nodes: a prompt without one has nothing to run."""

COMFY_TYPES = {
    "UNet": "MODEL",
    "Clip": "CLIP",
    "Vae": "VAE",
    "Conditioning": "CONDITIONING",
    "Latent": "LATENT",
    "Image": "IMAGE",
    "Mask": "MASK",
}
"""graphsd socket type → the ComfyUI type of the same values, so that the frontend links a
ComfyUI node's output to a graphsd node's input of the same kind. Types without a ComfyUI
counterpart (Noise, ...) keep their graphsd names."""

INPUT_NAMES: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"path": "ckpt_name"},
    "CheckpointLoader": {"path": "ckpt_name"},
    "HypernetworkLoader": {"unet": "model", "hypernetwork": "hypernetwork_name", "strength": "strength"},
    "CLIPTextEncode": {"clip": "clip", "text": "text", "clip_skip": "clip"},
    "EmptyLatentImage": {"width": "width", "height": "height", "batch_size": "batch_size"},
    "KSampler": {
        "seed": "seed",
        "noise": "seed",
        "latent": "latent_image",
        "unet": "model",
        "positive": "positive",
        "negative": "negative",
        "steps": "steps",
        "start_step": "denoise",
        "denoise": "denoise",
        "cfg": "cfg",
        "sampler": "sampler_name",
        "schedule": "scheduler",
    },
    "KSamplerAdvanced": {
        "seed": "noise_seed",
        "noise": "noise_seed",
        "latent": "latent_image",
        "unet": "model",
        "positive": "positive",
        "negative": "negative",
        "steps": "steps",
        "cfg": "cfg",
        "sampler": "sampler_name",
        "schedule": "scheduler",
        "start_step": "start_at_step",
        "end_step": "end_at_step",
        "add_noise": "add_noise",
        "leftover_noise": "return_with_leftover_noise",
    },
    "VAEDecode": {"vae": "vae", "latent": "samples"},
    "VAEDecodeTiled": {"vae": "vae", "latent": "samples", "tiled": "tile_size", "tile_size": "tile_size", "tile_overlap": "overlap"},
    "VAEEncode": {"vae": "vae", "image": "pixels"},
    "VAEEncodeTiled": {"vae": "vae", "image": "pixels", "tiled": "tile_size", "tile_size": "tile_size", "tile_overlap": "overlap"},
    "LoadImage": {"path": "image"},
    "SaveImage": {"image": "images", "prefix": "filename_prefix"},
    "LoraLoader": {
        "unet": "model",
        "clip": "clip",
        "lora": "lora_name",
        "strength_model": "strength_model",
        "strength_clip": "strength_clip",
    },
    "PreviewImage": {"image": "images"},
    "LatentUpscale": {"latent": "samples", "method": "upscale_method", "width": "width", "height": "height", "crop": "crop"},
    "LatentUpscaleBy": {"latent": "samples", "method": "upscale_method", "scale_by": "scale_by"},
}
"""ComfyUI class → {graphsd input of the node(s) it becomes: the ComfyUI input it comes from},
so that a problem graphsd finds in a translated node is reported on the ComfyUI input."""

PASSTHROUGH = {"CLIPSetLastLayer": "clip"}
"""ComfyUI classes that make no graphsd node: a link to their output is a link to this input."""


@dataclass
class _Conversion:
    """State of one conversion: graphsd nodes made so far, where each came from, and the
    problems found."""

    prompt: dict[str, Any]
    ids: dict[str, str]
    native: dict[str, Any] = field(default_factory=dict)  # graphsd node types usable by name
    folders: dict[str, Path] = field(default_factory=dict)  # ComfyUI folder type (input, output, temp) -> folder
    confine: bool = False  # file names must stay inside their folders (served prompts)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # graphsd node id -> ComfyUI node id
    issues: list[Issue] = field(default_factory=list)
    current: str = ""
    following: set[str] = field(default_factory=set)  # PASSTHROUGH nodes being followed (cycle guard)

    def issue(self, comfy_id: str, message: str, field: str | None = None, hint: str | None = None, code: str = "comfy") -> None:
        self.issues.append(Issue(message, node=comfy_id, field=field, hint=hint, code=code))

    def value(self, comfy_id: str, name: str, default: Any = ...) -> Any:
        """A ComfyUI input as a graphsd value: links become ``"@node.output"``."""
        inputs = self.prompt[comfy_id].get("inputs", {})
        if name not in inputs:
            if default is ...:
                self.issue(comfy_id, f"missing input '{name}'", field=name, code="missing_input")
            return None if default is ... else default
        raw = inputs[name]
        if _is_link(raw):
            return self.link(comfy_id, name, raw)
        return _literal(raw)

    def outputs_of(self, comfy_id: str) -> tuple[str, ...] | None:
        """graphsd output names of a prompt node's outputs by index (None: unknown class)."""
        class_type = self.prompt[comfy_id].get("class_type")
        if class_type in OUTPUTS:
            return OUTPUTS[class_type]
        cls = native_class(class_type, self.native)
        return tuple(cls.output_fields()) if cls is not None else None

    def link(self, comfy_id: str, name: str, raw: list) -> str | None:
        source, index = str(raw[0]), raw[1]
        if source not in self.prompt:
            self.issue(comfy_id, f"links to node '{source}', which is not in the prompt", field=name, code="missing_node")
            return None
        outputs = self.outputs_of(source)
        if outputs is None:
            return None  # the unknown class is reported on its own
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(outputs):
            self.issue(
                comfy_id, f"links to output {index} of '{source}', which has {len(outputs)} output(s)", field=name, code="missing_output"
            )
            return None
        passthrough = PASSTHROUGH.get(self.prompt[source].get("class_type")) or _unchanged_latent(self.prompt[source])
        if passthrough is None:
            return f"@{self.ids[source]}.{outputs[index]}"
        upstream = self.prompt[source].get("inputs", {}).get(passthrough)
        if source in self.following:
            self.issue(source, f"its {passthrough} input leads back to itself (a cycle)", field=passthrough, code="cycle")
            return None
        if not _is_link(upstream):
            return None  # reported on that node
        self.following.add(source)
        try:
            return self.link(source, passthrough, upstream)
        finally:
            self.following.discard(source)

    def source_class(self, comfy_id: str, name: str) -> str | None:
        raw = self.prompt[comfy_id].get("inputs", {}).get(name)
        if _is_link(raw) and str(raw[0]) in self.prompt:
            return self.prompt[str(raw[0])].get("class_type")
        return None

    def add(self, node_id: str, node_type: str, inputs: dict[str, Any]) -> None:
        self.nodes[node_id] = {"type": node_type, "inputs": {k: v for k, v in inputs.items() if v is not None}}
        self.origins[node_id] = self.current

    def fresh_id(self, base: str) -> str:
        taken = set(self.ids.values()) | set(self.nodes)
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}{n}"
        return candidate

    def file_name(self, comfy_id: str, name: str, what: str) -> str | None:
        """A file-name input (image, ckpt_name, lora_name) as a graphsd value: Windows ``\\``
        separators become ``/``; an input image (``what`` "input") is looked up in the folder its
        annotation names (``"x.png [output]"``), by default the input folder. Served prompts
        (``confine``) may only name files inside their folders."""
        raw = self.prompt[comfy_id].get("inputs", {}).get(name)
        if not isinstance(raw, str):
            return self.value(comfy_id, name)
        file = normalise_file_name(raw)
        folder = None
        if what == "input":
            file, kind = annotated_name(file)
            folder = self.folders.get(kind)
        problem = _confinement_problem(file) if self.confine else None
        if problem:
            self.issue(
                comfy_id, f"{what} {raw!r} {problem}", field=name, hint=f"give the name of a file in the {what} folder", code="bad_path"
            )
            return None
        return _escape(str(folder / file) if folder is not None else file)


def normalise_file_name(name: str) -> str:
    """A file name as a ComfyUI prompt written on Windows gives it, with ``/`` separators
    (``"sd15\\model.safetensors"`` → ``"sd15/model.safetensors"``)."""
    return name.replace("\\", "/")


def annotated_name(name: str) -> tuple[str, str]:
    """(file name, folder type) of a LoadImage name as the frontend annotates it: ``"x.png
    [output]"`` → ``("x.png", "output")``; a name without annotation lies in ``input``."""
    match = re.fullmatch(r"(.*?) ?\[(input|output|temp)\]", name)
    return (match[1], match[2]) if match else (name, "input")


def _confinement_problem(name: str) -> str | None:
    if not name or "\0" in name:
        return "is not a file name"
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "leaves its folder ('..')"
    return None


def _escape(text: str) -> str:
    """A ComfyUI string as a graphsd literal: a leading ``@`` and ``${`` are escaped so they are
    never read as a link or a param."""
    text = text.replace("${", "$${")
    return "@" + text if text.startswith("@") else text


def _literal(raw: Any) -> Any:
    """A ComfyUI widget value as a graphsd literal: strings escaped (also inside lists and
    mappings), and the frontend's ``{"__value__": [...]}`` wrapping of list values removed."""
    if isinstance(raw, dict) and set(raw) == {"__value__"}:
        raw = raw["__value__"]
    if isinstance(raw, str):
        return _escape(raw)
    if isinstance(raw, list):
        return [_literal(v) for v in raw]
    if isinstance(raw, dict):
        return {k: _literal(v) for k, v in raw.items()}
    return raw


def _is_link(raw: Any) -> bool:
    return isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], (str, int)) and not isinstance(raw[0], bool)


def native_class(class_type: Any, nodes: dict[str, Any]) -> Any:
    """The graphsd node class a prompt's ``class_type`` names (its type, or ``graphsd.<type>``),
    or None. A ComfyUI class that graphsd imports takes precedence over a graphsd type of the
    same name."""
    if not isinstance(class_type, str) or class_type in CONVERTERS:
        return None
    if class_type.startswith(COMFY_NATIVE_PREFIX):
        class_type = class_type[len(COMFY_NATIVE_PREFIX) :]
    return nodes.get(class_type)


def _checkpoint(c: _Conversion, cid: str, gid: str) -> None:
    """CheckpointLoaderSimple, and CheckpointLoader whose ``config_name`` (an original LDM config
    file) graphsd does not need: it reads the model's layout from the checkpoint itself."""
    c.add(gid, "CheckpointLoader", {"path": c.file_name(cid, "ckpt_name", "checkpoint")})


def _hypernetwork(c: _Conversion, cid: str, gid: str) -> None:
    inputs = {"unet": c.value(cid, "model"), "hypernetwork": c.file_name(cid, "hypernetwork_name", "hypernetwork")}
    c.add(gid, "HypernetworkLoader", inputs | {"strength": c.value(cid, "strength", default=1.0)})


def _clip_skip(c: _Conversion, cid: str) -> int | None:
    """graphsd ``clip_skip`` of a CLIPTextEncode: -``stop_at_clip_layer`` of the nearest
    CLIPSetLastLayer up its clip's chain (through LoraLoaders), None when there is none."""
    seen = set()
    node_id, name = cid, "clip"
    while node_id not in seen:
        seen.add(node_id)
        raw = c.prompt[node_id].get("inputs", {}).get(name)
        if not _is_link(raw) or str(raw[0]) not in c.prompt:
            return None
        node_id = str(raw[0])
        class_type = c.prompt[node_id].get("class_type")
        if class_type == "CLIPSetLastLayer":
            stop = c.prompt[node_id].get("inputs", {}).get("stop_at_clip_layer")
            return -stop if isinstance(stop, int) and not isinstance(stop, bool) and stop < 0 else None
        if class_type != "LoraLoader" or raw[1] != 1:
            return None
    return None


def _text(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "TextEncode", {"clip": c.value(cid, "clip"), "text": c.value(cid, "text"), "clip_skip": _clip_skip(c, cid)})


def _set_last_layer(c: _Conversion, cid: str, gid: str) -> None:
    """CLIPSetLastLayer makes no node (see the module docstring); its inputs are checked here."""
    clip, stop = c.value(cid, "clip"), c.prompt[cid].get("inputs", {}).get("stop_at_clip_layer", -1)
    if clip is not None and not _is_link(c.prompt[cid]["inputs"]["clip"]):
        c.issue(cid, "clip must be linked to a CLIP output", field="clip", hint="link it to a checkpoint loader's CLIP")
    if _is_link(stop):
        c.issue(cid, "stop_at_clip_layer cannot be linked here", field="stop_at_clip_layer", hint="give it as a number (-1, -2, ...)")
    elif not isinstance(stop, int) or isinstance(stop, bool):
        c.issue(cid, f"stop_at_clip_layer {stop!r} is not an integer", field="stop_at_clip_layer", hint="-1 = last layer, -2 = penultimate")


def _empty_latent(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "EmptyLatent", {n: c.value(cid, n, default=d) for n, d in (("width", 512), ("height", 512), ("batch_size", 1))})


def _choice(c: _Conversion, cid: str, name: str, table: dict[str, str]) -> str | None:
    value = c.value(cid, name)
    if value is None or (isinstance(value, str) and (value in table or value.startswith("@"))):
        return table.get(value, value) if isinstance(value, str) else None
    why = f" ({NOT_SUPPORTED[value]})" if isinstance(value, str) and value in NOT_SUPPORTED else ""
    c.issue(cid, f"{name} '{value}' is not supported{why}", field=name, hint=f"supported: {', '.join(table)}", code="unsupported")
    return None


def _ksampler(c: _Conversion, cid: str, gid: str) -> None:
    """KSampler → LatentNoise (seed, shape of latent_image) + UNetDenoiseLoop."""
    latent = c.value(cid, "latent_image")
    noise_id = c.fresh_id(f"{gid}_noise")
    c.add(noise_id, "LatentNoise", {"seed": c.value(cid, "seed"), "latent": latent})
    steps, denoise = c.value(cid, "steps", default=20), c.value(cid, "denoise", default=1.0)
    loop = {
        "unet": c.value(cid, "model"),
        "positive": c.value(cid, "positive"),
        "negative": c.value(cid, "negative"),
        "noise": f"@{noise_id}.noise",
        "latent": latent,
        "steps": steps,
        "cfg": c.value(cid, "cfg", default=8.0),
        **_sampler_inputs(c, cid),
    }
    if isinstance(denoise, (int, float)) and isinstance(steps, int) and denoise < 1.0:
        if denoise <= 0:
            c.issue(cid, "denoise 0 leaves the latent unchanged", field="denoise", hint="use a denoise in (0, 1]")
        elif steps / denoise > RANGES["KSampler"]["steps"][1]:
            c.issue(
                cid,
                f"denoise {denoise:g} with {steps} steps needs a schedule of {steps / denoise:.3g} steps (at most 10000)",
                field="denoise",
                hint="raise denoise or lower steps",
            )
        else:
            total = int(steps / denoise)
            loop.update(steps=total, start_step=total - steps)
    elif c.source_class(cid, "latent_image") == "EmptyLatentImage":
        loop["latent"] = None
    elif isinstance(denoise, str):
        loop["denoise"] = denoise
    c.add(gid, "UNetDenoiseLoop", loop)


def _sampler_inputs(c: _Conversion, cid: str) -> dict[str, Any]:
    """UNetDenoiseLoop's sampler, schedule and convention for a KSampler's sampler_name and
    scheduler: ComfyUI's samplers on ComfyUI's sigmas."""
    return {
        "sampler": _choice(c, cid, "sampler_name", SAMPLER_NAMES),
        "schedule": _choice(c, cid, "scheduler", SCHEDULER_NAMES),
        "convention": "comfyui",
    }


def _switch(c: _Conversion, cid: str, name: str, default: str) -> bool | None:
    """An ``enable`` / ``disable`` widget as a boolean."""
    value = c.value(cid, name, default=default)
    if value in ("enable", "disable"):
        return value == "enable"
    if value is not None:
        c.issue(cid, f"{name} must be 'enable' or 'disable', got {value!r}", field=name, hint="give enable or disable")
    return None


def _unchanged_latent(node: dict[str, Any]) -> str | None:
    """``"latent_image"`` for a KSamplerAdvanced whose step window is empty (``start_at_step`` ≥
    ``min(end_at_step, steps)``, given as numbers): ComfyUI's sampler then returns that input
    unchanged. None for any other node."""
    if node.get("class_type") != "KSamplerAdvanced":
        return None
    inputs = node.get("inputs", {})
    steps, start, end = inputs.get("steps", 20), inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, start, end))
    return "latent_image" if numbers and start >= min(end, steps) else None


def _ksampler_advanced(c: _Conversion, cid: str, gid: str) -> None:
    """KSamplerAdvanced → LatentNoise (noise_seed, shape of latent_image) + UNetDenoiseLoop with
    start_step / end_step, add_noise and leftover_noise; nothing when its step window is empty
    (see the module docstring)."""
    if _unchanged_latent(c.prompt[cid]):  # checked as ComfyUI checks it, but no sampling: links lead to latent_image
        for name in ("model", "positive", "negative", "latent_image"):
            c.value(cid, name)
        _sampler_inputs(c, cid)
        _switch(c, cid, "add_noise", "enable")
        _switch(c, cid, "return_with_leftover_noise", "disable")
        return
    latent = c.value(cid, "latent_image")
    noise_id = c.fresh_id(f"{gid}_noise")
    c.add(noise_id, "LatentNoise", {"seed": c.value(cid, "noise_seed"), "latent": latent})
    steps = c.value(cid, "steps", default=20)
    start, end = c.value(cid, "start_at_step", default=0), c.value(cid, "end_at_step", default=10000)
    add_noise = _switch(c, cid, "add_noise", "enable")
    if add_noise and start == 0 and c.source_class(cid, "latent_image") == "EmptyLatentImage":
        latent = None  # text-to-image: the empty latent only gives the noise its shape, as for KSampler
    loop = {
        "unet": c.value(cid, "model"),
        "positive": c.value(cid, "positive"),
        "negative": c.value(cid, "negative"),
        "noise": f"@{noise_id}.noise",
        "latent": latent,
        "steps": steps,
        "cfg": c.value(cid, "cfg", default=8.0),
        **_sampler_inputs(c, cid),
        "start_step": start,
        "end_step": end,
        "add_noise": add_noise,
        "leftover_noise": _switch(c, cid, "return_with_leftover_noise", "disable"),
    }
    c.add(gid, "UNetDenoiseLoop", loop)


def _vae_decode(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "VAEDecode", {"vae": c.value(cid, "vae"), "latent": c.value(cid, "samples")})


def _tiled_vae(node: str, into: str, source: str) -> Callable[[_Conversion, str, str], None]:
    """ComfyUI's VAEDecodeTiled / VAEEncodeTiled: graphsd's ``node`` in its tiled mode, its input
    ``into`` from the ComfyUI input ``source``."""

    def convert(c: _Conversion, cid: str, gid: str) -> None:
        tiles = {"tiled": True, "tile_size": c.value(cid, "tile_size", default=512), "tile_overlap": c.value(cid, "overlap", default=64)}
        c.add(gid, node, {"vae": c.value(cid, "vae"), into: c.value(cid, source), **tiles})

    return convert


def _vae_encode(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "VAEEncode", {"vae": c.value(cid, "vae"), "image": c.value(cid, "pixels")})


def _load_image(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "LoadImage", {"path": c.file_name(cid, "image", "input")})


def _save_image(c: _Conversion, cid: str, gid: str) -> None:
    prefix = c.value(cid, "filename_prefix", default="ComfyUI")
    prefix = normalise_file_name(prefix) if isinstance(prefix, str) and not prefix.startswith("@") else prefix
    c.add(gid, "SaveImage", {"image": c.value(cid, "images"), "prefix": prefix, "naming": "comfyui"})


def _lora(c: _Conversion, cid: str, gid: str) -> None:
    c.add(
        gid,
        "LoraLoader",
        {
            "unet": c.value(cid, "model"),
            "clip": c.value(cid, "clip"),
            "lora": c.file_name(cid, "lora_name", "LoRA"),
            "strength_model": c.value(cid, "strength_model", default=1.0),
            "strength_clip": c.value(cid, "strength_clip", default=1.0),
        },
    )


def _preview_image(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "PreviewImage", {"image": c.value(cid, "images")})


def _latent_upscale(c: _Conversion, cid: str, gid: str) -> None:
    inputs = {"latent": c.value(cid, "samples"), "method": _upscale_method(c, cid)}
    inputs |= {n: c.value(cid, n, default=d) for n, d in (("width", 512), ("height", 512), ("crop", "disabled"))}
    c.add(gid, "LatentUpscale", inputs)


def _latent_upscale_by(c: _Conversion, cid: str, gid: str) -> None:
    inputs = {"latent": c.value(cid, "samples"), "method": _upscale_method(c, cid), "scale_by": c.value(cid, "scale_by", default=1.5)}
    c.add(gid, "LatentUpscaleBy", inputs)


def _upscale_method(c: _Conversion, cid: str) -> str | None:
    method = c.value(cid, "upscale_method", default="nearest-exact")
    if method == "bislerp":
        c.issue(
            cid,
            "upscale_method 'bislerp' is not supported",
            field="upscale_method",
            hint="use nearest-exact, bilinear, area or bicubic",
            code="unsupported",
        )
        return None
    return method


def _native(c: _Conversion, cid: str, gid: str, cls: Any) -> None:
    """A graphsd node named in the prompt: inputs by graphsd name, links by output index."""
    inputs = {}
    for name, raw in c.prompt[cid].get("inputs", {}).items():
        inputs[str(name)] = c.link(cid, name, raw) if _is_link(raw) else _literal(raw)
    c.add(gid, cls.type, inputs)


CONVERTERS: dict[str, Callable[[_Conversion, str, str], None]] = {
    "CheckpointLoaderSimple": _checkpoint,
    "CheckpointLoader": _checkpoint,
    "HypernetworkLoader": _hypernetwork,
    "CLIPTextEncode": _text,
    "EmptyLatentImage": _empty_latent,
    "KSampler": _ksampler,
    "KSamplerAdvanced": _ksampler_advanced,
    "VAEDecode": _vae_decode,
    "VAEDecodeTiled": _tiled_vae("VAEDecode", "latent", "samples"),
    "VAEEncode": _vae_encode,
    "VAEEncodeTiled": _tiled_vae("VAEEncode", "image", "pixels"),
    "LoadImage": _load_image,
    "SaveImage": _save_image,
    "LoraLoader": _lora,
    "PreviewImage": _preview_image,
    "CLIPSetLastLayer": _set_last_layer,
    "LatentUpscale": _latent_upscale,
    "LatentUpscaleBy": _latent_upscale_by,
}
"""ComfyUI class_type → converter adding the graphsd node(s) for one ComfyUI node."""

OUTPUTS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("unet", "clip", "vae"),
    "CheckpointLoader": ("unet", "clip", "vae"),
    "HypernetworkLoader": ("unet",),
    "CLIPTextEncode": ("cond",),
    "EmptyLatentImage": ("latent",),
    "KSampler": ("latent",),
    "KSamplerAdvanced": ("latent",),
    "VAEDecode": ("image",),
    "VAEDecodeTiled": ("image",),
    "VAEEncode": ("latent",),
    "VAEEncodeTiled": ("latent",),
    "LoadImage": ("image", "mask"),
    "SaveImage": (),
    "LoraLoader": ("unet", "clip"),
    "PreviewImage": (),
    "CLIPSetLastLayer": ("clip",),
    "LatentUpscale": ("latent",),
    "LatentUpscaleBy": ("latent",),
}
"""ComfyUI class_type → graphsd output name of each ComfyUI output index."""


def _check_ranges(c: _Conversion, cid: str, node: dict[str, Any]) -> None:
    """Refuse number widgets outside ComfyUI's range, and NaN / infinities, as ComfyUI does."""
    inputs = node.get("inputs", {})
    for name, (low, high) in RANGES.get(node["class_type"], {}).items():
        value = inputs.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            c.issue(cid, f"Value {value} is not a number", field=name, code="out_of_range")
        elif value < low:
            c.issue(cid, f"Value {value} smaller than min of {low}", field=name, code="out_of_range")
        elif value > high:
            c.issue(cid, f"Value {value} bigger than max of {high}", field=name, code="out_of_range")


def _graphsd_ids(prompt: dict[str, Any]) -> dict[str, str]:
    """ComfyUI ids (``"3"``, ``"12:5"``) → valid, unique graphsd node ids."""
    ids: dict[str, str] = {}
    for cid in prompt:
        base = re.sub(r"[^A-Za-z0-9_\-]", "_", str(cid)) or "node"
        candidate, n = base, 1
        while candidate in ids.values():
            n += 1
            candidate = f"{base}_{n}"
        ids[cid] = candidate
    return ids


REQUEST_WRAPPERS: tuple[tuple[str, ...], ...] = (
    ("prompt",),
    ("workflow",),
    ("input", "workflow"),
    ("input", "prompt"),
    ("workflow_json",),
    ("input", "workflow_json"),
)
"""Where request bodies carry a ComfyUI workflow (an API prompt or an editor file): ComfyUI's own
``POST /prompt`` body (``prompt``), serverless workers' ``{"input": {"workflow": ...}}`` (RunPod's
worker-comfyui and its forks), ``workflow_json`` holding the workflow as JSON text (Replicate's
ComfyUI runner). Other fields of the body (inline images, webhooks) are not read."""


def _is_bare_prompt(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and "nodes" not in data
        and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


def _is_workflow(data: Any) -> bool:
    """An API prompt or an editor (UI-format) file."""
    from graphsd.std.comfy_ui import is_ui_workflow

    return _is_bare_prompt(data) or is_ui_workflow(data)


def _nested_workflow(data: Any, depth: int = 3) -> tuple[str, ...] | None:
    """The key path of the first workflow inside ``data`` (mappings only, ``depth`` levels)."""
    if not isinstance(data, dict) or depth == 0:
        return None
    for key, value in data.items():
        if _is_workflow(value):
            return (str(key),)
        if (inner := _nested_workflow(value, depth - 1)) is not None:
            return (str(key), *inner)
    return None


def unwrap(data: Any) -> Any:
    """The ComfyUI workflow a request body carries (:data:`REQUEST_WRAPPERS`), or ``data`` itself
    when it is no wrapper (a prompt, an editor file, a graphsd document, anything else). Raises
    :class:`WorkflowError` for a workflow under a key graphsd does not know, naming the key."""
    if not isinstance(data, dict) or _is_workflow(data) or isinstance(data.get("nodes"), dict):
        return data
    for path in REQUEST_WRAPPERS:
        inner: Any = data
        for key in path:
            inner = inner.get(key) if isinstance(inner, dict) else None
        if path[-1] == "workflow_json" and isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except (ValueError, RecursionError) as exc:
                where = ".".join(path)
                raise WorkflowError([Issue(f"the request body's {where} is not a JSON workflow ({exc})", code="syntax")]) from None
        if _is_workflow(inner):
            return inner
    found = _nested_workflow(data)
    if found is None:
        return data
    where = "".join(f"[{json.dumps(key)}]" for key in found)
    known = ", ".join("".join(f"[{json.dumps(k)}]" for k in path) for path in REQUEST_WRAPPERS)
    raise WorkflowError(
        [
            Issue(
                f"this is a request body carrying a ComfyUI workflow at {where}, a wrapper graphsd does not read",
                hint=f"give the workflow itself (the value at {where}), or wrap it as graphsd reads it: {known}",
                code="schema",
            )
        ]
    )


def is_comfy_prompt(data: Any) -> bool:
    """A ComfyUI API prompt is a mapping of ids to ``{"class_type": ..., "inputs": ...}``
    (sometimes wrapped in a request body: :data:`REQUEST_WRAPPERS`)."""
    try:
        return _is_bare_prompt(unwrap(data))
    except WorkflowError:
        return False


def translate(
    prompt: dict[str, Any],
    nodes: dict[str, Any] | None = None,
    input_dir: str | Path | None = None,
    folders: dict[str, str | Path] | None = None,
    confine: bool | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Convert a ComfyUI API prompt (optionally wrapped in a request body: :func:`unwrap`) into
    a graphsd workflow document. ``nodes`` (the registry's node classes) lets the prompt name
    graphsd node types; ``folders`` maps ComfyUI's folder types (input, output, temp) to the
    folders LoadImage's names lie in (``input_dir`` is the input one); ``confine`` (by default:
    whether ``input_dir`` is given, as for the server) keeps file-name inputs inside their folders
    (see the module docstring). Returns (document, origins): origins maps each graphsd node id
    to ``{"id": <ComfyUI node id>, "class_type": ..., "inputs": {<graphsd input>: <ComfyUI
    input>}}``. Raises :class:`WorkflowError` listing every problem found."""
    prompt = unwrap(prompt)
    if not isinstance(prompt, dict):
        raise WorkflowError([Issue("a ComfyUI API prompt must be a mapping of node ids to nodes", code="schema")])
    prompt = {str(k): v for k, v in prompt.items()}
    malformed = [
        Issue('a ComfyUI node must be {"class_type": <name>, "inputs": {...}}', node=cid, code="schema")
        for cid, n in prompt.items()
        if not (isinstance(n, dict) and isinstance(n.get("class_type"), str) and isinstance(n.get("inputs", {}), dict))
    ]
    if malformed:
        raise WorkflowError(malformed)
    native = dict(nodes or {})
    places = {kind: Path(folder) for kind, folder in (folders or {}).items()}
    if input_dir is not None:
        places.setdefault("input", Path(input_dir))
    confined = input_dir is not None if confine is None else confine
    conversion = _Conversion(prompt, _graphsd_ids(prompt), native, places, confined)
    unknown = sorted(
        {n["class_type"] for n in prompt.values() if n["class_type"] not in CONVERTERS and native_class(n["class_type"], native) is None}
    )
    if unknown:
        users = {t: [cid for cid, n in prompt.items() if n.get("class_type") == t] for t in unknown}
        conversion.issues.append(
            Issue(
                "ComfyUI node classes graphsd cannot import: " + "; ".join(f"{t} (node {', '.join(users[t])})" for t in unknown),
                hint=f"supported classes: {', '.join(CONVERTERS)}"
                + (f"; graphsd node types: {', '.join(sorted(native))}" if native else ""),
                code="unknown_type",
            )
        )
    has_output = False
    for cid, node in prompt.items():
        conversion.current = cid
        _check_ranges(conversion, cid, node)
        converter = CONVERTERS.get(node["class_type"])
        if converter is not None:
            converter(conversion, cid, conversion.ids[cid])
            has_output = has_output or node["class_type"] in OUTPUT_CLASSES
        elif (cls := native_class(node["class_type"], native)) is not None:
            _native(conversion, cid, conversion.ids[cid], cls)
            has_output = has_output or bool(cls.output_node)
    if not conversion.issues and not has_output:
        outputs = sorted(OUTPUT_CLASSES | {t for t, cls in native.items() if cls.output_node})
        conversion.issues.append(Issue("Prompt has no outputs", hint=f"add an output node ({', '.join(outputs)})", code="no_outputs"))
    if conversion.issues:
        raise WorkflowError(conversion.issues)
    origins = {
        gid: {
            "id": cid,
            "class_type": prompt[cid]["class_type"],
            "inputs": INPUT_NAMES.get(prompt[cid]["class_type"])
            or {name: name for name in native[conversion.nodes[gid]["type"]].input_fields()},
        }
        for gid, cid in conversion.origins.items()
    }
    return {"version": 1, "params": {}, "nodes": conversion.nodes}, origins


def comfy_to_workflow(prompt: dict[str, Any], nodes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a ComfyUI API prompt into a graphsd workflow document (:func:`translate` without
    the origins). Raises :class:`WorkflowError` listing every problem found."""
    return translate(prompt, nodes)[0]


# ---- /object_info ---------------------------------------------------------------------------
def _files(folder: Path, keep: Callable[[Path], bool], recursive: bool = False, limit: int = 10_000) -> list[str]:
    """Names (relative, with '/') of the entries of ``folder`` that ``keep`` accepts; hidden
    names (temporaries) are left out."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if keep(path):
            found.append(rel.as_posix())
            if len(found) >= limit:
                break
    return found


def checkpoint_names(models_dir: str | Path) -> list[str]:
    """What CheckpointLoaderSimple's ``ckpt_name`` offers: graphsd's built-in models, then the
    model folders and single files under the models folder and its ``checkpoints/``."""
    from graphsd.std.models.formats import WEIGHT_SUFFIXES
    from graphsd.std.models.loading import builtin_models_dir

    def model(path: Path) -> bool:
        return (path.is_dir() and (path / "model_index.json").is_file()) or (path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES)

    names = _files(builtin_models_dir(), lambda p: p.is_dir() and (p / "model_index.json").is_file())
    names += _files(Path(models_dir), model)
    names += _files(Path(models_dir) / "checkpoints", model, recursive=True)
    return list(dict.fromkeys(names))


def config_names(models_dir: str | Path) -> list[str]:
    """What CheckpointLoader's ``config_name`` offers: the LDM config files in the models folder's
    ``configs/`` (graphsd ignores the choice)."""
    return _files(Path(models_dir) / "configs", lambda p: p.is_file() and p.suffix.lower() in (".yaml", ".yml"))


def image_names(input_dir: str | Path) -> list[str]:
    """What LoadImage's ``image`` offers: the image files in the input folder (not its subfolders,
    as in ComfyUI; a subfolder's file can still be named ``sub/name.png``)."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    return _files(Path(input_dir), lambda p: p.is_file() and p.suffix.lower() in suffixes)


def object_info(models_dir: str | Path, input_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ComfyUI classes graphsd imports, in ComfyUI's ``/object_info`` shape: ComfyUI's input
    names, types, defaults and ranges, with the models and images that are there to choose."""
    from graphsd.std.nodes.patches import available

    def entry(
        name: str,
        display: str,
        category: str,
        description: str,
        required: dict[str, Any],
        outputs: list[str],
        output_names: list[str] | None = None,
        output_node: bool = False,
    ) -> dict[str, Any]:
        return {
            "input": {
                "required": required,
                "optional": {},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"} if output_node else {},
            },
            "input_order": {"required": list(required), "optional": []},
            "output": outputs,
            "output_is_list": [False] * len(outputs),
            "output_name": output_names or list(outputs),
            "name": name,
            "display_name": display,
            "description": description,
            "category": category,
            "output_node": output_node,
            "python_module": "nodes",
            "deprecated": False,
            "experimental": category.startswith("_for_testing"),
        }

    size = {"min": 16, "max": MAX_RESOLUTION, "step": 8}
    tile = {"step": 32}
    ckpts, loras = checkpoint_names(models_dir), available("loras", models_dir)
    return {
        "CheckpointLoaderSimple": entry(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            "Loads a diffusion model checkpoint (graphsd: CheckpointLoader).",
            {"ckpt_name": [ckpts, {"tooltip": "The checkpoint (model) to load."}]},
            ["MODEL", "CLIP", "VAE"],
        ),
        "CheckpointLoader": entry(
            "CheckpointLoader",
            "Load Checkpoint With Config (DEPRECATED)",
            "advanced/loaders",
            "Loads a checkpoint; the config file is not needed and ignored (graphsd: CheckpointLoader).",
            {"config_name": [config_names(models_dir), {}], "ckpt_name": [ckpts, {}]},
            ["MODEL", "CLIP", "VAE"],
        )
        | {"deprecated": True},
        "HypernetworkLoader": entry(
            "HypernetworkLoader",
            "HypernetworkLoader",
            "loaders",
            "Applies an A1111 hypernetwork to the model (graphsd: HypernetworkLoader).",
            {
                "model": ["MODEL"],
                "hypernetwork_name": [available("hypernetworks", models_dir), {}],
                "strength": ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}],
            },
            ["MODEL"],
        ),
        "CLIPTextEncode": entry(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            "Encodes a text prompt (graphsd: TextEncode).",
            {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
            ["CONDITIONING"],
        ),
        "EmptyLatentImage": entry(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            "A batch of empty latents (graphsd: EmptyLatent).",
            {
                "width": ["INT", {"default": 512, **size}],
                "height": ["INT", {"default": 512, **size}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            },
            ["LATENT"],
        ),
        "KSampler": entry(
            "KSampler",
            "KSampler",
            "sampling",
            "Denoises a latent (graphsd: LatentNoise + UNetDenoiseLoop).",
            {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}],
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
                "sampler_name": [list(SAMPLER_NAMES), {}],
                "scheduler": [list(SCHEDULER_NAMES), {}],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            },
            ["LATENT"],
        ),
        "KSamplerAdvanced": entry(
            "KSamplerAdvanced",
            "KSampler (Advanced)",
            "sampling",
            "Denoises a latent over a window of the schedule's steps (graphsd: LatentNoise + UNetDenoiseLoop).",
            {
                "model": ["MODEL"],
                "add_noise": [["enable", "disable"], {}],
                "noise_seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}],
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
                "sampler_name": [list(SAMPLER_NAMES), {}],
                "scheduler": [list(SCHEDULER_NAMES), {}],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "start_at_step": ["INT", {"default": 0, "min": 0, "max": 10000}],
                "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}],
                "return_with_leftover_noise": [["disable", "enable"], {}],
            },
            ["LATENT"],
        ),
        "VAEDecode": entry(
            "VAEDecode",
            "VAE Decode",
            "latent",
            "Decodes latents into images (graphsd: VAEDecode).",
            {"samples": ["LATENT"], "vae": ["VAE"]},
            ["IMAGE"],
        ),
        "VAEDecodeTiled": entry(
            "VAEDecodeTiled",
            "VAE Decode (Tiled)",
            "_for_testing",
            "Decodes latents in tiles (graphsd: VAEDecode, tiled).",
            {
                "samples": ["LATENT"],
                "vae": ["VAE"],
                "tile_size": ["INT", {"default": 512, "min": 64, "max": 4096, **tile}],
                "overlap": ["INT", {"default": 64, "min": 0, "max": 4096, **tile}],
            },
            ["IMAGE"],
        ),
        "VAEEncode": entry(
            "VAEEncode",
            "VAE Encode",
            "latent",
            "Encodes images into latents (graphsd: VAEEncode).",
            {"pixels": ["IMAGE"], "vae": ["VAE"]},
            ["LATENT"],
        ),
        "VAEEncodeTiled": entry(
            "VAEEncodeTiled",
            "VAE Encode (Tiled)",
            "_for_testing",
            "Encodes images into latents in tiles (graphsd: VAEEncode, tiled).",
            {
                "pixels": ["IMAGE"],
                "vae": ["VAE"],
                "tile_size": ["INT", {"default": 512, "min": 64, "max": 4096, "step": 64}],
                "overlap": ["INT", {"default": 64, "min": 0, "max": 4096, **tile}],
            },
            ["LATENT"],
        ),
        "LoadImage": entry(
            "LoadImage",
            "Load Image",
            "image",
            "Loads an image from the input folder (graphsd: LoadImage).",
            {"image": [image_names(input_dir), {"image_upload": True}]},
            ["IMAGE", "MASK"],
        ),
        "SaveImage": entry(
            "SaveImage",
            "Save Image",
            "image",
            "Saves images to the output folder (graphsd: SaveImage).",
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
            [],
            output_node=True,
        ),
        "LoraLoader": entry(
            "LoraLoader",
            "Load LoRA",
            "loaders",
            "Applies a LoRA to the model and the text encoder (graphsd: LoraLoader).",
            {
                "model": ["MODEL"],
                "clip": ["CLIP"],
                "lora_name": [loras, {}],
                "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
                "strength_clip": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
            },
            ["MODEL", "CLIP"],
        ),
        "PreviewImage": entry(
            "PreviewImage",
            "Preview Image",
            "image",
            "Shows images; writes them into the output folder's temp/ (graphsd: PreviewImage).",
            {"images": ["IMAGE"]},
            [],
            output_node=True,
        ),
        "CLIPSetLastLayer": entry(
            "CLIPSetLastLayer",
            "CLIP Set Last Layer",
            "conditioning",
            "Which CLIP layer the text encodes stop at: -1 last, -2 penultimate (graphsd: TextEncode clip_skip).",
            {"clip": ["CLIP"], "stop_at_clip_layer": ["INT", {"default": -1, "min": -24, "max": -1, "step": 1}]},
            ["CLIP"],
        ),
        "LatentUpscale": entry(
            "LatentUpscale",
            "Upscale Latent",
            "latent",
            "Resizes latents to a size in pixels (graphsd: LatentUpscale).",
            {
                "samples": ["LATENT"],
                "upscale_method": [list(UPSCALE_METHODS), {}],
                "width": ["INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}],
                "height": ["INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}],
                "crop": [["disabled", "center"], {}],
            },
            ["LATENT"],
        ),
        "LatentUpscaleBy": entry(
            "LatentUpscaleBy",
            "Upscale Latent By",
            "latent",
            "Resizes latents by a factor (graphsd: LatentUpscaleBy).",
            {
                "samples": ["LATENT"],
                "upscale_method": [list(UPSCALE_METHODS), {}],
                "scale_by": ["FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}],
            },
            ["LATENT"],
        ),
    }
