"""CLIP vision encoders (ComfyUI's ``CLIP_VISION``): reading the files, ComfyUI's preprocessing,
and the encoding ComfyUI's CLIPVisionEncode returns.

A file holds the vision tower of a CLIP model in one of two layouts:

- transformers' ``CLIPVisionModelWithProjection`` (``vision_model.*`` + ``visual_projection.weight``),
  as ComfyUI saves and loads them and as the IP-Adapter / SD-unCLIP image encoders come;
- OpenCLIP's (``visual.transformer.resblocks.*``, ``visual.proj``, ...), as whole OpenCLIP models
  and the ``embedder.model.visual.`` part of SD2.1-unCLIP checkpoints come; it is renamed to
  transformers' layout (the fused attention projection split into q, k, v; ``proj`` transposed).

The architecture is read from the tensors' shapes (width, patch size, image size, depth, MLP width,
projection width). Two facts are not in the shapes: the attention heads, 16 in every CLIP vision
encoder of the SD ecosystem (ViT-L/14, ViT-H/14, ViT-bigG/14), so a width of 64 per head is used
only when the width is not a multiple of 16; and the MLP activation, ``quick_gelu`` for OpenAI's
ViT-L/14 (24 layers, width 1024) and ``gelu`` for the OpenCLIP ones (ComfyUI decides the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from graphsd.std.models.formats import ModelFileError, read_weights
from graphsd.types import ModelRef, Socket, _tensor_bytes

#: CLIP's pixel normalisation (OpenAI's, which every SD-ecosystem CLIP vision encoder uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = 16
OPENAI_L_LAYERS, OPENAI_L_WIDTH = 24, 1024

_OPEN_CLIP_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


class ClipVisionError(ModelFileError):
    """A CLIP vision file that cannot be read or is not a CLIP vision encoder."""


class ClipVision(ModelRef):
    """A loaded CLIP vision encoder (ComfyUI's ``CLIP_VISION``): the ModelManager holds the
    transformers ``CLIPVisionModelWithProjection`` under ``keys["clip_vision"]``."""

    socket_name = "ClipVision"


@dataclass(eq=False)
class ClipVisionOutput(Socket):
    """What CLIPVisionEncode returns (ComfyUI's ``CLIP_VISION_OUTPUT``), per image:
    ``image_embeds`` ``[B, projection]`` (the projected, post-layer-normed class token: CLIP's image
    embedding), ``last_hidden_state`` ``[B, tokens, width]`` (the last layer's output, before the
    final layer norm) and ``penultimate_hidden_states`` (the output of the layer before it)."""

    image_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor

    def check(self) -> str | None:
        if not isinstance(self.image_embeds, torch.Tensor) or self.image_embeds.ndim != 2:
            return "a CLIP vision output's image_embeds must be a tensor [batch, width]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.image_embeds, self.last_hidden_state, self.penultimate_hidden_states)


def open_clip_to_transformers(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The OpenCLIP vision tower under ``prefix`` (e.g. ``visual.``) in transformers' names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
        elif name == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks.") :].split(".", 1)
            layer = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]  # weight / bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                    out[f"{layer}self_attn.{part}.{kind}"] = chunk.contiguous()
                continue
            module, kind = rest.rsplit(".", 1)
            if module in _OPEN_CLIP_LAYER:
                out[f"{layer}{_OPEN_CLIP_LAYER[module]}.{kind}"] = value
    return out


def vision_tensors(tensors: dict[str, torch.Tensor], name: str, field: str | None = None) -> dict[str, torch.Tensor]:
    """A file's CLIP vision tower in transformers' names, whichever layout it has (see the module)."""
    for prefix in ("visual.", "embedder.model.visual.", "cond_stage_model.model.visual.", "conditioner.embedders.0.model.visual."):
        if f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in tensors:
            return open_clip_to_transformers(tensors, prefix)
    for prefix in ("", "image_encoder.", "clip_vision."):
        if f"{prefix}vision_model.embeddings.patch_embedding.weight" in tensors:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(prefix + "text_model.")}
    sample = ", ".join(sorted(tensors)[:6]) or "no tensors"
    raise ClipVisionError(
        f"'{name}' is not a CLIP vision encoder (neither transformers' vision_model.* nor OpenCLIP's visual.* layout; "
        f"it holds {sample}, ...)",
        field=field,
    )


def derive_config(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """transformers ``CLIPVisionConfig`` arguments from the shapes (see the module for heads and activation)."""
    patch = tensors["vision_model.embeddings.patch_embedding.weight"]
    width, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = math.isqrt(positions - 1)
    layers = 1 + max(int(k.split(".")[3]) for k in tensors if k.startswith("vision_model.encoder.layers."))
    projection = tensors.get("visual_projection.weight")
    return {
        "hidden_size": width,
        "intermediate_size": tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS if width % HEADS == 0 else max(1, width // 64),
        "num_channels": channels,
        "image_size": side * patch_size,
        "patch_size": patch_size,
        "projection_dim": projection.shape[0] if projection is not None else width,
        "hidden_act": "quick_gelu" if (layers, width) == (OPENAI_L_LAYERS, OPENAI_L_WIDTH) else "gelu",
        "layer_norm_eps": 1e-5,
    }


def build_clip_vision(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, field: str | None = None) -> torch.nn.Module:
    """transformers' ``CLIPVisionModelWithProjection`` holding ``tensors`` (transformers' names)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        config = CLIPVisionConfig(**derive_config(tensors))
    except (KeyError, ValueError, IndexError) as exc:
        raise ClipVisionError(f"'{name}' is an incomplete CLIP vision encoder ({exc})", field=field) from None
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    state = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    if "visual_projection.weight" not in state:  # a tower without projection: the embedding is the pooled output
        state["visual_projection.weight"] = torch.eye(config.hidden_size)
    expected = model.state_dict()
    missing = sorted(set(k for k in expected if not k.endswith("position_ids")) - set(state))
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        raise ClipVisionError(
            f"'{name}' does not hold a consistent CLIP vision encoder (missing: {', '.join(missing[:4]) or 'none'}; "
            f"wrong shapes: {', '.join(wrong[:4]) or 'none'})",
            field=field,
        )
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ClipVisionError(f"'{name}' has NaN or infinite weights in {key}; the file is damaged", field=field)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False, assign=True)
    model.vision_model.embeddings.register_buffer(  # a non-persistent buffer, still on the meta device
        "position_ids", torch.arange((config.image_size // config.patch_size) ** 2 + 1).unsqueeze(0), persistent=False
    )
    return model.to(dtype).eval()


def load_clip_vision(path: Path, dtype: torch.dtype, allow_pickle: bool, field: str | None = None) -> torch.nn.Module:
    """The CLIP vision encoder in the file at ``path`` (either layout)."""
    tensors, _ = read_weights(path, allow_pickle, ClipVisionError, field)
    return build_clip_vision(vision_tensors(tensors, path.name, field), path.name, dtype, field)


def preprocess(pixels: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    """ComfyUI's CLIP preprocessing of images ``[B, H, W, C]`` in [0, 1] → ``[B, 3, size, size]``:
    unless already ``size`` square, resize (bicubic, antialiased) the shortest side to ``size`` and
    cut the centre square (``crop``), or resize to the square (no ``crop``); then quantise to 8-bit
    levels and normalise with CLIP's mean and std. Alpha is dropped, grey is repeated."""
    image = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1].expand(*pixels.shape[:-1], 3)
    image = image.movedim(-1, 1).float()
    height, width = image.shape[2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        target = (round(scale * height), round(scale * width)) if crop else (size, size)
        image = F.interpolate(image, size=target, mode="bicubic", antialias=True)
        top, left = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, top : top + size, left : left + size]
    image = (255.0 * image).clamp(0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def encode(model: Any, pixel_values: torch.Tensor) -> ClipVisionOutput:
    """Encode preprocessed pixels: the image embedding and the last two layers' hidden states
    (on the CPU, float32)."""
    param = next(model.parameters())
    out = model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
    return ClipVisionOutput(
        image_embeds=out.image_embeds.float().cpu(),
        last_hidden_state=out.last_hidden_state.float().cpu(),
        penultimate_hidden_states=out.hidden_states[-2].float().cpu(),
    )


# ---- unCLIP: the image embedding as the U-Net's class labels -----------------------------------
#: ComfyUI's default noise level of the augmentation of several summed image embeddings.
UNCLIP_MERGE_AUGMENTATION = 0.05
#: ComfyUI draws the augmentation noise with the sampler's seed minus this.
UNCLIP_SEED_OFFSET = 10
#: The conditioning ``extras`` entry unCLIPConditioning records its applications under (a tuple of :class:`Unclip`).
UNCLIP_KEY = "unclip"


@dataclass(frozen=True)
class Unclip:
    """One unCLIPConditioning application recorded on a conditioning (ComfyUI's
    ``unclip_conditioning`` entry): the encoder's output, its weight and its noise level (0..1)."""

    output: ClipVisionOutput
    strength: float
    noise_augmentation: float


@dataclass(eq=False)
class NoiseAugmentor:
    """SD2.1-unCLIP's noise augmentation of CLIP image embeddings (ComfyUI's and the original
    code's ``CLIPEmbeddingNoiseAugmentation``; diffusers' ``StableUnCLIPImageNormalizer`` +
    ``image_noising_scheduler``): the embedding normalised with the checkpoint's ``mean`` / ``std``,
    noised as a DDPM sample at a level of a 1000-step squared-cosine schedule, unnormalised, then
    followed by the sinusoidal embedding of the level (cos half first)."""

    mean: torch.Tensor
    std: torch.Tensor
    max_noise_level: int = 1000

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ of the squared-cosine schedule (Nichol & Dhariwal 2021, eq. 17, s = 0.008, β ≤ 0.999)."""
        n = self.max_noise_level
        t = torch.arange(n + 1, dtype=torch.float64) / n
        bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - bar[1:] / bar[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, dim=0)

    def level_embedding(self, level: int, dim: int) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = torch.tensor([float(level)]) * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)])
        return torch.cat([emb, torch.zeros(dim % 2)]).unsqueeze(0)

    def __call__(self, embeds: torch.Tensor, augmentation: float, seed: int) -> torch.Tensor:
        """``[B, 2 × width]``: the noised embeddings and their noise level's embedding."""
        level = round((self.max_noise_level - 1) * augmentation)
        abar = float(self.alphas_cumprod()[level])
        noise = torch.randn(embeds.shape, dtype=embeds.dtype, generator=torch.Generator().manual_seed(seed))
        scaled = (embeds - self.mean) / self.std
        noised = (math.sqrt(abar) * scaled + math.sqrt(1 - abar) * noise) * self.std + self.mean
        return torch.cat([noised, self.level_embedding(level, embeds.shape[-1]).to(embeds).expand(embeds.shape[0], -1)], dim=1)


def unclip_class_labels(unclips: tuple[Unclip, ...], augmentor: NoiseAugmentor, seed: int, width: int) -> torch.Tensor:
    """The U-Net's class labels for a conditioning (ComfyUI's ``unclip_adm``): zeros without
    unCLIP; one application gives its augmented embedding × strength; several are summed and the
    sum's embedding half augmented once more at level 0.05. Noise from ``seed`` − 10, as ComfyUI
    (whose second augmentation draws unseeded noise; graphsd uses the same seed, so runs repeat)."""
    seed -= UNCLIP_SEED_OFFSET
    if not unclips:
        return torch.zeros(1, 2 * width)
    parts = [
        augmentor(embeds.unsqueeze(0).float(), u.noise_augmentation, seed) * u.strength for u in unclips for embeds in u.output.image_embeds
    ]
    if len(parts) == 1:
        return parts[0]
    total = torch.stack(parts).sum(0)
    return augmentor(total[:, :width], UNCLIP_MERGE_AUGMENTATION, seed)
