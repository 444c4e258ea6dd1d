"""ComfyUI's simple core classes as graphsd nodes of the same names (comfy_image, comfy_latent,
comfy_primitive, comfy_text): each computes what ComfyUI's class computes, checked against torch,
PIL and formulas written here (ComfyUI's nodes.py and comfy_extras are the spec); the .latent
files against files written here with the safetensors library; the SDXL encoders against
diffusers' StableDiffusionXL pipelines on tiny random models; and ComfyUI API prompts and a
UI-format file naming these classes run through graphsd's ComfyUI import."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from reference import U32, assert_same

from graphsd import Engine, Settings, WorkflowError
from graphsd.errors import NodeError
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt
from graphsd.std.nodes.comfy_image import (
    EmptyImage,
    ImageBatch,
    ImageCrop,
    ImageInvert,
    ImagePadForOutpaint,
    ImageScale,
    ImageScaleBy,
)
from graphsd.std.nodes.comfy_latent import LatentBlend, LatentComposite, LatentFromBatch, RepeatLatentBatch
from graphsd.types import Image, Latent
from graphsd.workflow import PNG_WORKFLOW_KEY

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SD1_SCALE = 0.18215  # ComfyUI's factor of the SD1/SD2 VAE, and of its .latent files without a version


def run(node: type, **inputs):
    """A node's outputs for ``inputs`` (nodes that need no context)."""
    return node().run(node.Inputs(**inputs), None)


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def nchw(p: torch.Tensor) -> torch.Tensor:
    return p.permute(0, 3, 1, 2)


def nhwc(p: torch.Tensor) -> torch.Tensor:
    return p.permute(0, 2, 3, 1)


# ---- images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_image_scale_is_torch_interpolate_in_the_methods_mode(method):
    image = pixels(2, 5, 7, 3)
    out = run(ImageScale, image=Image(image), upscale_method=method, width=11, height=6, crop="disabled").image.pixels
    assert_same(out, nhwc(F.interpolate(nchw(image), size=(6, 11), mode=method)), method)


def test_image_scale_zero_side_keeps_the_aspect_ratio_with_pythons_rounding():
    image = Image(pixels(1, 10, 20, 3))
    size = lambda **wh: tuple(run(ImageScale, image=image, upscale_method="area", crop="disabled", **wh).image.pixels.shape[1:3])  # noqa: E731
    assert size(width=0, height=5) == (5, 10)
    assert size(width=5, height=0) == (2, 5)  # round(10 · 5 / 20) = round(2.5) = 2: half to even, as Python (and ComfyUI) round
    assert size(width=7, height=0) == (4, 7)  # round(3.5) = 4
    assert run(ImageScale, image=image, upscale_method="area", width=0, height=0, crop="disabled").image is image


def test_image_scale_center_crop_trims_the_longer_side_first():
    image = pixels(1, 8, 12, 3)  # aspect 1.5 → 1: x = round((12 - 12 · (1 / 1.5)) / 2) = 2 columns off each side
    out = run(ImageScale, image=Image(image), upscale_method="bilinear", width=4, height=4, crop="center").image.pixels
    assert_same(out, nhwc(F.interpolate(nchw(image[:, :, 2:10]), size=(4, 4), mode="bilinear")))
    tall = pixels(1, 12, 8, 3)  # aspect 2/3 → 2: y = round((12 - 12 · ((2/3) / 2)) / 2) = 4 rows off each side
    out = run(ImageScale, image=Image(tall), upscale_method="nearest-exact", width=8, height=4, crop="center").image.pixels
    assert_same(out, nhwc(F.interpolate(nchw(tall[:, 4:8]), size=(4, 8), mode="nearest-exact")))


