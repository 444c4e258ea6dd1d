"""Textual-inversion embeddings: the files of every common format, found by name in
``<models_dir>/embeddings`` and named in prompts as ComfyUI (``embedding:NAME``) and A1111 (the
bare name) write them, against diffusers' ``load_textual_inversion`` + ``encode_prompt``.

The embedding files are written here in each real format. Both sides run the same float64
encoders (the vectors replace the token embedding at the same positions), so they differ by
rounding only: reference.py's bound."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from reference import assert_same
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from graphsd import Engine, Settings
from graphsd.std.models.embeddings import EmbeddingFormatError, available_embeddings, find_embedding, load_embedding
from graphsd.std.text.tokenizer import clip_tokenizer_dir
from graphsd.std.text.weighting import EmbeddingRef, split_embeddings

SD1_WIDTH, XL_L_WIDTH, XL_G_WIDTH = 32, 32, 64  # the tiny encoders' widths (real: 768; 768 + 1280)


def tiny_encoder(width: int, seed: int, projection: bool = False):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval().to(torch.float64)


def tokenizer(sdxl_second: bool = False) -> CLIPTokenizer:
    """A fresh tokenizer (diffusers adds the embeddings' tokens to the one it is given)."""
    extra = {"pad_token": "!"} if sdxl_second else {}
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True, **extra)


@pytest.fixture(scope="module")
def encoders():
    return {"sd1": tiny_encoder(SD1_WIDTH, 0), "xl1": tiny_encoder(XL_L_WIDTH, 1), "xl2": tiny_encoder(XL_G_WIDTH, 2, projection=True)}


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    """Learned-embedding-like vectors: the scale of CLIP's token embeddings (std ≈ 0.02) and beyond."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3


# ---- files in each real format ---------------------------------------------------------------
def a1111_pt(path: Path, v: torch.Tensor) -> Path:
    """AUTOMATIC1111's training output (modules/textual_inversion: Embedding.save)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": path.stem, "step": 1500,
                "sd_checkpoint": "4bdfc29c", "sd_checkpoint_name": "v1-5-pruned"}, path)
    return path


def emb_params_safetensors(path: Path, v: torch.Tensor) -> Path:
    """kohya sd-scripts' SD1/SD2 embedding, as A1111 reads it."""
    save_file({"emb_params": v.contiguous()}, str(path))
    return path


def diffusers_bin(path: Path, v: torch.Tensor, token: str = "<cat-toy>") -> Path:
    """diffusers' textual_inversion.py: ``learned_embeds.bin`` holds {token: [width]} for one vector."""
    torch.save({token: v[0] if len(v) == 1 else v}, path)
    return path


def diffusers_safetensors(path: Path, v: torch.Tensor, token: str = "<cat-toy>") -> Path:
    save_file({token: v.contiguous()}, str(path))
    return path


def sdxl_pair(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


# ---- diffusers, the reference ----------------------------------------------------------------
def sd1_pipe(encoders, loaded: dict[str, Path]):
    """A float64 SD1 pipeline on a copy of the test encoder with ``loaded`` (token → file) loaded."""
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(encoders["sd1"]), tokenizer=tokenizer(), unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for token, path in loaded.items():
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


def sdxl_pipe(encoders, loaded: dict[str, Path], tokenizers=None):
    """diffusers' documented way for SDXL embeddings: clip_l into the first encoder, clip_g into the second."""
    from safetensors.torch import load_file

    tok1, tok2 = tokenizers or (tokenizer(), tokenizer(sdxl_second=True))
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=copy.deepcopy(encoders["xl1"]), text_encoder_2=copy.deepcopy(encoders["xl2"]),
        tokenizer=tok1, tokenizer_2=tok2, unet=None, scheduler=None,
    )
    for token, path in loaded.items():
        state = load_file(str(path))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    return pipe


def reference_sd1(pipe, prompt: str) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return embeds


