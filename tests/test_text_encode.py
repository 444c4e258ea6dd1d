"""Prompt encoding (chunks, weights, clip skip) and the TextEncode node, against diffusers'
``encode_prompt`` of StableDiffusionPipeline / StableDiffusionXLPipeline on tiny text encoders.

Where both sides run the same computation on the same input (one chunk of the same tokens),
results are compared bit for bit in float32. Where they batch or split it differently (several
chunks at once against one at a time) or where an identity is checked, both sides run in float64
(copies of the same encoders) and differ by rounding only: reference.py's bound."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from reference import U64, assert_same, tolerance
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from graphsd import Engine, Settings
from graphsd.std.text.encode import encode_prompt, tokenize_prompt
from graphsd.std.text.tokenizer import clip_tokenizer, clip_tokenizer_dir

LAYERS = 3


def tiny_config(width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def reference_encoder(te):
    """A copy of ``te`` for diffusers' clip-skip path, which reads ``text_encoder.text_model.
    final_layer_norm``; transformers 5 moved ``final_layer_norm`` onto CLIPTextModel itself.
    The alias is a plain attribute (not a submodule) and changes no computation."""
    ref = copy.deepcopy(te)
    object.__setattr__(ref, "text_model", ref)
    return ref


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    te = CLIPTextModel(tiny_config(32)).eval()
    tok = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=reference_encoder(te), tokenizer=tok, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return te, tok, pipe


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(1)
    te1 = CLIPTextModel(tiny_config(32)).eval()
    te2 = CLIPTextModelWithProjection(tiny_config(64)).eval()
    tok1 = clip_tokenizer()
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")  # as SDXL's tokenizer_2
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=None, scheduler=None
    )
    return (te1, tok1), (te2, tok2), pipe


@pytest.fixture(scope="module")
def sd1_64(sd1):
    """The ``sd1`` encoder in float64 (the same numbers), with its diffusers pipeline."""
    te = copy.deepcopy(sd1[0]).to(torch.float64)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=reference_encoder(te), tokenizer=sd1[1], unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return te, sd1[1], pipe


@pytest.fixture(scope="module")
def sdxl_64(sdxl):
    """The ``sdxl`` encoders in float64 (the same numbers), with their diffusers pipeline."""
    (te1, tok1), (te2, tok2), _ = sdxl
    te1, te2 = copy.deepcopy(te1).to(torch.float64), copy.deepcopy(te2).to(torch.float64)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=None, scheduler=None
    )
    return (te1, tok1), (te2, tok2), pipe


def sd1_reference(pipe, prompt, clip_skip=1):
    """diffusers' embeddings; its ``clip_skip`` counts skipped layers (ours - 1)."""
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=None if clip_skip == 1 else clip_skip - 1)
    return embeds


def sdxl_reference(pipe, prompt, clip_skip=1):
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
        clip_skip=None if clip_skip == 1 else clip_skip - 1,
    )
    return embeds, pooled


def ours_sd1(sd1, prompt, clip_skip=1):
    te, tok, _ = sd1
    embeds, pooled = encode_prompt(prompt, [(tok, te)], clip_skip)
    assert pooled is None
    return embeds


# ---- chunking -----------------------------------------------------------------------------
@pytest.mark.parametrize(("n_tokens", "length"), [(0, 77), (75, 77), (76, 154), (150, 154), (151, 231)])
def test_chunk_count(sd1, n_tokens, length):
    assert ours_sd1(sd1, "cat " * n_tokens).shape == (1, length, 32)


def test_chunks_are_encoded_separately_and_concatenated(sd1_64):
    _, _, pipe = sd1_64
    long = ours_sd1(sd1_64, "a photo of a cat " * 16)  # 80 tokens: 75 + 5, encoded as a batch of 2
    first = sd1_reference(pipe, "a photo of a cat " * 15)  # the first 75 tokens
    second = sd1_reference(pipe, "a photo of a cat")  # the remaining 5, padded
    assert_same(long, torch.cat([first, second], dim=1), "chunked embeddings")


def test_break_starts_a_new_chunk(sd1_64):
    _, _, pipe = sd1_64
    split = ours_sd1(sd1_64, "a photo BREAK of a cat")
    expected = torch.cat([sd1_reference(pipe, "a photo"), sd1_reference(pipe, "of a cat")], dim=1)
    assert_same(split, expected, "embeddings split at BREAK")


def test_long_weighted_prompt_keeps_weights_in_both_chunks(sd1):
    te, tok, _ = sd1
    chunks = tokenize_prompt(tok, "cat " * 74 + "(dog:1.5) (bird:0.5)")
    assert chunks.ids.shape == (2, 77)
    assert chunks.weights[0, 75].item() == 1.5 and chunks.ids[0, 75].item() == tok.convert_tokens_to_ids("dog</w>")
    assert chunks.weights[1, 1].item() == 0.5 and chunks.ids[1, 1].item() == tok.convert_tokens_to_ids("bird</w>")
    assert chunks.weights[:, 0].tolist() == [1.0, 1.0] and chunks.weights[1, 2:].eq(1.0).all()