def pil_lanczos(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """ComfyUI's lanczos of one [H, W, C] image: 255 × value truncated to 8 bits, PIL's Lanczos filter, / 255."""
    arr = np.clip(255.0 * image, 0, 255).astype(np.uint8)
    squeeze = arr.shape[-1] == 1
    out = np.asarray(PILImage.fromarray(arr[..., 0] if squeeze else arr).resize((width, height), PILImage.Resampling.LANCZOS))
    out = out.astype(np.float32) / 255.0
    return out[..., None] if squeeze else out


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_image_scale_lanczos_is_pils_filter_on_8_bit_images(channels):
    image = pixels(2, 9, 13, channels).float()
    out = run(ImageScale, image=Image(image), upscale_method="lanczos", width=20, height=7, crop="disabled").image.pixels
    reference = torch.from_numpy(np.stack([pil_lanczos(i.numpy(), 20, 7) for i in image]))
    assert out.dtype == torch.float32 and torch.equal(out, reference)


def test_lanczos_truncates_to_8_bits_as_comfyui_does():
    """0.999 × 255 = 254.7 becomes 254, not 255: a flat image keeps the truncated value."""
    flat = torch.full((1, 4, 4, 3), 0.999)
    out = run(ImageScaleBy, image=Image(flat), upscale_method="lanczos", scale_by=2.0).image.pixels
    assert out.shape == (1, 8, 8, 3) and torch.all(out == 254 / 255)


def test_image_scale_by_rounds_each_side_and_refuses_an_empty_result():
    image = pixels(1, 5, 7, 3)  # 7 × 1.5 = 10.5 → 10, 5 × 1.5 = 7.5 → 8 (half to even)
    out = run(ImageScaleBy, image=Image(image), upscale_method="bicubic", scale_by=1.5).image.pixels
    assert_same(out, nhwc(F.interpolate(nchw(image), size=(8, 10), mode="bicubic")))
    with pytest.raises(NodeError) as err:
        run(ImageScaleBy, image=Image(image), upscale_method="area", scale_by=0.05)
    assert err.value.field == "scale_by"


def test_image_invert_is_one_minus_every_channel():
    image = pixels(2, 3, 4, 4)
    assert torch.equal(run(ImageInvert, image=Image(image)).image.pixels, 1.0 - image)


def test_image_batch_joins_and_fits_the_second_batch_to_the_first():
    one, two = pixels(2, 6, 8, 3, seed=1), pixels(1, 6, 8, 3, seed=2)
    assert torch.equal(run(ImageBatch, image1=Image(one), image2=Image(two)).image.pixels, torch.cat([one, two]))
    wide = pixels(1, 6, 12, 3, seed=3)  # 12 × 6 → 8 × 6: aspect 2 → 4/3, x = round((12 - 12 · (2/3)) / 2) = 2
    out = run(ImageBatch, image1=Image(one), image2=Image(wide)).image.pixels
    assert_same(out[2:], nhwc(F.interpolate(nchw(wide[:, :, 2:10]), size=(6, 8), mode="bilinear")))
    rgba = pixels(1, 6, 8, 4, seed=4)
    out = run(ImageBatch, image1=Image(one), image2=Image(rgba)).image.pixels
    assert out.shape == (3, 6, 8, 4) and torch.equal(out[:2, ..., :3], one) and torch.all(out[:2, ..., 3] == 1.0)
    assert torch.equal(out[2:], rgba)
    with pytest.raises(NodeError) as err:
        run(ImageBatch, image1=Image(one), image2=Image(pixels(1, 6, 8, 1)))
    assert err.value.field == "image2"


def test_image_crop_cuts_the_rectangle_and_clips_it_at_the_edges():
    image = pixels(2, 10, 12, 3)
    assert torch.equal(run(ImageCrop, image=Image(image), width=5, height=4, x=3, y=2).image.pixels, image[:, 2:6, 3:8])
    assert torch.equal(run(ImageCrop, image=Image(image), width=5, height=4, x=10, y=9).image.pixels, image[:, 9:10, 10:12])
    assert torch.equal(run(ImageCrop, image=Image(image), width=5, height=4, x=50, y=50).image.pixels, image[:, 9:10, 11:12])


def test_empty_image_is_the_color_as_0xrrggbb():
    out = run(EmptyImage, width=5, height=3, batch_size=2, color=0x12AB7F).image.pixels
    assert out.shape == (2, 3, 5, 3) and out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([0x12 / 255, 0xAB / 255, 0x7F / 255]).expand(2, 3, 5, 3))


def outpaint_mask(h: int, w: int, left: int, top: int, right: int, bottom: int, feather: int) -> torch.Tensor:
    """ComfyUI's outpainting mask, pixel by pixel: 1 on the padding; inside, at distance d from the
    nearest padded side (rows from the top and columns from the left count from 0, from the bottom
    and right from 1), ((feather - d) / feather)² where d < feather, when 2 · feather < h and < w."""
    mask = torch.ones(h + top + bottom, w + left + right, dtype=torch.float32)
    for i in range(h):
        for j in range(w):
            distances = [i if top else h, h - i if bottom else h, j if left else w, w - j if right else w]
            d = min(distances)
            feathered = 0 < feather and 2 * feather < h and 2 * feather < w and d < feather
            mask[top + i, left + j] = ((feather - d) / feather) ** 2 if feathered else 0.0
    return mask


@pytest.mark.parametrize(
    "pads, feather",
    [((2, 0, 3, 1), 3), ((0, 4, 0, 0), 2), ((1, 1, 1, 1), 0), ((2, 2, 2, 2), 5)],  # the last: 2 · 5 ≥ 10, no feathering
)
def test_image_pad_for_outpaint_pads_grey_with_the_feathered_mask(pads, feather):
    left, top, right, bottom = pads
    image = pixels(2, 10, 12, 3)
    out = run(ImagePadForOutpaint, image=Image(image), left=left, top=top, right=right, bottom=bottom, feathering=feather)
    padded = out.image.pixels
    assert padded.shape == (2, 10 + top + bottom, 12 + left + right, 3)
    assert torch.equal(padded[:, top : top + 10, left : left + 12], image)
    outside = torch.ones(padded.shape[1:3], dtype=torch.bool)
    outside[top : top + 10, left : left + 12] = False
    assert torch.all(padded[:, outside] == 0.5)
    assert torch.equal(out.mask.values, outpaint_mask(10, 12, left, top, right, bottom, feather)[None])


# ---- latents --------------------------------------------------------------------------------------
def test_repeat_latent_batch_repeats_the_whole_batch_and_its_masks():
    samples, masks = latents(2, 4, 3, 5), torch.rand(2, 1, 3, 5, dtype=torch.float64)
    out = run(RepeatLatentBatch, samples=Latent(samples, noise_mask=masks), amount=3).latent
    assert torch.equal(out.samples, torch.cat([samples] * 3)) and torch.equal(out.noise_mask, torch.cat([masks] * 3))
    shared = masks[:1]
    assert run(RepeatLatentBatch, samples=Latent(samples, noise_mask=shared), amount=2).latent.noise_mask is shared


