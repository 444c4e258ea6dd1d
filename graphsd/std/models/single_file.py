"""Single-file Stable Diffusion checkpoints (the original LDM layout) ⇄ diffusers modules.

A single-file checkpoint holds every component under one prefix per component::

    model.diffusion_model.*                  U-Net (openaimodel layout: input/middle/output blocks)
    first_stage_model.*                      VAE (encoder.down.N.block.M, mid.attn_1, ...)
    cond_stage_model.transformer.text_model.*  SD1: CLIP ViT-L, Hugging Face key names
    cond_stage_model.model.*                 SD2: OpenCLIP ViT-H (fused attention in_proj)
    conditioner.embedders.0.transformer.text_model.*  SDXL: CLIP ViT-L
    conditioner.embedders.1.model.*          SDXL: OpenCLIP ViT-bigG (+ text_projection)

:func:`load_single_file` detects the family from those prefixes (:func:`layout_family`), builds
the diffusers / transformers modules from the bundled diffusers-layout configs in
``graphsd/std/data/configs/<family>/`` (real SD1.5, SD2.1 768-v and SDXL-base configs) with
every size that the tensors reveal (channels, layers, context width, transformer depth, ...)
taken from the file, so small models load as well as real ones. Files written by
:func:`save_single_file` also carry the exact diffusers configs in the safetensors metadata (key
``graphsd``), which restores what shapes cannot tell (attention heads, norm groups, scheduler),
and, under ``graphsd.tokenizer``, the tokenizer files of a text encoder whose vocabulary is not
the standard CLIP one (a single file otherwise gets the shipped CLIP tokenizer, which only fits a
49,408-token text encoder).

The key mapping is one table per component, built from the diffusers config; the same table
serves both directions (the U-Net's, :func:`graphsd.std.models.ldm_layout.unet_module_map`, also
matches LoRA files that use the LDM names). Facts of the format follow diffusers'
``loaders/single_file_utils.py`` (the reference these conversions are tested against) and the
CompVis ``ldm`` / Stability ``sgm`` module names.

Safety: ``.safetensors`` always; pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only
when allowed, and then only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from graphsd.paths import write_atomic
from graphsd.std.models.family import Family
from graphsd.std.models.formats import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, ModelFileError, read_weights
from graphsd.std.models.ldm_layout import unet_module_map

#: The families a single file can hold.
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"
METADATA_KEY = "graphsd"
#: Metadata key of the tokenizers that are not the standard CLIP one: a JSON object
#: role (``tokenizer`` / ``tokenizer_2``) → {file name → text of that file, as the tokenizer's
#: ``save_pretrained`` writes it (``tokenizer.json``: vocabulary, merges, special tokens;
#: ``tokenizer_config.json``)}.
TOKENIZER_KEY = "graphsd.tokenizer"
#: The tokenizer files that may be stored (and written back on load), nothing else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: (family, role) -> prefix of that text encoder in the file.
TEXT_PREFIXES = {
    ("sd1", "text_encoder"): "cond_stage_model.transformer.text_model.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.text_model.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
#: Text encoders stored in OpenCLIP's own layout (the others use Hugging Face names).
OPEN_CLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}
#: OpenCLIP ViT-H/14 has 24 layers; SD2 reads the penultimate one, so diffusers' SD2 text
#: encoder keeps 23 (``num_hidden_layers: 23``) and the last layer of the file is unused.
OPEN_CLIP_H_LAYERS = 24

#: A rule says where a diffusers tensor lives in the file and how it is stored there:
#: "" as is, "T" transposed, "conv" as a 1×1 convolution, "q"/"k"/"v" a third of a fused in_proj.
Rule = tuple[str, str]


# ---- key tables ------------------------------------------------------------------------------

_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}


def vae_module_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module path -> LDM module path for an ``AutoencoderKL`` config. The decoder's
    up blocks run in the opposite order of LDM's ``decoder.up`` list."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    table = dict(_VAE_TOP)

    def resnet(diffusers: str, ldm: str) -> None:
        table[diffusers] = ldm
        table[f"{diffusers}.conv_shortcut"] = f"{ldm}.nin_shortcut"

    for i in range(levels):
        for j in range(per):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        up = levels - 1 - i
        for j in range(per + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}")
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        for a, b in _VAE_ATTENTION.items():
            table[f"{part}.mid_block.attentions.0.{a}"] = f"{part}.mid.attn_1.{b}"
    return table


def _rename(key: str, table: dict[str, str]) -> str:
    """Replace the longest leading module path of ``key`` found in ``table``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    raise KeyError(f"no single-file name for {key!r}")


