"""How Stable Diffusion's components divide for partial loading and weight streaming under a VRAM
budget (:mod:`graphsd.memory`), and how much activation memory their calls need.

**Blocks.** A diffusers U-Net, VAE or ControlNet streams by its ResNet blocks, its transformer
blocks (each ``BasicTransformerBlock`` of an attention layer alone, so SDXL's ten-deep
transformers at the lowest resolution divide finely; a ResNet larger than every other unit by its
convolutions), its down/upsampling convolutions and the
VAE's attention; a CLIP text encoder by its encoder layers. What lies between them (the
input/output convolutions, the time and class embeddings, the transformers' projections and
norms, the token embeddings) is small and always stays on the device. A block's ``rank`` is the
number of spatial positions it works on relative to the full latent (4^-level): under
:attr:`graphsd.memory.ModelOffload.residency` ``"rank"`` the low-resolution blocks, whose weights
are large and whose computation is short, stay resident and the high-resolution ones stream,
their copies hidden behind long computation; under ``"size"`` (the default) the smallest blocks stay
and the largest stream, the fewest for the bytes.

**Workspaces.** Each estimate is a bound made of the tensors a call holds at its widest point,
from the shape of its input: for the U-Net the skip connections kept for the up path plus the
largest block's working set (a transformer block: its feed-forward GEGLU input and output and
the attention's projections, ~24 feature maps of its width; a ResNet block: 8); for the VAE
decoder the largest ResNet or upsampling step at its resolution; for the encoder the same going
down. They are multiplied by 1.25 for what the estimate leaves out (convolution workspaces,
allocator rounding); on CUDA, a call that still goes past the budget makes the next one keep
room for the difference (:class:`graphsd.memory.ModelManager`).

**Economy.** A U-Net call whose activations would not fit next to the least working set of its
weights runs every transformer block's feed-forward in chunks of tokens (:func:`unet_economy`),
which divides the largest part of a transformer block's working set; attention needs no such
step on the GPU (PyTorch's fused attention does not hold the score matrix).

Importing this module registers :func:`sd_layout` with :func:`graphsd.memory.register_splitter`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from graphsd.memory import Block, Layout, ModelManager, module_nbytes, register_splitter

#: Classes that stream as one block, by name (diffusers' and transformers').
UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D", "CLIPEncoderLayer")
#: Slack on every activation estimate (convolution workspaces, allocator rounding).
SLACK = 1.25
#: Feature maps of a block's width a transformer block / a ResNet block holds at its widest.
TRANSFORMER_MAPS, RESNET_MAPS = 24, 8
#: Of a transformer block's maps, those of its feed-forward (GEGLU's doubled projection, its gated
#: half and the product: 8 + 4 + 4), which running the feed-forward in chunks of tokens divides.
FEED_FORWARD_MAPS = 16
#: Chunks of tokens a transformer block's feed-forward runs in under a budget too tight for it whole.
FEED_FORWARD_CHUNKS = 16


def _units(module: torch.nn.Module, extra: Callable[[str, torch.nn.Module], bool] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The submodules of ``module`` that are units, outermost only, in registration order."""
    found: list[tuple[str, torch.nn.Module]] = []
    inside: str | None = None
    for name, child in module.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if type(child).__name__ in UNITS or (extra is not None and extra(name, child)):
            found.append((name, child))
            inside = name
    return found


def _level(name: str, levels: int) -> int:
    """Resolution level (0 = full) of a U-Net / VAE block from its name."""
    if match := re.search(r"(?:^|\.)down_blocks\.(\d+)", name):
        return int(match[1])
    if match := re.search(r"(?:^|\.)up_blocks\.(\d+)", name):
        return levels - 1 - int(match[1])
    return levels - 1  # mid blocks


