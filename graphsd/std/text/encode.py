"""Prompt → CLIP text-encoder embeddings, with prompt weighting, long prompts and clip skip.

**Chunks.** A prompt is parsed into weighted segments (:mod:`graphsd.std.text.weighting`); each
segment is tokenized on its own and the tokens are cut into chunks of 75 (``BREAK`` also ends a
chunk; a chunk is never empty unless the whole prompt is). Each chunk becomes
``[BOS] tokens [EOS] [PAD]...`` of the tokenizer's 77-token context, padded with the tokenizer's
own ``pad_token`` (``<|endoftext|>`` for SD1, ``!`` for SDXL's second tokenizer), is encoded
separately, and the chunks' hidden states are concatenated along the token axis: 76..150 tokens
give 154 embeddings. This is how AUTOMATIC1111's web UI and ComfyUI handle long prompts. For a
plain prompt of ≤ 75 tokens it is exactly diffusers' ``tokenizer(prompt, padding="max_length")``.

**Weights, ComfyUI-style** (``comfy/sd1_clip.py``, ``ClipTokenWeightEncoder``): each token's
embedding is moved away from the embedding that the empty prompt has at the same position,
``z_i ← z_empty,i + w_i · (z_i - z_empty,i)``. Weight 1 leaves a token untouched, so a prompt
whose weights are all 1 gives exactly the plain encoding (the empty prompt is then not even
encoded). A1111's alternative (scale the embeddings, then restore the chunk mean) changes every
token when one is weighted; ComfyUI's keeps the effect where the user put it.

**Clip skip** counts layers from the end, A1111's convention: 1 = the last layer, 2 = the
penultimate, ... For SD1 (one encoder) the chosen hidden state goes through the encoder's final
layer norm, as A1111 does and as diffusers' ``StableDiffusionPipeline.encode_prompt`` does with
``clip_skip = ours - 1``. For SDXL (two encoders) diffusers' ``StableDiffusionXLPipeline``
already takes the penultimate hidden state without the final norm; our ``clip_skip`` k takes
``hidden_states[-(k + 1)]`` of both encoders (diffusers' ``clip_skip = k - 1``), concatenated
to 768 + 1280 = 2048 wide. SDXL's pooled embedding is ``text_embeds`` (the projected final-layer
EOS state) of the second encoder for the first chunk, unweighted, as ComfyUI and A1111 do.

**Textual-inversion embeddings** (:mod:`graphsd.std.models.embeddings`) named in the prompt
(``embedding:NAME``, or a bare word equal to an embedding file's name) take one token position per
vector, with the weight of the text around them, and count toward the 75 tokens of a chunk; an
embedding that fits in a chunk but not in what is left of the current one starts the next chunk
(A1111), so its vectors stay together. Each vector replaces the token embedding at its position
before the position embeddings are added, which is exactly what diffusers'
``load_textual_inversion(file, token=...)`` does with the new tokens it adds (``token``,
``token_1``, ...), so a prompt's encoding equals diffusers' ``encode_prompt`` of the same prompt
with the token in the embedding's place. One difference, in SDXL's pooled embedding only: with the
text-encoder configs of the released models (``eos_token_id: 2``), transformers reads the pooled
output at the largest token id, which for diffusers is an added embedding token rather than the
end-of-text token; graphsd reads it at the end-of-text token, as A1111 and ComfyUI do (and as
diffusers does with configs that give the real ``eos_token_id``).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from graphsd.std.text.weighting import BREAK, EmbeddingRef, Segment, parse_prompt, split_embeddings
from graphsd.types import working_dtype


@dataclass(frozen=True)
class TokenChunks:
    """Token ids ``[chunks, context]``, the weight of each position (1.0 for specials), and the
    positions that take an embedding's vectors: ``embedded`` marks them ``[chunks, context]``,
    ``vectors`` holds theirs ``[marked positions, width]`` in row-major order (None without)."""

    ids: torch.Tensor
    weights: torch.Tensor
    embedded: torch.Tensor | None = None
    vectors: torch.Tensor | None = None

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


#: The id standing at a position whose token embedding an embedding's vector replaces: any
#: ordinary token will do, as long as it is not the end-of-text token, where the pooled output
#: is read (by position of that id, or by the largest id in older configs, as with A1111 and ComfyUI).
PLACEHOLDER_ID = 0

#: Embedding vectors a tokenizer uses: reference in the prompt → ``[n, width]``.
EmbeddingVectors = Mapping[EmbeddingRef, torch.Tensor]


def context_length(tokenizer: Any, text_encoder: Any) -> int:
    """Tokens per chunk: the tokenizer's maximum length, bounded by the encoder's positions."""
    return min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))


def tokenize_weighted(
    tokenizer: Any,
    segments: Sequence[Segment],
    length: int = 77,
    embeddings: EmbeddingVectors | None = None,
    bare_names: Collection[str] = (),
) -> TokenChunks:
    """Tokenize weighted segments into ``[BOS] ≤length-2 tokens [EOS] [PAD]...`` chunks.

    The embedding references in the text (:func:`~graphsd.std.text.weighting.split_embeddings`
    with ``bare_names``) take one position per vector of theirs in ``embeddings``, with their
    segment's weight; an embedding that fits in a chunk but not in what is left of the current
    one starts the next chunk, as in A1111, so its vectors stay together. Without ``embeddings``
    (None) the text is all text: ``embedding:NAME`` is then tokenized as written."""
    body = length - 2
    chunks: list[list[tuple[int, float, torch.Tensor | None]]] = []
    current: list[tuple[int, float, torch.Tensor | None]] = []
    for segment in segments:
        if segment == BREAK:
            if current:
                chunks.append(current)
                current = []
            continue
        for piece in [segment.text] if embeddings is None else split_embeddings(segment.text, bare_names):
            if isinstance(piece, EmbeddingRef):
                vectors = embeddings.get(piece) if embeddings is not None else None
                if vectors is None:
                    raise ValueError(f"no vectors were given for the embedding {piece.name!r} of the prompt")
                if current and len(vectors) <= body and len(current) + len(vectors) > body:
                    chunks.append(current)
                    current = []
                entries = [(PLACEHOLDER_ID, segment.weight, row) for row in vectors]
            else:
                ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"] if piece else []
                entries = [(token, segment.weight, None) for token in ids]
            for entry in entries:
                if len(current) == body:
                    chunks.append(current)
                    current = []
                current.append(entry)
    if current or not chunks:
        chunks.append(current)
    return _pack(tokenizer, chunks, body)


def _pack(tokenizer: Any, chunks: list[list[tuple[int, float, torch.Tensor | None]]], body: int) -> TokenChunks:
    ids, weights, embedded, rows = [], [], [], []
    for chunk in chunks:
        padding = body - len(chunk)
        ids.append([tokenizer.bos_token_id, *(t for t, _, _ in chunk), tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *(w for _, w, _ in chunk), 1.0] + [1.0] * padding)
        embedded.append([False, *(v is not None for _, _, v in chunk), False] + [False] * padding)
        rows += [v for _, _, v in chunk if v is not None]
    # weights in float64, as parsed: a float64 encoder weights with 1.3 itself, a float32 one with float32(1.3)
    ids_t, weights_t = torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)
    if not rows:
        return TokenChunks(ids_t, weights_t)
    dtype = functools.reduce(torch.promote_types, (r.dtype for r in rows))  # float16 and float32 files: float32, exactly
    return TokenChunks(ids_t, weights_t, torch.tensor(embedded), torch.stack([r.to(dtype) for r in rows]))


def tokenize_prompt(tokenizer: Any, text: str, length: int = 77, use_break: bool = True) -> TokenChunks:
    """Parse the weighting syntax of ``text`` and tokenize it into chunks."""
    return tokenize_weighted(tokenizer, parse_prompt(text, use_break=use_break), length)


def run_encoder(
    text_encoder: Any, ids: torch.Tensor, clip_skip: int, final_norm: bool, chunks: TokenChunks | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder on ``ids [chunks, context]``: the hidden state picked by ``clip_skip``
    (see the module docstring) and the encoder's pooled output (``text_embeds`` when the model
    has a projection, else ``pooler_output``). The embedding vectors of ``chunks`` replace the
    token embeddings at their positions."""
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is larger than the text encoder's {layers} layers")
    with _embedding_vectors(text_encoder, chunks):
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    if final_norm:
        z = out.last_hidden_state if clip_skip == 1 else _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    else:
        z = out.hidden_states[-(clip_skip + 1)]
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return z, pooled


