"""Socket types: the classes that travel along the edges of a graph.

A node input or output annotated with a subclass of :class:`Socket` can only be fed by a link
(``@node.output``), never by a literal, and validation checks before anything runs that the
upstream output's class is the input's class or a subclass of it. Plugins add their own socket
types by subclassing :class:`Socket` and returning the classes from ``graphsd_register_types``.

Literal inputs (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``) may be given either as a
value in the workflow file or as a link from an output of the same Python type.

Every socket class has a cheap ``check()`` so values can be verified at run time (class, tensor
rank, channel count); a failed check is reported with the node id and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision latents, guidance and sampler state are kept in around a model of
    ``dtype``: float32 for float32 and half-precision models, float64 for float64 ones (the
    reference precision the parity tests compare in)."""
    return torch.promote_types(dtype, torch.float32)


def weight_dtype(module: Any) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (or buffer),
    past the parts it keeps in float32 (``_keep_in_fp32_modules``). For graphsd's models this is
    what diffusers' ``ModelMixin.dtype`` answers, but read from the first parameters: diffusers
    first walks every submodule looking for layerwise-casting hooks (which graphsd never
    attaches), milliseconds a read (3.4 ms for an SD1.5 U-Net, 6.4 ms for SDXL's on a CPU), and
    the denoise loop, latent nodes, VAE decode and previews each need the dtype. Works on
    anything with ``named_parameters``/``buffers`` (a compiled wrapper forwards them); a model
    without weights answers its own ``dtype``."""
    kept = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, param in module.named_parameters():
        if param.is_floating_point() and not any(k in name for k in kept):
            return param.dtype
    for buffer in module.buffers():
        if buffer.is_floating_point():
            return buffer.dtype
    return module.dtype


class Socket:
    """Base class of every value that can only travel along a link."""

    #: Name shown in schemas and error messages (defaults to the class name).
    socket_name: str = ""

    @classmethod
    def type_name(cls) -> str:
        return cls.socket_name or cls.__name__

    def check(self) -> str | None:
        """Return a description of what is wrong with this value, or None when it is fine."""
        return None

    def nbytes(self) -> int:
        """Approximate memory held by this value (for the output cache's budget)."""
        return 0


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass(eq=False)
class Latent(Socket):
    """Latents ``[B, C, H/8, W/8]`` in the model's scaled latent space (already × scale factor).

    ``noise_mask`` (optional, ``[B, 1, h, w]``, 1 = denoise here, 0 = keep) marks where denoising
    may change the latent (inpainting). Like ComfyUI's, it may have any size (the picture's, as
    ComfyUI's inpainting nodes make it, or the latent's): the denoise loops resize it to the
    latent's size.
    """

    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None

    def check(self) -> str | None:
        if not isinstance(self.samples, torch.Tensor) or self.samples.ndim != 4:
            return "a latent must be a 4-D tensor [batch, channels, height, width]"
        mask = self.noise_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1):
            return "a latent's noise_mask must be a tensor [batch, 1, height, width]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.samples, self.noise_mask)


@dataclass(eq=False)
class Noise(Socket):
    """Initial noise ``[B, C, h, w]`` drawn from a seeded CPU generator, plus the generator state
    that ancestral/SDE samplers continue from, so that a seed fixes the whole run."""

    samples: torch.Tensor
    seed: int
    generator_state: torch.Tensor | None = None

    def check(self) -> str | None:
        if not isinstance(self.samples, torch.Tensor) or self.samples.ndim != 4:
            return "noise must be a 4-D tensor [batch, channels, height, width]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.samples, self.generator_state)


@dataclass(eq=False)
class Image(Socket):
    """Images ``[B, H, W, C]``, float in [0, 1], channels last (as ComfyUI passes them)."""

    pixels: torch.Tensor

    def check(self) -> str | None:
        p = self.pixels
        if not isinstance(p, torch.Tensor) or p.ndim != 4 or p.shape[-1] not in (1, 3, 4):
            return "an image must be a tensor [batch, height, width, 1|3|4]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.pixels)


@dataclass(eq=False)
class Mask(Socket):
    """Masks ``[B, H, W]``, float in [0, 1] (1 = change this pixel)."""

    values: torch.Tensor

    def check(self) -> str | None:
        if not isinstance(self.values, torch.Tensor) or self.values.ndim != 3:
            return "a mask must be a tensor [batch, height, width]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.values)


@dataclass(frozen=True)
class Area:
    """A rectangle of the latent that a conditioning applies to (ComfyUI's conditioning
    ``area``): ``height`` × ``width`` latent cells whose top-left cell is row ``y``, column
    ``x``; with ``relative``, the four numbers are fractions of the latent's height and width."""

    height: float
    width: float
    y: float = 0
    x: float = 0
    relative: bool = False


@dataclass(eq=False)
class Conditioning(Socket):
    """Text conditioning: the cross-attention context ``[B, tokens, width]`` plus extras.

    ``pooled`` is SDXL's pooled text embedding; ``extras`` holds model-specific additions that
    the denoise loops forward to the U-Net: SDXL's ``original_size``, ``crop_top_left``,
    ``target_size``, ``aesthetic_score``, and for inpainting U-Nets ``concat_latent_image``
    (the masked picture's latent) and ``concat_mask`` (ComfyUI's InpaintModelConditioning).

    Where and how much it counts (ComfyUI's conditioning keys of the same meaning): ``area``
    restricts it to a rectangle of the latent, ``strength`` weighs its prediction against the
    others of the same side, ``mask`` (``[B, H, W]``, any size, resized to the latent's) weighs
    it per cell, times ``mask_strength``; ``mask_bounds`` makes the mask's bounding box its area.

    ``combined`` holds further conditionings evaluated beside this one (ComfyUI's
    ConditioningCombine, which makes a list of them): :meth:`entries` lists them all, this one
    first. A plain conditioning is a list of one, read through its own fields as before.

    ``control`` is the ControlNet applied to it (ComfyUI's ``control``), which the denoise loops
    run beside the U-Net: an object of the plugin that applied it (graphsd.std's ControlNetApply
    records a ``graphsd.std.models.controlnet.Control``, whose ``nbytes()`` counts here), or None.
    """

    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    area: Area | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0
    mask_bounds: bool = False
    combined: tuple[Conditioning, ...] = ()
    control: Any = None

    def entries(self) -> list[Conditioning]:
        """Every conditioning this value stands for, in order (itself first, without ``combined``)."""
        first = replace(self, combined=()) if self.combined else self
        return [first] + [e for c in self.combined for e in c.entries()]

    @staticmethod
    def of_entries(entries: list[Conditioning]) -> Conditioning:
        """The value standing for ``entries`` (the inverse of :meth:`entries`)."""
        if not entries:
            raise ValueError("a conditioning needs at least one entry")
        return replace(entries[0], combined=tuple(entries[1:]))

    def check(self) -> str | None:
        for entry in self.entries():
            if not isinstance(entry.embeddings, torch.Tensor) or entry.embeddings.ndim != 3:
                return "conditioning must be a tensor [batch, tokens, width]"
            if entry.mask is not None and (not isinstance(entry.mask, torch.Tensor) or entry.mask.ndim != 3):
                return "a conditioning's mask must be a tensor [batch, height, width]"
        return None

    def nbytes(self) -> int:
        return sum(
            _tensor_bytes(e.embeddings, e.pooled, e.mask, *(v for v in e.extras.values() if isinstance(v, torch.Tensor)))
            + (e.control.nbytes() if e.control is not None else 0)
            for e in self.entries()
        )


@dataclass(eq=False)
class ModelRef(Socket):
    """Base of the model handles. A handle is light: it names the components that the
    :class:`~graphsd.memory.ModelManager` holds (``keys``: role → manager key, e.g.
    ``{"unet": "..."}`` or ``{"text_encoder": ..., "text_encoder_2": ...}``), the facts about
    them that the plugin which made it needs (``info``) and the patches (LoRA, hypernetworks)
    recorded on it. :meth:`with_patches` returns a new handle; weights are never copied and the
    shared cached weights are never modified outside ``ModelManager.use``.

    ``info`` is the plugin's own typed object, opaque to the engine, which never reads it: what
    a model is (its family, latent scaling, tokenizers, ...) is knowledge of the plugin that
    loads it. graphsd.std puts a ``graphsd.std.models.family.ModelInfo`` there, shared by the
    three handles of a checkpoint.
    """

    manager: Any
    keys: dict[str, str]
    info: Any = None
    patches: tuple[Any, ...] = ()

    def with_patches(self, *patches: Any) -> ModelRef:
        return replace(self, patches=self.patches + tuple(patches))

    def fingerprint(self) -> str:
        """Stable identity of the handle: the components it names and its patches."""
        parts = [f"{role}={key}" for role, key in sorted(self.keys.items())]
        parts += [p.fingerprint() for p in self.patches]
        return "|".join(parts)


class UNet(ModelRef):
    """The noise-prediction network (U-Net) of a checkpoint, with its scheduler config."""


class Clip(ModelRef):
    """The tokenizer(s) and text encoder(s) of a checkpoint."""


class Vae(ModelRef):
    """The VAE (encoder + decoder) of a checkpoint, with its latent scale factor."""


class Dataset(Socket):
    """A training dataset: a sequence of (image, caption) samples (see graphsd.std.training)."""


class TrainedModel(Socket):
    """Result of a training node: in-memory components ready to be saved or used."""


BUILTIN_SOCKET_TYPES: tuple[type[Socket], ...] = (
    Latent,
    Noise,
    Image,
    Mask,
    Conditioning,
    UNet,
    Clip,
    Vae,
    Dataset,
    TrainedModel,
)