def test_latent_from_batch_takes_what_the_batch_holds():
    samples = latents(3, 4, 2, 2)
    take = lambda i, n, mask=None: run(LatentFromBatch, samples=Latent(samples, noise_mask=mask), batch_index=i, length=n).latent  # noqa: E731
    assert torch.equal(take(1, 1).samples, samples[1:2])
    assert torch.equal(take(1, 5).samples, samples[1:3])  # cut to the batch
    assert torch.equal(take(7, 2).samples, samples[2:3])  # past the end: the last one
    masks = torch.rand(2, 1, 2, 2, dtype=torch.float64)  # two masks for three latents: repeated (m0, m1, m0)
    assert torch.equal(take(1, 2, masks).noise_mask, torch.stack([masks[1], masks[0]]))
    assert torch.equal(take(2, 1, masks[:1]).noise_mask, masks[:1])  # one mask is shared


def composite_reference(to: torch.Tensor, source: torch.Tensor, x: int, y: int, feather: int) -> torch.Tensor:
    """ComfyUI's LatentComposite cell by cell (x, y, feather in latent cells): the pasted cell k
    (from 1) from an edge that lies inside samples_to is weighted k / feather."""
    out = to.clone()
    height, width = to.shape[2], to.shape[3]
    h, w = min(source.shape[2], height - y), min(source.shape[3], width - x)
    for i in range(h):
        for j in range(w):
            weight = 1.0
            if feather:
                if y > 0 and i < feather:
                    weight *= (i + 1) / feather
                if y + h < height and h - 1 - i < feather:
                    weight *= (h - i) / feather
                if x > 0 and j < feather:
                    weight *= (j + 1) / feather
                if x + w < width and w - 1 - j < feather:
                    weight *= (w - j) / feather
            out[:, :, y + i, x + j] = source[:, :, i, j] * weight + to[:, :, y + i, x + j] * (1 - weight)
    return out


