"""Write trained components as a diffusers Stable Diffusion folder.

The folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` (an Euler scheduler with the training noise schedule, which DDIM, DPM-Solver
and the other diffusers schedulers also read), weights as safetensors, so
``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`` and graphsd's
CheckpointLoader load it. It is written to a temporary sibling and renamed into place, so a
reader never sees half a model.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

import torch


def save_pipeline(
    folder: str | Path, unet, vae, text_encoder, tokenizer, schedule: dict, dtype: torch.dtype = torch.float16, readme: str | None = None
) -> Path:
    """Save the components (copied and cast to ``dtype``) as a diffusers folder, atomically
    replacing whatever was at ``folder``."""
    # imported here: the pipelines package is heavy and only saving needs it
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(dtype),
        text_encoder=copy.deepcopy(text_encoder).to(dtype),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to(dtype),
        scheduler=EulerDiscreteScheduler.from_config(schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if readme:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
