"""Prompt encoding (chunks, weights, clip skip) and the TextEncode node, against diffusers'
``encode_prompt`` of StableDiffusionPipeline / StableDiffusionXLPipeline on tiny text encoders."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from graphsd import Engine, Settings
from graphsd.text.encode import encode_prompt, tokenize_prompt
from graphsd.text.tokenizer import clip_tokenizer, clip_tokenizer_dir

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


def test_chunks_are_encoded_separately_and_concatenated(sd1):
    _, _, pipe = sd1
    long = ours_sd1(sd1, "a photo of a cat " * 16)  # 80 tokens: 75 + 5
    first = sd1_reference(pipe, "a photo of a cat " * 15)  # the first 75 tokens
    second = sd1_reference(pipe, "a photo of a cat")  # the remaining 5, padded
    torch.testing.assert_close(long, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-6)


def test_break_starts_a_new_chunk(sd1):
    _, _, pipe = sd1
    split = ours_sd1(sd1, "a photo BREAK of a cat")
    expected = torch.cat([sd1_reference(pipe, "a photo"), sd1_reference(pipe, "of a cat")], dim=1)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-6)


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
def test_weight_scales_the_token_away_from_the_empty_prompt(sd1, weight):
    """ComfyUI-style: the weighted token's embedding is empty + w·(plain - empty) at its
    position (so w > 1 moves it away from what the empty prompt has there, w < 1 towards it);
    every other position is the plain embedding bit for bit."""
    _, _, pipe = sd1
    weighted = ours_sd1(sd1, f"a photo of a (cat:{weight})")
    plain = sd1_reference(pipe, "a photo of a cat")
    empty = sd1_reference(pipe, "")
    cat = 5  # [BOS] a photo of a cat
    torch.testing.assert_close(weighted[0, cat], empty[0, cat] + weight * (plain[0, cat] - empty[0, cat]))
    others = [i for i in range(77) if i != cat]
    assert torch.equal(weighted[0, others], plain[0, others])
    moved = (weighted[0, cat] - empty[0, cat]).norm() / (plain[0, cat] - empty[0, cat]).norm()
    assert moved.item() == pytest.approx(weight, rel=1e-4)


# ---- the node, through the engine -----------------------------------------------------------
HAND_CLIP_PLUGIN = '''
"""Test plugin: Clip handles for the tiny text encoders the test put into the ModelManager."""
from transformers import CLIPTokenizer

from graphsd import Node, NodeIO, hookimpl
from graphsd.text.tokenizer import clip_tokenizer, clip_tokenizer_dir
from graphsd.types import Clip


class HandClip(Node):
    type = "HandClip"

    class Inputs(NodeIO):
        sdxl: bool = False

    class Outputs(NodeIO):
        clip: Clip

    def run(self, inputs, ctx):
        if not inputs.sdxl:
            return self.Outputs(clip=Clip(ctx.models, {"text_encoder": "hand:sd1"}, "sd1", {"tokenizer": clip_tokenizer()}))
        tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
        keys = {"text_encoder": "hand:sdxl1", "text_encoder_2": "hand:sdxl2"}
        return self.Outputs(clip=Clip(ctx.models, keys, "sdxl", {"tokenizer": clip_tokenizer(), "tokenizer_2": tok2}))


@hookimpl
def graphsd_register_nodes():
    return [HandClip]
'''


@pytest.fixture(scope="module")
def engine(tmp_path_factory, sd1, sdxl):
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "hand_clip.py").write_text(HAND_CLIP_PLUGIN)
    out = tmp_path_factory.mktemp("out")
    engine = Engine(Settings(device="cpu", output_dir=str(out), plugins_dirs=[str(plugins)], load_entry_points=False))
    engine.models.add("hand:sd1", sd1[0])
    engine.models.add("hand:sdxl1", sdxl[0][0])
    engine.models.add("hand:sdxl2", sdxl[1][0])
    return engine


def text_encode(engine, text, clip_skip=1, sdxl=False):
    doc = {
        "version": 1,
        "nodes": {
            "clip": {"type": "HandClip", "inputs": {"sdxl": sdxl}},
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


def test_node_sdxl_long_prompt_pools_the_first_chunk(engine, sdxl):
    result = text_encode(engine, "a photo of a cat " * 16, sdxl=True)
    assert result.ok, result.errors
    cond = result.outputs["enc"]["cond"]
    assert cond.embeddings.shape == (1, 154, 96)
    embeds, pooled = sdxl_reference(sdxl[2], "a photo of a cat " * 15)
    torch.testing.assert_close(cond.embeddings[:, :77], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-5, atol=1e-6)


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
def test_loaded_checkpoint_matches_diffusers(tmp_path, folders, model, pipeline_class):
    """CheckpointLoader → TextEncode on a diffusers folder equals that folder's own pipeline's
    ``encode_prompt`` (the refiner has only ``text_encoder_2``: SDXL-style, with pooled)."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path), load_entry_points=False))
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
