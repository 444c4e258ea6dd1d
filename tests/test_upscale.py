"""UpscaleModelLoader and ImageUpscaleWithModel on tiny ESRGAN-family models with random weights,
written here as real files in their layouts (ESRGAN's original ``model.N`` layout, BasicSR's
``conv_first`` / ``body`` layout, Real-ESRGAN's pixel-unshuffled ×2, Real-ESRGAN Compact). The
reference is the architectures' definitions written here as plain functions over the files'
tensors (ESRGAN: Wang et al. 2018; Compact: Real-ESRGAN's SRVGGNetCompact), in float64; and
ComfyUI's tiled blending written here in closed form.

(spandrel, the library ComfyUI uses, needs torchvision, which graphsd does not install, so it is
not the reference here; graphsd's networks were checked equal to spandrel 0.4.2's, to the last bit
in float64, on random weights in all these layouts, while they were written.)"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from reference import assert_same
from safetensors.torch import save_file

from graphsd import Engine, Settings, WorkflowError
from graphsd.server.objectinfo import native_entry
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.models.upscalers import OVERLAP, TILE, UpscalerFormatError, load_upscaler, upscale_tiled
from graphsd.std.nodes.upscale import ImageUpscaleWithModel

NF, GC = 8, 4  # filters and growth channels of the tiny models


# ---- tiny models, as the files hold them ---------------------------------------------------------
def esrgan_state(blocks: int, upsamplings: int, cin: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ESRGAN's original names: model.0 first conv, model.1.sub.B.RDBr.convc.0
    dense-block convs and model.1.sub.<blocks> the trunk conv, model.3k the upsampling convs,
    then the HR conv and the last conv two and four places after the last upsampling."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name: str, cin: int, cout: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.1
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1

    conv("model.0", cin, NF)
    for b, r, c in itertools.product(range(blocks), range(1, 4), range(1, 6)):
        conv(f"model.1.sub.{b}.RDB{r}.conv{c}.0", NF + (c - 1) * GC, GC if c < 5 else NF)
    conv(f"model.1.sub.{blocks}", NF, NF)
    for k in range(1, upsamplings + 1):
        conv(f"model.{3 * k}", NF, NF)
    conv(f"model.{3 * upsamplings + 2}", NF, NF)
    conv(f"model.{3 * upsamplings + 4}", NF, 3)
    return state


def basicsr_names(state: dict[str, torch.Tensor], blocks: int, upsamplings: int) -> dict[str, torch.Tensor]:
    """The same weights under BasicSR's names (Real-ESRGAN's files)."""
    names = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body"}
    names |= {f"model.{3 * k}": f"conv_up{k}" for k in range(1, upsamplings + 1)}
    names |= {f"model.{3 * upsamplings + 2}": "conv_hr", f"model.{3 * upsamplings + 4}": "conv_last"}
    for b, r, c in itertools.product(range(blocks), range(1, 4), range(1, 6)):
        names[f"model.1.sub.{b}.RDB{r}.conv{c}.0"] = f"body.{b}.rdb{r}.conv{c}"
    return {f"{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v for k, v in state.items()}


def compact_state(convs: int, scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact: body.2i convolutions, body.2i+1 per-channel PReLU slopes, the last conv to 3·scale² channels."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(convs + 2):
        cin, cout = (3 if i == 0 else NF), (3 * scale * scale if i == convs + 1 else NF)
        state[f"body.{2 * i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.1
        state[f"body.{2 * i}.bias"] = torch.randn(cout, generator=g) * 0.1
        if i <= convs:
            state[f"body.{2 * i + 1}.weight"] = torch.rand(NF, generator=g) * 0.3
    return state


# ---- the architectures, as functions over the tensors --------------------------------------------
def esrgan_reference(state: dict, x: torch.Tensor, blocks: int, upsamplings: int, unshuffle: int = 1) -> torch.Tensor:
    def conv(t, name):
        return F.conv2d(t, state[f"{name}.weight"].double(), state[f"{name}.bias"].double(), padding=1)

    def lrelu(t):
        return torch.where(t >= 0, t, 0.2 * t)

    h, w = x.shape[-2:]
    if unshuffle > 1:
        x = F.pixel_unshuffle(F.pad(x, (0, -w % unshuffle, 0, -h % unshuffle), mode="reflect"), unshuffle)
    first = conv(x, "model.0")
    t = first
    for b in range(blocks):
        block_in = t
        for r in range(1, 4):
            dense = [t]
            for c in range(1, 6):
                out = conv(torch.cat(dense, 1), f"model.1.sub.{b}.RDB{r}.conv{c}.0")
                dense.append(lrelu(out))
            t = out * 0.2 + dense[0]
        t = t * 0.2 + block_in
    feat = first + conv(t, f"model.1.sub.{blocks}")
    for k in range(1, upsamplings + 1):
        feat = lrelu(conv(feat.repeat_interleave(2, -1).repeat_interleave(2, -2), f"model.{3 * k}"))
    out = conv(lrelu(conv(feat, f"model.{3 * upsamplings + 2}")), f"model.{3 * upsamplings + 4}")
    scale = 2**upsamplings // unshuffle
    return out[..., : h * scale, : w * scale]


def compact_reference(state: dict, x: torch.Tensor, convs: int, scale: int) -> torch.Tensor:
    out = x
    for i in range(convs + 1):
        out = F.conv2d(out, state[f"body.{2 * i}.weight"].double(), state[f"body.{2 * i}.bias"].double(), padding=1)
        out = torch.where(out >= 0, out, state[f"body.{2 * i + 1}.weight"].double()[:, None, None] * out)
    last = 2 * (convs + 1)
    out = F.conv2d(out, state[f"body.{last}.weight"].double(), state[f"body.{last}.bias"].double(), padding=1)
    return F.pixel_shuffle(out, scale) + x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def image(h: int, w: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64)


# ---- architectures ---------------------------------------------------------------------------------
CASES = {  # file name: (state, reference, scale)
    "4x_esrgan.safetensors": (esrgan_state(2, 2), lambda s, x: esrgan_reference(s, x, 2, 2), 4),
    "2x_esrgan.safetensors": (esrgan_state(1, 1, seed=1), lambda s, x: esrgan_reference(s, x, 1, 1), 2),
    "1x_esrgan.safetensors": (esrgan_state(1, 0, seed=2), lambda s, x: esrgan_reference(s, x, 1, 0), 1),
    "8x_esrgan.safetensors": (esrgan_state(1, 3, seed=3), lambda s, x: esrgan_reference(s, x, 1, 3), 8),
    "RealESRGAN_x4plus.safetensors": (basicsr_names(esrgan_state(2, 2, seed=4), 2, 2), None, 4),
    "RealESRGAN_x2plus.safetensors": (basicsr_names(esrgan_state(1, 2, cin=12, seed=5), 1, 2), None, 2),
    "realesr-general-x4v3.safetensors": (compact_state(3, 4, seed=6), lambda s, x: compact_reference(s, x, 3, 4), 4),
}


def original(name: str) -> dict:
    """The original-layout state whose BasicSR renaming a case holds (for the reference)."""
    return {
        "RealESRGAN_x4plus.safetensors": esrgan_state(2, 2, seed=4),
        "RealESRGAN_x2plus.safetensors": esrgan_state(1, 2, cin=12, seed=5),
    }[name]


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    state, ref, _ = CASES[name]
    if name == "RealESRGAN_x4plus.safetensors":
        return esrgan_reference(original(name), x, 2, 2)
    if name == "RealESRGAN_x2plus.safetensors":
        return esrgan_reference(original(name), x, 1, 2, unshuffle=2)
    return ref(state, x)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "upscale_models").mkdir()
    for name, (state, _, _) in CASES.items():
        save_file(state, root / "upscale_models" / name)
    torch.save({"params_ema": CASES["RealESRGAN_x4plus.safetensors"][0]}, root / "upscale_models" / "RealESRGAN_x4plus.pth")
    swin = {"layers.0.residual_group.blocks.0.norm1.weight": torch.ones(4), "conv_first.weight": torch.ones(4, 3, 3, 3)}
    save_file(swin, root / "upscale_models" / "SwinIR_4x.safetensors")
    return root


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("size", [(13, 17), (16, 16)])
def test_networks_compute_the_architectures(models, name, size):
    net = load_upscaler(models / "upscale_models" / name, allow_pickle=False).double()
    x = image(*size)
    with torch.no_grad():
        ours = net(x)
    expected = reference(name, x)
    assert net.scale == CASES[name][2] and ours.shape[-2:] == (size[0] * net.scale, size[1] * net.scale)
    assert_same(ours, expected, name)


def test_basicsr_pickles_with_params_ema_need_allow_pickle(models):
    path = models / "upscale_models" / "RealESRGAN_x4plus.pth"
    with pytest.raises(UpscalerFormatError, match="allow-pickle"):
        load_upscaler(path, allow_pickle=False)
    net = load_upscaler(path, allow_pickle=True).double()
    x = image(9, 11, 1)
    with torch.no_grad():
        assert_same(net(x), reference("RealESRGAN_x4plus.safetensors", x))


def test_other_architectures_are_refused_by_name(models):
    with pytest.raises(UpscalerFormatError, match="SwinIR, DAT, HAT"):
        load_upscaler(models / "upscale_models" / "SwinIR_4x.safetensors", allow_pickle=False)


# ---- ComfyUI's tiles ---------------------------------------------------------------------------
def ramp(length: int, feather: int) -> torch.Tensor:
    """ComfyUI's tile weights along one side, in closed form: rising (t+1)/f over the first f
    pixels and falling over the last f (both where they meet); none when f does not fit."""
    t = torch.arange(length, dtype=torch.float64)
    if feather >= length:
        return torch.ones(length, dtype=torch.float64)
    rise = torch.where(t < feather, (t + 1) / feather, torch.ones_like(t))
    fall = torch.where(length - 1 - t < feather, (length - t) / feather, torch.ones_like(t))
    return rise * fall


def tiled_reference(net, x: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Every output pixel: the average of the tiles' outputs covering it, weighted by their ramps."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return net(x)
    total = torch.zeros(x.shape[0], 3, h * scale, w * scale, dtype=torch.float64)
    weights = torch.zeros_like(total)
    starts = [range(0, n - overlap, tile - overlap) if n > tile else [0] for n in (h, w)]
    for y, x0 in itertools.product(*starts):
        piece = net(x[..., y : min(y + tile, h), x0 : min(x0 + tile, w)])
        ph, pw = piece.shape[-2:]
        mask = ramp(ph, overlap * scale)[:, None] * ramp(pw, overlap * scale)[None, :]
        total[..., y * scale : y * scale + ph, x0 * scale : x0 * scale + pw] += piece * mask
        weights[..., y * scale : y * scale + ph, x0 * scale : x0 * scale + pw] += mask
    return total / weights


@pytest.mark.parametrize(("size", "tile", "overlap"), [((40, 29), 16, 4), ((16, 50), 16, 3), ((12, 12), 16, 4)])
def test_tiles_are_blended_as_comfyui_blends_them(models, size, tile, overlap):
    net = load_upscaler(models / "upscale_models" / "2x_esrgan.safetensors", allow_pickle=False).double()
    x = image(*size, batch=1)
    with torch.no_grad():
        assert_same(upscale_tiled(net, x, 2, tile, overlap), tiled_reference(net, x, 2, tile, overlap))


def test_a_pixelwise_model_comes_out_the_same_tiled_or_whole():
    """Blending only averages: for a model that looks at one pixel at a time, the tiles' outputs
    agree wherever they overlap and tiling changes nothing (to rounding)."""

    def pixelwise(x):
        return torch.sigmoid(3 * x - 1).repeat_interleave(4, -1).repeat_interleave(4, -2)

    x = image(70, 45, batch=2)
    assert_same(upscale_tiled(pixelwise, x, 4, tile=32, overlap=8), pixelwise(x))


def test_comfyuis_tile_is_512_pixels_overlapping_by_32():
    assert (TILE, OVERLAP) == (512, 32)


# ---- the nodes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out"))))


@pytest.mark.slow
def test_loading_and_upscaling_an_image_file(engine, models, tmp_path):
    pixels = (image(20, 24, batch=1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    PILImage.fromarray(pixels.numpy()).save(tmp_path / "in.png")
    nodes = {
        "load": {"type": "LoadImage", "inputs": {"path": str(tmp_path / "in.png")}},
        "model": {"type": "UpscaleModelLoader", "inputs": {"model_name": "4x_esrgan.safetensors"}},
        "up": {"type": "ImageUpscaleWithModel", "inputs": {"upscale_model": "@model.upscale_model", "image": "@load.image"}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["up"])
    assert result.ok, [str(e) for e in result.errors]
    ours = result.outputs["up"]["image"].pixels
    x = pixels.permute(2, 0, 1)[None].double() / 255
    expected = reference("4x_esrgan.safetensors", x).clamp(0, 1).permute(0, 2, 3, 1)
    assert ours.shape == (1, 80, 96, 3)
    assert (ours.double() - expected).abs().max() < 1e-5  # float32 network: rounding of a few dozen layers, far below 1/255


@pytest.mark.slow
def test_loader_errors_name_the_field_and_what_is_there(engine):
    def loader(name):
        return {"version": 1, "nodes": {"m": {"type": "UpscaleModelLoader", "inputs": {"model_name": name}}}}

    with pytest.raises(WorkflowError) as info:  # a missing file: at validation
        engine.run(loader("missing.pth"), outputs=["m"])
    [issue] = info.value.issues
    assert issue.field == "model_name" and "4x_esrgan.safetensors" in str(issue)
    for name, message in (("RealESRGAN_x4plus.pth", "allow-pickle"), ("SwinIR_4x", "SwinIR")):
        result = engine.run(loader(name), outputs=["m"])
        assert not result.ok
        assert result.errors[0].message.startswith("input 'model_name':") and message in result.errors[0].message


def test_comfy_prompt_classes_and_the_upscale_model_type(engine):
    prompt = json.loads((Path(__file__).resolve().parent.parent / "workflows" / "comfy_txt2img.json").read_text())
    prompt["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x_esrgan.safetensors"}}
    prompt["21"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["20", 0], "image": ["8", 0]}}
    prompt["9"]["inputs"]["images"] = ["21", 0]
    nodes = comfy_to_workflow(prompt, engine.registry.nodes)["nodes"]
    assert nodes["21"] == {"type": "ImageUpscaleWithModel", "inputs": {"upscale_model": "@20.upscale_model", "image": "@8.image"}}
    assert nodes["9"]["inputs"]["image"] == "@21.image"
    types: dict[str, str] = {}
    for found in engine.pm.hook.graphsd_comfy_types():
        types.update(found)
    entry = native_entry(ImageUpscaleWithModel, "ImageUpscaleWithModel", "x", types)
    assert entry["input"]["required"]["upscale_model"][0] == "UPSCALE_MODEL" and entry["output"] == ["IMAGE"]
    prompt["21"]["inputs"]["upscale_model"] = ["8", 0]  # an IMAGE where the model goes
    with pytest.raises(WorkflowError):
        engine.run(prompt)