@pytest.mark.parametrize("x, y, feather", [(16, 8, 0), (16, 8, 16), (0, 24, 16), (40, 40, 8), (8, 0, 24)])
def test_latent_composite_pastes_at_the_position_with_the_feathered_edge(x, y, feather):
    to, source = latents(2, 4, 8, 9, seed=1), latents(2, 4, 5, 6, seed=2)
    mask = torch.rand(2, 1, 8, 9, dtype=torch.float64)
    out = run(LatentComposite, samples_to=Latent(to, noise_mask=mask), samples_from=Latent(source), x=x, y=y, feather=feather).latent
    assert_same(out.samples, composite_reference(to, source, x // 8, y // 8, feather // 8))
    assert out.noise_mask is mask


def test_latent_composite_refuses_a_paste_outside_or_of_another_model():
    to = Latent(latents(1, 4, 4, 4))
    with pytest.raises(NodeError) as err:
        run(LatentComposite, samples_to=to, samples_from=Latent(latents(1, 4, 2, 2)), x=32, y=0, feather=0)
    assert err.value.field == "x"
    with pytest.raises(NodeError) as err:
        run(LatentComposite, samples_to=to, samples_from=Latent(latents(1, 16, 2, 2)), x=0, y=0, feather=0)
    assert err.value.field == "samples_from" and "channels" in str(err.value)


def test_latent_blend_mixes_and_fits_the_second_latent_to_the_first():
    one, two = latents(2, 4, 6, 8, seed=1), latents(2, 4, 6, 8, seed=2)
    out = run(LatentBlend, samples1=Latent(one), samples2=Latent(two), blend_factor=0.3).latent
    assert_same(out.samples, one * 0.3 + two * 0.7)
    tall = latents(2, 4, 10, 8, seed=3)  # 8 × 10 → 8 × 6: aspect 0.8 → 4/3, y = round((10 - 10 · 0.6) / 2) = 2
    out = run(LatentBlend, samples1=Latent(one), samples2=Latent(tall), blend_factor=0.25).latent
    assert_same(out.samples, one * 0.25 + F.interpolate(tall[:, :, 2:8], size=(6, 8), mode="bicubic") * 0.75)


# ---- .latent files --------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    (tmp_path / "in").mkdir()
    return tmp_path


@pytest.fixture
def engine(folders):
    return Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in")))


def write_latent(path: Path, raw: torch.Tensor, versioned: bool = True) -> Path:
    """A .latent file in ComfyUI's format, written with the safetensors library."""
    tensors = {"latent_tensor": raw}
    if versioned:
        tensors["latent_format_version_0"] = torch.tensor([])
    safetensors.torch.save_file(tensors, str(path))
    return path


def load_and_save(engine, name: str, **extra) -> tuple:
    doc = {
        "version": 1,
        "nodes": {
            "load": {"type": "LoadLatent", "inputs": {"latent": name, **extra}},
            "save": {"type": "SaveLatent", "inputs": {"samples": "@load.latent", **extra}},
        },
    }
    result = engine.run(doc, outputs=["load", "save"])
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs["load"]["latent"].samples, [Path(p) for p in result.outputs["save"]["paths"]]


def test_a_comfyui_latent_file_is_read_scaled_and_written_back_unscaled(engine, folders):
    """Version 0 holds the VAE's own latents: graphsd's are × 0.18215 (SD1/SD2 without a vae), and
    SaveLatent writes latent / 0.18215 back: the original up to two float32 roundings."""
    raw = latents(2, 4, 3, 5).float()
    write_latent(folders / "in" / "x.latent", raw)
    loaded, [path] = load_and_save(engine, "x.latent")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, (raw.double() * SD1_SCALE).float())
    assert path == folders / "out" / "latents" / "ComfyUI_00001_.latent"  # ComfyUI's name
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_format_version_0").numel() == 0
        written = f.get_tensor("latent_tensor")
        assert json.loads(f.metadata()[PNG_WORKFLOW_KEY])["nodes"]["save"]["type"] == "SaveLatent"
    assert written.dtype == torch.float32 and written.shape == raw.shape
    assert torch.all((written - raw).abs() <= 2.01 * U32 * raw.abs())
    _, [again] = load_and_save(engine, "x.latent [input]")  # the frontend's annotated name; a new file each time
    assert again.name == "ComfyUI_00002_.latent"


def test_a_latent_file_without_version_holds_scaled_latents(engine, folders):
    """Before the version marker, ComfyUI saved latents × 0.18215 and reads them × 1 / 0.18215:
    with SD1's own factor they come back exactly (the float64 product is within 3 · 2^-53 of the
    float32 value, far less than half its ulp)."""
    raw = latents(1, 4, 4, 4).float()
    write_latent(folders / "old.latent", raw, versioned=False)
    loaded, _ = load_and_save(engine, str(folders / "old.latent"))
    assert torch.equal(loaded, raw)


def test_a_missing_latent_file_is_refused_at_validation_on_its_field(engine, folders):
    """Before anything runs, naming where graphsd looked and the .latent files the input folder has."""
    write_latent(folders / "in" / "other.latent", latents(1, 4, 2, 2).float())
    with pytest.raises(WorkflowError) as info:
        engine.run({"version": 1, "nodes": {"load": {"type": "LoadLatent", "inputs": {"latent": "bad.latent"}}}}, outputs=["load"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("load", "latent")
    assert "does not exist" in issue.message and str(folders / "in" / "bad.latent") in issue.message and "other.latent" in issue.message


@pytest.mark.parametrize(
    "content, expected",
    [(b"not safetensors at all", "not a readable .latent"), ({"other": torch.zeros(1)}, "holds no latents")],
)
def test_a_bad_latent_file_fails_the_node_on_its_field(engine, folders, content, expected):
    path = folders / "in" / "bad.latent"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        safetensors.torch.save_file(content, str(path))
    result = engine.run({"version": 1, "nodes": {"load": {"type": "LoadLatent", "inputs": {"latent": "bad.latent"}}}}, outputs=["load"])
    assert not result.ok
    [failure] = result.errors
    assert failure.node_id == "load" and "input 'latent'" in failure.message
    assert expected in failure.message and failure.traceback == ""


@pytest.mark.parametrize("linked", [False, True])
def test_load_latent_reads_a_replaced_file_again(engine, folders, linked):
    """The cache knows the file (or, for a name that comes through a link, the input folder)."""
    nodes = {"load": {"type": "LoadLatent", "inputs": {"latent": "@name.value" if linked else "x.latent"}}}
    nodes["name"] = {"type": "PrimitiveString", "inputs": {"value": "x.latent"}}
    for size in (2, 3):
        write_latent(folders / "in" / "x.latent", latents(1, 4, size, size).float())
        result = engine.run({"version": 1, "nodes": nodes}, outputs=["load"])
        assert result.ok and result.outputs["load"]["latent"].samples.shape == (1, 4, size, size)


def test_load_latent_reads_only_where_a_confined_workflow_may(folders):
    write_latent(folders / "x.latent", latents(1, 4, 2, 2).float())
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), read_roots=[str(folders / "in")]))
    doc = {"version": 1, "nodes": {"load": {"type": "LoadLatent", "inputs": {"latent": str(folders / "x.latent")}}}}
    result = engine.run(doc, outputs=["load"])
    assert not result.ok and "outside the folders this workflow may read" in result.errors[0].message


def test_save_latent_stays_inside_the_output_directory(engine, folders):
    write_latent(folders / "in" / "x.latent", latents(1, 4, 2, 2).float())
    doc = {
        "version": 1,
        "nodes": {
            "load": {"type": "LoadLatent", "inputs": {"latent": "x.latent"}},
            "save": {"type": "SaveLatent", "inputs": {"samples": "@load.latent", "filename_prefix": "../escape"}},
        },
    }
    result = engine.run(doc)
    assert not result.ok and "filename_prefix" in str(result.errors[0]) and not list(folders.glob("escape*"))