@contextmanager
def _embedding_vectors(text_encoder: Any, chunks: TokenChunks | None) -> Iterator[None]:
    """While active, the encoder's token-embedding lookup returns ``chunks.vectors`` (cast to its
    dtype) at the positions ``chunks.embedded`` marks: what diffusers' ``load_textual_inversion``
    achieves with new tokens whose rows of the embedding matrix are the vectors, without
    changing the shared model."""
    if chunks is None or chunks.embedded is None or chunks.vectors is None:
        yield
        return
    embedded, vectors = chunks.embedded, chunks.vectors

    def replace(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        replaced = output.clone()
        replaced[embedded.to(output.device)] = vectors.to(device=output.device, dtype=output.dtype)
        return replaced

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    """The encoder's final LayerNorm: on the model itself in transformers ≥ 5's
    ``CLIPTextModel``, under ``text_model`` in older releases and in ``CLIPTextModelWithProjection``."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def apply_token_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ComfyUI's weighting ``z_empty + w · (z - z_empty)`` per position, computed in float32
    (float64 for a float64 encoder); positions of weight 1 keep ``z`` bit for bit.

    ``z`` is ``[chunks, context, width]``, ``z_empty`` ``[1, context, width]``, ``weights``
    ``[chunks, context]``."""
    work = working_dtype(z.dtype)
    w = weights.to(device=z.device, dtype=work).unsqueeze(-1)
    base = z_empty.to(work)
    weighted = (base + w * (z.to(work) - base)).to(z.dtype)
    return torch.where(w == 1.0, z, weighted)


def encode_chunks(
    tokenizer: Any, text_encoder: Any, chunks: TokenChunks, clip_skip: int, final_norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every chunk, weight it, and join the chunks: ``[1, chunks·context, width]`` plus
    the pooled output of the first chunk ``[1, pooled width]``."""
    z, pooled = run_encoder(text_encoder, chunks.ids, clip_skip, final_norm, chunks)
    if chunks.weighted:
        empty = tokenize_weighted(tokenizer, [Segment("", 1.0)], chunks.ids.shape[1])
        z_empty, _ = run_encoder(text_encoder, empty.ids, clip_skip, final_norm)
        z = apply_token_weights(z, z_empty, chunks.weights)
    return z.reshape(1, -1, z.shape[-1]), pooled[:1]


@torch.no_grad()
def encode_prompt(
    text: str,
    encoders: Sequence[tuple[Any, Any]],
    clip_skip: int = 1,
    sdxl: bool = False,
    embeddings: Sequence[EmbeddingVectors] | None = None,
    bare_names: Collection[str] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode ``text`` with one (SD1/SD2) or several (SDXL) ``(tokenizer, text_encoder)`` pairs.

    Returns ``(embeddings [1, tokens, width], pooled)``: SD1 → ``pooled`` is None and the final
    layer norm is applied; ``sdxl=True`` → embeddings of all encoders concatenated along the
    width, no final norm, ``pooled`` from the last encoder (see the module docstring).
    ``embeddings`` gives, per encoder, the vectors of each textual-inversion embedding the
    prompt names (``embedding:NAME``, or a word of ``bare_names``); without it (None) the prompt
    is text only (``embedding:NAME`` is tokenized as written)."""
    if not sdxl and len(encoders) != 1:
        raise ValueError("an SD1-style prompt encoding takes exactly one text encoder")
    segments = parse_prompt(text)
    results, pooled = [], None
    for i, (tokenizer, text_encoder) in enumerate(encoders):
        vectors = embeddings[i] if embeddings is not None else None
        chunks = tokenize_weighted(tokenizer, segments, context_length(tokenizer, text_encoder), vectors, bare_names)
        z, pooled = encode_chunks(tokenizer, text_encoder, chunks, clip_skip, final_norm=not sdxl)
        results.append(z)
    if len({z.shape[1] for z in results}) != 1:
        raise ValueError("the tokenizers of the text encoders split this prompt into different lengths")
    return torch.cat(results, dim=-1), (pooled if sdxl else None)
