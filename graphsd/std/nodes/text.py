"""Text conditioning node: a prompt (with A1111/ComfyUI weighting syntax) → Conditioning.

A :class:`~graphsd.types.Clip` handle names its text encoders in ``keys`` (``"text_encoder"``,
plus ``"text_encoder_2"`` for SDXL) and carries the tokenizer of each in its
:class:`~graphsd.std.models.family.ModelInfo` (``info.tokenizers``, by the same role). A handle
with a second encoder is encoded the SDXL way (both encoders' hidden states side by side,
pooled embedding from the second); otherwise the SD1 way. See :mod:`graphsd.std.text.encode`
for chunking, weighting and clip skip.

Textual-inversion embeddings (:mod:`graphsd.std.models.embeddings`) are named in the prompt as
ComfyUI writes them (``embedding:NAME``, weighted ``(embedding:NAME:1.2)``) or, as in
AUTOMATIC1111, by a bare word equal to an embedding file's name (any case) whose vectors fit the
model (A1111 offers only those; a bare word whose embedding is for another kind of model stays
text, while such an ``embedding:NAME`` is refused). The node's cache identity
includes the fingerprint of every embedding file the prompt names (of the whole embeddings
folder when the prompt comes through a link), and an ``embedding:NAME`` that names no file fails
the node before anything runs.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.paths import file_fingerprint
from graphsd.std.models.embeddings import (
    Embedding,
    EmbeddingFormatError,
    available_embeddings,
    bare_names,
    describe_missing,
    embedding_files,
    embedding_folders,
    load_embedding,
)
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, model_info
from graphsd.std.models.formats import PICKLE_SUFFIXES, load_pickle
from graphsd.std.models.loading import builtin_models_dir
from graphsd.std.text.encode import EmbeddingVectors, encode_prompt
from graphsd.std.text.weighting import EmbeddingRef, embedding_references
from graphsd.types import Clip, Conditioning


def prompt_embeddings(text: str, ctx: Context) -> tuple[dict[EmbeddingRef, Path], list[str]]:
    """The embedding files a prompt names (by reference) and the names a bare word may match;
    a NodeError on ``text`` for ``embedding:NAME`` references that name no file."""
    available = available_embeddings(ctx.models_dir)
    bare = bare_names(available)
    files, missing = embedding_files(embedding_references(text, bare), ctx.models_dir, available)
    if missing:
        raise NodeError(describe_missing(missing, available, ctx.models_dir), field="text")
    return files, bare


def load_prompt_embedding(path: Path, ctx: Context) -> Embedding:
    """The embedding in ``path``, read once per engine (the ModelManager keeps it by the file's
    fingerprint). Pickle files only with the user's --allow-pickle, or when graphsd ships them."""
    path = ctx.readable(path, "text")  # a confined workflow (a PNG's, a server's) reads only its folders
    allow_pickle = bool(ctx.settings.allow_pickle) or builtin_models_dir() in path.parents
    try:
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            load_pickle(path, False, EmbeddingFormatError, "text")  # refuses before the ModelManager, which may hold it
        key = ctx.models.load(f"embedding:{file_fingerprint(path)}", lambda: load_embedding(path, allow_pickle, "text"))
    except EmbeddingFormatError as exc:
        raise NodeError(str(exc), field="text") from None
    return ctx.models.get(key)


