"""Import of ComfyUI API prompts (the JSON that ComfyUI's "Save (API)" writes and ``POST /prompt``
takes) as graphsd workflow documents.

A prompt maps node ids to ``{"class_type": ..., "inputs": {...}}``; an input that is a list
``[node_id, output_index]`` is a link. Each supported class becomes one or two graphsd nodes
(:data:`CONVERTERS`), links become ``"@node.output"`` strings, and every problem (unknown
classes, unsupported samplers, dangling links) is reported at once in one WorkflowError.

| ComfyUI class | graphsd node(s) |
| --- | --- |
| CheckpointLoaderSimple | CheckpointLoader |
| CLIPTextEncode | TextEncode |
| EmptyLatentImage | EmptyLatent |
| KSampler | LatentNoise + UNetDenoiseLoop |
| VAEDecode / VAEDecodeTiled | VAEDecode |
| VAEEncode | VAEEncode |
| LoadImage | LoadImage |
| SaveImage | SaveImage |
| LoraLoader | LoraLoader |

KSampler's ``denoise`` < 1 follows ComfyUI: a schedule of ``int(steps / denoise)`` steps of
which the last ``steps`` run (graphsd ``start_step``), so the numbers of steps agree. A
KSampler fed by EmptyLatentImage at full denoise is text-to-image (the latent only gives the
noise its shape), as in diffusers' text-to-image pipelines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from graphsd.errors import Issue, WorkflowError

SAMPLER_NAMES = {
    "euler": "euler",
    "euler_ancestral": "euler_ancestral",
    "heun": "heun",
    "ddim": "ddim",
    "lms": "lms",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "uni_pc": "unipc",
}
"""ComfyUI ``sampler_name`` → graphsd sampler."""

SCHEDULER_NAMES = {"normal": "normal", "karras": "karras"}
"""ComfyUI ``scheduler`` → graphsd schedule."""

MAX_RESOLUTION = 16384
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "KSampler": {"seed": (0, 2**64 - 1), "steps": (1, 10000), "cfg": (0.0, 100.0), "denoise": (0.0, 1.0)},
    "EmptyLatentImage": {"width": (16, MAX_RESOLUTION), "height": (16, MAX_RESOLUTION), "batch_size": (1, 4096)},
    "LoraLoader": {"strength_model": (-100.0, 100.0), "strength_clip": (-100.0, 100.0)},
    "VAEDecodeTiled": {"tile_size": (64, 4096), "overlap": (0, 4096)},
}
"""ComfyUI's widget ranges (min, max) of the number inputs of each class: a prompt with a value
outside them is refused on import, as ComfyUI refuses it."""

OUTPUT_CLASSES = {"SaveImage"}
"""ComfyUI classes that are output nodes: a prompt without one has nothing to run."""


@dataclass
class _Conversion:
    """State of one conversion: graphsd nodes made so far, and the problems found."""

    prompt: dict[str, Any]
    ids: dict[str, str]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

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
        if isinstance(raw, str):
            return _escape(raw)
        return raw

    def link(self, comfy_id: str, name: str, raw: list) -> str | None:
        source, index = str(raw[0]), raw[1]
        if source not in self.prompt:
            self.issue(comfy_id, f"links to node '{source}', which is not in the prompt", field=name, code="missing_node")
            return None
        outputs = OUTPUTS.get(self.prompt[source].get("class_type"), ())
        if not outputs:
            return None  # the unknown class is reported on its own
        if not isinstance(index, int) or not 0 <= index < len(outputs):
            self.issue(comfy_id, f"links to output {index} of '{source}', which has {len(outputs)} output(s)", field=name, code="missing_output")
            return None
        return f"@{self.ids[source]}.{outputs[index]}"

    def source_class(self, comfy_id: str, name: str) -> str | None:
        raw = self.prompt[comfy_id].get("inputs", {}).get(name)
        if _is_link(raw) and str(raw[0]) in self.prompt:
            return self.prompt[str(raw[0])].get("class_type")
        return None

    def add(self, node_id: str, node_type: str, inputs: dict[str, Any]) -> None:
        self.nodes[node_id] = {"type": node_type, "inputs": {k: v for k, v in inputs.items() if v is not None}}

    def fresh_id(self, base: str) -> str:
        taken = set(self.ids.values()) | set(self.nodes)
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}{n}"
        return candidate


def _escape(text: str) -> str:
    """A ComfyUI string as a graphsd literal: a leading ``@`` and ``${`` are escaped so they are
    never read as a link or a param."""
    text = text.replace("${", "$${")
    return "@" + text if text.startswith("@") else text


def _is_link(raw: Any) -> bool:
    return isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], (str, int)) and not isinstance(raw[0], bool)


def _checkpoint(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "CheckpointLoader", {"path": c.value(cid, "ckpt_name")})


def _text(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "TextEncode", {"clip": c.value(cid, "clip"), "text": c.value(cid, "text")})


def _empty_latent(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "EmptyLatent", {n: c.value(cid, n, default=d) for n, d in (("width", 512), ("height", 512), ("batch_size", 1))})


def _choice(c: _Conversion, cid: str, name: str, table: dict[str, str]) -> str | None:
    value = c.value(cid, name)
    if value is None or (isinstance(value, str) and (value in table or value.startswith("@"))):
        return table.get(value, value) if isinstance(value, str) else None
    c.issue(cid, f"{name} '{value}' is not supported", field=name, hint=f"supported: {', '.join(table)}", code="unsupported")
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
        "sampler": _choice(c, cid, "sampler_name", SAMPLER_NAMES),
        "schedule": _choice(c, cid, "scheduler", SCHEDULER_NAMES),
    }
    if isinstance(denoise, (int, float)) and isinstance(steps, int) and denoise < 1.0:
        if denoise <= 0:
            c.issue(cid, "denoise 0 leaves the latent unchanged", field="denoise", hint="use a denoise in (0, 1]")
        elif steps / denoise > RANGES["KSampler"]["steps"][1]:
            c.issue(cid, f"denoise {denoise:g} with {steps} steps needs a schedule of {steps / denoise:.3g} steps (at most 10000)",
                    field="denoise", hint="raise denoise or lower steps")
        else:
            total = int(steps / denoise)
            loop.update(steps=total, start_step=total - steps)
    elif c.source_class(cid, "latent_image") == "EmptyLatentImage":
        loop["latent"] = None
    elif isinstance(denoise, str):
        loop["denoise"] = denoise
    c.add(gid, "UNetDenoiseLoop", loop)


def _vae_decode(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "VAEDecode", {"vae": c.value(cid, "vae"), "latent": c.value(cid, "samples")})


def _vae_decode_tiled(c: _Conversion, cid: str, gid: str) -> None:
    c.add(
        gid,
        "VAEDecode",
        {
            "vae": c.value(cid, "vae"),
            "latent": c.value(cid, "samples"),
            "tiled": True,
            "tile_size": c.value(cid, "tile_size", default=512),
            "tile_overlap": c.value(cid, "overlap", default=64),
        },
    )


def _vae_encode(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "VAEEncode", {"vae": c.value(cid, "vae"), "image": c.value(cid, "pixels")})


def _load_image(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "LoadImage", {"path": c.value(cid, "image")})


def _save_image(c: _Conversion, cid: str, gid: str) -> None:
    c.add(gid, "SaveImage", {"image": c.value(cid, "images"), "prefix": c.value(cid, "filename_prefix", default="ComfyUI")})


def _lora(c: _Conversion, cid: str, gid: str) -> None:
    c.add(
        gid,
        "LoraLoader",
        {
            "unet": c.value(cid, "model"),
            "clip": c.value(cid, "clip"),
            "lora": c.value(cid, "lora_name"),
            "strength_model": c.value(cid, "strength_model", default=1.0),
            "strength_clip": c.value(cid, "strength_clip", default=1.0),
        },
    )


CONVERTERS: dict[str, Callable[[_Conversion, str, str], None]] = {
    "CheckpointLoaderSimple": _checkpoint,
    "CLIPTextEncode": _text,
    "EmptyLatentImage": _empty_latent,
    "KSampler": _ksampler,
    "VAEDecode": _vae_decode,
    "VAEDecodeTiled": _vae_decode_tiled,
    "VAEEncode": _vae_encode,
    "LoadImage": _load_image,
    "SaveImage": _save_image,
    "LoraLoader": _lora,
}
"""ComfyUI class_type → converter adding the graphsd node(s) for one ComfyUI node."""

OUTPUTS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("unet", "clip", "vae"),
    "CLIPTextEncode": ("cond",),
    "EmptyLatentImage": ("latent",),
    "KSampler": ("latent",),
    "VAEDecode": ("image",),
    "VAEDecodeTiled": ("image",),
    "VAEEncode": ("latent",),
    "LoadImage": ("image", "mask"),
    "SaveImage": (),
    "LoraLoader": ("unet", "clip"),
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


def is_comfy_prompt(data: Any) -> bool:
    """A ComfyUI API prompt is a mapping of ids to ``{"class_type": ..., "inputs": ...}``
    (sometimes wrapped as ``{"prompt": {...}}``)."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]
    return (
        isinstance(data, dict)
        and bool(data)
        and "nodes" not in data
        and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


def comfy_to_workflow(prompt: dict[str, Any]) -> dict[str, Any]:
    """Convert a ComfyUI API prompt (optionally wrapped as ``{"prompt": {...}}``) into a graphsd
    workflow document. Raises :class:`WorkflowError` listing every problem found."""
    if isinstance(prompt.get("prompt"), dict):
        prompt = prompt["prompt"]
    prompt = {str(k): v for k, v in prompt.items()}
    malformed = [
        Issue("a ComfyUI node must be {\"class_type\": <name>, \"inputs\": {...}}", node=cid, code="schema")
        for cid, n in prompt.items()
        if not (isinstance(n, dict) and isinstance(n.get("class_type"), str) and isinstance(n.get("inputs", {}), dict))
    ]
    if malformed:
        raise WorkflowError(malformed)
    unknown = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in CONVERTERS})
    conversion = _Conversion(prompt, _graphsd_ids(prompt))
    if unknown:
        users = {t: [cid for cid, n in prompt.items() if n.get("class_type") == t] for t in unknown}
        conversion.issues.append(
            Issue(
                "ComfyUI node classes graphsd cannot import: "
                + "; ".join(f"{t} (node {', '.join(users[t])})" for t in unknown),
                hint=f"supported classes: {', '.join(CONVERTERS)}",
                code="unknown_type",
            )
        )
    for cid, node in prompt.items():
        _check_ranges(conversion, cid, node)
        converter = CONVERTERS.get(node.get("class_type"))
        if converter is not None:
            converter(conversion, cid, conversion.ids[cid])
    if not conversion.issues and not any(n["class_type"] in OUTPUT_CLASSES for n in prompt.values()):
        conversion.issues.append(Issue("Prompt has no outputs", hint=f"add an output node ({', '.join(sorted(OUTPUT_CLASSES))})", code="no_outputs"))
    if conversion.issues:
        raise WorkflowError(conversion.issues)
    return {"version": 1, "params": {}, "nodes": conversion.nodes}
