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

    ``noise_mask`` (optional, ``[B, 1, h, w]``) marks where denoising may change the latent.
    """

    samples: torch.Tensor
    noise_mask: torch.Tensor | None = None

    def check(self) -> str | None:
        if not isinstance(self.samples, torch.Tensor) or self.samples.ndim != 4:
            return "a latent must be a 4-D tensor [batch, channels, height, width]"
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


@dataclass(eq=False)
class Conditioning(Socket):
    """Text conditioning: the cross-attention context ``[B, tokens, width]`` plus extras.

    ``pooled`` is SDXL's pooled text embedding; ``extras`` holds model-specific additions
    (e.g. SDXL ``time_ids``) that the denoise loop forwards to the U-Net.
    """

    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def check(self) -> str | None:
        if not isinstance(self.embeddings, torch.Tensor) or self.embeddings.ndim != 3:
            return "conditioning must be a tensor [batch, tokens, width]"
        return None

    def nbytes(self) -> int:
        return _tensor_bytes(self.embeddings, self.pooled)


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