# ---- primitives -----------------------------------------------------------------------------------
def test_primitives_feed_the_inputs_of_their_type(engine, folders):
    doc = {
        "version": 1,
        "nodes": {
            "w": {"type": "PrimitiveInt", "inputs": {"value": 6}},
            "s": {"type": "PrimitiveFloat", "inputs": {"value": 1.5}},
            "m": {"type": "PrimitiveString", "inputs": {"value": "bilinear"}},
            "p": {"type": "PrimitiveStringMultiline", "inputs": {"value": "sub/name"}},
            "b": {"type": "PrimitiveBoolean", "inputs": {"value": False}},
            "img": {"type": "EmptyImage", "inputs": {"width": "@w.value", "height": "@w.value", "color": 0xFF0000}},
            "up": {"type": "ImageScaleBy", "inputs": {"image": "@img.image", "upscale_method": "@m.value", "scale_by": "@s.value"}},
            "save": {"type": "SaveImage", "inputs": {"image": "@up.image", "prefix": "@p.value", "embed_workflow": "@b.value"}},
        },
    }
    result = engine.run(doc, outputs=["up", "save"])
    assert result.ok, [str(e) for e in result.errors]
    assert result.outputs["up"]["image"].pixels.shape == (1, 9, 9, 3)
    [path] = result.files
    assert Path(path) == folders / "out" / "sub" / "name_00001.png"
    with PILImage.open(path) as im:
        assert PNG_WORKFLOW_KEY not in im.text and im.getpixel((4, 4)) == (255, 0, 0)


def test_a_primitive_of_another_type_or_out_of_range_is_refused(engine):
    float_into_int = {
        "version": 1,
        "nodes": {
            "f": {"type": "PrimitiveFloat", "inputs": {"value": 2.0}},
            "img": {"type": "EmptyImage", "inputs": {"width": "@f.value"}},
        },
    }
    with pytest.raises(WorkflowError) as err:
        engine.load(float_into_int)
    assert any(issue.node == "img" and issue.field == "width" for issue in err.value.issues)
    negative = copy.deepcopy(float_into_int)
    negative["nodes"]["f"] = {"type": "PrimitiveInt", "inputs": {"value": -3}}
    result = engine.run(negative, outputs=["img"])
    assert not result.ok and "width" in result.errors[0].message and "greater than or equal to 1" in result.errors[0].message
    with pytest.raises(WorkflowError):
        engine.load({"version": 1, "nodes": {"f": {"type": "PrimitiveFloat", "inputs": {"value": float("inf")}}}})


# ---- ComfyUI prompts and UI files without a model --------------------------------------------------
def image_prompt() -> dict:
    """An API prompt of image classes: a red image, padded for outpainting, resized, inverted, joined, saved."""
    return {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 24}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 16, "batch_size": 1, "color": 0xFF0000}},
        "3": {
            "class_type": "ImagePadForOutpaint",
            "inputs": {"image": ["2", 0], "left": 8, "top": 0, "right": 0, "bottom": 8, "feathering": 4},
        },
        "4": {
            "class_type": "ImageScale",
            "inputs": {"image": ["3", 0], "upscale_method": "nearest-exact", "width": 16, "height": 0, "crop": "disabled"},
        },
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "outpaint"}},
    }


def test_a_comfyui_prompt_of_image_classes_writes_the_expected_pixels(engine, folders):
    """After padding the picture is 32 × 24: red in columns 8..31 of rows 0..15, grey (0.5) elsewhere.
    nearest-exact to 16 × round(24 · 16 / 32) = 16 × 12 halves both sides: output pixel (i, j) is
    source pixel (2i + 1, 2j + 1), red for j ≥ 4 and i ≤ 7. The inverted copy follows in the batch."""
    result = engine.run(image_prompt())
    assert result.ok, [str(e) for e in result.errors]
    paths = sorted(Path(p) for p in result.files)  # numbered in batch order
    assert len(paths) == 2 and all(p.parent == folders / "out" and p.name.startswith("outpaint_") for p in paths)
    first, second = (np.asarray(PILImage.open(p)).astype(int) for p in paths)
    red = np.zeros((12, 16), dtype=bool)
    red[:8, 4:] = True
    grey = round(0.5 * 255)  # 127.5 rounds to even: 128, and 1 - 0.5 is grey again
    expected = np.where(red[..., None], [255, 0, 0], grey)
    assert (first == expected).all()
    assert (second == np.where(red[..., None], [0, 255, 255], grey)).all()


def test_out_of_range_widgets_of_these_classes_are_refused_on_import(engine):
    prompt = image_prompt()
    prompt["2"]["inputs"]["color"] = 0x1000000
    prompt["4"]["inputs"]["upscale_method"] = "bislerp"
    with pytest.raises(WorkflowError) as err:
        engine.load(prompt)
    assert {(i.node, i.field) for i in err.value.issues} >= {("2", "color"), ("4", "upscale_method")}


def ui_node(nid: int, kind: str, widgets: list, inputs: list | None = None, outputs: list | None = None) -> dict:
    return {"id": nid, "type": kind, "mode": 0, "inputs": inputs or [], "outputs": outputs or [], "widgets_values": widgets}


