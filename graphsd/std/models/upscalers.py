"""Image upscaling models of the ESRGAN family, read from their files, and ComfyUI's tiled way of
running them on images of any size.

Architectures (the ones ComfyUI's ``upscale_models`` folders mostly hold):

- **ESRGAN / RRDBNet** (Wang et al. 2018, arXiv:1809.00219): a 3×3 convolution, a trunk of
  residual-in-residual dense blocks (each block: three residual dense blocks of five 3×3
  convolutions with LeakyReLU 0.2, dense connections, residuals scaled by 0.2) closed by a 3×3
  convolution and added to its input, then ×2 nearest-neighbour upsamplings each followed by a
  convolution and LeakyReLU, a convolution, LeakyReLU, and the output convolution. Files in the
  original layout (``model.0.weight``, ``model.1.sub.N.RDB1.conv1.0.weight``, ...; 4x-UltraSharp,
  Remacri, NMKD Siax) and in BasicSR's (``conv_first``, ``body.N.rdb1.conv1`` or ``RRDB_trunk.N.RDB1``,
  ``conv_body`` or ``trunk_conv``, ``conv_up1``/``upconv1``, ``conv_hr``/``HRconv``, ``conv_last``;
  Real-ESRGAN x4plus, anime 6B, BSRGAN). Real-ESRGAN's ×2 and ×1 models take their input
  pixel-unshuffled by 2 or 4 (12 or 48 input channels), after a reflection pad to a multiple of
  that factor, and the output is cropped back.
- **Real-ESRGAN Compact / SRVGGNetCompact** (``body.0.weight`` ..., realesr-general-x4v3,
  realesr-animevideov3): 3×3 convolutions each followed by a per-channel PReLU, a last convolution
  to ``3·scale²`` channels, pixel shuffle, plus the input upsampled by nearest neighbour.

The files' layouts and these definitions follow the published implementations (ESRGAN, BasicSR,
and spandrel, the library ComfyUI loads them with); graphsd builds the networks itself so that it
needs no torchvision.

:func:`upscale_tiled` runs a model as ComfyUI's ImageUpscaleWithModel does: an image that fits
in one tile goes through whole; a larger one is cut into tiles of ``tile`` pixels that start every
``tile - overlap`` pixels (those at the right and bottom borders cut short), each tile's output
is weighted by a ramp of ``overlap · scale`` pixels on every side (weight ``(t + 1) / ramp`` at
``t`` pixels from the edge; none along a side the ramp would not fit in) and the weighted
outputs are averaged.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphsd.std.models.formats import PICKLE_SUFFIXES, ModelFileError, load_pickle, read_weights

#: Containers training tools wrap the weights in (BasicSR's ``params_ema`` first: the EMA weights).
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net", "generator")
#: ComfyUI's ImageUpscaleWithModel: tile size and overlap in input pixels; smallest tile it retries with.
TILE, OVERLAP, MIN_TILE = 512, 32, 128


class UpscalerFormatError(ModelFileError):
    """The file is not an upscaling model graphsd can run; the message says what it holds."""


# ---- networks ----------------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class DenseBlock(nn.Module):
    """Five 3×3 convolutions, each seeing the input and every earlier output; the last output,
    scaled by 0.2, is added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv(nf + i * gc, gc if i < 4 else nf) for i in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(features, 1))
            if i < 4:
                features.append(F.leaky_relu(out, 0.2))
        return out * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a row, their result scaled by 0.2 and added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.blocks = nn.ModuleList(DenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for block in self.blocks:
            out = block(out)
        return out * 0.2 + x


class ESRGAN(nn.Module):
    """RRDBNet: see the module docstring. ``unshuffle`` is Real-ESRGAN's input pixel-unshuffle
    factor (1 for none); the network itself upsamples by ``2 ** upsamplings``."""

    def __init__(self, cin: int, cout: int, nf: int, gc: int, blocks: int, upsamplings: int, unshuffle: int):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2**upsamplings // unshuffle
        self.channels = cin
        self.first = _conv(cin * unshuffle**2, nf)
        self.trunk = nn.ModuleList(RRDB(nf, gc) for _ in range(blocks))
        self.trunk_conv = _conv(nf, nf)
        self.ups = nn.ModuleList(_conv(nf, nf) for _ in range(upsamplings))
        self.hr = _conv(nf, nf)
        self.last = _conv(nf, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.unshuffle > 1:
            pad_h, pad_w = -height % self.unshuffle, -width % self.unshuffle
            x = F.pixel_unshuffle(F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"), self.unshuffle)
        feat = self.first(x)
        trunk = feat
        for block in self.trunk:
            trunk = block(trunk)
        feat = feat + self.trunk_conv(trunk)
        for up in self.ups:
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.last(F.leaky_relu(self.hr(feat), 0.2))
        return out[..., : height * self.scale, : width * self.scale]


class Compact(nn.Module):
    """SRVGGNetCompact: see the module docstring."""

    def __init__(self, cin: int, cout: int, nf: int, convs: int, scale: int):
        super().__init__()
        self.scale = scale
        self.channels = cin
        self.convs = nn.ModuleList([_conv(cin, nf)] + [_conv(nf, nf) for _ in range(convs)] + [_conv(nf, cout * scale**2)])
        self.acts = nn.ModuleList(nn.PReLU(nf) for _ in range(convs + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv, act in zip(self.convs[:-1], self.acts, strict=True):
            out = act(conv(out))
        out = F.pixel_shuffle(self.convs[-1](out), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# ---- reading files -----------------------------------------------------------------------------
def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(data, dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
            inner = next((data[w] for w in WRAPPERS if isinstance(data.get(w), dict)), None)
            if inner is None:
                break
            data = inner
    if not isinstance(data, dict):
        raise UpscalerFormatError(f"'{path.name}' holds a {type(data).__name__}, not a dictionary of tensors", field="model_name")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_upscaler_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of an upscaling model's file (``.pth`` files are pickles, read when allowed)."""
    if path.suffix.lower() in PICKLE_SUFFIXES + (".pth",):
        data = load_pickle(path, allow_pickle, UpscalerFormatError, field="model_name")
        return _unwrap(data, path)
    return _unwrap(read_weights(path, allow_pickle, UpscalerFormatError, field="model_name")[0], path)


_NEW_NAMES = (  # BasicSR's names (two generations) → the original layout's
    (r"conv_first\.", "model.0."),
    (r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d)\.", r"model.1.sub.\1.RDB\2.conv\3.0."),
    (r"(?:conv_body|trunk_conv)\.", "model.1.sub.NB."),
)


def _original_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ESRGAN state dict in BasicSR's naming under the original layout's names."""
    if "model.0.weight" in tensors:
        return tensors
    blocks = {int(m[1]) for k in tensors if (m := re.match(r"(?:body|RRDB_trunk)\.(\d+)\.", k))}
    ups = sorted(int(m[2]) for k in tensors if (m := re.fullmatch(r"(conv_up|upconv)(\d)\.weight", k)))
    top = max(ups, default=0) * 3
    out = {}
    for key, value in tensors.items():
        new = key
        for pattern, replacement in _NEW_NAMES:
            new = re.sub("^" + pattern, replacement, new)
        new = new.replace("model.1.sub.NB.", f"model.1.sub.{len(blocks)}.")
        if m := re.fullmatch(r"(?:conv_up|upconv)(\d)\.(weight|bias)", key):
            new = f"model.{int(m[1]) * 3}.{m[2]}"
        elif m := re.fullmatch(r"(?:conv_hr|HRconv)\.(weight|bias)", key):
            new = f"model.{top + 2}.{m[1]}"
        elif m := re.fullmatch(r"conv_last\.(weight|bias)", key):
            new = f"model.{top + 4}.{m[1]}"
        out[new] = value
    return out


def _esrgan(tensors: dict[str, torch.Tensor], path: Path) -> ESRGAN:
    state = _original_layout(tensors)
    if any(".conv1x1." in k for k in state):
        raise UpscalerFormatError(
            f"'{path.name}' is an ESRGAN+ model (extra 1×1 convolutions), which graphsd does not run", field="model_name"
        )
    blocks = len({int(m[1]) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB1\.", k))})
    tops = sorted({int(m[1]) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    upsamplings = len(tops) - 3  # the first conv, the HR conv and the last conv besides the upsampling convs
    expected = [0] + [3 * (i + 1) for i in range(upsamplings)] + [3 * upsamplings + 2, 3 * upsamplings + 4]
    if upsamplings < 0 or tops != expected or blocks == 0:
        raise UpscalerFormatError(f"'{path.name}': unrecognised ESRGAN layout (top-level layers {tops})", field="model_name")
    first, last = state["model.0.weight"], state[f"model.{tops[-1]}.weight"]
    cin, cout, nf = first.shape[1], last.shape[0], first.shape[0]
    unshuffle = int(math.isqrt(cin // cout)) if cin in (cout * 4, cout * 16) else 1
    net = ESRGAN(cin // unshuffle**2, cout, nf, state["model.1.sub.0.RDB1.conv1.0.weight"].shape[0], blocks, upsamplings, unshuffle)
    names = {"first": "model.0", "trunk_conv": f"model.1.sub.{blocks}", "hr": f"model.{tops[-2]}", "last": f"model.{tops[-1]}"}
    names |= {f"ups.{i}": f"model.{3 * (i + 1)}" for i in range(upsamplings)}
    for b, r, c in itertools.product(range(blocks), range(3), range(5)):
        names[f"trunk.{b}.blocks.{r}.convs.{c}"] = f"model.1.sub.{b}.RDB{r + 1}.conv{c + 1}.0"
    if net.scale < 1:
        raise UpscalerFormatError(f"'{path.name}': an ESRGAN that shrinks images, which graphsd does not run", field="model_name")
    _fill(net, state, names, path)
    return net.eval()


def _compact(tensors: dict[str, torch.Tensor], path: Path) -> Compact:
    top = max(int(m[1]) for k in tensors if (m := re.match(r"body\.(\d+)\.", k)))
    first, last = tensors["body.0.weight"], tensors[f"body.{top}.weight"]
    cin, nf, convs = first.shape[1], first.shape[0], (top - 2) // 2
    scale = math.isqrt(last.shape[0] // cin)
    if top % 2 or scale * scale * cin != last.shape[0]:
        raise UpscalerFormatError(f"'{path.name}': unrecognised Compact (SRVGGNet) layout", field="model_name")
    net = Compact(cin, cin, nf, convs, scale)
    names = {f"convs.{i}": f"body.{2 * i}" for i in range(convs + 2)} | {f"acts.{i}": f"body.{2 * i + 1}" for i in range(convs + 1)}
    _fill(net, tensors, names, path)
    return net.eval()


def _fill(net: nn.Module, state: dict[str, torch.Tensor], names: dict[str, str], path: Path) -> None:
    """Load ``net``'s parameters from the file's ``state`` through ``names`` (module → file name), strictly."""
    values, missing = {}, []
    for key, target in net.state_dict().items():
        module, _, param = key.rpartition(".")
        name = f"{names[module]}.{param}"
        if name not in state or state[name].shape != target.shape:
            missing.append(f"{name} {tuple(target.shape)}")
            continue
        values[key] = state[name].to(torch.float32)
    if missing:
        raise UpscalerFormatError(
            f"'{path.name}' does not have the layout its first layers announce: {', '.join(missing[:5])}", field="model_name"
        )
    net.load_state_dict(values, strict=True)


def load_upscaler(path: Path, allow_pickle: bool) -> ESRGAN | Compact:
    """The upscaling network in ``path`` (see the module docstring for what is recognised); its
    ``scale`` and input ``channels`` are attributes."""
    tensors = read_upscaler_file(path, allow_pickle)
    if "model.1.sub.0.RDB1.conv1.0.weight" in tensors or any(k.startswith(("body.0.rdb1.", "RRDB_trunk.0.")) for k in tensors):
        return _esrgan(tensors, path)
    if "body.0.weight" in tensors and "body.1.weight" in tensors and tensors["body.1.weight"].ndim == 1:
        return _compact(tensors, path)
    heads = sorted({k.split(".")[0] for k in tensors})[:8]
    raise UpscalerFormatError(
        f"'{path.name}' is not an upscaling model graphsd runs (ESRGAN / Real-ESRGAN, Real-ESRGAN Compact); "
        f"its tensors lie under {', '.join(heads) or 'nothing'} (SwinIR, DAT, HAT and other architectures are not supported)",
        field="model_name",
    )


# ---- running -----------------------------------------------------------------------------------
def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start: every ``tile - overlap`` pixels while more than the
    overlap is left."""
    return list(range(0, size - overlap, tile - overlap)) if size > tile else [0]


def _ramp(length: int, feather: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Weights along one side of a tile's output: ``(t + 1) / feather`` at ``t`` pixels from
    either end (both ramps where they meet), 1 inside."""
    weights = torch.ones(length, dtype=dtype, device=device)
    if feather < length:
        for t in range(feather):
            a = (t + 1) / feather
            weights[t] *= a
            weights[length - 1 - t] *= a
    return weights


def upscale_tiled(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    tile: int = TILE,
    overlap: int = OVERLAP,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``net`` applied to ``image`` [B, C, H, W] in tiles as ComfyUI does (module docstring);
    returns [B, C', H·scale, W·scale] on the image's device."""
    batch, _, height, width = image.shape
    rows, cols = _starts(height, tile, overlap), _starts(width, tile, overlap)
    total, done = batch * len(rows) * len(cols), 0
    results = []
    for b in range(batch):
        item = image[b : b + 1]
        if height <= tile and width <= tile:
            results.append(net(item))
            done += 1
            if progress:
                progress(done, total)
            continue
        out: torch.Tensor | None = None
        weight: torch.Tensor | None = None
        for y, x in itertools.product(rows, cols):
            piece = net(item[..., y : y + tile, x : x + tile])
            h, w = piece.shape[-2:]
            feather = round(overlap * scale)
            mask = _ramp(h, feather, piece.dtype, piece.device)[:, None] * _ramp(w, feather, piece.dtype, piece.device)[None, :]
            if out is None or weight is None:
                out = torch.zeros(piece.shape[:2] + (height * scale, width * scale), dtype=piece.dtype, device=piece.device)
                weight = torch.zeros_like(out)
            out[..., y * scale : y * scale + h, x * scale : x * scale + w] += piece * mask
            weight[..., y * scale : y * scale + h, x * scale : x * scale + w] += mask
            done += 1
            if progress:
                progress(done, total)
        assert out is not None and weight is not None
        results.append(out / weight)
    return torch.cat(results)
