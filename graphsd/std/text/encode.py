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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphsd.std.text.weighting import BREAK, Segment, parse_prompt
from graphsd.types import working_dtype


@dataclass(frozen=True)
class TokenChunks:
    """Token ids ``[chunks, context]`` and the weight of each position (1.0 for specials)."""

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def context_length(tokenizer: Any, text_encoder: Any) -> int:
    """Tokens per chunk: the tokenizer's maximum length, bounded by the encoder's positions."""
    return min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))


def tokenize_weighted(tokenizer: Any, segments: Sequence[Segment], length: int = 77) -> TokenChunks:
    """Tokenize weighted segments into ``[BOS] ≤length-2 tokens [EOS] [PAD]...`` chunks."""
    body = length - 2
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for segment in segments:
        if segment == BREAK:
            if current:
                chunks.append(current)
                current = []
            continue
        for token in tokenizer(segment.text, add_special_tokens=False, verbose=False)["input_ids"]:
            if len(current) == body:
                chunks.append(current)
                current = []
            current.append((token, segment.weight))
    if current or not chunks:
        chunks.append(current)
    return _pack(tokenizer, chunks, body)


def _pack(tokenizer: Any, chunks: list[list[tuple[int, float]]], body: int) -> TokenChunks:
    ids, weights = [], []
    for chunk in chunks:
        padding = body - len(chunk)
        ids.append([tokenizer.bos_token_id, *(t for t, _ in chunk), tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *(w for _, w in chunk), 1.0] + [1.0] * padding)
    return TokenChunks(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))


def tokenize_prompt(tokenizer: Any, text: str, length: int = 77, use_break: bool = True) -> TokenChunks:
    """Parse the weighting syntax of ``text`` and tokenize it into chunks."""
    return tokenize_weighted(tokenizer, parse_prompt(text, use_break=use_break), length)


def run_encoder(text_encoder: Any, ids: torch.Tensor, clip_skip: int, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder on ``ids [chunks, context]``: the hidden state picked by ``clip_skip``
    (see the module docstring) and the encoder's pooled output (``text_embeds`` when the model
    has a projection, else ``pooler_output``)."""
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is larger than the text encoder's {layers} layers")
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    if final_norm:
        z = out.last_hidden_state if clip_skip == 1 else _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    else:
        z = out.hidden_states[-(clip_skip + 1)]
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return z, pooled


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
    z, pooled = run_encoder(text_encoder, chunks.ids, clip_skip, final_norm)
    if chunks.weighted:
        empty = tokenize_weighted(tokenizer, [Segment("", 1.0)], chunks.ids.shape[1])
        z_empty, _ = run_encoder(text_encoder, empty.ids, clip_skip, final_norm)
        z = apply_token_weights(z, z_empty, chunks.weights)
    return z.reshape(1, -1, z.shape[-1]), pooled[:1]


@torch.no_grad()
def encode_prompt(
    text: str, encoders: Sequence[tuple[Any, Any]], clip_skip: int = 1, sdxl: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode ``text`` with one (SD1/SD2) or several (SDXL) ``(tokenizer, text_encoder)`` pairs.

    Returns ``(embeddings [1, tokens, width], pooled)``: SD1 → ``pooled`` is None and the final
    layer norm is applied; ``sdxl=True`` → embeddings of all encoders concatenated along the
    width, no final norm, ``pooled`` from the last encoder (see the module docstring)."""
    if not sdxl and len(encoders) != 1:
        raise ValueError("an SD1-style prompt encoding takes exactly one text encoder")
    embeddings, pooled = [], None
    for tokenizer, text_encoder in encoders:
        chunks = tokenize_prompt(tokenizer, text, context_length(tokenizer, text_encoder))
        z, pooled = encode_chunks(tokenizer, text_encoder, chunks, clip_skip, final_norm=not sdxl)
        embeddings.append(z)
    if len({z.shape[1] for z in embeddings}) != 1:
        raise ValueError("the tokenizers of the text encoders split this prompt into different lengths")
    return torch.cat(embeddings, dim=-1), (pooled if sdxl else None)