def test_a_ui_file_maps_the_widgets_of_these_classes_by_comfyuis_order(engine):
    """Widget values in ComfyUI's order: PrimitiveInt [value, control], EmptyImage [width, height,
    batch_size, color], ImagePadForOutpaint [left, top, right, bottom, feathering], ImageScale
    [upscale_method, width, height, crop], SaveImage [filename_prefix]."""
    ui = {
        "last_node_id": 5,
        "nodes": [
            ui_node(1, "PrimitiveInt", [24, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
            ui_node(
                2,
                "EmptyImage",
                [512, 16, 1, 16711680],
                inputs=[{"name": "width", "type": "INT", "link": 1, "widget": {"name": "width"}}],
                outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
            ),
            ui_node(
                3,
                "ImagePadForOutpaint",
                [8, 0, 0, 8, 4],
                inputs=[{"name": "image", "type": "IMAGE", "link": 2}],
                outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [3]}, {"name": "MASK", "type": "MASK", "links": []}],
            ),
            ui_node(
                4,
                "ImageScale",
                ["nearest-exact", 16, 0, "disabled"],
                inputs=[{"name": "image", "type": "IMAGE", "link": 3}],
                outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [4]}],
            ),
            ui_node(5, "SaveImage", ["outpaint"], inputs=[{"name": "images", "type": "IMAGE", "link": 4}]),
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 4, 0, 5, 0, "IMAGE"]],
    }
    prompt = ui_to_prompt(ui, class_definitions(engine.nodes))
    expected = image_prompt()
    for cid in ("1", "2", "3", "4"):
        assert prompt[cid]["inputs"] == expected[cid]["inputs"], cid
    assert prompt["5"]["inputs"] == {"images": ["4", 0], "filename_prefix": "outpaint"}
    engine.load(ui)


def test_the_comfyui_import_keeps_these_classes_and_their_input_names(engine):
    nodes = comfy_to_workflow(image_prompt(), engine.nodes)["nodes"]
    assert nodes["3"] == {
        "type": "ImagePadForOutpaint",
        "inputs": {"image": "@2.image", "left": 8, "top": 0, "right": 0, "bottom": 8, "feathering": 4},
    }
    assert nodes["2"]["inputs"]["width"] == "@1.value"


# ---- SDXL text encoders against diffusers (tiny random SDXL models) --------------------------------
SEED = 1234


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import sd_tiny

    return sd_tiny.save_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def xl_engine(tiny, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(tiny), output_dir=str(tmp_path_factory.mktemp("out"))))


def xl_pipeline(folder: Path, cls_name: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True).to(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs(engine, nodes: dict, *names: str) -> dict:
    result = engine.run({"version": 1, "nodes": nodes}, outputs=list(names))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


def sdxl_encode(text_g: str, text_l: str, **sizes) -> dict:
    inputs = {"clip": "@model.clip", "text_g": text_g, "text_l": text_l, **sizes}
    return {"type": "CLIPTextEncodeSDXL", "inputs": inputs}


XL = {"model": {"type": "CheckpointLoader", "inputs": {"path": "xl", "dtype": "fp64"}}}


@pytest.mark.slow
def test_clip_text_encode_sdxl_is_diffusers_encode_prompt_with_prompt_2(xl_engine, tiny):
    """text_l through the first encoder, text_g through the second (and its pooled output):
    diffusers' ``encode_prompt(prompt=text_l, prompt_2=text_g)``. A text with more chunks (BREAK)
    than the other makes the other continue with chunks of the empty prompt."""
    pipe = xl_pipeline(tiny / "xl", "StableDiffusionXLPipeline")
    out = outputs(
        xl_engine,
        {**XL, "a": sdxl_encode("a red circle", "a blue square"), "b": sdxl_encode("a red circle BREAK on a table", "a square")},
        "a",
        "b",
    )

    def encode(l_text: str, g_text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=l_text, prompt_2=g_text, device="cpu", do_classifier_free_guidance=False)
        return embeds, pooled

    embeds, pooled = encode("a blue square", "a red circle")
    assert_same(out["a"]["cond"].embeddings, embeds, "embeddings")
    assert_same(out["a"]["cond"].pooled, pooled, "pooled")
    width = pipe.text_encoder.config.hidden_size  # the first encoder's part of each embedding
    square, _ = encode("a square", "on a table")
    empty, _ = encode("", "x")
    circle, circle_pooled = encode("x", "a red circle")
    expected = torch.cat(
        [torch.cat([square[..., :width], empty[..., :width]], 1), torch.cat([circle[..., width:], square[..., width:]], 1)], -1
    )
    assert_same(out["b"]["cond"].embeddings, expected, "chunks")
    assert_same(out["b"]["cond"].pooled, circle_pooled, "pooled of the first chunk")


@pytest.mark.slow
def test_sdxl_size_conditioning_reaches_the_unet_as_diffusers_time_ids(xl_engine, tiny):
    """CLIPTextEncodeSDXL's width/height, crop_w/crop_h and target sizes are diffusers'
    original_size, crops_coords_top_left and target_size, (height, width) each, for the positive
    and the negative alike: the denoised latents match the pipeline given those sizes."""
    from reference import diffusers_noise_in_float32

    pos = sdxl_encode("a red circle", "a circle", width=96, height=80, crop_w=8, crop_h=16, target_width=64, target_height=48)
    neg = sdxl_encode("blurry", "blurry", width=40, height=56, crop_w=0, crop_h=24, target_width=64, target_height=64)
    nodes = {
        **XL,
        "pos": pos,
        "neg": neg,
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": 64, "height": 64}},
        "denoise": {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@model.unet",
                "positive": "@pos.cond",
                "negative": "@neg.cond",
                "noise": "@noise.noise",
                "steps": 3,
                "cfg": 7.5,
            },
        },
    }
    out = outputs(xl_engine, nodes, "denoise", "pos", "neg")
    pipe = xl_pipeline(tiny / "xl", "StableDiffusionXLPipeline")
    conds = {
        "prompt_embeds": out["pos"]["cond"].embeddings,
        "negative_prompt_embeds": out["neg"]["cond"].embeddings,
        "pooled_prompt_embeds": out["pos"]["cond"].pooled,
        "negative_pooled_prompt_embeds": out["neg"]["cond"].pooled,
    }
    common = {"num_inference_steps": 3, "guidance_scale": 7.5, "height": 64, "width": 64, "output_type": "latent"}
    sizes = {
        "original_size": (80, 96),
        "crops_coords_top_left": (16, 8),
        "target_size": (48, 64),
        "negative_original_size": (56, 40),
        "negative_crops_coords_top_left": (24, 0),
        "negative_target_size": (64, 64),
    }
    with diffusers_noise_in_float32():
        reference = pipe(**conds, **common, **sizes, generator=torch.Generator().manual_seed(SEED)).images
        default = pipe(**conds, **common, generator=torch.Generator().manual_seed(SEED)).images
    assert_same(out["denoise"]["latent"].samples, reference)
    assert float((reference - default).abs().max()) > 1e-6  # the sizes do reach the U-Net