class TextEncode(Node):
    type = "TextEncode"
    category = "conditioning"
    description = (
        "Encode a prompt with the checkpoint's CLIP text encoder(s). Supports (word), [word], "
        "(word:1.3) weighting, \\( escapes, BREAK, prompts longer than 75 tokens, and textual-inversion "
        "embeddings from <models_dir>/embeddings: embedding:NAME (ComfyUI), (embedding:NAME:1.2), or the "
        "file's name as a word (A1111)."
    )

    class Inputs(NodeIO):
        clip: Clip = Field(description="Tokenizer(s) and text encoder(s) of a checkpoint")
        text: str = Field(
            description="The prompt; (word:1.3) weights, BREAK starts a new 75-token chunk; embedding:NAME, or a word "
            "equal to an embedding file's name (any case), puts that embedding's vectors there, one token each"
        )
        clip_skip: int = Field(1, ge=1, description="Layer counted from the end: 1 = last (default), 2 = penultimate")

    class Outputs(NodeIO):
        cond: Conditioning = Field(description="Embeddings [1, 77·chunks, width]; SDXL also sets pooled")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """The embedding files the prompt names (so that replacing one re-encodes the prompt), or,
        for a prompt that comes through a link, every file in the embeddings folders."""
        text = literals.get("text")
        if not isinstance(text, str):
            return "embeddings:" + ",".join(file_fingerprint(folder) for folder in embedding_folders(ctx.models_dir))
        files, _ = prompt_embeddings(text, ctx)
        return ",".join(f"{ref.name}:{int(ref.explicit)}={file_fingerprint(path)}" for ref, path in files.items())

    def run(self, inputs: Inputs, ctx: Context) -> Outputs:
        clip = inputs.clip
        roles = [role for role in TOKENIZER_OF_ENCODER if role in clip.keys]
        if not roles:
            raise NodeError("this Clip handle names no text encoder; connect the clip output of a checkpoint loader", field="clip")
        tokenizers = [model_info(clip, "clip").tokenizers.get(role) for role in roles]
        if any(t is None for t in tokenizers):
            raise NodeError("this Clip handle has no tokenizer for its text encoder; load it with a checkpoint loader", field="clip")
        sdxl = "text_encoder_2" in roles
        files, bare = prompt_embeddings(inputs.text, ctx)
        loaded = {ref: load_prompt_embedding(path, ctx) for ref, path in files.items()}
        with ExitStack() as stack:
            encoders = [stack.enter_context(ctx.models.use(clip, role)) for role in roles]
            for encoder in encoders:
                if inputs.clip_skip > encoder.config.num_hidden_layers:
                    raise NodeError(
                        f"clip_skip {inputs.clip_skip} is larger than the text encoder's "
                        f"{encoder.config.num_hidden_layers} layers; use 1 (last layer) or 2 (penultimate)",
                        field="clip_skip",
                    )
            vectors, unfit = _vectors_for(loaded, roles, encoders, sdxl)
            bare = [name for name in bare if name not in unfit]
            try:
                embeddings, pooled = encode_prompt(
                    inputs.text, list(zip(tokenizers, encoders, strict=True)), inputs.clip_skip, sdxl, vectors, bare
                )
            except ValueError as exc:  # tokenizers that disagree about the prompt's length
                raise NodeError(f"{exc}; use the tokenizers that came with the checkpoint", field="clip") from exc
        if not torch.isfinite(embeddings).all():
            cause = "patch on the text encoder, or the " if clip.patches else ""
            raise NodeError(
                f"the embeddings hold NaN or infinite values: check the {cause}prompt's weights (nested brackets "
                "multiply: 1000 levels of (…) weigh 1.1^1000 ≈ 2e41, more than fp32 holds)",
                field="text",
            )
        return self.Outputs(cond=Conditioning(embeddings=embeddings, pooled=pooled))


def _vectors_for(
    loaded: dict[EmbeddingRef, Embedding], roles: list[str], encoders: list[Any], sdxl: bool
) -> tuple[list[EmbeddingVectors], set[str]]:
    """Each embedding's vectors for each text encoder, and the bare-word names whose embedding
    does not fit this model: those words stay text, as A1111 offers only the embeddings that fit
    the loaded model. An ``embedding:NAME`` made for another kind of model is a NodeError on ``text``."""
    vectors: list[dict[EmbeddingRef, torch.Tensor]] = [{} for _ in roles]
    unfit: set[str] = set()
    for ref, embedding in loaded.items():
        try:
            fitted = [
                embedding.for_encoder(role, sdxl, encoder.get_input_embeddings().embedding_dim)
                for role, encoder in zip(roles, encoders, strict=True)
            ]
        except EmbeddingFormatError as exc:
            if not ref.explicit:
                unfit.add(ref.name)
                continue
            raise NodeError(str(exc), field="text") from None
        for per_encoder, v in zip(vectors, fitted, strict=True):
            per_encoder[ref] = v
    return list(vectors), unfit


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [TextEncode]
