"""ComfyUI's mask classes and their image companions (graphsd/std/nodes/comfy_mask.py): each
computes what ComfyUI's class computes (its nodes.py / comfy_extras are the spec), checked
against PIL, scipy.ndimage (the grey-scale morphology ComfyUI's GrowMask calls), torch and
formulas written here; ComfyUI API prompts and a UI-format file naming them run through graphsd's
ComfyUI import on graphsd-tiny."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from reference import assert_same

from graphsd import Engine, Settings
from graphsd.errors import NodeError
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt
from graphsd.std.nodes.comfy_mask import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageCompositeMasked,
    ImageScaleToTotalPixels,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)
from graphsd.types import Image, Mask


def run(node: type, ctx=None, **inputs):
    return node().run(node.Inputs(**inputs), ctx)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- simple mask classes ------------------------------------------------------------------------
def test_mask_to_image_repeats_the_mask_in_three_channels():
    mask = rand(2, 5, 7)
    image = run(MaskToImage, mask=Mask(mask)).image.pixels
    assert image.shape == (2, 5, 7, 3)
    for c in range(3):
        assert torch.equal(image[..., c], mask)


def test_solid_threshold_and_crop():
    solid = run(SolidMask, value=0.25, width=7, height=3).mask.values
    assert solid.shape == (1, 3, 7) and solid.dtype == torch.float32 and bool((solid == 0.25).all())
    mask = rand(2, 6, 8)
    mask[0, 0, 0] = 0.5  # equal to the threshold: below
    thresholded = run(ThresholdMask, mask=Mask(mask), value=0.5).mask.values
    assert torch.equal(thresholded, torch.tensor(np.where(mask.numpy() > 0.5, 1.0, 0.0), dtype=torch.float64))
    assert thresholded[0, 0, 0] == 0
    crop = run(CropMask, mask=Mask(mask), x=5, y=2, width=10, height=3).mask.values
    assert torch.equal(crop, mask[:, 2:5, 5:8])  # cut at the right edge


def test_crop_outside_the_mask_names_the_field():
    with pytest.raises(NodeError) as info:
        run(CropMask, mask=Mask(rand(1, 4, 4)), x=4, y=0, width=2, height=2)
    assert info.value.field == "x" and "below 4" in str(info.value)


def test_feather_mask_ramps_as_comfyui_does():
    """Left and top: the k-th column (row) from the edge times k / n. Right and bottom, as ComfyUI
    indexes them (column -k for k = 0, 1, ...): column 0 times 1 / n, the last column times 2 / n,
    ..., the (n-1)-th from the right times n / n."""
    height, width = 6, 9
    mask = torch.ones(1, height, width, dtype=torch.float64)
    out = run(FeatherMask, mask=Mask(mask), left=3, top=2, right=4, bottom=0).mask.values[0]
    cols = np.ones(width)
    for k in range(1, 4):  # left: columns 0, 1, 2 get 1/3, 2/3, 3/3
        cols[k - 1] *= k / 3
    cols[0] *= 1 / 4  # right ramp, k = 0
    for k in range(1, 4):  # right ramp, k = 1..3: columns W-1, W-2, W-3 get 2/4, 3/4, 4/4
        cols[width - k] *= (k + 1) / 4
    rows = np.ones(height)
    rows[0], rows[1] = 1 / 2, 2 / 2
    np.testing.assert_allclose(out.numpy(), np.outer(rows, cols), rtol=1e-15)


# ---- GrowMask -----------------------------------------------------------------------------------
@pytest.mark.parametrize("expand", [-2, -1, 0, 1, 3])
@pytest.mark.parametrize("tapered", [True, False])
def test_grow_mask_is_scipys_grey_morphology_repeated(expand, tapered):
    """ComfyUI's GrowMask: |expand| passes of scipy.ndimage.grey_dilation (erosion when negative)
    with the 3x3 footprint, its corners off when tapered."""
    mask = (rand(2, 12, 10) > 0.8).double() * rand(2, 12, 10, seed=1)
    c = 0 if tapered else 1
    footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    expected = []
    for m in mask.numpy():
        for _ in range(abs(expand)):
            m = (scipy.ndimage.grey_erosion if expand < 0 else scipy.ndimage.grey_dilation)(m, footprint=footprint)
        expected.append(m)
    out = run(GrowMask, mask=Mask(mask), expand=expand, tapered_corners=tapered).mask.values
    assert torch.equal(out, torch.from_numpy(np.stack(expected)))


# ---- ImageCompositeMasked -----------------------------------------------------------------------
def composite_reference(dest: np.ndarray, src: np.ndarray, x: int, y: int, mask: np.ndarray | None) -> np.ndarray:
    """Pixel by pixel: inside the source's rectangle (clipped to the destination) out = m src +
    (1 - m) dest with m the mask at that source pixel (1 without a mask)."""
    out = dest.copy()
    for b in range(dest.shape[0]):
        for i in range(src.shape[1]):
            for j in range(src.shape[2]):
                if y + i < dest.shape[1] and x + j < dest.shape[2]:
                    m = 1.0 if mask is None else mask[min(b, mask.shape[0] - 1), i, j]
                    out[b, y + i, x + j] = m * src[min(b, src.shape[0] - 1), i, j] + (1 - m) * dest[b, y + i, x + j]
    return out


@pytest.mark.parametrize("x,y", [(0, 0), (3, 2), (6, 5), (20, 0)])
def test_image_composite_masked_blends_the_source_rectangle(x, y):
    dest, src = rand(2, 7, 9, 3), rand(1, 4, 5, 3, seed=1)
    mask = rand(1, 4, 5, seed=2)  # the source's size: resizing it changes nothing
    out = run(ImageCompositeMasked, destination=Image(dest), source=Image(src), x=x, y=y, resize_source=False, mask=Mask(mask))
    assert_same(out.image.pixels, torch.from_numpy(composite_reference(dest.numpy(), src.numpy(), x, y, mask.numpy())))
    plain = run(ImageCompositeMasked, destination=Image(dest), source=Image(src), x=x, y=y, resize_source=False)
    assert_same(plain.image.pixels, torch.from_numpy(composite_reference(dest.numpy(), src.numpy(), x, y, None)))


def test_image_composite_masked_resizes_mask_and_source_bilinearly():
    dest, src = rand(1, 8, 8, 3), rand(1, 4, 4, 3, seed=1)
    mask = rand(1, 2, 2, seed=2)
    out = run(ImageCompositeMasked, destination=Image(dest), source=Image(src), x=1, y=2, resize_source=False, mask=Mask(mask))
    m = F.interpolate(mask[None], size=(4, 4), mode="bilinear")[0]
    assert_same(out.image.pixels, torch.from_numpy(composite_reference(dest.numpy(), src.numpy(), 1, 2, m.numpy())))
    grey = torch.full((1, 2, 3, 3), 0.25, dtype=torch.float64)  # resized to the destination: 0.25 everywhere
    whole = run(ImageCompositeMasked, destination=Image(dest), source=Image(grey), x=0, y=0, resize_source=True)
    assert torch.allclose(whole.image.pixels, torch.full_like(dest, 0.25), atol=1e-15, rtol=0)


def test_image_composite_masked_keeps_the_destinations_channels():
    dest = torch.cat([rand(1, 4, 4, 3), torch.full((1, 4, 4, 1), 0.5, dtype=torch.float64)], dim=-1)
    out = run(ImageCompositeMasked, destination=Image(dest), source=Image(rand(1, 2, 2, 3, seed=1)), x=0, y=0, resize_source=False)
    assert out.image.pixels.shape == (1, 4, 4, 4)
    assert bool((out.image.pixels[0, :2, :2, 3] == 1).all()) and bool((out.image.pixels[0, 2:, :, 3] == 0.5).all())
    rgba_into_rgb = run(ImageCompositeMasked, destination=Image(rand(1, 4, 4, 3)), source=Image(dest), x=0, y=0, resize_source=False)
    assert torch.equal(rgba_into_rgb.image.pixels, dest[..., :3])


# ---- ImageScaleToTotalPixels --------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,megapixels,steps,expected",
    [
        ((64, 48), 0.01, 1, (118, 89)),  # scale sqrt(0.01 · 2^20 / 3072) = 1.8475: 118.24, 88.68
        ((64, 48), 0.01, 8, (120, 88)),  # 118.24 / 8 = 14.78 -> 15, 88.68 / 8 = 11.08 -> 11
        ((1000, 1000), 1.0, 1, (1024, 1024)),
        ((30, 10), 0.25, 64, (896, 320)),  # scale sqrt(0.25 · 2^20 / 300) = 29.56: 886.8 -> 14 x 64, 295.6 -> 5 x 64
    ],
)
def test_image_scale_to_total_pixels_size(size, megapixels, steps, expected):
    width, height = size
    scale = math.sqrt(megapixels * 2**20 / (width * height))
    assert (round(width * scale / steps) * steps, round(height * scale / steps) * steps) == expected  # the formula itself
    image = Image(rand(1, height, width, 3))
    out = run(ImageScaleToTotalPixels, image=image, upscale_method="bilinear", megapixels=megapixels, resolution_steps=steps)
    assert tuple(out.image.pixels.shape[1:3]) == (expected[1], expected[0])
    reference = F.interpolate(image.pixels.permute(0, 3, 1, 2), size=(expected[1], expected[0]), mode="bilinear").permute(0, 2, 3, 1)
    assert_same(out.image.pixels, reference)


# ---- LoadImageMask ------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def rgba_picture(seed: int = 0, size: tuple[int, int] = (6, 4)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)


def load_mask(engine: Engine, image: str, channel: str) -> torch.Tensor:
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": image, "channel": channel, "upload": "image"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    result = engine.run(prompt, outputs=["1"])
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs["1"]["mask"].values


@pytest.mark.parametrize("channel,index", [("alpha", 3), ("red", 0), ("green", 1), ("blue", 2)])
def test_load_image_mask_reads_a_channel_of_a_picture_in_the_input_folder(folders, channel, index):
    data = rgba_picture()
    PILImage.fromarray(data, "RGBA").save(folders / "in" / "m.png")
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in")))
    values = data[..., index].astype(np.float32) / 255
    expected = torch.from_numpy(1 - values if channel == "alpha" else values)[None]
    for name in ("m.png", "m.png [input]"):
        assert torch.equal(load_mask(engine, name, channel), expected)


def test_load_image_mask_of_an_rgb_picture_and_an_annotated_output_file(folders):
    data = rgba_picture(1)[..., :3]
    PILImage.fromarray(data, "RGB").save(folders / "out" / "rgb.png")
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in")))
    assert torch.equal(load_mask(engine, "rgb.png [output]", "alpha"), torch.zeros(1, 4, 6))  # opaque: nothing masked
    assert torch.equal(load_mask(engine, "rgb.png [output]", "green"), torch.from_numpy(data[..., 1].astype(np.float32) / 255)[None])


def test_load_image_mask_turns_the_picture_upright_by_its_exif_orientation(folders):
    """EXIF orientation 3 means 'shown rotated by 180 degrees': the mask is the stored pixels
    turned by 180 degrees, as ComfyUI's exif_transpose gives them."""
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    exif = PILImage.Exif()
    exif[0x0112] = 3
    PILImage.fromarray(grey, "L").save(folders / "in" / "turned.png", exif=exif)
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in")))
    expected = torch.from_numpy(np.rot90(grey, 2).astype(np.float32) / 255)[None]
    assert torch.equal(load_mask(engine, "turned.png", "red"), expected)