@pytest.mark.slow
def test_sdxl_refiner_aesthetic_scores_are_diffusers_aesthetic_score(xl_engine, tiny, tmp_path):
    """CLIPTextEncodeSDXLRefiner's ascore and size are the refiner pipeline's aesthetic_score /
    negative_aesthetic_score and original_size; image-to-image from a latent that LoadLatent read."""
    from reference import diffusers_noise_in_float32

    write_latent(tmp_path / "start.latent", latents(1, 4, 8, 8, seed=5).float())
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "refiner", "dtype": "fp64"}},
        "pos": {
            "type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"clip": "@model.clip", "text": "a red circle", "ascore": 7.5, "width": 96, "height": 80},
        },
        "neg": {
            "type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"clip": "@model.clip", "text": "blurry", "ascore": 1.5, "width": 48, "height": 72},
        },
        "start": {"type": "LoadLatent", "inputs": {"latent": str(tmp_path / "start.latent"), "vae": "@model.vae"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "latent": "@start.latent"}},
        "denoise": {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@model.unet",
                "positive": "@pos.cond",
                "negative": "@neg.cond",
                "noise": "@noise.noise",
                "latent": "@start.latent",
                "steps": 4,
                "cfg": 7.5,
                "denoise": 0.5,
            },
        },
    }
    out = outputs(xl_engine, nodes, "denoise", "pos", "neg", "start")
    pipe = xl_pipeline(tiny / "refiner", "StableDiffusionXLImg2ImgPipeline")
    with diffusers_noise_in_float32():
        reference = pipe(
            prompt_embeds=out["pos"]["cond"].embeddings,
            negative_prompt_embeds=out["neg"]["cond"].embeddings,
            pooled_prompt_embeds=out["pos"]["cond"].pooled,
            negative_pooled_prompt_embeds=out["neg"]["cond"].pooled,
            image=out["start"]["latent"].samples.double(),
            strength=0.5,
            num_inference_steps=4,
            guidance_scale=7.5,
            aesthetic_score=7.5,
            negative_aesthetic_score=1.5,
            original_size=(80, 96),
            negative_original_size=(72, 48),
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).images
    assert_same(out["denoise"]["latent"].samples, reference)


@pytest.mark.slow
def test_clip_text_encode_sdxl_refuses_a_clip_with_one_text_encoder(xl_engine):
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "enc": {"type": "CLIPTextEncodeSDXL", "inputs": {"clip": "@model.clip", "text_g": "a", "text_l": "a"}},
    }
    with pytest.raises(WorkflowError) as info:  # at validation: the sd1 folder has one text encoder
        xl_engine.run({"version": 1, "nodes": nodes}, outputs=["enc"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("enc", "clip") and "CLIPTextEncodeSDXLRefiner" in str(issue)


# ---- a ComfyUI prompt on graphsd-tiny ------------------------------------------------------------
def tiny_prompt() -> dict:
    """The example text-to-image prompt at 64 × 64, 2 steps, with its seed and prompt from
    primitives, the latent batched, picked, composited onto itself and saved as a .latent."""
    prompt = json.loads((WORKFLOWS / "comfy_txt2img.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64, batch_size=1)
    prompt["3"]["inputs"].update(steps=2, seed=["20", 0])
    prompt["6"]["inputs"]["text"] = ["21", 0]
    prompt.update(
        {
            "20": {"class_type": "PrimitiveInt", "inputs": {"value": 5}},
            "21": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a blue square"}},
            "30": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["3", 0], "amount": 2}},
            "31": {"class_type": "LatentFromBatch", "inputs": {"samples": ["30", 0], "batch_index": 1, "length": 1}},
        }
    )
    prompt["32"] = {
        "class_type": "LatentComposite",
        "inputs": {"samples_to": ["3", 0], "samples_from": ["31", 0], "x": 16, "y": 24, "feather": 8},
    }
    prompt["33"] = {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": "latents/tiny", "vae": ["4", 2]}}
    prompt["8"]["inputs"]["samples"] = ["32", 0]
    return prompt


@pytest.mark.slow
def test_a_comfyui_prompt_with_latent_classes_and_primitives_runs_on_graphsd_tiny(tmp_path):
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), input_dir=str(tmp_path / "in")))
    prompt = tiny_prompt()
    result = engine.run(prompt, outputs=["3", "32", "33", "9"])
    assert result.ok, [str(e) for e in result.errors]
    sampled, composite = result.outputs["3"]["latent"].samples, result.outputs["32"]["latent"].samples
    # the composite pastes the sampled latent onto itself at cell (2, 3), faded over one cell
    expected = composite_reference(sampled.double(), sampled.double(), 2, 3, 1)
    assert torch.all((composite.double() - expected).abs() <= 4 * U32 * (sampled.double().abs().max()))
    [latent_file] = result.outputs["33"]["paths"]
    assert Path(latent_file) == tmp_path / "out" / "latents" / "tiny_00001_.latent"
    scale = 0.8359811902046204  # graphsd-tiny's VAE scaling_factor: the file holds latent / scale
    assert torch.equal(safetensors.torch.load_file(latent_file)["latent_tensor"], (composite.double() / scale).float())
    with PILImage.open(result.outputs["9"]["paths"][0]) as im:
        assert im.size == (64, 64)

    (tmp_path / "in").mkdir()
    Path(latent_file).rename(tmp_path / "in" / "tiny.latent")
    back = {
        "4": prompt["4"],
        "40": {"class_type": "LoadLatent", "inputs": {"latent": "tiny.latent [input]", "vae": ["4", 2]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "from_latent"}},
    }
    result = engine.run(back, outputs=["40"])
    assert result.ok, [str(e) for e in result.errors]
    loaded = result.outputs["40"]["latent"].samples
    assert torch.all((loaded - composite).abs() <= 2.01 * U32 * composite.abs())


