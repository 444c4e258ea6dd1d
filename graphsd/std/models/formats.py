"""File-name facts of model files, in one place.

Weights come as ``.safetensors`` (read without running code) or as pickle-based files, which
graphsd reads only when the user allows them (``--allow-pickle``) and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from graphsd.errors import GraphsdError

#: Pickle-based weight files: PyTorch (``.pt``, ``.pth``), original SD checkpoints (``.ckpt``),
#: transformers/diffusers ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Every weight file graphsd recognises.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class ModelFileError(GraphsdError):
    """A model file (checkpoint, LoRA, hypernetwork, ...) is missing, unreadable or does not fit;
    the message names the file and says what to do. ``field`` is the node input it came from,
    when known. The executor reports it like a NodeError: no traceback."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)
