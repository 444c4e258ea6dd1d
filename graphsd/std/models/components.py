"""Files that hold one component of a Stable Diffusion model, as ComfyUI's VAELoader, UNETLoader,
CLIPLoader and DualCLIPLoader read them: a VAE, a U-Net or a text encoder alone.

Each is read in the layout it comes in, with any prefix in front of its names (a whole
checkpoint's ``first_stage_model.`` or ``model.diffusion_model.``, ComfyUI's ``clip_l.``, ...):

- **VAE**: the original LDM layout (``encoder.down.0.block.0...``, ``vae-ft-mse-840000``,
  ``sdxl_vae.safetensors``) or diffusers' (``encoder.down_blocks.0.resnets.0...``, also with the
  old attention names ``query`` / ``key`` / ``value`` / ``proj_attn``). Only the KL VAEs of SD1,
  SD2 and SDXL (4 latent channels) are read; 16-channel VAEs (SD3, Flux) are refused by name.
- **U-Net**: the LDM layout (``input_blocks.0.0.weight``, what ComfyUI's ``unet/`` and
  ``diffusion_models/`` folders hold for SD models) or diffusers' (``conv_in.weight``,
  ``down_blocks.0...``), of SD1.x, SD2.x or SDXL; transformer diffusion models (Flux, SD3,
  PixArt, ...) are refused by name.
- **Text encoder**: Hugging Face's CLIP layout (``text_model.encoder.layers.0...``, ComfyUI's
  ``clip_l.safetensors`` / ``clip_g.safetensors``) or OpenCLIP's (``transformer.resblocks.0...``
  with fused attention, as in SD2 and SDXL checkpoints); T5, Llama and other encoders are
  refused by name.

The family follows from the widths of the released models: a text encoder 1024 wide is SD2's
OpenCLIP ViT-H, 1280 wide SDXL's OpenCLIP ViT-bigG, any other one CLIP ViT-L (SD1, and SDXL's
first encoder); a U-Net attending to 1024-wide text is SD2's, one with SDXL's added conditioning
(``label_emb``) is SDXL's, any other SD1's. The configs are the bundled ones of that family with
every size the tensors reveal, as for single-file checkpoints
(:mod:`graphsd.std.models.single_file`, whose key tables and module builders are used here);
what shapes cannot tell (attention heads, norm groups) is the family's. A VAE file does not say
which latent space it belongs to: its latent scale is chosen by the caller (:data:`VAE_SCALES`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from graphsd.std.models.family import Family
from graphsd.std.models.formats import ModelFileError, read_weights
from graphsd.std.models.single_file import (
    OPEN_CLIP,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    _build_diffusers,
    _build_text,
    _check_vocabulary,
    _derive,
    _indices,
    _to_file,
    _tokenizer,
    bundled_config,
    derive_text_config,
    derive_unet_config,
    derive_vae_config,
    describe_keys,
    open_clip_rule,
    unet_rule,
    vae_rule,
)

#: Latent scaling factor of the VAE of each latent space (SD1.x and SD2.x share one).
VAE_SCALES = {"sd": 0.18215, "sdxl": 0.13025}
#: The latent channels of every SD-family VAE and U-Net.
LATENT_CHANNELS = 4
#: SDXL's added conditioning: each size / crop / score number is Fourier-embedded this wide, and
#: the pooled text embedding (OpenCLIP bigG's projection) is this wide.
SDXL_TIME_EMBED, SDXL_POOLED = 256, 1280
#: Width of SDXL's second text encoder, OpenCLIP ViT-bigG (CLIP-G).
CLIP_G_WIDTH = 1280
#: Text-encoder widths of the released models → (family, role).
TEXT_WIDTHS: dict[int, tuple[Family, str]] = {1024: ("sd2", "text_encoder"), CLIP_G_WIDTH: ("sdxl", "text_encoder_2")}
#: Names that mark another model family's file: (key fragment, what it is).
FOREIGN = (
    ("double_blocks.", "a Flux diffusion model"),
    ("joint_blocks.", "an SD3 diffusion model"),
    ("transformer_blocks.0.attn.add_q_proj", "an SD3 / Flux diffusion model (diffusers layout)"),
    ("x_embedder.", "a DiT-style diffusion model (PixArt, SD3, Flux, ...)"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder"),
    ("model.layers.0.self_attn", "an LLM text encoder (Llama, Qwen, Gemma, ...)"),
)
#: diffusers' old names of the VAE's mid-block attention layers → the current ones.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _within(tensors: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor] | None:
    """The tensors under the prefix in front of ``marker`` (a key every file of the layout has),
    with that prefix removed; None when no key ends with ``marker``."""
    found = next((k for k in tensors if k == marker or k.endswith("." + marker)), None)
    if found is None:
        return None
    prefix = found[: len(found) - len(marker)]
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _foreign(tensors: dict[str, Any]) -> str | None:
    for fragment, what in FOREIGN:
        if any(fragment in k for k in tensors):
            return what
    return None


def _not_this(path: Path, tensors: dict[str, Any], expected: str, field: str) -> ModelFileError:
    what = _foreign(tensors)
    found = f"it looks like {what}" if what else f"it holds {describe_keys(tensors)}"
    return ModelFileError(f"'{path.name}' is not {expected}: {found}", field=field)


def read(path: Path, allow_pickle: bool, field: str) -> dict[str, torch.Tensor]:
    """The tensors of a component file (pickle files only when allowed)."""
    return read_weights(path, allow_pickle, field=field)[0]


# ---- VAE ---------------------------------------------------------------------------------------
def load_vae(path: Path, dtype: torch.dtype, allow_pickle: bool, field: str = "vae_name") -> Any:
    """An ``AutoencoderKL`` from a VAE file in the LDM or the diffusers layout."""
    from diffusers import AutoencoderKL

    tensors = read(path, allow_pickle, field)
    ldm = _within(tensors, "encoder.down.0.block.0.conv1.weight")
    diffusers = _within(tensors, "encoder.down_blocks.0.resnets.0.conv1.weight")
    vae = ldm if ldm is not None else diffusers
    if vae is None:
        raise _not_this(path, tensors, "a VAE of Stable Diffusion 1.x / 2.x / XL", field)
    latent = vae.get("decoder.conv_in.weight")
    if latent is not None and latent.shape[1] != LATENT_CHANNELS:
        raise ModelFileError(
            f"'{path.name}' is a VAE with {latent.shape[1]} latent channels (SD3 and Flux use 16): graphsd runs the "
            f"{LATENT_CHANNELS}-channel VAEs of Stable Diffusion 1.x / 2.x / XL",
            field=field,
        )
    if ldm is not None:
        try:
            config = _derive(derive_vae_config, "", "sd1", ldm)
            return _build_diffusers(AutoencoderKL, config, vae_rule(config), {VAE_PREFIX + k: v for k, v in ldm.items()}, dtype, "VAE")
        except ModelFileError as exc:
            raise ModelFileError(f"'{path.name}': {exc}", field=field) from None
    state = {_new_attention_name(k): v for k, v in vae.items()}
    return _build_state(AutoencoderKL, _diffusers_vae_config(path, state, field), state, dtype, path, field)


def _new_attention_name(key: str) -> str:
    match = re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)(\.weight|\.bias)", key)
    return f"{match[1]}{_OLD_VAE_ATTENTION[match[2]]}{match[3]}" if match else key


def _diffusers_vae_config(path: Path, vae: dict[str, torch.Tensor], field: str) -> dict[str, Any]:
    """The bundled VAE config with the sizes of a diffusers-layout VAE's tensors."""
    config = bundled_config("sd1", "vae")
    levels = _indices(vae, r"encoder\.down_blocks\.(\d+)\.")
    try:
        config.update(
            in_channels=vae["encoder.conv_in.weight"].shape[1],
            out_channels=vae["decoder.conv_out.weight"].shape[0],
            latent_channels=vae["post_quant_conv.weight"].shape[0],
            block_out_channels=[vae[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in levels],
            layers_per_block=len(_indices(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
            down_block_types=["DownEncoderBlock2D"] * len(levels),
            up_block_types=["UpDecoderBlock2D"] * len(levels),
        )
    except KeyError as exc:
        raise ModelFileError(f"'{path.name}': unrecognised VAE layout, {exc.args[0]} is missing", field=field) from None
    if "encoder.mid_block.attentions.0.to_q.weight" not in vae:
        config["mid_block_add_attention"] = False
    return config


def _build_state(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, path: Path, field: str) -> Any:
    """A diffusers model from ``config``, filled with ``state`` (its own names), strictly."""
    with torch.device("meta"):
        module = cls.from_config(config)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
            [f"unexpected shape of {', '.join(wrong[:5])}"] if wrong else []
        )
        raise ModelFileError(f"'{path.name}' does not have the expected layout: {'; '.join(problems)}", field=field)
    module.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=True, assign=True)
    return module


# ---- U-Net -------------------------------------------------------------------------------------
def load_unet(path: Path, dtype: torch.dtype, allow_pickle: bool, field: str = "unet_name") -> tuple[Any, Family]:
    """A ``UNet2DConditionModel`` and its family from a U-Net file in the LDM or the diffusers
    layout (SD1.x, SD2.x, SDXL base or refiner)."""
    from diffusers import UNet2DConditionModel

    tensors = read(path, allow_pickle, field)
    unet = _within(tensors, "input_blocks.0.0.weight")
    if unet is None and (diffusers := _within(tensors, "time_embedding.linear_1.weight")) is not None:
        unet = _diffusers_unet_to_ldm(diffusers, path, field)
    if unet is None or _foreign(tensors):
        raise _not_this(path, tensors, "a U-Net of Stable Diffusion 1.x / 2.x / XL", field)
    to_k = next((v for k, v in unet.items() if k.endswith("attn2.to_k.weight")), None)
    context = to_k.shape[1] if to_k is not None else None
    family: Family = "sdxl" if "label_emb.0.0.weight" in unet else "sd2" if context == 1024 else "sd1"
    pooled = None
    if family == "sdxl":
        ids = 6 if context == 2048 else 5  # the base model's sizes and crop; the refiner's score instead of the size
        pooled = unet["label_emb.0.0.weight"].shape[1] - ids * SDXL_TIME_EMBED
        if pooled != SDXL_POOLED:
            raise ModelFileError(
                f"'{path.name}' is an SDXL-style U-Net whose added conditioning is not SDXL's ({ids} numbers "
                f"{SDXL_TIME_EMBED} wide beside a {SDXL_POOLED}-wide pooled text embedding): its layout cannot be told "
                "from the file; load the whole model's diffusers folder or checkpoint instead",
                field=field,
            )
    try:
        config = _derive(derive_unet_config, "", family, unet, pooled)
        if family == "sdxl":
            config["addition_time_embed_dim"] = SDXL_TIME_EMBED
        tensors = {UNET_PREFIX + k: v for k, v in unet.items()}
        return _build_diffusers(UNet2DConditionModel, config, unet_rule(config), tensors, dtype, "U-Net"), family
    except ModelFileError as exc:
        raise ModelFileError(f"'{path.name}': {exc}", field=field) from None


def _diffusers_unet_to_ldm(unet: dict[str, torch.Tensor], path: Path, field: str) -> dict[str, torch.Tensor]:
    """A diffusers-layout U-Net's tensors under their LDM names (the block layout, all that the
    name table needs, read from which blocks hold attention layers and how many resnets)."""
    levels = _indices(unet, r"down_blocks\.(\d+)\.")
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in unet) for i in levels]
    layout = {
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": len(_indices(unet, r"down_blocks\.0\.resnets\.(\d+)\.")),
    }
    rule = unet_rule(layout)
    try:
        return {rule(k)[0][len(UNET_PREFIX) :]: v for k, v in unet.items()}
    except KeyError as exc:
        raise ModelFileError(f"'{path.name}': unrecognised U-Net layout ({exc.args[0]})", field=field) from None