# ---- what graphsd serve lists ---------------------------------------------------------------------
MAX = 16384  # ComfyUI's MAX_RESOLUTION
COMFY_WIDGETS = {
    # ComfyUI class: its widgets in the frontend's order, (name, type or choices, default, min, max), from nodes.py / comfy_extras
    "ImageScale": [
        ("upscale_method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], "nearest-exact", None, None),
        ("width", "INT", 512, 0, MAX),
        ("height", "INT", 512, 0, MAX),
        ("crop", ["disabled", "center"], "disabled", None, None),
    ],
    "ImageScaleBy": [
        ("upscale_method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], "nearest-exact", None, None),
        ("scale_by", "FLOAT", 1.0, 0.01, 8.0),
    ],
    "ImageCrop": [("width", "INT", 512, 1, MAX), ("height", "INT", 512, 1, MAX), ("x", "INT", 0, 0, MAX), ("y", "INT", 0, 0, MAX)],
    "EmptyImage": [
        ("width", "INT", 512, 1, MAX),
        ("height", "INT", 512, 1, MAX),
        ("batch_size", "INT", 1, 1, 4096),
        ("color", "INT", 0, 0, 0xFFFFFF),
    ],
    "ImagePadForOutpaint": [(side, "INT", 0, 0, MAX) for side in ("left", "top", "right", "bottom")] + [("feathering", "INT", 40, 0, MAX)],
    "RepeatLatentBatch": [("amount", "INT", 1, 1, 64)],
    "LatentFromBatch": [("batch_index", "INT", 0, 0, 63), ("length", "INT", 1, 1, 64)],
    "LatentComposite": [("x", "INT", 0, 0, MAX), ("y", "INT", 0, 0, MAX), ("feather", "INT", 0, 0, MAX)],
    "LatentBlend": [("blend_factor", "FLOAT", 0.5, 0, 1)],
    "SaveLatent": [("filename_prefix", "STRING", "latents/ComfyUI", None, None)],
    "CLIPTextEncodeSDXL": [
        ("width", "INT", 1024, 0, MAX),
        ("height", "INT", 1024, 0, MAX),
        ("crop_w", "INT", 0, 0, MAX),
        ("crop_h", "INT", 0, 0, MAX),
        ("target_width", "INT", 1024, 0, MAX),
        ("target_height", "INT", 1024, 0, MAX),
        ("text_g", "STRING", "", None, None),
        ("text_l", "STRING", "", None, None),
    ],
    "CLIPTextEncodeSDXLRefiner": [
        ("ascore", "FLOAT", 6.0, 0, 1000),
        ("width", "INT", 1024, 0, MAX),
        ("height", "INT", 1024, 0, MAX),
        ("text", "STRING", "", None, None),
    ],
    "PrimitiveInt": [("value", "INT", 0, -(2**63 - 1), 2**63 - 1)],
    "PrimitiveFloat": [("value", "FLOAT", 0.0, -(2**63 - 1), 2**63 - 1)],
    "PrimitiveString": [("value", "STRING", "", None, None)],
    "PrimitiveStringMultiline": [("value", "STRING", "", None, None)],
    "PrimitiveBoolean": [("value", "BOOLEAN", False, None, None)],
}


@pytest.mark.parametrize("name", COMFY_WIDGETS)
def test_object_info_lists_comfyuis_widgets_in_comfyuis_order(name, engine):
    """/object_info (what the frontend builds its widgets from, and what UI files are read with)
    gives each class ComfyUI's widgets, in ComfyUI's order, with its defaults and ranges."""
    entry = class_definitions(engine.nodes)[name]
    widgets = []
    for section in ("required", "optional"):
        for field in entry["input_order"][section]:
            kind, opts = entry["input"][section][field]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((field, kind, opts.get("default"), opts.get("min"), opts.get("max")))
    assert widgets == COMFY_WIDGETS[name]