def test_load_image_mask_stays_inside_a_confined_workflows_folders(folders, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    PILImage.fromarray(rgba_picture(), "RGBA").save(outside)
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in"), read_roots=[str(folders)]))
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": str(outside), "channel": "red"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    result = engine.run(prompt)
    assert not result.ok and "outside the folders" in str(result.errors[0])


# ---- ComfyUI prompts on graphsd-tiny ------------------------------------------------------------
def inpaint_prompt() -> dict:
    """The shape of real inpainting prompts: a picture and a mask file, the mask grown, the
    repainted picture pasted back through it."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "picture.png"}},
        "mask_image": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "grow": {"class_type": "GrowMask", "inputs": {"mask": ["mask_image", 0], "expand": 2, "tapered_corners": True}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a blue circle"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "encode": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2], "mask": ["grow", 0]}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["encode", 0],
                "seed": 1,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "paste": {
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": ["image", 0], "source": ["decode", 0], "x": 0, "y": 0, "resize_source": False, "mask": ["grow", 0]},
        },
        "scaled": {
            "class_type": "ImageScaleToTotalPixels",
            "inputs": {"image": ["paste", 0], "upscale_method": "area", "megapixels": 0.01, "resolution_steps": 8},
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["scaled", 0], "filename_prefix": "inpaint"}},
    }


@pytest.mark.slow
def test_inpaint_prompt_with_a_mask_file_runs_and_keeps_the_picture_outside_the_mask(folders):
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[..., 0] = 200
    PILImage.fromarray(picture).save(folders / "in" / "picture.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:44] = 255
    PILImage.fromarray(mask).save(folders / "in" / "mask.png")
    engine = Engine(Settings(device="cpu", output_dir=str(folders / "out"), input_dir=str(folders / "in")))
    result = engine.run(inpaint_prompt(), outputs=["paste", "scaled", "save"])
    assert result.ok, [str(e) for e in result.errors]
    pasted = result.outputs["paste"]["image"].pixels
    grown = np.zeros((64, 64), dtype=bool)
    grown[14:42, 18:46] = True  # tapered growth by 2 never reaches beyond the rectangle grown by 2
    outside = torch.from_numpy(~grown)
    assert torch.equal(pasted[0][outside], torch.from_numpy(picture.astype(np.float32) / 255)[outside])
    assert result.outputs["scaled"]["image"].pixels.shape[1:3] == (104, 104)  # sqrt(0.01 · 2^20) = 102.4 -> 13 x 8
    assert len(result.files) == 1


def test_ui_format_widgets_land_on_comfyuis_input_names():
    """Widget values as the editor saves them (LoadImageMask's upload button value included)."""
    engine = Engine(Settings(device="cpu"))
    classes = class_definitions(engine.nodes)

    def node(nid, kind, widgets, source=None, kind_in="MASK", kind_out="MASK", name=None):
        inputs = [{"name": name or kind_in.lower(), "type": kind_in, "link": source}] if source else []
        return {
            "id": nid,
            "type": kind,
            "mode": 0,
            "inputs": inputs,
            "outputs": [{"name": kind_out, "type": kind_out, "links": [nid]}],
            "widgets_values": widgets,
        }

    workflow = {
        "nodes": [
            node(1, "LoadImageMask", ["mask.png", "alpha", "image"]),
            node(2, "GrowMask", [10, False], 1),
            node(3, "FeatherMask", [1, 2, 3, 4], 2),
            node(4, "MaskToImage", [], 3, kind_out="IMAGE"),
            node(5, "ImageScaleToTotalPixels", ["lanczos", 1.5], 4, "IMAGE", "IMAGE"),
            node(6, "PreviewImage", [], 5, "IMAGE", "IMAGE", "images"),
        ],
        "links": [[i, i, 0, i + 1, 0, "MASK" if i < 4 else "IMAGE"] for i in range(1, 6)],
    }
    prompt = ui_to_prompt(workflow, classes)
    assert prompt["1"]["inputs"] == {"image": "mask.png", "channel": "alpha", "upload": "image"}
    assert prompt["2"]["inputs"] == {"mask": ["1", 0], "expand": 10, "tapered_corners": False}
    assert prompt["3"]["inputs"] == {"mask": ["2", 0], "left": 1, "top": 2, "right": 3, "bottom": 4}
    assert prompt["5"]["inputs"] == {"image": ["4", 0], "upscale_method": "lanczos", "megapixels": 1.5, "resolution_steps": 1}
    doc = comfy_to_workflow(prompt, engine.nodes)
    assert doc["nodes"]["2"] == {"type": "GrowMask", "inputs": {"mask": "@1.mask", "expand": 10, "tapered_corners": False}}


@pytest.mark.parametrize(
    "cls,inputs,field",
    [
        ("GrowMask", {"expand": 16385, "tapered_corners": True}, "expand"),
        ("ThresholdMask", {"value": 1.5}, "value"),
        ("ImageScaleToTotalPixels", {"upscale_method": "bislerp", "megapixels": 1.0}, "upscale_method"),
        ("ImageScaleToTotalPixels", {"upscale_method": "area", "megapixels": 17.0}, "megapixels"),
        ("LoadImageMask", {"image": "m.png", "channel": "hue"}, "channel"),
    ],
)
def test_out_of_range_widgets_are_refused_at_validation(cls, inputs, field):
    from graphsd.errors import WorkflowError

    engine = Engine(Settings(device="cpu"))
    source = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}}
    link = {"image": ["0", 0]} if cls == "ImageScaleToTotalPixels" else {} if cls == "LoadImageMask" else {"mask": ["0", 0]}
    prompt = {"0": source, "1": {"class_type": cls, "inputs": {**inputs, **link}}}
    if cls == "ImageScaleToTotalPixels":
        prompt["0"] = {"class_type": "MaskToImage", "inputs": {"mask": ["9", 0]}}
        prompt["9"] = source
    prompt["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0] if cls == "ImageScaleToTotalPixels" else ["3", 0]}}
    if cls != "ImageScaleToTotalPixels":
        prompt["3"] = {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}}
    with pytest.raises(WorkflowError) as info:
        engine.load(prompt)
    assert any(i.node == "1" and i.field == field for i in info.value.issues), [str(i) for i in info.value.issues]