# ---- weights --------------------------------------------------------------------------------
def test_weights_of_one_are_exactly_plain(sd1):
    _, _, pipe = sd1
    assert torch.equal(ours_sd1(sd1, "a (photo:1.0) of a cat"), sd1_reference(pipe, "a photo of a cat"))
    assert torch.equal(ours_sd1(sd1, "a photo of a cat, \\(masterpiece\\)"), sd1_reference(pipe, "a photo of a cat, (masterpiece)"))


@pytest.mark.parametrize("weight", [1.5, 0.5])
def test_weight_scales_the_token_away_from_the_empty_prompt(sd1_64, weight):
    """ComfyUI-style: the weighted token's embedding is empty + w·(plain - empty) at its
    position (so w > 1 moves it away from what the empty prompt has there, w < 1 towards it);
    every other position is the plain embedding bit for bit.

    In float64 (graphsd weights a float64 encoder's embeddings in float64): the embeddings come
    from the same encoder on both sides and the weighting adds a few roundings, so the identity
    holds within reference.py's bound t."""
    _, _, pipe = sd1_64
    weighted = ours_sd1(sd1_64, f"a photo of a (cat:{weight})")
    plain = sd1_reference(pipe, "a photo of a cat")
    empty = sd1_reference(pipe, "")
    cat = 5  # [BOS] a photo of a cat
    d = plain[0, cat] - empty[0, cat]
    expected = empty[0, cat] + weight * d
    assert_same(weighted[0, cat], expected, "weighted token")
    others = [i for i in range(77) if i != cat]
    assert torch.equal(weighted[0, others], plain[0, others])
    # How far the token moved, relative to plain − empty: weighted − empty = w·d + r per element,
    # |r| ≤ t (just checked) + the two roundings of `expected` (u·(|w·d| + |expected|), taken 3×
    # for room), u = 2**-53. So the exact ratio ‖w·d + r‖ / ‖d‖ is w within √n·max|r| / ‖d‖; the
    # subtraction, the two n-term norms and the division add at most (2n + 4)·u relative to it (≤ 2w).
    r = tolerance(expected) + 3 * U64 * float((weight * d).detach().abs().max() + expected.detach().abs().max())
    n = d.numel()
    moved = (weighted[0, cat] - empty[0, cat]).norm().item() / d.norm().item()
    assert abs(moved - weight) <= math.sqrt(n) * r / d.norm().item() + (2 * n + 4) * U64 * 2 * weight


# ---- the node, through the engine -----------------------------------------------------------
HAND_CLIP_PLUGIN = '''
"""Test plugin: Clip handles for the tiny text encoders the test put into the ModelManager."""
from transformers import CLIPTokenizer

from graphsd import Node, NodeIO, hookimpl
from graphsd.std.models.family import ModelInfo
from graphsd.std.text.tokenizer import clip_tokenizer, clip_tokenizer_dir
from graphsd.types import Clip


class HandClip(Node):
    type = "HandClip"

    class Inputs(NodeIO):
        sdxl: bool = False
        fp64: bool = False  # the float64 copies of the encoders

    class Outputs(NodeIO):
        clip: Clip

    def run(self, inputs, ctx):
        tag = ":fp64" if inputs.fp64 else ""
        if not inputs.sdxl:
            return self.Outputs(clip=Clip(ctx.models, {"text_encoder": "hand:sd1" + tag}, ModelInfo("sd1", {"text_encoder": clip_tokenizer()})))
        tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
        keys = {"text_encoder": "hand:sdxl1" + tag, "text_encoder_2": "hand:sdxl2" + tag}
        return self.Outputs(clip=Clip(ctx.models, keys, ModelInfo("sdxl", {"text_encoder": clip_tokenizer(), "text_encoder_2": tok2})))


@hookimpl
def graphsd_register_nodes():
    return [HandClip]
'''


@pytest.fixture(scope="module")
def engine(tmp_path_factory, sd1, sdxl, sd1_64, sdxl_64):
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "hand_clip.py").write_text(HAND_CLIP_PLUGIN)
    out = tmp_path_factory.mktemp("out")
    engine = Engine(Settings(device="cpu", output_dir=str(out), plugins_dirs=[str(plugins)]))
    engine.models.add("hand:sd1", sd1[0])
    engine.models.add("hand:sdxl1", sdxl[0][0])
    engine.models.add("hand:sdxl2", sdxl[1][0])
    engine.models.add("hand:sd1:fp64", sd1_64[0])
    engine.models.add("hand:sdxl1:fp64", sdxl_64[0][0])
    engine.models.add("hand:sdxl2:fp64", sdxl_64[1][0])
    return engine