def _split_resnets(units: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
    """``units`` with each ResNet block larger than every unit of another kind divided into its
    convolutions (its norms and time projection, small, then stay on the device). The ring holds
    two of the largest unit, so these few ResNets (SD1.5's 1280-channel ones: 92 MB against 63 MB
    for its largest transformer block) would set its size, and every byte of ring is a byte of
    resident weights streamed at every call."""
    others = max((module_nbytes(m) for _, m in units if type(m).__name__ != "ResnetBlock2D"), default=0)
    split: list[tuple[str, torch.nn.Module]] = []
    for name, module in units:
        if type(module).__name__ == "ResnetBlock2D" and others and module_nbytes(module) > others:
            convs = [(f"{name}.{part}", getattr(module, part, None)) for part in ("conv1", "conv2", "conv_shortcut")]
            split.extend((n, m) for n, m in convs if isinstance(m, torch.nn.Module))
        else:
            split.append((name, module))
    return split


def _blocks(units: list[tuple[str, torch.nn.Module]], levels: int | None) -> list[Block]:
    return [Block(name, m, module_nbytes(m), 4.0 ** -_level(name, levels) if levels else 1.0) for name, m in units]


def _element(module: torch.nn.Module) -> int:
    return next(module.parameters()).element_size()


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _maps(height: int, width: int, level: int) -> int:
    """Positions of a feature map ``level`` halvings below ``height`` × ``width``."""
    return -(-height // 2**level) * -(-width // 2**level)


def unet_workspace(unet: torch.nn.Module) -> Callable[[tuple, dict], int]:
    """Activation bytes of one U-Net call, from its ``sample`` (see the module docstring); with
    the feed-forward in chunks (:func:`unet_economy`), its maps divided by the chunks."""
    config = unet.config
    widths = list(config.block_out_channels)
    per_level = config.layers_per_block if isinstance(config.layers_per_block, int) else max(config.layers_per_block)
    element = _element(unet)
    transformers = _transformer_levels(unet)

    def maps(level: int, positions: int) -> float:
        if level not in transformers:
            return RESNET_MAPS
        chunk = transformers[level][0]._chunk_size
        return TRANSFORMER_MAPS - FEED_FORWARD_MAPS + FEED_FORWARD_MAPS * (chunk / positions if chunk else 1)

    def estimate(args: tuple, kwargs: dict) -> int:
        batch, _, height, width = _first(args, kwargs, "sample").shape
        skips = sum((per_level + 1) * c * _maps(height, width, level) for level, c in enumerate(widths))
        widest = max(maps(level, _maps(height, width, level)) * c * _maps(height, width, level) for level, c in enumerate(widths))
        return int(SLACK * batch * element * (skips + widest))

    return estimate


def _transformer_levels(unet: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """The U-Net's transformer blocks by resolution level."""
    levels: dict[int, list[torch.nn.Module]] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock" and hasattr(module, "set_chunk_feed_forward"):
            levels.setdefault(_level(name, len(unet.config.block_out_channels)), []).append(module)
    return levels


def unet_economy(unet: torch.nn.Module) -> Callable[[tuple, dict, bool], bool] | None:
    """The U-Net's economy under a tight budget (:class:`graphsd.memory.Layout`): every
    transformer block's feed-forward runs in :data:`FEED_FORWARD_CHUNKS` chunks of tokens (or the
    most of 8, 4, 2 that divide its level's positions), so it holds that fraction of its
    activations at a time; the attention's are unchanged. diffusers' ``enable_forward_chunking``,
    sized for each call. None for a U-Net without transformer blocks."""
    transformers = _transformer_levels(unet)
    if not transformers:
        return None

    def economy(args: tuple, kwargs: dict, on: bool) -> bool:
        _, _, height, width = _first(args, kwargs, "sample").shape
        chunked = False
        for level, blocks in transformers.items():
            positions = _maps(height, width, level)
            chunks = next(n for n in (FEED_FORWARD_CHUNKS, 8, 4, 2, 1) if positions % n == 0) if on else 1
            for block in blocks:
                block.set_chunk_feed_forward(positions // chunks if chunks > 1 else None, 1)
            chunked |= chunks > 1
        return chunked

    return economy


def decoder_workspace(vae: torch.nn.Module) -> Callable[[tuple, dict], int]:
    """Activation bytes of one VAE decoder call, from its latent ``sample``."""
    widths = list(reversed(vae.config.block_out_channels))
    element = _element(vae)

    def estimate(args: tuple, kwargs: dict) -> int:
        batch, _, height, width = _first(args, kwargs, "sample").shape
        widest = height * width * widths[0] * 3 + (height * width) ** 2  # mid block (attention scores without a fused kernel)
        for i, c in enumerate(widths):
            positions = (height << i) * (width << i)
            c_in = widths[max(i - 1, 0)]
            widest = max(widest, (2 * c_in + 2 * c) * positions)  # ResNet: input, activation, output, shortcut
            if i < len(widths) - 1:
                widest = max(widest, 9 * c * positions)  # upsampling: input, 4x interpolated, 4x convolved
        return int(SLACK * batch * element * widest)

    return estimate


def encoder_workspace(vae: torch.nn.Module) -> Callable[[tuple, dict], int]:
    """Activation bytes of one VAE encoder call, from its pixel ``sample``."""
    widths = list(vae.config.block_out_channels)
    element = _element(vae)

    def estimate(args: tuple, kwargs: dict) -> int:
        batch, _, height, width = _first(args, kwargs, "sample").shape
        widest = max((4 * c + c) * _maps(height, width, level) for level, c in enumerate(widths))
        last = _maps(height, width, len(widths) - 1)
        return int(SLACK * batch * element * (widest + last**2))

    return estimate


def text_workspace(encoder: torch.nn.Module) -> Callable[[tuple, dict], int]:
    """Activation bytes of one CLIP text-encoder call, from its ``input_ids``."""
    config = encoder.config
    element = _element(encoder)

    def estimate(args: tuple, kwargs: dict) -> int:
        batch, tokens = _first(args, kwargs, "input_ids").shape
        per_token = (config.num_hidden_layers + 8) * config.hidden_size + 3 * config.intermediate_size
        return int(SLACK * batch * element * (tokens * per_token + config.num_attention_heads * tokens * tokens))

    return estimate


def _vae_attention(name: str, module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Attention" and ".mid_block.attentions." in f".{name}"


def sd_layout(module: torch.nn.Module) -> Layout | None:
    """The layout of a diffusers U-Net, ControlNet or VAE, or a CLIP text encoder; None for
    anything else (it is then divided by size)."""
    config = getattr(module, "config", None)
    if hasattr(module, "down_blocks") and hasattr(module, "conv_in") and config is not None:
        levels = len(config.block_out_channels)
        units = _split_resnets(_units(module))
        if not hasattr(module, "up_blocks"):
            return Layout(_blocks(units, levels))
        economy = unet_economy(module)
        return Layout(_blocks(units, levels), {"": unet_workspace(module)}, economy={"": economy} if economy else {})
    if hasattr(module, "encoder") and hasattr(module, "decoder") and hasattr(module, "post_quant_conv"):
        levels = len(config.block_out_channels)
        units = _units(module, _vae_attention)
        return Layout(_blocks(units, levels), {"decoder": decoder_workspace(module), "encoder": encoder_workspace(module)})
    text = getattr(module, "text_model", module)  # transformers 5 dropped the text_model level
    if hasattr(text, "embeddings") and hasattr(getattr(text, "encoder", None), "layers") and config is not None:
        return Layout(_blocks(_units(module), None), {"": text_workspace(module)})
    return None


def decode_tile(models: ModelManager, key: str, latent_shape: tuple[int, ...]) -> int | None:
    """The latent tile edge for decoding ``latent_shape`` with the VAE ``key`` within what the
    VRAM budget leaves it, or None when the whole frame fits (or there is no budget): the largest
    multiple of 8 up to 64 (512 pixels, diffusers' tile) whose decode, plus what earlier decodes
    needed beyond the estimate, fits next to the VAE's weights (all of them, or the least it
    streams with); 8 when none does (placing the VAE then names the minimum budget). The VAE's
    activation reservation is set to what the chosen decode needs, so a smaller decode after a
    larger one is placed for its own size."""
    batch, channels, height, width = latent_shape
    return _tile(models, key, decoder_workspace, lambda h, w: (batch, channels, h, w), height, width)


def encode_tile(models: ModelManager, key: str, pixel_shape: tuple[int, ...], down: int) -> int | None:
    """The same for encoding pixels of ``pixel_shape`` (``[batch, channels, height, width]``, sides
    multiples of the VAE's downscale ``down``): the tile edge in latent cells (``× down`` pixels),
    or None when the whole frame's encode fits."""
    batch, channels, height, width = pixel_shape
    return _tile(models, key, encoder_workspace, lambda h, w: (batch, channels, h * down, w * down), height // down, width // down)


def _tile(
    models: ModelManager,
    key: str,
    workspace: Callable[[torch.nn.Module], Callable[[tuple, dict], int]],
    call_shape: Callable[[int, int], tuple[int, ...]],
    height: int,
    width: int,
) -> int | None:
    """:func:`decode_tile` / :func:`encode_tile` for a frame of ``height`` × ``width`` latent cells,
    whose call on a tile of h × w cells takes an input of ``call_shape(h, w)``."""
    room = models.room(key)
    if room is None:
        return None
    vae = models.get(key)
    estimate = workspace(vae)
    weights = (module_nbytes(vae), models.minimum_bytes(key))
    overshoot = models.overshoot(key)  # what earlier calls needed beyond the estimate

    def need(h: int, w: int) -> int:
        return estimate((torch.empty(*call_shape(h, w), device="meta"),), {})

    def fits(h: int, w: int) -> bool:
        return any(nbytes + need(h, w) + overshoot <= room for nbytes in weights)

    tile: int | None = None
    if not fits(height, width):
        tiles = range(min(64, max(height, width)) // 8 * 8, 8, -8)
        tile = next((t for t in tiles if fits(min(t, height), min(t, width))), 8)
    # the calls need this much, whatever a larger call before needed
    models.expect(key, need(height, width) if tile is None else need(min(tile, height), min(tile, width)))
    return tile


register_splitter(sd_layout)
