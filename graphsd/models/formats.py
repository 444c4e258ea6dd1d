"""File-name facts of model files, in one place.

Weights come as ``.safetensors`` (read without running code) or as pickle-based files, which
graphsd reads only when the user allows them (``--allow-pickle``) and then with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

#: Pickle-based weight files: PyTorch (``.pt``, ``.pth``), original SD checkpoints (``.ckpt``),
#: transformers/diffusers ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Every weight file graphsd recognises.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