def text_encode(engine, text, clip_skip=1, sdxl=False, fp64=False):
    doc = {
        "version": 1,
        "nodes": {
            "clip": {"type": "HandClip", "inputs": {"sdxl": sdxl, "fp64": fp64}},
            "enc": {"type": "TextEncode", "inputs": {"clip": "@clip.clip", "text": text, "clip_skip": clip_skip}},
        },
    }
    return engine.run(doc, outputs=["enc"])


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "Hello, World! café 🐱 " * 6])
def test_node_matches_diffusers_sd1(engine, sd1, prompt, clip_skip):
    result = text_encode(engine, prompt, clip_skip)
    assert result.ok, result.errors
    cond = result.outputs["enc"]["cond"]
    assert cond.pooled is None
    assert torch.equal(cond.embeddings, sd1_reference(sd1[2], prompt, clip_skip))


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("prompt", ["a photo of a cat", ""])
def test_node_matches_diffusers_sdxl(engine, sdxl, prompt, clip_skip):
    result = text_encode(engine, prompt, clip_skip, sdxl=True)
    assert result.ok, result.errors
    cond = result.outputs["enc"]["cond"]
    embeds, pooled = sdxl_reference(sdxl[2], prompt, clip_skip)
    assert cond.embeddings.shape == (1, 77, 32 + 64) and cond.pooled.shape == (1, 16)
    assert torch.equal(cond.embeddings, embeds)
    assert torch.equal(cond.pooled, pooled)


def test_clip_skip_picks_different_layers(engine):
    last = text_encode(engine, "a photo of a cat", 1).outputs["enc"]["cond"].embeddings
    penultimate = text_encode(engine, "a photo of a cat", 2).outputs["enc"]["cond"].embeddings
    assert not torch.allclose(last, penultimate)


def test_node_sdxl_long_prompt_pools_the_first_chunk(engine, sdxl_64):
    """Two chunks encoded as a batch against the first alone: float64 encoders on both sides."""
    result = text_encode(engine, "a photo of a cat " * 16, sdxl=True, fp64=True)
    assert result.ok, result.errors
    cond = result.outputs["enc"]["cond"]
    assert cond.embeddings.shape == (1, 154, 96)
    embeds, pooled = sdxl_reference(sdxl_64[2], "a photo of a cat " * 15)
    assert_same(cond.embeddings[:, :77], embeds, "first chunk")
    assert_same(cond.pooled, pooled, "pooled output")


def test_node_rejects_clip_skip_beyond_the_layers(engine):
    result = text_encode(engine, "a cat", clip_skip=LAYERS + 1)
    assert not result.ok
    [failure] = result.errors
    assert "clip_skip" in str(failure)


# ---- with the checkpoint loader's Clip handles (diffusers folders) -------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import sd_tiny

    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": sd_tiny.save_sd1(root / "sd1"),
        "xl": sd_tiny.save_sdxl_base(root / "xl"),
        "refiner": sd_tiny.save_sdxl_refiner(root / "refiner"),
    }


@pytest.mark.parametrize(
    ("model", "pipeline_class"),
    [("sd1", StableDiffusionPipeline), ("xl", StableDiffusionXLPipeline), ("refiner", StableDiffusionXLImg2ImgPipeline)],
)
@pytest.mark.slow
def test_loaded_checkpoint_matches_diffusers(tmp_path, folders, model, pipeline_class):
    """CheckpointLoader → TextEncode on a diffusers folder equals that folder's own pipeline's
    ``encode_prompt`` (the refiner has only ``text_encoder_2``: SDXL-style, with pooled)."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    prompt, plain = r"a photo of a cat, (masterpiece:1.0), \(8k\)", "a photo of a cat, masterpiece, (8k)"
    pipe = pipeline_class.from_pretrained(str(folders[model]), local_files_only=True)
    if model == "sd1":
        pipe.text_encoder = reference_encoder(pipe.text_encoder)
    for clip_skip in (1, 2):
        doc = {
            "version": 1,
            "nodes": {
                "model": {"type": "CheckpointLoader", "inputs": {"path": str(folders[model])}},
                "enc": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": prompt, "clip_skip": clip_skip}},
            },
        }
        result = engine.run(doc, outputs=["enc"])
        assert result.ok, result.errors
        cond = result.outputs["enc"]["cond"]
        if model == "sd1":
            assert torch.equal(cond.embeddings, sd1_reference(pipe, plain, clip_skip)) and cond.pooled is None
        else:
            embeds, pooled = sdxl_reference(pipe, plain, clip_skip)
            assert torch.equal(cond.embeddings, embeds) and torch.equal(cond.pooled, pooled)
