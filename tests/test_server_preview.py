"""Live previews during sampling: ``Engine.run(..., previews=True)`` and the binary type-4 frames
(PREVIEW_IMAGE_WITH_METADATA) that ``graphsd serve`` sends to the client that queued a prompt,
when that client asks for them (feature flag ``supports_preview_metadata``, or
``extra_data.preview_method``), never otherwise. graphsd-tiny at 64x64, a few steps."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import graphsd
from graphsd.events import Preview
from graphsd.std.sampling import preview as preview_module
from tests.test_server_harness import Served, receive, txt2img

pytestmark = pytest.mark.slow

STEPS = 3

#: The last preview is a JPEG of the decoded final latent. JPEG keeps each 8x8 block's mean up to
#: its quantised DC coefficient (at quality 90 the DC step is 3 in units where DC = 8 x the block
#: mean, so the mean moves by at most 3/2/8 of a level); chroma subsampling averages, which keeps
#: means; the conversions to and from YCbCr and the 8-bit rounding on both sides add at most one
#: level each; clipping ringing back into [0, 255] can move a mean by at most another level.
JPEG_MEAN_TOLERANCE = 3.5 / 255


def workflow(seed: int) -> dict:
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle on a white background"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"width": 64, "height": 64, "seed": seed}},
            "denoise": {
                "type": "UNetDenoiseLoop",
                "inputs": {
                    "unet": "@model.unet",
                    "positive": "@pos.cond",
                    "negative": "@neg.cond",
                    "noise": "@noise.noise",
                    "steps": STEPS,
                    "cfg": 7.5,
                    "sampler": "euler",
                },
            },
            "image": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@denoise.latent"}},
        },
    }


def mean_colour(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255


def test_engine_previews_show_each_step_and_change_nothing(tmp_path):
    engine = graphsd.Engine(graphsd.Settings(output_dir=str(tmp_path)))
    seen: list[Preview] = []
    with_previews = engine.run(
        workflow(5), outputs=["image"], on_event=lambda e: seen.append(e) if isinstance(e, Preview) else None, previews=True
    )
    assert with_previews.ok
    assert [p.node_id for p in seen] == ["denoise"] * STEPS
    assert all(p.image_type == "image/jpeg" for p in seen)
    assert not any(isinstance(e, Preview) for e in with_previews.events)  # transient: the result keeps no pictures

    # graphsd-tiny's VAE is not linear in colour: the fitted map's error is too large, so previews
    # are decoded by the VAE itself, at full size for a 64x64 image
    vae = with_previews.outputs["model"]["vae"]
    fitted = preview_module._MAPS[engine.models.get(vae.keys["vae"])]
    assert fitted.rms_error > preview_module.MAX_LINEAR_RMS
    decoded = with_previews.outputs["image"]["image"].pixels[0].numpy().astype(np.float64)
    last = seen[-1].image_bytes()
    assert Image.open(io.BytesIO(last)).size == (64, 64)
    # Euler's last x0 estimate is the final latent, so the last preview is that latent decoded
    assert np.abs(mean_colour(last) - decoded.reshape(-1, 3).mean(0)).max() <= JPEG_MEAN_TOLERANCE

    engine.cache.clear()
    quiet: list[object] = []
    without = engine.run(workflow(5), outputs=["image"], on_event=quiet.append)
    assert without.ok and not any(isinstance(e, Preview) for e in quiet)
    assert torch.equal(with_previews.outputs["denoise"]["latent"].samples, without.outputs["denoise"]["latent"].samples)
    assert torch.equal(with_previews.outputs["image"]["image"].pixels, without.outputs["image"]["image"].pixels)


@pytest.fixture(scope="module")
def server(shared_server):
    """The server process shared with test_server.py and test_server_load.py (tests/conftest.py)."""
    return shared_server["server"]


def run_prompt(server: Served, seed: int, announce: bool, **extra) -> tuple[str, list[dict], list[bytes]]:
    """Queue txt2img from a websocket client (announcing ``supports_preview_metadata`` first when
    ``announce``); return the prompt id, its text messages and the binary frames, until done."""
    ws = server.ws()
    try:
        sid = receive(ws)["data"]["sid"]
        if announce:
            ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            reply = receive(ws)
            # the queue's status broadcasts (the shared server has other clients) may come first
            while isinstance(reply, dict) and reply["type"] == "status":
                reply = receive(ws)
            assert reply["type"] == "feature_flags"
        prompt_id = server.queue_prompt(txt2img(seed=seed, steps=STEPS, cfg=1.0), sid, **extra)
        texts, frames = [], []
        while True:
            msg = receive(ws)
            if isinstance(msg, bytes):
                frames.append(msg)
                continue
            texts.append(msg)
            if msg["type"] == "executing" and msg["data"]["node"] is None and msg["data"]["prompt_id"] == prompt_id:
                return prompt_id, texts, frames
    finally:
        ws.close()


def parse_frame(frame: bytes) -> tuple[int, dict, bytes]:
    kind, length = struct.unpack(">II", frame[:8])
    return kind, json.loads(frame[8 : 8 + length]), frame[8 + length :]


def test_a_client_that_supports_previews_gets_type_4_frames_of_the_sampler_node(server):
    prompt_id, texts, frames = run_prompt(server, seed=11, announce=True)
    assert texts[-2]["type"] == "execution_success"
    assert 1 <= len(frames) <= STEPS  # one per step at most; a slow reader skips some
    for frame in frames:
        kind, meta, image = parse_frame(frame)
        assert kind == 4
        assert meta == {
            "node_id": "3",  # the KSampler
            "prompt_id": prompt_id,
            "display_node_id": "3",
            "parent_node_id": None,
            "real_node_id": "3",
            "image_type": "image/jpeg",
        }
        decoded = Image.open(io.BytesIO(image))
        assert decoded.format == "JPEG" and decoded.size == (64, 64)


def test_preview_method_none_turns_previews_off_and_latent2rgb_turns_them_on(server):
    _, texts, frames = run_prompt(server, seed=12, announce=True, extra_data={"preview_method": "none"})
    assert texts[-2]["type"] == "execution_success" and frames == []
    _, texts, frames = run_prompt(server, seed=13, announce=False)  # a client that never said it reads them
    assert texts[-2]["type"] == "execution_success" and frames == []
    _, texts, frames = run_prompt(server, seed=14, announce=False, extra_data={"preview_method": "latent2rgb"})
    assert texts[-2]["type"] == "execution_success" and frames and all(parse_frame(f)[0] == 4 for f in frames)


def test_an_unknown_preview_method_is_refused_with_the_allowed_values(server):
    status, body = server.json("POST", "/prompt", {"prompt": txt2img(seed=15), "extra_data": {"preview_method": "fancy"}})
    assert status == 400
    assert "preview_method" in body["error"]["message"] and "latent2rgb" in body["error"]["message"]
