"""LoRA-family weight patches: read a file, match it to a model's layers, add the deltas.

Formats read (one file may mix them, layer by layer):

- **kohya / A1111** (``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; text encoders ``lora_te_`` (SD1) or ``lora_te1_`` / ``lora_te2_`` (SDXL)). U-Net
  paths are the diffusers module names with ``.`` replaced by ``_`` (kohya's SD1 trainer) or
  the original SGM/LDM names (``input_blocks_4_1_...``, kohya's SDXL trainer), mapped to
  diffusers through the U-Net's block layout.
- **LyCORIS LoCon** with Tucker-decomposed convolutions (LyCORIS ``use_tucker``; kohya-style
  names): ``lora_down`` [r, in, 1, 1], ``lora_mid`` [r, r, kh, kw], ``lora_up`` [out, r, 1, 1],
  optional ``alpha``.
- **PEFT / diffusers** (``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, also
  ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight`` and the old attention-processor
  spelling ``attn1.processor.to_q_lora.down.weight``) under ``unet.`` / ``text_encoder.`` /
  ``text_encoder_2.``. Keys with no such prefix are U-Net layers: diffusers' 2023
  ``save_attn_procs`` / ``LoRAAttnProcessor`` files
  (``down_blocks.0.….attn1.processor.to_q_lora.down.weight``; ``to_out_lora`` → ``to_out.0``) and
  PEFT's ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``). A folder
  holding ``adapter_model.safetensors`` or ``pytorch_lora_weights.safetensors`` may be given
  instead of the file.
- **PEFT scale**: ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; per-module
  ``rank_pattern`` / ``alpha_pattern``, regular expressions matched against the end of the
  module path), read from the safetensors metadata entry ``lora_adapter_metadata`` (JSON, fields
  prefixed by component, ``unet.lora_alpha``, as diffusers' ``save_lora_weights`` writes it) or,
  for ``adapter_model.*``, from PEFT's ``adapter_config.json`` beside it. Without either, and
  without ``alpha`` keys, the scale is 1 (``W + B·A``, diffusers' convention).
- **LyCORIS LoHa** (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional Tucker
  cores ``hada_t1`` / ``hada_t2``) and **LoKr** (``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``,
  ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``, optional ``lokr_t2``), with kohya-style names.

Deltas (strength 1; the patch multiplies by the strength), products of the factors taken in float64
and rounded once to float32 (the same on every device), added a few rows at a time:

- LoRA: ``up @ down × alpha / rank`` (rank = rows of ``down``; scale 1 without alpha), from
  the LoRA paper (Hu et al. 2021, arXiv:2106.09685) with kohya's alpha convention. With a Tucker
  core the three are convolutions applied in turn (``up ∘ mid ∘ down``), whose merged kernel is
  ``Σ_ij up[p, i] · mid[i, j, y, x] · down[j, c]``.
- LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) × alpha / rank`` (Hadamard product; FedPara, Hyeon-Woo
  et al. 2022, arXiv:2108.06098, as LyCORIS stores it).
- LoKr: ``kron(w1, w2) × alpha / rank``, rank from a decomposed factor, scale 1 when neither
  factor is decomposed (LyCORIS, Yeh et al. 2024, arXiv:2309.14859).

Conv layers (1×1 and 3×3) use the same formulas on weights flattened to ``[out, in·k·k]`` and
reshaped back. Pickle files (``.pt``, ``.ckpt``, ``.bin``) are read only when allowed, and
then with ``torch.load(weights_only=True)``. Truncated or damaged files, and files holding NaN or
infinite values, are refused with a :class:`LoraFormatError` that names the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphsd.memory import patch_backup
from graphsd.paths import file_fingerprint
from graphsd.std.models.family import CONTEXT_WIDTHS
from graphsd.std.models.formats import ModelFileError, read_weights
from graphsd.std.models.ldm_layout import ldm_flat_names, rename_flat
from graphsd.types import working_dtype

#: Key endings → the slot they fill in a layer's recipe, longest first so that matching the
#: first ending that fits is unambiguous.
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down",
            ".lora_linear_layer.up.weight": "up",
            "_lora.down.weight": "down",
            "_lora.up.weight": "up",
            ".lora_mid.weight": "mid",
            ".dora_scale": "dora_scale",
            ".alpha": "alpha",
            **{f".hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
            **{f".lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
        }.items(),
        key=lambda item: -len(item[0]),
    )
)

#: Name prefixes → (role of the component, whether the module path is flattened with ``_``).
_PREFIXES: tuple[tuple[str, str, bool], ...] = (
    ("lora_unet_", "unet", True),
    ("lora_te1_", "text_encoder", True),
    ("lora_te2_", "text_encoder_2", True),
    ("lora_te_", "text_encoder", True),
    ("unet.", "unet", False),
    ("text_encoder_2.", "text_encoder_2", False),
    ("text_encoder.", "text_encoder", False),
    ("base_model.model.", "unet", False),
)

#: What a folder given as the LoRA may hold: PEFT's and diffusers' file names.
_FOLDER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")

#: The safetensors metadata entry where diffusers' ``save_lora_weights`` stores the PEFT
#: ``LoraConfig`` fields as JSON, each prefixed with its component (``unet.lora_alpha``).
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


class LoraFormatError(ModelFileError, ValueError):
    """The file is not a LoRA graphsd can read, or does not fit the model (message says why)."""


def _check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Raise :class:`LoraFormatError` naming the first key (sorted) whose tensor holds NaN or ±inf."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraFormatError(f"'{name}': '{key}' holds NaN or infinite values; the file is corrupt or was saved "
                                  "after a diverged training run")


def peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """PEFT ``LoraConfig`` fields per component role, from the safetensors metadata diffusers
    writes (``lora_adapter_metadata``: JSON with keys ``<role>.<field>``) or, for a file named
    ``adapter_model.*``, from PEFT's ``adapter_config.json`` beside it (applies to every role).
    Empty when there is neither."""
    if _ADAPTER_METADATA_KEY in metadata:
        try:
            fields = json.loads(metadata[_ADAPTER_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LoraFormatError(f"'{path.name}': its {_ADAPTER_METADATA_KEY} metadata is not valid JSON ({e})") from e
        configs: dict[str, dict] = {}
        for key, value in fields.items():
            role, _, name = key.partition(".")
            configs.setdefault(role, {})[name] = value
        return configs
    config_file = path.with_name("adapter_config.json")
    if path.stem == "adapter_model" and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraFormatError(f"'{config_file}' is not valid JSON ({e})") from e
        return {role: config for _, role, _ in _PREFIXES}
    return {}


def _peft_pattern(patterns: dict | None, path: str, default):
    """PEFT's per-module override: the value of the first pattern (a regular expression) that
    matches the whole module path or a dot-separated ending of it, else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return value
    return default


