"""Facts of model files, in one place: which suffixes are weights, and the one reader of
weight files.

Weights come as ``.safetensors`` (read without running code) or as pickle-based files, which
graphsd reads only when the user allows them (``--allow-pickle``) and then with
``torch.load(weights_only=True)``: plain containers and tensors only, never code. Checkpoints,
LoRAs and hypernetworks are all read here, so each refusal says the same thing for every kind of
file, and always names the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from graphsd.errors import GraphsdError

#: Pickle-based weight files: PyTorch (``.pt``, ``.pth``), original SD checkpoints (``.ckpt``),
#: transformers/diffusers ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Every weight file graphsd recognises.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class ModelFileError(GraphsdError):
    """A model file (checkpoint, LoRA, hypernetwork, ...) is missing, unreadable or does not fit;
    the message names the file and says what to do. ``field`` is the node input it came from,
    when known. The executor reports it like a NodeError: no traceback."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def _existing(path: Path, error: type[ModelFileError], field: str | None) -> None:
    """Refuse a missing or empty file before any reader sees it."""
    if not path.is_file():
        raise error(f"{path} does not exist", field=field)
    if path.stat().st_size == 0:
        raise error(f"'{path.name}' is empty (0 bytes): the file was not written completely; download or copy it again", field=field)


def load_pickle(path: str | Path, allow_pickle: bool, error: type[ModelFileError] = ModelFileError, field: str | None = None) -> object:
    """What a pickle-based file holds, read with ``torch.load(weights_only=True)`` (plain
    containers, numbers, strings and tensors) and only when ``allow_pickle``. Every failure is an
    ``error`` (a :class:`ModelFileError` subclass) naming the file; none suggests
    ``weights_only=False``, which would run code from the file."""
    path = Path(path)
    if not allow_pickle:
        raise error(
            f"'{path.name}' is pickle-based: convert it to .safetensors or, for a file you trust, run with --allow-pickle "
            "(Settings.allow_pickle). Pickle files can run code when loaded, so graphsd reads allowed ones with "
            "torch.load(weights_only=True), which loads tensors only",
            field=field,
        )
    _existing(path, error, field)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for refused or damaged files
        text = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)", text) if "Weights only load failed" in text else None
        if refused:
            raise error(
                f"'{path.name}' could not be read safely: it contains Python objects beyond tensors (a pickled object "
                f"named {refused.group(1)}), which "
                "graphsd never loads, also not with --allow-pickle (torch.load(weights_only=True) reads tensors only); "
                "convert it to .safetensors with a tool you trust, or do not use it",
                field=field,
            ) from None
        if "Weights only load failed" in text:  # torch's own text there advises weights_only=False: not passed on
            unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            detail = unpickler.group(1).strip()[:200] if unpickler else "the unpickler refused it"
        else:
            detail = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        raise error(
            f"'{path.name}' is truncated or damaged, or not a readable PyTorch file ({detail}); copy it again", field=field
        ) from None


def read_weights(
    path: str | Path, allow_pickle: bool, error: type[ModelFileError] = ModelFileError, field: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors of a weight file and its string metadata (safetensors only). A pickle
    file (:data:`PICKLE_SUFFIXES`, through :func:`load_pickle`) may wrap them in
    ``{"state_dict": {...}}`` as original checkpoints do; entries that are not named tensors
    (``global_step``, ...) are left out. Any other suffix is read as safetensors, whose header
    is checked against the file's size before a tensor is read."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data = load_pickle(path, allow_pickle, error, field)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise error(f"'{path.name}' holds a {type(data).__name__}, not a dictionary of tensors", field=field)
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}
    _existing(path, error, field)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # a truncated or damaged file, or another format
        raise error(
            f"'{path.name}' is truncated or damaged, or not a readable .safetensors file ({exc}); download or copy it again", field=field
        ) from None