# ---- text encoders -------------------------------------------------------------------------------
def text_encoder_kind(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool, int] | None:
    """(the encoder's tensors under the names of its layout, whether it is OpenCLIP's layout, its
    width), or None for a file holding no CLIP text encoder."""
    hf = _within(tensors, "embeddings.token_embedding.weight")
    if hf is not None:
        projection = next((v for k, v in tensors.items() if k.endswith("text_projection.weight")), None)
        if projection is not None:
            hf["text_projection.weight"] = projection
        return hf, False, hf["embeddings.token_embedding.weight"].shape[1]
    open_clip = _within(tensors, "token_embedding.weight")
    if open_clip is not None and "positional_embedding" in open_clip:
        return open_clip, True, open_clip["token_embedding.weight"].shape[1]
    return None


def text_encoder_layout(path: Path, allow_pickle: bool, field: str = "clip_name") -> tuple[int, bool]:
    """(width, whether it is OpenCLIP's layout) of a text-encoder file, read from the header of a
    .safetensors file (no tensor is loaded)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception:  # missing, empty or damaged: read_weights says which, naming the file
            read_weights(path, allow_pickle=False, field=field)
            raise
    else:
        shapes = {k: list(v.shape) for k, v in read(path, allow_pickle, field).items()}
    hf = next((k for k in shapes if k.endswith("embeddings.token_embedding.weight")), None)
    open_clip = next((k for k in shapes if k.endswith("token_embedding.weight")), None)
    positional = any(k.endswith("positional_embedding") for k in shapes)
    key = hf or (open_clip if positional else None)
    if key is None or _foreign(shapes):
        raise _not_this(path, shapes, "a CLIP text encoder of Stable Diffusion 1.x / 2.x / XL", field)
    return int(shapes[key][1]), hf is None


def default_slot(width: int, open_clip: bool) -> tuple[Family, str]:
    """(family, role) of a text encoder of ``width`` (see the module docstring)."""
    return TEXT_WIDTHS.get(width, ("sd2", "text_encoder") if open_clip else ("sd1", "text_encoder"))


def load_text_encoder(path: Path, slot: tuple[Family, str], dtype: torch.dtype, allow_pickle: bool, field: str = "clip_name") -> Any:
    """The text encoder of a file as the ``slot`` (family, role) it fills: CLIP ViT-L for SD1 and
    SDXL's ``text_encoder``, OpenCLIP for SD2 and SDXL's ``text_encoder_2`` (either layout)."""
    tensors = read(path, allow_pickle, field)
    kind = text_encoder_kind(tensors)
    if kind is None or _foreign(tensors):
        raise _not_this(path, tensors, "a CLIP text encoder of Stable Diffusion 1.x / 2.x / XL", field)
    text, open_clip, width = kind
    family, role = slot
    needs_open_clip = slot in OPEN_CLIP
    if open_clip and not needs_open_clip:
        raise ModelFileError(
            f"'{path.name}' is an OpenCLIP text encoder ({width} wide), not the CLIP ViT-L that {family}'s {role} is", field=field
        )
    try:
        if needs_open_clip and not open_clip:
            text = _to_file({k: v for k, v in text.items() if not k.endswith("position_ids")}, open_clip_rule(""))
        config = derive_text_config(family, role, text)
    except KeyError as exc:
        raise ModelFileError(
            f"'{path.name}': unrecognised text-encoder layout, {exc.args[0]} is missing or unexpected", field=field
        ) from None
    if role == "text_encoder_2" and "text_projection" not in text:
        raise ModelFileError(f"'{path.name}' has no text projection, which SDXL's second text encoder (CLIP-G) has", field=field)
    prefix = TEXT_PREFIXES[slot]
    try:
        return _build_text(family, role, config, {prefix + k: v for k, v in text.items()}, dtype)
    except ModelFileError as exc:
        raise ModelFileError(f"'{path.name}': {exc}", field=field) from None


def pad_token(family: Family, role: str) -> str | None:
    """The pad token of a text encoder's tokenizer: ``!`` for OpenCLIP's (it pads with id 0),
    the tokenizer's own (end of text) for CLIP ViT-L's."""
    return "!" if (family, role) in OPEN_CLIP else None


def tokenizer(pad: str | None) -> Any:
    """The shipped CLIP tokenizer, padding with ``pad`` (its own pad token when None)."""
    return _tokenizer(pad)


def check_vocabulary(role: str, tok: Any, encoder: Any) -> None:
    """Refuse a text encoder whose vocabulary is not CLIP's (the shipped tokenizer would give
    ids it does not have)."""
    _check_vocabulary(role, tok, encoder, stored=False)