def _peft_alpha(config: dict, path: str, rank: int, name: str) -> float:
    """The ``alpha`` that makes graphsd's ``alpha / rank`` equal PEFT's scale for the module
    ``path``: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``."""
    r = _peft_pattern(config.get("rank_pattern"), path, config["r"])
    if r != rank:
        raise LoraFormatError(f"'{name}': the adapter config gives {path} rank {r}, but its tensors have rank {rank}")
    alpha = float(_peft_pattern(config.get("alpha_pattern"), path, config["lora_alpha"]))
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


#: Elements of a LoRA delta computed at once when it is added into a weight (:meth:`LoraLayer.pieces`).
DELTA_PIECE = 1 << 20


@dataclass
class LoraLayer:
    """The tensors that make up one layer's delta (``kind``: lora, loha or lokr)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    def delta(self, shape: torch.Size, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight delta at strength 1, reshaped to ``shape``, in ``dtype`` (float32; float64 for
        a float64 model). The factors are multiplied in float64 and the product rounded once to
        ``dtype``, so the delta is the same whichever device computes it (the GPU for resident
        weights, the CPU for the pinned copies of streamed ones under a VRAM budget): float32
        products summed in a device's own order would differ in their last bits, and an fp16
        weight would then round differently where it is streamed than where it is resident."""
        exact = dtype if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        t = {k: v.to(device=device, dtype=exact) for k, v in self.tensors.items()}
        if self.kind == "lora":
            d, rank = _lora_matrix(t), t["down"].shape[0]
        elif self.kind == "loha":
            d, rank = _loha_matrix(t), t["hada_w1_b"].shape[0]
        else:
            d, rank = _lokr_matrix(t), _lokr_rank(t)
        if d.numel() != shape.numel():
            raise LoraFormatError(f"a {self.kind} delta of shape {tuple(d.shape)} does not fit a weight of shape {tuple(shape)}")
        scale = self.alpha / rank if self.alpha is not None and rank else 1.0
        return (d.reshape(shape) * scale).to(dtype)

    def pieces(
        self, shape: torch.Size, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """The delta as (rows, delta of those rows) pieces of at most :data:`DELTA_PIECE` elements,
        so adding it into a weight on the device needs temporaries of a piece, not of the whole
        layer (a VRAM budget plans for the weights, not for these). A plain LoRA's rows are
        independent products; the other kinds (LoHa, LoKr, Tucker cores) come whole."""
        width = math.prod(shape[1:]) if len(shape) > 1 else 1
        if self.kind != "lora" or "mid" in self.tensors or not shape or shape[0] * width <= DELTA_PIECE:
            yield slice(None), self.delta(shape, device, dtype)
            return
        step = max(1, DELTA_PIECE // width)
        for start in range(0, shape[0], step):
            rows = slice(start, min(start + step, shape[0]))
            part = LoraLayer(self.kind, {**self.tensors, "up": self.tensors["up"][rows]}, self.alpha)  # those rows' products alone
            yield rows, part.delta(torch.Size((rows.stop - rows.start, *shape[1:])), device, dtype)


def _lora_matrix(t: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = t["up"], t["down"]
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise LoraFormatError("LoRA up weights with a spatial kernel are not supported")
    if "mid" in t:  # LoCon Tucker: 1×1 down [r, in], k×k mid [r, r, kh, kw], 1×1 up [out, r]
        return _tucker(t["mid"], up.flatten(1).T, down.flatten(1))
    return up.flatten(1) @ down.flatten(1)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv factor from a Tucker core (LyCORIS ``use_tucker``): core [r, r, k, k],
    a [r, out], b [r, in] → [out, in, k, k]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a, b)


def _loha_matrix(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in t and "hada_t2" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1 = t["hada_w1_a"].flatten(1) @ t["hada_w1_b"].flatten(1)
        w2 = t["hada_w2_a"].flatten(1) @ t["hada_w2_b"].flatten(1)
    return w1 * w2


def _lokr_factor(t: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    if f"lokr_w{n}" in t:
        return t[f"lokr_w{n}"]
    if f"lokr_t{n}" in t:
        return _tucker(t[f"lokr_t{n}"], t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"])
    return t[f"lokr_w{n}_a"].flatten(1) @ t[f"lokr_w{n}_b"].flatten(1)


def _lokr_matrix(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = _lokr_factor(t, 1), _lokr_factor(t, 2)
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def _lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in t:
            return t[name].shape[0]
    return None


def _layer_kind(slots: dict[str, torch.Tensor]) -> str | None:
    if {"down", "up"} <= slots.keys() and "dora_scale" not in slots:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= slots.keys():
        return "loha"
    has = slots.keys()
    w1 = "lokr_w1" in has or {"lokr_w1_a", "lokr_w1_b"} <= has
    w2 = "lokr_w2" in has or {"lokr_w2_a", "lokr_w2_b"} <= has
    return "lokr" if w1 and w2 else None


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, slot in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], slot
    return None


_PROCESSOR_NAME = re.compile(r"\.processor\.to_(q|k|v|out)$")


def _normalise_base(base: str) -> str:
    """The old attention-processor spelling (``attn1.processor.to_q`` once ``_lora.down.weight``
    is cut off) → module path (``attn1.to_q``; ``to_out`` → ``to_out.0``)."""
    return _PROCESSOR_NAME.sub(lambda m: f".to_{m.group(1)}" + (".0" if m.group(1) == "out" else ""), base)


@dataclass
class LoraTarget:
    """One layer recipe and where it goes: component role, module path, path spelling."""

    role: str
    path: str
    flat: bool
    layer: LoraLayer


@dataclass
class LoraFile:
    """A parsed LoRA file: ``targets`` (one per layer in the file) and ``unreadable`` keys
    (present but of a kind graphsd does not apply, e.g. DoRA layers)."""

    name: str
    fingerprint: str
    targets: dict[str, LoraTarget]
    unreadable: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        """Memory held by the file's tensors (for the ModelManager's RAM budget)."""
        return sum(t.numel() * t.element_size() for tg in self.targets.values() for t in tg.layer.tensors.values())


def parse_lora(tensors: dict[str, torch.Tensor], name: str = "lora", fingerprint: str = "",
               peft: dict[str, dict] | None = None) -> LoraFile:
    """Group a state dict's keys into per-layer recipes (see the module docstring). ``peft``:
    PEFT ``LoraConfig`` fields per role (:func:`peft_configs`), for LoRA layers without an
    ``alpha`` key."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unreadable: list[str] = []
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            unreadable.append(key)
            continue
        base, slot = split
        groups.setdefault(_normalise_base(base), {})[slot] = value
    targets: dict[str, LoraTarget] = {}
    for base, slots in groups.items():
        kind = _layer_kind(slots)
        if kind is None:
            unreadable += [f"{base}.{slot}" for slot in slots]
            continue
        role, path, flat = _role_and_path(base)
        config = (peft or {}).get(role, {})
        if "alpha" in slots:
            alpha = float(slots["alpha"].float().item())
        elif kind == "lora" and config.get("peft_type", "LORA") == "LORA" and {"r", "lora_alpha"} <= config.keys():
            alpha = _peft_alpha(config, path, slots["down"].shape[0], name)
        else:
            alpha = None
        tensors_ = {k: v for k, v in slots.items() if k != "alpha"}
        targets[base] = LoraTarget(role, path, flat, LoraLayer(kind, tensors_, alpha))
    return LoraFile(name, fingerprint, targets, sorted(unreadable))


def _role_and_path(base: str) -> tuple[str, str, bool]:
    """Component role, module path and whether it is flattened; unprefixed paths are the U-Net's."""
    for prefix, role, flat in _PREFIXES:
        if base.startswith(prefix):
            return role, base[len(prefix):], flat
    return "unet", base, False


def load_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Read and parse a LoRA file, or a folder holding one (raises :class:`LoraFormatError` on
    unreadable or non-finite files)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in _FOLDER_FILES if (path / f).is_file()]
        if not found:
            raise LoraFormatError(f"folder '{path.name}' holds none of {', '.join(_FOLDER_FILES)}")
        path = found[0]
    tensors, metadata = read_weights(path, allow_pickle, LoraFormatError)
    _check_finite(tensors, path.name)
    fingerprint = file_fingerprint(path)
    if path.stem == "adapter_model":  # its scale may come from adapter_config.json
        fingerprint += "+" + file_fingerprint(path.with_name("adapter_config.json"))
    lora = parse_lora(tensors, path.name, fingerprint, peft_configs(path, metadata))
    if not lora.targets:
        raise LoraFormatError(f"'{path.name}' holds no LoRA, LoHa or LoKr layers (keys such as "
                              f"{lora.unreadable[:3]}); is it a full checkpoint or an embedding?")
    return lora


# ---- matching names to a model's modules -----------------------------------------------------


def _aliases(name: str) -> tuple[str, ...]:
    """A module path and its spelling with / without the ``text_model.`` level that
    ``CLIPTextModel`` has in some transformers versions and not in others."""
    if name.startswith("text_model."):
        return name, name[len("text_model."):]
    return name, "text_model." + name


def weight_modules(model: torch.nn.Module) -> dict[str, str]:
    """``spelling → module path`` for every Linear / Conv2d of ``model``: the dotted path and
    the kohya spelling (dots replaced by ``_``), each with and without ``text_model.``."""
    index: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            for alias in reversed(_aliases(name)):
                index[alias] = index[alias.replace(".", "_")] = name
    return index


@dataclass
class LoraMatch:
    """Result of matching a LoRA file against components: ``layers[role][module path]``."""

    layers: dict[str, dict[str, LoraLayer]]
    matched: int
    unmatched: list[str]


def match_lora(lora: LoraFile, components: dict[str, torch.nn.Module]) -> LoraMatch:
    """Find the module each layer of ``lora`` patches in ``components`` (role → module).

    Layers whose role is not among ``components`` or whose module does not exist (or has a
    weight of another size) are reported in ``unmatched``."""
    indexes = {role: weight_modules(m) for role, m in components.items()}
    block_maps = {"unet": ldm_flat_names(components["unet"].config)} if hasattr(components.get("unet"), "config") else {}
    layers: dict[str, dict[str, LoraLayer]] = {}
    unmatched = list(lora.unreadable)
    for key, target in lora.targets.items():
        path = _resolve(target, indexes.get(target.role), block_maps.get(target.role))
        if path is None or not _fits(target.layer, components[target.role].get_submodule(path).weight):
            unmatched.append(key)
            continue
        layers.setdefault(target.role, {})[path] = target.layer
    matched = sum(len(v) for v in layers.values())
    return LoraMatch(layers, matched, sorted(unmatched))


def _resolve(target: LoraTarget, index: dict[str, str] | None, block_map: dict[str, str] | None) -> str | None:
    if index is None:
        return None
    if target.path in index:
        return index[target.path]
    if target.flat and block_map is not None:
        flat = rename_flat(target.path, block_map)
        return index.get(flat) if flat is not None else None
    return None


def _fits(layer: LoraLayer, weight: torch.Tensor) -> bool:
    """Whether the layer's delta has the weight's size (computed on the meta device: shapes only)."""
    try:
        layer.delta(weight.shape, "meta")
    except (LoraFormatError, RuntimeError, KeyError):
        return False
    return True


def context_width(lora: LoraFile) -> int | None:
    """The cross-attention context width the LoRA was trained for (input width of its
    ``attn2.to_k`` layers), or None when it has no such layer."""
    inputs = {"lora": "down", "loha": "hada_w1_b"}
    widths = {t.layer.tensors[inputs[t.layer.kind]].flatten(1).shape[1] for k, t in lora.targets.items()
              if t.layer.kind in inputs and re.search(r"attn2[._]to_k$", k)}
    return max(widths) if widths else None


def guess_family(lora: LoraFile) -> str:
    """Which model family a LoRA seems made for, from key names and context widths."""
    keys = " ".join(lora.targets)
    width = context_width(lora)
    if width is not None:
        name = {w: family for family, w in CONTEXT_WIDTHS.items()}.get(width, "a model")
        return f"{name} (cross-attention context width {width})"
    if "lora_te1_" in keys or "lora_te2_" in keys or "text_encoder_2." in keys or "label_emb" in keys:
        return "sdxl (two text encoders)"
    if "lora_te_" in keys or "lora_unet_" in keys or "unet." in keys:
        return "sd1/sd2 (one text encoder)"
    return "not a Stable Diffusion U-Net or CLIP text encoder"


def check_family(lora: LoraFile, components: dict[str, torch.nn.Module]) -> None:
    """Raise :class:`LoraFormatError` when the LoRA is plainly for another model family (its
    context width differs from the U-Net's, or it patches a second text encoder the model
    does not have): such files would otherwise match a few same-sized layers by accident."""
    unet = components.get("unet")
    width = context_width(lora)
    model_width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    roles = {t.role for t in lora.targets.values()}
    if (width is not None and model_width is not None and width != model_width) or (
        "text_encoder_2" in roles and "text_encoder_2" not in components and "text_encoder" in components
    ):
        raise LoraFormatError(
            f"LoRA '{lora.name}' seems made for {guess_family(lora)}, but the model's context width is "
            f"{model_width} and it has {sum(r.startswith('text_encoder') for r in components)} text encoder(s). "
            "Use a LoRA made for this model"
        )


# ---- the patch -------------------------------------------------------------------------------


class LoraPatch:
    """A LoRA applied at ``strengths[role]`` to the matched layers of each role.

    :meth:`apply` adds ``delta × strength`` into the weights in place and returns an undo that
    copies the original tensors back bit for bit (a backup of each touched weight is kept for
    the duration of the use)."""

    def __init__(self, lora: LoraFile, layers: dict[str, dict[str, LoraLayer]], strengths: dict[str, float]):
        self.lora = lora
        self.layers = layers
        self.strengths = strengths

    def fingerprint(self) -> str:
        parts = ",".join(f"{r}={self.strengths[r]!r}" for r in sorted(self.strengths))
        return f"lora:{self.lora.fingerprint}:{parts}"

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        strength = self.strengths.get(role, 0.0)
        layers = self.layers.get(role)
        if not layers or strength == 0.0:
            return None
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for path, layer in layers.items():
                weight = module.get_submodule(path).weight
                backups.append((weight, patch_backup(weight)))
                work = working_dtype(weight.dtype)
                for rows, delta in layer.pieces(weight.shape, weight.device, work):
                    part = weight[rows]
                    part.copy_((part.to(work) + delta * strength).to(weight.dtype))

        def undo() -> None:
            with torch.no_grad():
                for weight, original in backups:
                    weight.copy_(original)
            backups.clear()

        return undo