def unet_rule(config: dict[str, Any]) -> Callable[[str], Rule]:
    _layers_per_block(config)
    table = unet_module_map(config)
    if config.get("class_embed_type") == "projection":  # SD2.1-unCLIP keeps it where SDXL keeps its added embedding
        table.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})
    return lambda key: (UNET_PREFIX + _rename(key, table), "")


def vae_rule(config: dict[str, Any]) -> Callable[[str], Rule]:
    table = vae_module_map(config)
    linear = tuple(f"attentions.0.{a}.weight" for a in ("to_q", "to_k", "to_v", "to_out.0"))
    return lambda key: (VAE_PREFIX + _rename(key, table), "conv" if key.endswith(linear) else "")


def clip_rule(prefix: str) -> Callable[[str], Rule]:
    """Hugging Face CLIP names (the ``text_model.`` level is absent in recent transformers'
    ``CLIPTextModel`` and present in the file)."""
    return lambda key: (prefix + key.removeprefix("text_model."), "")


def open_clip_rule(prefix: str) -> Callable[[str], Rule]:
    """OpenCLIP names: ``transformer.resblocks.N`` with q, k, v fused into ``attn.in_proj_*``
    (rows ordered q, k, v) and ``text_projection`` stored as ``[width, proj]`` (x @ P)."""

    def rule(key: str) -> Rule:
        key = key.removeprefix("text_model.")
        if key in _OPEN_CLIP_TOP:
            return prefix + _OPEN_CLIP_TOP[key], "T" if key == "text_projection.weight" else ""
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match is None:
            raise KeyError(f"no single-file name for {key!r}")
        layer, module, param = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        if module in _OPEN_CLIP_QKV:
            return f"{block}attn.in_proj_{param}", _OPEN_CLIP_QKV[module]
        return f"{block}{_OPEN_CLIP_LAYER[module]}.{param}", ""

    return rule


def text_rule(family: str, role: str) -> Callable[[str], Rule]:
    prefix = TEXT_PREFIXES[(family, role)]
    return open_clip_rule(prefix) if (family, role) in OPEN_CLIP else clip_rule(prefix)


