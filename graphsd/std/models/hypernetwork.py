"""A1111 hypernetworks: small MLPs that transform the attention context before ``to_k``/``to_v``.

File format (a pickled dict, read with ``torch.load(weights_only=True)``), as written by the
AUTOMATIC1111 web UI (``modules/hypernetworks/hypernetwork.py``):

- integer keys: a context width (320, 640, 768, 1280, ...) → ``[k_net, v_net]``, each a state
  dict of a ``torch.nn.Sequential`` called ``linear`` (``linear.N.weight`` / ``linear.N.bias``);
- ``layer_structure`` (default ``[1, 2, 1]``): layer widths as multiples of the context width;
- ``activation_func`` (``linear`` or missing = none; ``relu``, ``leakyrelu``, ``elu``,
  ``swish`` (which A1111 maps to ``Hardswish``), ``tanh``, ``sigmoid``, and every other class
  of ``torch.nn.modules.activation`` by its lower-cased name: ``gelu``, ``mish``, ``softsign``,
  ``silu``, ...), placed after every linear layer except the last unless ``activate_output``
  (default True when the key is missing);
- ``is_layer_norm``: a LayerNorm after every linear layer;
- ``dropout_structure``, or ``use_dropout`` + ``last_layer_dropout``: where Dropout layers sit
  (inactive at inference, but they shift the indices of the Sequential);
- ``name``, ``step``, ``sd_checkpoint``, ... (informational).

Applied, as A1111 does in its attention forward and ComfyUI in its ``attn1``/``attn2`` patches:
for every attention layer of the U-Net (self- and cross-attention), the input of ``to_k`` and
``to_v`` (the text context for cross-attention, the normalised hidden states for
self-attention) is replaced by ``ctx + k_net(ctx)·s`` and ``ctx + v_net(ctx)·s`` respectively,
where the pair of nets is the one whose width equals the input width (layers of other widths
are left alone), and ``s`` is the strength.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphsd.std.models.formats import ModelFileError, load_pickle


class HypernetworkFormatError(ModelFileError, ValueError):
    """The file is not an A1111 hypernetwork graphsd can read (message says why)."""


def _activation_table() -> dict[str, type[torch.nn.Module]]:
    """A1111's table: its fixed names (``linear`` = none, ``swish`` = ``Hardswish``, not SiLU) and
    every class of ``torch.nn.modules.activation`` by its lower-cased name. A1111 adds the torch
    classes after its fixed names; the names both have (relu, elu, tanh, ...) mean the same class."""
    table: dict[str, type[torch.nn.Module]] = {
        name.lower(): getattr(torch.nn.modules.activation, name) for name in torch.nn.modules.activation.__all__
    }
    table.update({
        "linear": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leakyrelu": torch.nn.LeakyReLU,
        "elu": torch.nn.ELU,
        "swish": torch.nn.Hardswish,
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
    })
    return table


ACTIVATIONS = _activation_table()


def dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's default dropout placement: none when dropout is off; otherwise 0.3 after every
    hidden layer but the last, and after the last hidden layer only with last_layer_dropout."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


def build_net(width: int, meta: dict[str, Any]) -> torch.nn.Sequential:
    """The ``linear`` Sequential of one A1111 ``HypernetworkModule`` (weights uninitialised)."""
    structure = meta["layer_structure"]
    act = meta["activation_func"]
    if act not in (None, "linear") and act not in ACTIVATIONS:
        raise HypernetworkFormatError(f"unsupported activation function {act!r} (known: {sorted(ACTIVATIONS)})")
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        out = int(width * structure[i + 1])
        layers.append(torch.nn.Linear(int(width * structure[i]), out))
        last = i >= len(structure) - 2
        if act not in (None, "linear") and (not last or meta["activate_output"]):
            layers.append(ACTIVATIONS[act]())
        if meta["is_layer_norm"]:
            layers.append(torch.nn.LayerNorm(out))
        if meta["dropout_structure"][i + 1] > 0:
            layers.append(torch.nn.Dropout(p=meta["dropout_structure"][i + 1]))
    return torch.nn.Sequential(*layers)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _metadata(data: dict[Any, Any], name: str) -> dict[str, Any]:
    """The layout keys of a file, checked: ``layer_structure`` a list of positive numbers that
    starts and ends with 1, ``dropout_structure`` one probability per entry of it, a known
    activation. Nothing is allocated here."""

    def refuse(what: str) -> HypernetworkFormatError:
        return HypernetworkFormatError(f"'{name}': {what}; the file is not a valid A1111 hypernetwork")

    structure = data.get("layer_structure")
    structure = [1, 2, 1] if structure is None else structure
    if (not isinstance(structure, (list, tuple)) or len(structure) < 2 or not all(_is_number(x) and x > 0 for x in structure)
            or structure[0] != 1 or structure[-1] != 1):
        raise refuse(f"layer_structure {structure!r} must be a list of positive numbers that starts and ends with 1")
    use_dropout = bool(data.get("use_dropout", False))
    dropout = data.get("dropout_structure")
    if dropout is None:
        dropout = dropout_structure(structure, use_dropout, bool(data.get("last_layer_dropout", False)))
    if (not isinstance(dropout, (list, tuple)) or len(dropout) != len(structure)
            or not all(_is_number(p) and 0 <= p <= 1 for p in dropout)):
        raise refuse(f"dropout_structure {dropout!r} must hold one probability (0 to 1) per entry of "
                     f"layer_structure {structure}")
    act = data.get("activation_func")
    if act is not None and (not isinstance(act, str) or act not in ACTIVATIONS):
        raise HypernetworkFormatError(f"'{name}': unsupported activation function {act!r} (known: {sorted(ACTIVATIONS)})")
    step = data.get("step")
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool)):
        raise refuse(f"step {step!r} is not an integer")
    return {
        "layer_structure": list(structure),
        "activation_func": act,
        "is_layer_norm": bool(data.get("is_layer_norm", False)),
        "activate_output": bool(data.get("activate_output", True)),
        "dropout_structure": list(dropout),
        "use_dropout": use_dropout or any(dropout),
        "last_layer_dropout": bool(data.get("last_layer_dropout", False)),
        "name": data.get("name"),
        "step": step or 0,
    }


#: Names of the first A1111 hypernetworks (two linear layers, no activation).
_OLD_NAMES = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
              "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class Hypernetwork(torch.nn.Module):
    """The nets of one hypernetwork file: ``nets[str(width)] = ModuleList([k_net, v_net])``,
    plus the file's ``meta`` data."""

    def __init__(self, nets: dict[int, tuple[torch.nn.Module, torch.nn.Module]], meta: dict[str, Any]):
        super().__init__()
        self.nets = torch.nn.ModuleDict({str(w): torch.nn.ModuleList(pair) for w, pair in nets.items()})
        self.meta = meta

    @property
    def widths(self) -> list[int]:
        return sorted(int(w) for w in self.nets)

    def pair(self, width: int) -> torch.nn.ModuleList | None:
        return self.nets[str(width)] if str(width) in self.nets else None

    @classmethod
    def from_state(cls, data: dict[Any, Any], name: str = "hypernetwork") -> Hypernetwork:
        """Build from the dict an A1111 ``.pt`` file holds (``name`` is used in error messages).
        Every stored tensor is checked against the layout before a module holds it; the nets
        are built on the meta device and take the stored tensors, so memory stays bounded by
        the file's size whatever its ``layer_structure`` says."""
        meta = _metadata(data, name)
        nets: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        for width, pair in data.items():
            if isinstance(width, bool) or not isinstance(width, int):
                continue
            if width < 1 or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise HypernetworkFormatError(f"'{name}': width {width} must be positive and hold [k_net, v_net] state dicts")
            nets[width] = tuple(_load_net(width, meta, sd, f"'{name}': width {width} {part}")  # type: ignore[assignment]
                                for sd, part in zip(pair, ("k_net", "v_net"), strict=True))
        if not nets:
            raise HypernetworkFormatError(f"'{name}': no integer (context width) keys: not an A1111 hypernetwork")
        return cls(nets, meta)

    def to_state(self) -> dict[Any, Any]:
        """The A1111 ``.pt`` dict for this hypernetwork."""
        state: dict[Any, Any] = {
            w: [{f"linear.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()} for net in self.pair(w)]
            for w in self.widths
        }
        state.update({k: self.meta[k] for k in ("layer_structure", "activation_func", "is_layer_norm", "use_dropout",
                                                   "activate_output", "last_layer_dropout", "dropout_structure")})
        state.update({"name": self.meta.get("name") or "hypernetwork", "step": int(self.meta.get("step") or 0)})
        return state


def _load_net(width: int, meta: dict[str, Any], state: Any, where: str) -> torch.nn.Sequential:
    """One net from its stored ``linear.*`` tensors: names and shapes must be exactly those of
    :func:`build_net` (built on the meta device, so nothing is allocated), values finite."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise HypernetworkFormatError(f"{where} is not a state dict of named tensors")
    state = {_OLD_NAMES.get(k, k): v for k, v in state.items()}
    stored = {k[len("linear."):]: v for k, v in state.items() if k.startswith("linear.")}
    try:
        with torch.device("meta"):
            net = build_net(width, meta)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise HypernetworkFormatError(f"{where}: cannot build layer_structure {meta['layer_structure']} "
                                      f"with activation {meta['activation_func']!r}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    problems = [f"missing linear.{k}" for k in expected if k not in stored]
    problems += [f"unexpected linear.{k}" for k in stored if k not in expected]
    problems += [f"linear.{k} is {tuple(stored[k].shape)}, expected {shape}"
                 for k, shape in expected.items() if k in stored and tuple(stored[k].shape) != shape]
    if problems:
        raise HypernetworkFormatError(f"{where}: weights do not fit layer_structure {meta['layer_structure']}: "
                                      f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}")
    for k, v in stored.items():
        if not v.is_floating_point():
            raise HypernetworkFormatError(f"{where}: linear.{k} holds {v.dtype} values, not floating-point weights")
        if not torch.isfinite(v).all():
            raise HypernetworkFormatError(f"{where}: linear.{k} holds NaN or infinite values; the file is damaged "
                                          "(e.g. its training diverged): do not use it")
    net.load_state_dict({k: v.to(torch.float32) for k, v in stored.items()}, assign=True)
    return net.eval().requires_grad_(False)


def load_hypernetwork(path: str | os.PathLike, allow_pickle: bool = False) -> Hypernetwork:
    """Read an A1111 hypernetwork file (``.pt``: a pickle, so only when allowed, and then with
    ``torch.load(weights_only=True)``, which builds plain containers and tensors only)."""
    path = Path(path)
    data = load_pickle(path, allow_pickle, HypernetworkFormatError)
    if not isinstance(data, dict):
        raise HypernetworkFormatError(f"'{path.name}' holds a {type(data).__name__}, not an A1111 hypernetwork dict")
    return Hypernetwork.from_state(data, path.name)


def save_hypernetwork(hn: Hypernetwork, path: str | os.PathLike) -> None:
    """Write ``hn`` in the A1111 ``.pt`` format."""
    torch.save(hn.to_state(), path)


def attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a U-Net that have ``to_k`` / ``to_v`` projections."""
    return [m for m in unet.modules() if isinstance(getattr(m, "to_k", None), torch.nn.Linear)
            and isinstance(getattr(m, "to_v", None), torch.nn.Linear)]


ADDS_COMPUTATION = "graphsd_adds_computation"
"""Attribute set on the forward hooks a patch adds to compute something the weights do not hold
(a hypernetwork), so that code which must not lose them (CheckpointSave) can tell them from hooks
other libraries add for their own bookkeeping (transformers' output capturing)."""


def _pre_hook(net: torch.nn.Module, strength: float) -> Callable:
    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        ctx = args[0]
        return (ctx + net(ctx) * strength, *args[1:])

    setattr(hook, ADDS_COMPUTATION, True)
    return hook


class HypernetworkPatch:
    """A hypernetwork applied at ``strength`` to a U-Net (role ``unet``).

    Implemented as forward pre-hooks on each attention layer's ``to_k`` and ``to_v`` (so it
    works with any attention processor that calls them, not with fused QKV projections); undo
    removes exactly the hooks it added."""

    def __init__(self, hypernetwork: Hypernetwork, fingerprint: str, strength: float):
        self.hypernetwork = hypernetwork
        self._fingerprint = fingerprint
        self.strength = strength

    def fingerprint(self) -> str:
        return f"hypernetwork:{self._fingerprint}:{self.strength!r}"

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        if role != "unet" or self.strength == 0.0:
            return None
        handles = []
        nets = _placed(self.hypernetwork, module)
        for attn in attention_layers(module):
            pair = nets.pair(attn.to_k.in_features)
            if pair is not None:
                handles.append(attn.to_k.register_forward_pre_hook(_pre_hook(pair[0], self.strength)))
                handles.append(attn.to_v.register_forward_pre_hook(_pre_hook(pair[1], self.strength)))
        if not handles:
            return None

        def undo() -> None:
            for h in handles:
                h.remove()

        return undo


def _placed(hn: Hypernetwork, like: torch.nn.Module) -> Hypernetwork:
    """``hn`` on the device and dtype of ``like`` (a copy when they differ: the loaded nets are
    shared between handles and stay where they were loaded)."""
    p = next(like.parameters())
    q = next(hn.parameters())
    if q.device == p.device and q.dtype == p.dtype:
        return hn
    return copy.deepcopy(hn).to(device=p.device, dtype=p.dtype)

