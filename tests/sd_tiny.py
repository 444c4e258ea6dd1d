"""Tiny random Stable Diffusion models (SD1-style, SDXL base, SDXL refiner) saved as diffusers
folders, for fast parity tests against diffusers' own pipelines on CPU.

The VAEs have four blocks, so latents are 1/8 of the image size as in the real models; the
U-Nets take 8×8 latents (64×64 images).

Each model is built once per process and copied into the folder a test asks for (the same
seeds give the same weights, so a copy is what building it again would write). Tokenizer
folders hold CLIP's vocab.json and merges.txt, as the released SD1.5 and SDXL folders do,
instead of the 3.6 MB tokenizer.json that ``save_pretrained`` writes: the same tokenizer,
read in a sixth of the time by diffusers and graphsd alike.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from graphsd.std.text.tokenizer import clip_tokenizer_dir

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), local_files_only=True)


def text_encoder(projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def unet(seed: int = 0, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    config.update(extra)
    return UNet2DConditionModel(**config)


def sdxl_unet(seed: int, time_ids: int, cross_attention_dim: int) -> UNet2DConditionModel:
    return unet(
        seed,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * time_ids + 32,
    )


def save_pipeline(pipe, folder: Path) -> Path:
    """``pipe.save_pretrained(folder)`` with its tokenizers (each :func:`tokenizer`, unchanged)
    written as CLIP's released files."""
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            released_tokenizer(folder / name)
    return folder


def released_tokenizer(folder: Path) -> None:
    """Replace the tokenizer ``save_pretrained`` wrote in ``folder`` (:func:`tokenizer`'s) by the
    files it was read from: vocab.json, merges.txt and their configs."""
    shutil.rmtree(folder)
    shutil.copytree(clip_tokenizer_dir(), folder, ignore=shutil.ignore_patterns("LICENSE"))


_BUILT: dict[str, Path] = {}


def _copy_of(build, folder: Path) -> Path:
    """``build(somewhere)`` once per process, then a copy of it at ``folder`` (new files, new
    modification times, nothing shared with other copies)."""
    name = build.__name__
    if name not in _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="sd-tiny-"))
        atexit.register(_remove, cache, os.getpid())
        _BUILT[name] = build(cache / name)
    shutil.copytree(_BUILT[name], folder, copy_function=shutil.copyfile, dirs_exist_ok=True)
    return folder


def _remove(cache: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child
        shutil.rmtree(cache, ignore_errors=True)


def save_sd1(folder: Path) -> Path:
    """An SD1-style model (PNDM scheduler config like the original SD1 releases)."""
    return _copy_of(_build_sd1, folder)


def save_sdxl_base(folder: Path) -> Path:
    return _copy_of(_build_sdxl_base, folder)


def save_sdxl_refiner(folder: Path) -> Path:
    return _copy_of(_build_sdxl_refiner, folder)


def _build_sd1(folder: Path) -> Path:
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        unet=unet(),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_pipeline(pipe, folder)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading")


def _build_sdxl_base(folder: Path) -> Path:
    pipe = StableDiffusionXLPipeline(
        vae=vae(1),
        text_encoder=text_encoder(seed=1),
        text_encoder_2=text_encoder(projection=True, seed=2),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=sdxl_unet(3, time_ids=6, cross_attention_dim=64),
        scheduler=sdxl_scheduler(),
    )
    return save_pipeline(pipe, folder)


def _build_sdxl_refiner(folder: Path) -> Path:
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae(1),
        text_encoder=None,
        text_encoder_2=text_encoder(projection=True, seed=2),
        tokenizer=None,
        tokenizer_2=tokenizer(),
        unet=sdxl_unet(4, time_ids=5, cross_attention_dim=32),
        scheduler=sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return save_pipeline(pipe, folder)


def save_all(root: Path) -> Path:
    """All three tiny models under ``root``: ``sd1``, ``xl`` (SDXL base), ``refiner``."""
    save_sd1(root / "sd1")
    save_sdxl_base(root / "xl")
    save_sdxl_refiner(root / "refiner")
    return root