def _from_file(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how == "T":
        return tensor.T.contiguous()
    if how == "conv":
        return tensor.reshape(tensor.shape[0], -1) if tensor.ndim == 4 else tensor
    if how in ("q", "k", "v"):
        return tensor.chunk(3, dim=0)["qkv".index(how)].contiguous()
    return tensor


# ---- reading ---------------------------------------------------------------------------------


def read_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint file and its safetensors metadata (empty for pickles), read
    by :func:`~graphsd.std.models.formats.read_weights`."""
    path = Path(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelFileError(
            f"{path.name}: unknown checkpoint format {path.suffix.lower()!r}; use a .safetensors file "
            f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle)",
            field="path",
        )
    return read_weights(path, allow_pickle, field="path")


def layout_family(tensors: dict[str, torch.Tensor]) -> Family:
    """The family whose layout a checkpoint uses: ``sd1``, ``sd2`` or ``sdxl`` from the text
    encoders' prefixes (the U-Net and the VAE must be present too); a clear error naming what
    the file holds otherwise. It decides how the file is read, and it is the loaded model's
    family even where the widths are not the released ones (small test models)."""
    has = lambda prefix: any(k.startswith(prefix) for k in tensors)  # noqa: E731
    family: Family
    if has("conditioner.embedders.1.model.") and has(TEXT_PREFIXES[("sdxl", "text_encoder")]):
        family = "sdxl"
    elif has(TEXT_PREFIXES[("sd2", "text_encoder")]):
        family = "sd2"
    elif has(TEXT_PREFIXES[("sd1", "text_encoder")]):
        family = "sd1"
    elif has("conditioner.embedders.0.model."):
        raise ModelFileError(
            "this is an SDXL refiner checkpoint (one OpenCLIP text encoder under conditioner.embedders.0.model.*); "
            "single-file refiners are not supported, load the refiner's diffusers folder instead",
            field="path",
        )
    else:
        raise ModelFileError(
            "not a Stable Diffusion 1.x / 2.x / XL single-file checkpoint: found no text encoder "
            "(cond_stage_model.transformer.text_model.*, cond_stage_model.model.* or "
            f"conditioner.embedders.0/1.*). The file holds {describe_keys(tensors)}",
            field="path",
        )
    missing = [p for p in (UNET_PREFIX, VAE_PREFIX) if not has(p)]
    if missing:
        raise ModelFileError(
            f"looks like an {family} checkpoint but has no {' and no '.join(p + '*' for p in missing)} "
            f"tensors; a complete checkpoint is needed. The file holds {describe_keys(tensors)}",
            field="path",
        )
    return family


def describe_keys(tensors: dict[str, Any], limit: int = 6) -> str:
    """``N tensors, mostly under a.b (n), c.d (m), ...`` for error messages."""
    if not tensors:
        return "no tensors"
    heads = Counter(".".join(k.split(".")[:2]) for k in tensors)
    listed = ", ".join(f"{h}.* ({n})" for h, n in heads.most_common(limit))
    return f"{len(tensors)} tensors, under {listed}"


# ---- configs ---------------------------------------------------------------------------------


def bundled_config(family: str, component: str) -> dict[str, Any]:
    """The bundled diffusers config of ``component`` (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``scheduler``) for ``family``."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((CONFIGS_DIR / family / component / name).read_text())


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _indices(keys: Any, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _layers_per_block(config: dict[str, Any]) -> int:
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ModelFileError("U-Nets with a different number of layers per block are not supported in single files")
    return per


def _heads(family: str, channels: list[int]) -> int | list[int]:
    """Attention heads (diffusers' ``attention_head_dim`` holds the head count for these
    families): SD1 uses 8 heads everywhere, SD2 and SDXL 64-wide heads (one head when the
    width is not a multiple of 64, e.g. in small test models)."""
    if family == "sd1":
        return 8
    return [c // 64 if c % 64 == 0 else 1 for c in channels]


def derive_unet_config(family: str, unet: dict[str, torch.Tensor], pooled_dim: int | None) -> dict[str, Any]:
    """The family's U-Net config with the sizes read from the tensors (``unet`` without prefix)."""
    config = bundled_config(family, "unet")
    inputs = _indices(unet, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downsamplers) + 1
    per, rest = divmod(len(inputs) - 1 - len(downsamplers), levels)
    if rest or per < 1 or "input_blocks.0.0.weight" not in unet:
        raise ModelFileError(f"unrecognised U-Net layout: {len(inputs)} input blocks for {levels} levels", field="path")
    first = [1 + b * (per + 1) for b in range(levels)]
    channels = [unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first]
    depth = [len(_indices(unet, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in first]
    to_k = next((v for k, v in unet.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in unet.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise ModelFileError("unrecognised U-Net layout: it has no cross-attention (attn2) layers", field="path")
    config.update(
        in_channels=unet["input_blocks.0.0.weight"].shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=to_k.shape[1],
        attention_head_dim=_heads(family, channels),
    )
    if (proj_in.ndim == 2) != config.get("use_linear_projection", False):  # SD1's config omits it
        config["use_linear_projection"] = proj_in.ndim == 2
    if any(d != 1 for d in depth) or "transformer_layers_per_block" in config:
        config["transformer_layers_per_block"] = depth if any(d != 1 for d in depth) else 1
    if "label_emb.0.0.weight" in unet:
        projection_in = unet["label_emb.0.0.weight"].shape[1]
        config["projection_class_embeddings_input_dim"] = projection_in
        if family == "sdxl" and pooled_dim is not None:
            # SDXL's added conditioning: pooled text embedding + 6 Fourier-embedded size/crop ids
            config["addition_time_embed_dim"] = (projection_in - pooled_dim) // 6
        elif family != "sdxl":
            # SD2.1-unCLIP: the class labels (noise-augmented image embedding + noise level) through a projection
            config["class_embed_type"] = "projection"
    return config


def derive_vae_config(family: str, vae: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The family's VAE config with the sizes read from the tensors (``vae`` without prefix)."""
    config = bundled_config(family, "vae")
    levels = _indices(vae, r"encoder\.down\.(\d+)\.")
    if not levels or "post_quant_conv.weight" not in vae:
        raise ModelFileError("unrecognised VAE layout (no encoder.down.* / post_quant_conv)", field="path")
    per = len(_indices(vae, r"encoder\.down\.0\.block\.(\d+)\."))
    config.update(
        in_channels=vae["encoder.conv_in.weight"].shape[1],
        out_channels=vae["decoder.conv_out.weight"].shape[0],
        latent_channels=vae["post_quant_conv.weight"].shape[0],
        block_out_channels=[vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels],
        layers_per_block=per,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )
    if "encoder.mid.attn_1.q.weight" not in vae:
        config["mid_block_add_attention"] = False
    return config


def derive_text_config(family: str, role: str, text: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The family's text-encoder config with the sizes read from the tensors (without prefix).
    Heads are 64 wide in every CLIP that SD uses (one head for widths not a multiple of 64)."""
    config = bundled_config(family, role)
    if (family, role) in OPEN_CLIP:
        tokens, positions = text["token_embedding.weight"], text["positional_embedding"]
        layers = len(_indices(text, r"transformer\.resblocks\.(\d+)\."))
        intermediate = text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        if family == "sd2" and layers == OPEN_CLIP_H_LAYERS:
            layers -= 1
        if "text_projection" in text and role == "text_encoder_2":
            config["projection_dim"] = text["text_projection"].shape[1]
    else:
        tokens = text["embeddings.token_embedding.weight"]
        positions = text["embeddings.position_embedding.weight"]
        layers = len(_indices(text, r"encoder\.layers\.(\d+)\."))
        intermediate = text["encoder.layers.0.mlp.fc1.weight"].shape[0]
    width = tokens.shape[1]
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=width,
        max_position_embeddings=positions.shape[0],
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=width // 64 if width % 64 == 0 else 1,
    )
    return config


# ---- building modules ------------------------------------------------------------------------


def _load_into(module: torch.nn.Module, rule: Callable[[str], Rule], tensors: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """Fill ``module``'s state dict from the file's tensors through ``rule`` (strict), as
    ``dtype``; a module built on the meta device takes the tensors themselves (``assign``)."""
    state, missing, wrong = {}, [], []
    targets = module.state_dict()
    for key, target in targets.items():
        name, how = rule(key)
        if name not in tensors:
            missing.append(name)
            continue
        value = _from_file(tensors[name], how)
        if value.shape != target.shape:
            wrong.append(f"{name} {tuple(value.shape)} (expected {tuple(target.shape)})")
        state[key] = value.to(dtype)
    if missing or wrong:
        problems = [f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []
        problems += [f"unexpected shape of {', '.join(wrong[:5])}"] if wrong else []
        raise ModelFileError(f"the {what} in this checkpoint does not have the expected layout: {'; '.join(problems)}", field="path")
    module.load_state_dict(state, strict=True, assign=any(t.is_meta for t in targets.values()))


def _build_diffusers(cls: type, config: dict[str, Any], rule: Callable[[str], Rule], tensors: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> torch.nn.Module:
    """A diffusers model from ``config`` without random initialisation (built on the meta
    device; these models hold no non-persistent buffers), then filled from the file."""
    with torch.device("meta"):
        module = cls.from_config(config)
    _load_into(module, rule, tensors, dtype, what)
    return module


def _build_text(family: str, role: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if role == "text_encoder_2" else CLIPTextModel
    text_config = CLIPTextConfig.from_dict(config)
    text_config.dtype = dtype
    module = cls(text_config).to(dtype)
    _load_into(module, text_rule(family, role), tensors, dtype, role.replace("_", " "))
    return module


@functools.lru_cache(maxsize=2)
def _tokenizer(pad_token: str | None = None) -> Any:
    """The shipped CLIP tokenizer, with ``pad_token`` (SDXL's second tokenizer pads with "!"),
    read once per process and shared (graphsd only reads tokenizers)."""
    from transformers import CLIPTokenizer

    from graphsd.std.text.tokenizer import clip_tokenizer_dir

    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True, **extra)


def _stored_tokenizer(files: Any) -> Any:
    """A CLIP tokenizer from the files :func:`tokenizer_files` stored (only names of
    :data:`TOKENIZER_FILES`, written to a temporary folder and read from there)."""
    import tempfile

    from transformers import CLIPTokenizer

    if not (isinstance(files, dict) and files and all(n in TOKENIZER_FILES and isinstance(t, str) for n, t in files.items())):
        raise ModelFileError(f"the file's {TOKENIZER_KEY!r} metadata is damaged: it must map {', '.join(TOKENIZER_FILES)} "
                        "to their text; re-save the model", field="path")
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        try:
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable stored tokenizer is the same error
            raise ModelFileError(f"the tokenizer stored in the file's {TOKENIZER_KEY!r} metadata cannot be read ({exc}); "
                            "re-save the model", field="path") from None


def _check_vocabulary(role: str, tokenizer: Any, encoder: torch.nn.Module, stored: bool) -> None:
    """The tokenizer must only give ids the text encoder has: a stored tokenizer at most
    ``vocab_size`` tokens; without one, the encoder's vocabulary must be the standard CLIP
    one (the file does not say which other tokenizer it was trained with)."""
    from graphsd.std.text.tokenizer import VOCAB_SIZE

    vocab = encoder.config.vocab_size
    if stored and len(tokenizer) > vocab:
        raise ModelFileError(f"the {role} stored in this file has {len(tokenizer)} tokens but the text encoder only "
                        f"{vocab}: the file is inconsistent; re-save the model", field="path")
    if not stored and vocab != VOCAB_SIZE:
        raise ModelFileError(
            f"the text encoder of this file has a {vocab}-token vocabulary, not the {VOCAB_SIZE} tokens of the CLIP "
            f"tokenizer, and the file carries no tokenizer of its own (metadata {TOKENIZER_KEY!r}): its prompts "
            "cannot be encoded. Load the model from its diffusers folder (with its tokenizer/), or save it again "
            "with CheckpointSave, which stores such a tokenizer in the file", field="path")


def _json_metadata(metadata: dict[str, str], key: str) -> dict[str, Any]:
    """What :func:`save_single_file` stored as JSON under ``key`` of the file's metadata, if any
    (the diffusers configs under :data:`METADATA_KEY`, tokenizers under :data:`TOKENIZER_KEY`)."""
    text = metadata.get(key)
    if not text:
        return {}
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"the file's {key!r} metadata is not valid JSON ({exc})", field="path") from exc
    return stored if isinstance(stored, dict) else {}


def load_single_file(path: Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> dict[str, Any]:
    """Load a single-file SD1 / SD2 / SDXL checkpoint as diffusers / transformers modules.

    Returns ``{"family", "unet", "vae", "text_encoder", ["text_encoder_2"], "tokenizer",
    ["tokenizer_2"], "scheduler_config"}``. Works offline: configs come from the file's
    ``graphsd`` metadata when present, else from the bundled family configs with the sizes
    read from the tensors. The tokenizers are those stored in the ``graphsd.tokenizer`` metadata,
    else the shipped CLIP tokenizer, padding with ``<|endoftext|>`` (SD1, SDXL's first) or ``!``
    (SD2, SDXL's second: OpenCLIP pads with id 0) unless the metadata names the pad tokens.
    Raises :class:`~graphsd.std.models.formats.ModelFileError` for pickle files unless ``allow_pickle``, for
    layouts it does not recognise and for a text encoder no available tokenizer fits."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    tensors, metadata = read_checkpoint(path, allow_pickle)
    family = layout_family(tensors)
    stored = _json_metadata(metadata, METADATA_KEY)
    roles = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    result: dict[str, Any] = {"family": family}
    for role in roles:
        prefix = TEXT_PREFIXES[(family, role)]
        config = stored.get(role) or _derive(derive_text_config, prefix, family, role, _under(tensors, prefix))
        result[role] = _build_text(family, role, config, tensors, dtype)
    pooled = result["text_encoder_2"].config.projection_dim if family == "sdxl" else None
    unet_config = stored.get("unet") or _derive(derive_unet_config, UNET_PREFIX, family, _under(tensors, UNET_PREFIX), pooled)
    _check_context(family, unet_config, [result[r].config.hidden_size for r in roles])
    result["unet"] = _build_diffusers(UNet2DConditionModel, unet_config, unet_rule(unet_config), tensors, dtype, "U-Net")
    vae_config = stored.get("vae") or _derive(derive_vae_config, VAE_PREFIX, family, _under(tensors, VAE_PREFIX))
    result["vae"] = _build_diffusers(AutoencoderKL, vae_config, vae_rule(vae_config), tensors, dtype, "VAE")
    pads = {"tokenizer": "!" if family == "sd2" else None, "tokenizer_2": "!", **stored.get("pad_tokens", {})}
    stored_tokenizers = _json_metadata(metadata, TOKENIZER_KEY)
    for role, tokenizer_role in zip(roles, ("tokenizer", "tokenizer_2")):
        files = stored_tokenizers.get(tokenizer_role)
        tokenizer = _tokenizer(pads[tokenizer_role]) if files is None else _stored_tokenizer(files)
        _check_vocabulary(tokenizer_role, tokenizer, result[role], stored=files is not None)
        result[tokenizer_role] = tokenizer
    result["scheduler_config"] = stored.get("scheduler") or bundled_config(family, "scheduler")
    return result


def _derive(derive: Callable[..., dict[str, Any]], prefix: str, *args: Any) -> dict[str, Any]:
    """Run a ``derive_*_config`` function; a tensor it needs that the file lacks is a layout error."""
    try:
        return derive(*args)
    except KeyError as exc:
        raise ModelFileError(f"unrecognised checkpoint layout: {prefix}{exc.args[0]} is missing", field="path") from None


def _check_context(family: str, unet_config: dict[str, Any], widths: list[int]) -> None:
    """The U-Net's cross-attention width must be what the text encoders produce (SDXL
    concatenates its two encoders' hidden states)."""
    if unet_config["cross_attention_dim"] != sum(widths):
        raise ModelFileError(
            f"inconsistent {family} checkpoint: the U-Net attends to {unet_config['cross_attention_dim']}-wide "
            f"text embeddings but the text encoder(s) give {' + '.join(map(str, widths))}",
            field="path",
        )


# ---- writing ---------------------------------------------------------------------------------


def _to_file(state: dict[str, torch.Tensor], rule: Callable[[str], Rule]) -> dict[str, torch.Tensor]:
    """A module's state dict under its single-file names, copied to the CPU (the inverse of
    :func:`_from_file`: q, k and v are concatenated into one in_proj). Copies, so that a patch
    undone after this call cannot change what is written."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, how = rule(key)
        value = value.detach().to("cpu", copy=True)
        if how in ("q", "k", "v"):
            fused.setdefault(name, {})[how] = value
        elif how == "T":
            out[name] = value.T.contiguous()
        elif how == "conv":
            out[name] = value.reshape(*value.shape, 1, 1)
        else:
            out[name] = value
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def component_tensors(family: str, role: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of one component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``)
    under their single-file names, on the CPU."""
    if role == "unet":
        rule = unet_rule(dict(module.config))
    elif role == "vae":
        rule = vae_rule(dict(module.config))
    else:
        rule = text_rule(family, role)
    try:
        return _to_file(module.state_dict(), rule)
    except KeyError as exc:
        raise ModelFileError(
            f"the {role} holds tensors that a single-file checkpoint has no place for ({exc.args[0]}); "
            "adapters must be merged into the weights (or removed) before saving"
        ) from None


def module_config(module: Any) -> dict[str, Any]:
    """The full config of a diffusers (``ConfigMixin``) or transformers model as plain JSON."""
    if hasattr(module, "to_json_string"):
        return json.loads(module.to_json_string())
    return json.loads(module.config.to_json_string(use_diff=False))


def component_roles(family: str) -> list[str]:
    """The components a single file of ``family`` holds."""
    if family not in FAMILIES:
        raise ModelFileError(f"cannot write a single file for model family {family!r}; supported: {', '.join(FAMILIES)}")
    return ["unet", "vae", "text_encoder", *(["text_encoder_2"] if family == "sdxl" else [])]


def tokenizer_files(tokenizers: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """role -> {file name -> text} of each ``tokenizer`` / ``tokenizer_2`` whose vocabulary is not
    the standard CLIP one (a file without them gets that one on load), as ``save_pretrained``
    writes them (only :data:`TOKENIZER_FILES`)."""
    import tempfile

    from graphsd.std.text.tokenizer import VOCAB_SIZE, clip_tokenizer

    stored = {}
    for role in ("tokenizer", "tokenizer_2"):
        tokenizer = tokenizers.get(role)
        if tokenizer is None or (len(tokenizer) == VOCAB_SIZE and tokenizer.get_vocab() == clip_tokenizer().get_vocab()):
            continue
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            stored[role] = {f.name: f.read_text(encoding="utf-8") for f in Path(folder).iterdir() if f.name in TOKENIZER_FILES}
    return stored


def pad_tokens(tokenizers: Mapping[str, Any]) -> dict[str, str]:
    """role -> pad token of the ``tokenizer`` / ``tokenizer_2`` given (for the metadata)."""
    return {r: t.pad_token for r, t in tokenizers.items() if r in ("tokenizer", "tokenizer_2") and t is not None}


def _as_given(role: str, module: Any) -> AbstractContextManager[Any]:
    return nullcontext(module)


def save_single_file(
    components: Mapping[str, Any],
    path: Path,
    *,
    overwrite: bool = False,
    open_component: Callable[[str, Any], AbstractContextManager[Any]] = _as_given,
) -> Path:
    """Write ``components`` (``family`` sd1 | sd2 | sdxl, ``unet``, ``vae``, ``text_encoder``,
    SDXL ``text_encoder_2``, optional ``tokenizer``/``tokenizer_2`` and ``scheduler_config``) as
    one ``.safetensors`` file in the original LDM layout. The diffusers configs (and the
    tokenizers' pad tokens, and tokenizers other than the standard CLIP one) go into the
    metadata, so :func:`load_single_file` restores them.

    Each component is turned into its module by ``open_component(role, components[role])``, held
    open only while its tensors are copied, one after the other (by default the value is the
    module; ``CheckpointSave`` passes model handles and opens each through the ModelManager, with
    its patches applied). The file is written atomically (:func:`graphsd.paths.write_atomic`): an
    existing file is replaced only with ``overwrite``, else the next free name is taken; the
    path written is returned."""
    from safetensors.torch import save_file

    family = components.get("family")
    roles = component_roles(family)
    absent = [r for r in roles if components.get(r) is None]
    if absent:
        raise ModelFileError(f"cannot write a {family} checkpoint without its {', '.join(absent)}")
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {"family": family}
    for role in roles:
        with open_component(role, components[role]) as module:
            tensors.update(component_tensors(family, role, module))
            configs[role] = module_config(module)
    if components.get("scheduler_config"):
        configs["scheduler"] = dict(components["scheduler_config"])
    if pads := pad_tokens(components):
        configs["pad_tokens"] = pads
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs)}
    if stored := tokenizer_files(components):
        metadata[TOKENIZER_KEY] = json.dumps(stored)
    tensors = {name: t.contiguous() for name, t in tensors.items()}  # safetensors stores dense row-major data (not channels-last)
    return write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)
