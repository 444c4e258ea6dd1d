"""Tiny random Stable Diffusion models (SD1-style, SDXL base, SDXL refiner) saved as diffusers
folders, for fast parity tests against diffusers' own pipelines on CPU.

The VAEs have four blocks, so latents are 1/8 of the image size as in the real models; the
U-Nets take 8×8 latents (64×64 images).
"""

from __future__ import annotations

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


def save_sd1(folder: Path) -> Path:
    """An SD1-style model (PNDM scheduler config like the original SD1 releases)."""
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
    pipe.save_pretrained(folder)
    return folder


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading")


def save_sdxl_base(folder: Path) -> Path:
    pipe = StableDiffusionXLPipeline(
        vae=vae(1),
        text_encoder=text_encoder(seed=1),
        text_encoder_2=text_encoder(projection=True, seed=2),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=sdxl_unet(3, time_ids=6, cross_attention_dim=64),
        scheduler=sdxl_scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def save_sdxl_refiner(folder: Path) -> Path:
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
    pipe.save_pretrained(folder)
    return folder


def save_all(root: Path) -> Path:
    """All three tiny models under ``root``: ``sd1``, ``xl`` (SDXL base), ``refiner``."""
    save_sd1(root / "sd1")
    save_sdxl_base(root / "xl")
    save_sdxl_refiner(root / "refiner")
    return root
