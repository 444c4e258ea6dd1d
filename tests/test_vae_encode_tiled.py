"""VAEEncode in tiles: ComfyUI's VAEEncodeTiled imports as VAEEncode's tiled mode (diffusers'
tiling, checked against diffusers in test_sd_parity.py), and under a VRAM budget a frame whose
encode would not fit is encoded in tiles on its own, as VAEDecode decodes in tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from graphsd import Engine, Settings
from graphsd.memory import ModelOffload
from graphsd.std.comfy import comfy_to_workflow

pytestmark = pytest.mark.slow  # whole workflows on graphsd-tiny: the fast lane skips this module


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    """A 256×256 picture with structure at every scale (so tiles see different context)."""
    path = tmp_path_factory.mktemp("in") / "in.png"
    y, x = np.mgrid[0:256, 0:256] / 256.0
    rgb = np.stack([np.sin(9 * x) * np.cos(5 * y), x * y, np.cos(13 * (x - y))], axis=-1) * 0.5 + 0.5
    PILImage.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return str(path)


def encode_nodes(picture: str, **tiles) -> dict:
    return {
        "version": 1,
        "nodes": {
            "m": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
            "load": {"type": "LoadImage", "inputs": {"path": picture}},
            "enc": {"type": "VAEEncode", "inputs": {"vae": "@m.vae", "image": "@load.image", **tiles}},
        },
    }


def latent(engine: Engine, doc: dict, node: str = "enc") -> torch.Tensor:
    result = engine.run(doc, outputs=[node])
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs[node]["latent"].samples


def test_comfyui_vae_encode_tiled_is_vae_encode_in_tiles(tmp_path, picture):
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": picture}},
        "11": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "tile_size": 128, "overlap": 32}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    doc = comfy_to_workflow(prompt)
    node = doc["nodes"]["11"]
    assert node["type"] == "VAEEncode"
    assert node["inputs"] == {"vae": "@4.vae", "image": "@10.image", "tiled": True, "tile_size": 128, "tile_overlap": 32}
    engine = Engine(Settings(output_dir=str(tmp_path)))
    tiled = latent(engine, doc, "11")
    assert torch.equal(tiled, latent(engine, encode_nodes(picture, tiled=True, tile_size=128, tile_overlap=32)))
    assert (tiled - latent(engine, encode_nodes(picture))).abs().max() > 1e-3  # the tiles really are encoded apart


def test_under_a_budget_a_frame_too_large_to_encode_whole_is_encoded_in_tiles(tmp_path, picture):
    """graphsd-tiny's VAE (15.5 MB of fp32 weights) under a 24 MiB budget on the CPU: the whole
    256² frame's encode (about 54 MB of activations) does not fit even with the VAE's blocks
    streamed, so the node encodes in tiles (a quarter's overlap, as diffusers) instead of
    failing; the result is the tiled mode's at that tile."""
    from graphsd.std.models.streaming import encode_tile

    engine = Engine(Settings(output_dir=str(tmp_path)))
    engine.models.strategy = ModelOffload(24 * 2**20, on_cpu=True)
    doc = encode_nodes(picture)
    got = latent(engine, doc)
    key = next(k for k in engine.models.entries if k.endswith(":vae:fp32"))
    down = 8
    tile = encode_tile(engine.models, key, (1, 3, 256, 256), down)
    assert tile is not None and tile < 256 // down  # the frame did not fit whole
    free = Engine(Settings(output_dir=str(tmp_path)))
    assert torch.equal(got, latent(free, encode_nodes(picture, tiled=True, tile_size=tile * down, tile_overlap=tile // 4 * down)))


def test_a_tile_overlap_not_below_the_tile_size_is_refused_by_both_vae_nodes(tmp_path, picture):
    doc = encode_nodes(picture, tiled=True, tile_size=64, tile_overlap=64)
    doc["nodes"]["dec"] = {
        "type": "VAEDecode",
        "inputs": {"vae": "@m.vae", "latent": "@enc.latent", "tiled": True, "tile_size": 64, "tile_overlap": 64},
    }
    engine = Engine(Settings(output_dir=str(tmp_path)))
    for node, upstream_ok in (("enc", None), ("dec", {"tiled": True, "tile_size": 64, "tile_overlap": 16})):
        if upstream_ok:
            doc["nodes"]["enc"]["inputs"].update(upstream_ok)
        result = engine.run(doc, outputs=[node])
        [error] = result.errors
        assert error.node_id == node and "tile_overlap (64) must be smaller than tile_size (64)" in error.message