def reference_sdxl(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, pooled


# ---- the node, through the engine ------------------------------------------------------------
HAND_CLIP_PLUGIN = '''
"""Test plugin: Clip handles for the tiny float64 text encoders the test put into the
ModelManager, and a node whose output is a prompt (text that comes through a link)."""
from transformers import CLIPTokenizer

from graphsd import Node, NodeIO, hookimpl
from graphsd.std.models.family import ModelInfo
from graphsd.std.text.tokenizer import clip_tokenizer, clip_tokenizer_dir
from graphsd.types import Clip


class HandClip(Node):
    type = "HandClip"

    class Inputs(NodeIO):
        sdxl: bool = False

    class Outputs(NodeIO):
        clip: Clip

    def run(self, inputs, ctx):
        if not inputs.sdxl:
            return self.Outputs(clip=Clip(ctx.models, {"text_encoder": "hand:sd1"}, ModelInfo("sd1", {"text_encoder": clip_tokenizer()})))
        tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
        keys = {"text_encoder": "hand:xl1", "text_encoder_2": "hand:xl2"}
        return self.Outputs(clip=Clip(ctx.models, keys, ModelInfo("sdxl", {"text_encoder": clip_tokenizer(), "text_encoder_2": tok2})))


class PromptText(Node):
    type = "PromptText"

    class Inputs(NodeIO):
        text: str

    class Outputs(NodeIO):
        text: str

    def run(self, inputs, ctx):
        return self.Outputs(text=inputs.text)


@hookimpl
def graphsd_register_nodes():
    return [HandClip, PromptText]
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "hand_clip.py").write_text(HAND_CLIP_PLUGIN)
    return folder


@pytest.fixture
def models(tmp_path):
    (tmp_path / "models" / "embeddings").mkdir(parents=True)
    return tmp_path / "models"


def make_engine(plugins, encoders, models: Path, allow_pickle: bool = False) -> Engine:
    engine = Engine(Settings(device="cpu", output_dir=str(models.parent / "out"), models_dir=str(models),
                             plugins_dirs=[str(plugins)], allow_pickle=allow_pickle))
    for name, te in encoders.items():
        engine.models.add(f"hand:{name}", te)
    return engine


def encode_doc(text, sdxl=False, linked=False) -> dict:
    nodes = {"clip": {"type": "HandClip", "inputs": {"sdxl": sdxl}}}
    if linked:
        nodes["prompt"] = {"type": "PromptText", "inputs": {"text": text}}
    nodes["enc"] = {"type": "TextEncode", "inputs": {"clip": "@clip.clip", "text": "@prompt.text" if linked else text}}
    return {"version": 1, "nodes": nodes}


def encode(engine, text, sdxl=False, linked=False):
    result = engine.run(encode_doc(text, sdxl, linked), outputs=["enc"])
    assert result.ok, result.errors
    return result.outputs["enc"]["cond"]


def failure(engine, text, sdxl=False, linked=False):
    result = engine.run(encode_doc(text, sdxl, linked), outputs=["enc"])
    assert not result.ok
    [error] = result.errors
    assert error.node_id == "enc" and error.message.startswith("input 'text': "), error
    return result, str(error)


# ---- parity with diffusers -------------------------------------------------------------------
SD1_FORMATS = {
    "a1111.pt": a1111_pt,
    "kohya.safetensors": emb_params_safetensors,
    "learned_embeds.bin": diffusers_bin,
    "learned_embeds.safetensors": diffusers_safetensors,
}


@pytest.mark.parametrize(
    ("file_name", "n"),
    [pytest.param(f, n, marks=[] if (f, n) == ("a1111.pt", 3) else [pytest.mark.slow]) for f in SD1_FORMATS for n in (1, 3)],
)
def test_sd1_formats_match_diffusers(plugins, encoders, models, file_name, n):
    """``embedding:NAME`` in graphsd equals diffusers' ``load_textual_inversion(file, token=...)``
    with the token in the same place, for each file format and for one and several vectors."""
    path = SD1_FORMATS[file_name](models / "embeddings" / file_name, vectors(n, SD1_WIDTH, seed=n))
    name = path.stem
    engine = make_engine(plugins, encoders, models, allow_pickle=True)
    cond = encode(engine, f"a photo of embedding:{name}, on a table")
    pipe = sd1_pipe(encoders, {"<emb>": path})
    assert cond.pooled is None
    assert_same(cond.embeddings, reference_sd1(pipe, "a photo of <emb>, on a table"), f"{file_name}, {n} vectors")


@pytest.mark.slow
def test_sdxl_pair_matches_diffusers(plugins, encoders, models):
    """An SDXL embedding: clip_l for the first encoder, clip_g for the second; the pooled output
    is read at the end-of-text token as before."""
    path = sdxl_pair(models / "embeddings" / "xl-style.safetensors", vectors(2, XL_L_WIDTH, 5), vectors(2, XL_G_WIDTH, 6))
    engine = make_engine(plugins, encoders, models)
    cond = encode(engine, "embedding:xl-style a castle, (embedding:xl-style:1.0)", sdxl=True)
    embeds, pooled = reference_sdxl(sdxl_pipe(encoders, {"<xl>": path}), "<xl> a castle, <xl>")
    assert cond.embeddings.shape == (1, 77, XL_L_WIDTH + XL_G_WIDTH)
    assert_same(cond.embeddings, embeds, "SDXL embeddings")
    assert_same(cond.pooled, pooled, "SDXL pooled")


def test_a1111_bare_name_matches_diffusers(plugins, encoders, models):
    """A1111 style: a word equal to an embedding file's name (any case, punctuation around it)
    is that embedding; a longer word, or a name with no file, stays text."""
    path = emb_params_safetensors(models / "embeddings" / "EasyNeg.safetensors", vectors(2, SD1_WIDTH, 7))
    engine = make_engine(plugins, encoders, models)
    cond = encode(engine, "a cat, easyneg, EasyNeg2, badhandv4")
    pipe = sd1_pipe(encoders, {"<neg>": path})
    assert_same(cond.embeddings, reference_sd1(pipe, "a cat, <neg>, EasyNeg2, badhandv4"), "bare embedding name")


def test_weighted_embedding(plugins, encoders, models):
    """``(embedding:x:1.3)`` weights each of the embedding's positions ComfyUI's way, empty +
    1.3·(plain - empty), and leaves every other position as the plain encoding."""
    path = a1111_pt(models / "embeddings" / "x.pt", vectors(3, SD1_WIDTH, 8))
    engine = make_engine(plugins, encoders, models, allow_pickle=True)
    weighted = encode(engine, "a photo of (embedding:x:1.3) cat")
    pipe = sd1_pipe(encoders, {"<x>": path})
    plain, empty = reference_sd1(pipe, "a photo of <x> cat"), reference_sd1(pipe, "")
    at = [4, 5, 6]  # [BOS] a photo of <x> <x>_1 <x>_2 cat
    assert_same(weighted.embeddings[:, at], empty[:, at] + 1.3 * (plain[:, at] - empty[:, at]), "weighted")
    others = [i for i in range(77) if i not in at]
    assert torch.equal(weighted.embeddings[:, others], plain[:, others])


@pytest.mark.parametrize(("words", "chunks"), [pytest.param(72, 1, marks=pytest.mark.slow), (73, 2)])
def test_vectors_count_toward_the_75_token_chunks(plugins, encoders, models, words, chunks):
    """Each vector takes one of a chunk's 75 positions; an embedding that does not fit in what is
    left of a chunk starts the next one whole (A1111), instead of being cut in two."""
    path = diffusers_safetensors(models / "embeddings" / "three.safetensors", vectors(3, SD1_WIDTH, 9))
    engine = make_engine(plugins, encoders, models)
    cond = encode(engine, "cat " * words + "embedding:three")
    pipe = sd1_pipe(encoders, {"<t>": path})
    if chunks == 1:
        expected = reference_sd1(pipe, "cat " * words + "<t>")
    else:
        expected = torch.cat([reference_sd1(pipe, "cat " * words), reference_sd1(pipe, "<t>")], dim=1)
    assert cond.embeddings.shape == (1, 77 * chunks, SD1_WIDTH)
    assert_same(cond.embeddings, expected, f"{words} words + 3 vectors")


# ---- finding and refusing -------------------------------------------------------------------
def test_missing_embedding_fails_before_anything_runs(plugins, encoders, models):
    emb_params_safetensors(models / "embeddings" / "EasyNegative.safetensors", vectors(1, SD1_WIDTH, 1))
    engine = make_engine(plugins, encoders, models)
    result, message = failure(engine, "a cat, embedding:EasyNegativeV2")
    assert "'EasyNegativeV2' not found" in message and "Available embeddings: EasyNegative." in message
    assert str(models / "embeddings") in message
    assert "clip" not in result.executed  # refused while the run was planned, not after loading the model
    _, message = failure(engine, "a cat, embedding:EasyNegativeV2", linked=True)  # a linked prompt: when the node runs
    assert "'EasyNegativeV2' not found" in message


def test_name_with_suffix_subfolder_and_other_case(plugins, encoders, models):
    (models / "embeddings" / "neg").mkdir()
    v = vectors(2, SD1_WIDTH, 2)
    emb_params_safetensors(models / "embeddings" / "neg" / "BadHands.safetensors", v)
    engine = make_engine(plugins, encoders, models)
    expected = encode(engine, "a hand, embedding:neg/BadHands")
    for spelled in ("embedding:neg/BadHands.safetensors", "embedding:neg/badhands", "badhands"):
        assert torch.equal(encode(engine, f"a hand, {spelled}").embeddings, expected.embeddings), spelled
    assert not torch.equal(encode(engine, "a hand, badhand").embeddings, expected.embeddings)


def test_widths_that_do_not_fit_are_refused(plugins, encoders, models):
    emb_params_safetensors(models / "embeddings" / "sd2-style.safetensors", vectors(2, SD1_WIDTH + 16, 3))
    sdxl_pair(models / "embeddings" / "xl.safetensors", vectors(1, XL_L_WIDTH, 4), vectors(1, XL_G_WIDTH, 4))
    emb_params_safetensors(models / "embeddings" / "sd1.safetensors", vectors(1, SD1_WIDTH, 4))
    engine = make_engine(plugins, encoders, models)
    _, message = failure(engine, "embedding:sd2-style")
    assert f"{SD1_WIDTH + 16}-wide" in message and f"takes {SD1_WIDTH}-wide" in message and "SD1: 768, SD2: 1024" in message
    _, message = failure(engine, "embedding:xl")
    assert "is an SDXL embedding" in message and "one text encoder" in message
    _, message = failure(engine, "embedding:sd1", sdxl=True)
    assert "needs an SDXL embedding" in message
    # as bare words (A1111), embeddings made for another model are not offered: the words stay text
    plain = reference_sd1(sd1_pipe(encoders, {}), "sd2-style, xl")
    assert_same(encode(engine, "sd2-style, xl").embeddings, plain, "bare names of embeddings that do not fit")


def test_pickle_embedding_needs_allow_pickle(plugins, encoders, models):
    a1111_pt(models / "embeddings" / "old.pt", vectors(1, SD1_WIDTH, 5))
    _, message = failure(make_engine(plugins, encoders, models), "embedding:old")
    assert "'old.pt' is pickle-based" in message and "--allow-pickle" in message
    assert encode(make_engine(plugins, encoders, models, allow_pickle=True), "embedding:old").embeddings.shape == (1, 77, SD1_WIDTH)


@pytest.mark.slow
def test_cache_key_follows_the_embedding_file(plugins, encoders, models):
    """Replacing an embedding file re-encodes the prompts that name it, literal or linked; a
    file that appears with the name of a prompt word (A1111) does too."""
    path = models / "embeddings" / "style.safetensors"
    for linked in (False, True):
        emb_params_safetensors(path, vectors(1, SD1_WIDTH, 10))
        engine = make_engine(plugins, encoders, models)
        doc = encode_doc("a house, embedding:style", linked=linked)
        first = engine.run(doc, outputs=["enc"])
        assert first.ok and engine.run(doc, outputs=["enc"]).cached == ["enc"]
        emb_params_safetensors(path, vectors(1, SD1_WIDTH, 11))
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
        second = engine.run(doc, outputs=["enc"])
        assert "enc" in second.executed, linked
        expected = reference_sd1(sd1_pipe(encoders, {"<s>": path}), "a house, <s>")
        assert_same(second.outputs["enc"]["cond"].embeddings, expected, "after replacing the file")
    engine = make_engine(plugins, encoders, models)
    before = engine.run(encode_doc("a house, roof"), outputs=["enc"])
    emb_params_safetensors(models / "embeddings" / "roof.safetensors", vectors(1, SD1_WIDTH, 12))
    after = engine.run(encode_doc("a house, roof"), outputs=["enc"])
    assert "enc" in after.executed
    assert not torch.equal(before.outputs["enc"]["cond"].embeddings, after.outputs["enc"]["cond"].embeddings)


# ---- the files and the syntax, directly -----------------------------------------------------
def test_every_format_reads_its_vectors(tmp_path):
    v = vectors(3, 8, 13)
    for make, file_name in ((a1111_pt, "a.pt"), (emb_params_safetensors, "b.safetensors"), (diffusers_bin, "c.bin"),
                            (diffusers_safetensors, "d.safetensors")):
        embedding = load_embedding(make(tmp_path / file_name, v), allow_pickle=True)
        assert torch.equal(embedding.vectors["*"], v) and embedding.count == 3, file_name
    one = load_embedding(diffusers_bin(tmp_path / "one.bin", v[:1]), allow_pickle=True)
    assert one.vectors["*"].shape == (1, 8)
    pair = load_embedding(sdxl_pair(tmp_path / "xl.safetensors", v, vectors(3, 12, 14)), allow_pickle=False)
    assert torch.equal(pair.vectors["clip_l"], v) and pair.vectors["clip_g"].shape == (3, 12)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, "not a textual-inversion embedding in a known format"),
        ({"clip_l": torch.zeros(1, 8)}, "without clip_g"),
        ({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(1, 12)}, "different numbers of vectors"),
        ({"emb_params": torch.tensor([[0.0, float("nan")]])}, "NaN or infinite"),
        ({"emb_params": torch.zeros(2, 3, 4)}, "shape [2, 3, 4]"),
        ({"emb_params": torch.zeros(2, 3, dtype=torch.int32)}, "torch.int32"),
    ],
)
def test_bad_files_are_refused_with_their_name(tmp_path, content, problem):
    path = tmp_path / "bad.safetensors"
    save_file(content, str(path))
    with pytest.raises(EmbeddingFormatError, match="'bad.safetensors'") as info:
        load_embedding(path, allow_pickle=False, field="text")
    assert problem in str(info.value) and info.value.field == "text"


def test_names_never_leave_the_embeddings_folder(tmp_path):
    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    emb_params_safetensors(tmp_path / "outside.safetensors", vectors(1, 8, 0))
    available = available_embeddings(models)
    for name in ("../../outside", "../../outside.safetensors", str(tmp_path / "outside")):
        assert find_embedding(name, models, available) is None, name


def test_prompt_syntax():
    ref, bare = EmbeddingRef("EasyNegative", True), EmbeddingRef("EasyNegative", False)
    assert split_embeddings("embedding:EasyNegative, cat") == [ref, ", cat"]
    assert split_embeddings("cat,embedding:EasyNegative") == ["cat,", ref]
    assert split_embeddings("my embedding:EasyNegative. x", []) == ["my ", EmbeddingRef("EasyNegative.", True), " x"]
    assert split_embeddings("noembedding:EasyNegative") == ["noembedding:EasyNegative"]
    assert split_embeddings("EASYNEGATIVE, (x)", ["EasyNegative"]) == [bare, ", (x)"]
    for kept in ("EasyNegative2", "my-EasyNegative", "EasyNegative_v2", "a/EasyNegative", "EasyNegative.x", "EasyNegativeé"):
        assert split_embeddings(kept, ["EasyNegative"]) == [kept], kept
    assert split_embeddings("EasyNegative.", ["EasyNegative"]) == [bare, "."]


# ---- a real checkpoint layout ----------------------------------------------------------------
@pytest.mark.slow
def test_loaded_checkpoints_match_diffusers(tmp_path):
    """CheckpointLoader (float64) on tiny diffusers folders in the real layouts → TextEncode with
    an embedding equals the folder's own pipeline with ``load_textual_inversion``."""
    import sd_tiny

    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    single = a1111_pt(models / "embeddings" / "sd1-style.pt", vectors(2, 32, 20))
    pair = sdxl_pair(models / "embeddings" / "xl-style.safetensors", vectors(2, 32, 21), vectors(2, 32, 22))
    folders = {"sd1": sd_tiny.save_sd1(tmp_path / "sd1"), "xl": sd_tiny.save_sdxl_base(tmp_path / "xl")}
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), models_dir=str(models), allow_pickle=True))
    for model, name in (("sd1", "sd1-style"), ("xl", "xl-style")):
        doc = {"version": 1, "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": str(folders[model]), "dtype": "fp64"}},
            "enc": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": f"a photo of embedding:{name}, (cat:1.0)"}},
        }}
        result = engine.run(doc, outputs=["enc"])
        assert result.ok, result.errors
        cond = result.outputs["enc"]["cond"]
        if model == "sd1":
            pipe = StableDiffusionPipeline.from_pretrained(str(folders[model]), local_files_only=True, torch_dtype=torch.float64)
            pipe.load_textual_inversion(str(single), token="<e>")
            assert_same(cond.embeddings, reference_sd1(pipe, "a photo of <e>, cat"), "SD1 checkpoint")
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(folders[model]), local_files_only=True, torch_dtype=torch.float64)
            encoders = {"xl1": pipe.text_encoder, "xl2": pipe.text_encoder_2}
            with_embedding = sdxl_pipe(encoders, {"<e>": pair}, (pipe.tokenizer, pipe.tokenizer_2))
            embeds, pooled = reference_sdxl(with_embedding, "a photo of <e>, cat")
            assert_same(cond.embeddings, embeds, "SDXL checkpoint")
            assert_same(cond.pooled, pooled, "SDXL checkpoint pooled")


def test_callers_without_embeddings_encode_the_text_as_written(encoders):
    """encode_prompt without ``embeddings`` (a training caption, say) reads no embedding syntax."""
    from graphsd.std.text.encode import encode_prompt
    from graphsd.std.text.tokenizer import clip_tokenizer

    ours, _ = encode_prompt("a photo, embedding:EasyNegative", [(clip_tokenizer(), encoders["sd1"])])
    assert_same(ours, reference_sd1(sd1_pipe(encoders, {}), "a photo, embedding:EasyNegative"), "text as written")
