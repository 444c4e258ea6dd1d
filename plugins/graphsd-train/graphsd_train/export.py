"""Write trained components as a diffusers Stable Diffusion folder.

The folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
and ``scheduler/`` (an Euler scheduler with the training noise schedule, which DDIM, DPM-Solver
and the other diffusers schedulers also read), weights as safetensors, so
``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`` and graphsd's
CheckpointLoader load it. It is written to a temporary sibling and renamed into place, so a
reader never sees half a model, and nothing that was there is deleted unless asked.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from graphsd.paths import write_folder_atomic


def save_pipeline(
    folder: str | Path, unet, vae, text_encoder, tokenizer, schedule: dict, dtype: torch.dtype = torch.float16,
    readme: str | None = None, overwrite: bool = False,
) -> Path:
    """Save the components (copied and cast to ``dtype``) as a diffusers folder, atomically
    (:func:`graphsd.paths.write_folder_atomic`): an existing model folder is replaced only with
    ``overwrite``, anything else existing is never touched (a taken name gives ``<name>_2``).
    Returns the folder written."""
    # imported here: the pipelines package is heavy and only saving needs it
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

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

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if readme:
            (tmp / "README.md").write_text(readme, encoding="utf-8")

    return write_folder_atomic(Path(folder), write, overwrite=overwrite, replaceable=is_model_folder)


def is_model_folder(path: Path) -> bool:
    """A diffusers model folder (it has ``model_index.json``)."""
    return (path / "model_index.json").is_file()
