"""Text conditioning node: a prompt (with A1111/ComfyUI weighting syntax) → Conditioning.

A :class:`~graphsd.types.Clip` handle names its text encoders in ``keys`` (``"text_encoder"``,
plus ``"text_encoder_2"`` for SDXL) and carries the tokenizer of each in its
:class:`~graphsd.std.models.family.ModelInfo` (``info.tokenizers``, by the same role). A handle
with a second encoder is encoded the SDXL way (both encoders' hidden states side by side,
pooled embedding from the second); otherwise the SD1 way. See :mod:`graphsd.std.text.encode`
for chunking, weighting and clip skip.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from pydantic import Field

from graphsd.errors import NodeError
from graphsd.hookspecs import hookimpl
from graphsd.node import Node, NodeIO
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, model_info
from graphsd.std.text.encode import encode_prompt
from graphsd.types import Clip, Conditioning


class TextEncode(Node):
    type = "TextEncode"
    category = "conditioning"
    description = (
        "Encode a prompt with the checkpoint's CLIP text encoder(s). Supports (word), [word], "
        "(word:1.3) weighting, \\( escapes, BREAK, and prompts longer than 75 tokens."
    )

    class Inputs(NodeIO):
        clip: Clip = Field(description="Tokenizer(s) and text encoder(s) of a checkpoint")
        text: str = Field(description="The prompt; (word:1.3) weights, BREAK starts a new 75-token chunk")
        clip_skip: int = Field(1, ge=1, description="Layer counted from the end: 1 = last (default), 2 = penultimate")

    class Outputs(NodeIO):
        cond: Conditioning = Field(description="Embeddings [1, 77·chunks, width]; SDXL also sets pooled")

    def run(self, inputs: Inputs, ctx) -> Outputs:
        clip = inputs.clip
        roles = [role for role in TOKENIZER_OF_ENCODER if role in clip.keys]
        if not roles:
            raise NodeError(
                "this Clip handle names no text encoder; connect the clip output of a checkpoint loader", field="clip"
            )
        tokenizers = [model_info(clip, "clip").tokenizers.get(role) for role in roles]
        if any(t is None for t in tokenizers):
            raise NodeError(
                "this Clip handle has no tokenizer for its text encoder; load it with a checkpoint loader", field="clip"
            )
        with ExitStack() as stack:
            encoders = [stack.enter_context(ctx.models.use(clip, role)) for role in roles]
            for encoder in encoders:
                if inputs.clip_skip > encoder.config.num_hidden_layers:
                    raise NodeError(
                        f"clip_skip {inputs.clip_skip} is larger than the text encoder's "
                        f"{encoder.config.num_hidden_layers} layers; use 1 (last layer) or 2 (penultimate)",
                        field="clip_skip",
                    )
            try:
                embeddings, pooled = encode_prompt(
                    inputs.text, list(zip(tokenizers, encoders)), inputs.clip_skip, sdxl="text_encoder_2" in roles
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


@hookimpl
def graphsd_register_nodes() -> list[type[Node]]:
    return [TextEncode]
