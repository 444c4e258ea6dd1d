"""The shapes of the networks graphsd trains: Stable Diffusion's architecture, scaled down.

Same component classes as SD 1.x (``AutoencoderKL``, ``CLIPTextModel``,
``UNet2DConditionModel``), so a trained model is an ordinary diffusers folder; only widths,
depths and the vocabulary differ. Defaults are those of graphsd-tiny (128² images, 16² latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a model is built, so loading the plugin stays light
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

#: Stable Diffusion's noise schedule (Rombach et al. 2022): "scaled_linear" betas in 1000 steps.
#: Also the saved scheduler config: ``clip_sample`` / ``set_alpha_to_one`` are set as in SD 1.x so
#: that DDIM built ``from_config`` does not clip the (unit-variance, unbounded) latents.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class VAEShape:
    """AutoencoderKL with len(channels) - 1 halvings: four levels give ×8, 4 latent channels."""

    channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 32

    def build(self, resolution: int) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        n = len(self.channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_groups,
            sample_size=resolution,
        )


@dataclass(frozen=True)
class TextEncoderShape:
    """A small CLIP text transformer (causal mask, last hidden state read by the U-Net)."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    max_length: int = 77

    def build(self, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> CLIPTextModel:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=self.width,
            intermediate_size=4 * self.width,
            projection_dim=self.width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_length,
            hidden_act="quick_gelu",
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        return CLIPTextModel(config)


@dataclass(frozen=True)
class UNetShape:
    """UNet2DConditionModel with cross-attention in all but the lowest-resolution level."""

    channels: tuple[int, ...] = (64, 128, 192)
    layers_per_block: int = 1
    attention_heads: int = 8
    norm_groups: int = 32

    def build(self, latent_size: int, latent_channels: int, context_width: int) -> UNet2DConditionModel:
        from diffusers import UNet2DConditionModel

        n = len(self.channels)
        return UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=self.channels,
            layers_per_block=self.layers_per_block,
            cross_attention_dim=context_width,
            attention_head_dim=self.attention_heads,
            norm_num_groups=self.norm_groups,
        )
