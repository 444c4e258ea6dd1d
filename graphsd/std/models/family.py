"""What graphsd.std knows about a loaded model, typed and detected in one place.

A checkpoint's three handles (:class:`~graphsd.types.UNet`, :class:`~graphsd.types.Clip`,
:class:`~graphsd.types.Vae`) share one :class:`ModelInfo` in their ``info`` field: the model
family and every fact the nodes read (latent scaling, the VAE's downscale, the scheduler config,
SDXL's added conditioning, the tokenizers). The engine core keeps that field opaque; this module
is the only place that fills it (:func:`detect_model_info`, from the configs of the loaded
components, whether they came from a diffusers folder or a single file) and the nodes read it
through :func:`model_info`, which says clearly when a handle carries no such facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from types import MappingProxyType
from typing import Any, Literal

from graphsd.errors import NodeError

#: Model families: Stable Diffusion 1.x, 2.x, XL (base and refiner), or another U-Net.
Family = Literal["sd1", "sd2", "sdxl", "other"]

#: Pixels per latent cell of the Stable Diffusion VAEs (SD1, SD2, SDXL: four levels, ×2 each
#: but the first); the size arithmetic of nodes without a VAE (LatentNoise, EmptyLatent).
SD_LATENT_DOWNSCALE = 8
#: Latent scaling factor of the SD1 / SD2 VAE, for a VAE config that does not give its own.
SD_SCALING_FACTOR = 0.18215
#: Latent channels of SD1, SD2 and SDXL (the U-Net's input channels when its config omits them).
SD_LATENT_CHANNELS = 4
#: Cross-attention context width of each family's released models (the width of its text
#: encoders' hidden states; SDXL's two side by side).
CONTEXT_WIDTHS: dict[Family, int] = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
#: Text encoders, in the order their hidden states are concatenated, and the tokenizer that
#: belongs to each (the component names of a diffusers folder and of a single file's metadata).
TOKENIZER_OF_ENCODER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _read_only(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ModelInfo:
    """The facts of one checkpoint that graphsd.std's nodes read. The defaults are those of the
    Stable Diffusion releases, for handles built by hand (tests, other plugins) that give only
    some facts; a loaded checkpoint has every field from its configs."""

    family: Family
    #: Text-encoder role (``text_encoder``, ``text_encoder_2``) → its tokenizer.
    tokenizers: Mapping[str, Any] = dataclass_field(default_factory=dict)
    #: The diffusers scheduler config the samplers are built from (read-only: pass a copy on).
    scheduler_config: Mapping[str, Any] = dataclass_field(default_factory=dict)
    #: Channels the U-Net takes: the channels of the noise to denoise.
    unet_in_channels: int = SD_LATENT_CHANNELS
    #: Width of the text context the U-Net attends to (``cross_attention_dim``).
    context_width: int | None = None
    #: SDXL's added conditioning: width of each Fourier-embedded size / crop / score number
    #: (``addition_time_embed_dim``); None for a U-Net without it.
    time_embed_dim: int | None = None
    #: SDXL: input width of the added-conditioning projection, pooled text embedding + numbers
    #: (``projection_class_embeddings_input_dim``).
    added_embed_width: int | None = None
    #: Pixels per latent cell along each side.
    latent_downscale: int = SD_LATENT_DOWNSCALE
    #: Latents are ``(VAE mean - shift_factor) × scaling_factor``.
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float = 0.0
    #: The ModelManager key of the checkpoint's own VAE, which defines what this U-Net's latents
    #: look like as pixels (the denoise loop's live previews fit their colour map on it); None
    #: for handles built by hand, which then get no previews.
    vae_key: str | None = None
    #: Width of the class labels the U-Net takes through a projection class embedding
    #: (``class_embed_type: projection``: SD2.1-unCLIP's noise-augmented image embedding + its
    #: noise level's embedding, 2 × the image-embedding width); None for a U-Net without one.
    class_labels_width: int | None = None
    #: SD2.1-unCLIP's noise augmentation of image embeddings
    #: (:class:`~graphsd.std.models.clip_vision.NoiseAugmentor`), set by unCLIPCheckpointLoader;
    #: None elsewhere (a U-Net with class labels but no augmentor gets zeros as class labels).
    noise_augmentor: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokenizers", _read_only(self.tokenizers))
        object.__setattr__(self, "scheduler_config", _read_only(self.scheduler_config))

    @property
    def takes_time_ids(self) -> bool:
        """Whether the U-Net takes SDXL's added conditioning (pooled text + size/crop numbers)."""
        return self.time_embed_dim is not None

    def time_id_count(self, pooled_width: int) -> int:
        """How many numbers SDXL's added conditioning holds beside a pooled text embedding of
        ``pooled_width``: 6 for the base model (sizes and crop), 5 for the refiner (aesthetic
        score instead of the target size)."""
        if self.time_embed_dim is None or self.added_embed_width is None:
            raise ValueError("this U-Net takes no added time conditioning")
        return (self.added_embed_width - pooled_width) // self.time_embed_dim


def detect_family(unet_config: Mapping[str, Any]) -> Family:
    """``sdxl`` (added text/time conditioning), ``sd2`` (SD2's context width), ``sd1`` (any other
    U-Net with SD1's layout, including small test models) or ``other``."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return "other"
    if unet_config.get("cross_attention_dim") == CONTEXT_WIDTHS["sd2"]:
        return "sd2"
    return "sd1"


def detect_model_info(
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
    family: Family | None = None,
) -> ModelInfo:
    """The facts of a checkpoint from the diffusers configs of its U-Net, VAE and scheduler and
    its tokenizers (text-encoder role → tokenizer). ``family`` defaults to what the U-Net config
    says (:func:`detect_family`); a single file passes the family its layout names, which also
    holds for small models whose widths are not the released ones."""
    text_time = unet_config.get("addition_embed_type") == "text_time"
    levels = vae_config.get("block_out_channels")
    return ModelInfo(
        family=family or detect_family(unet_config),
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        unet_in_channels=unet_config.get("in_channels", SD_LATENT_CHANNELS),
        context_width=unet_config.get("cross_attention_dim"),
        time_embed_dim=unet_config.get("addition_time_embed_dim") if text_time else None,
        added_embed_width=unet_config.get("projection_class_embeddings_input_dim") if text_time else None,
        latent_downscale=2 ** (len(levels) - 1) if levels else SD_LATENT_DOWNSCALE,
        scaling_factor=float(vae_config.get("scaling_factor") or SD_SCALING_FACTOR),
        shift_factor=float(vae_config.get("shift_factor") or 0.0),
        class_labels_width=unet_config.get("projection_class_embeddings_input_dim")
        if unet_config.get("class_embed_type") == "projection"
        else None,
    )


def model_info(handle: Any, field: str) -> ModelInfo:
    """The :class:`ModelInfo` a model handle carries; a handle made elsewhere without one (by
    another plugin, say) is refused with the node input ``field`` it came through."""
    info = getattr(handle, "info", None)
    if not isinstance(info, ModelInfo):
        raise NodeError(
            f"this {type(handle).__name__} handle carries no Stable Diffusion model facts (family, latent scaling, "
            "scheduler, ...); connect the output of a CheckpointLoader, or give the handle a graphsd.std ModelInfo",
            field=field,
        )
    return info
