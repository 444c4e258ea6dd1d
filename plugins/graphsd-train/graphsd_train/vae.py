"""Train the VAE (AutoencoderKL) and encode a dataset's latents once.

Loss (Kingma & Welling 2014, with SD's small KL weight, Rombach et al. 2022 §3):
``MSE(decode(z), x) + kl_weight · KL(q(z|x) ‖ N(0, I))``, z drawn by reparameterisation, both
terms averaged per element (AdamW, constant learning rate). The latent scale factor is set
afterwards to 1 / std of the encoded training latents, as SD's 0.18215 was, so the diffusion
model sees unit-variance latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from graphsd_train.architecture import VAEShape
from graphsd_train.data import to_model_range

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class VAETraining:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    kl_weight: float = 1e-4
    seed: int = 0
    shape: VAEShape = field(default_factory=VAEShape)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train_vae(
    pixels: torch.Tensor, cfg: VAETraining, device: torch.device | str = "cpu", progress: ProgressFn | None = None
) -> AutoencoderKL:
    """Train an AutoencoderKL on uint8 images ``[N, 3, H, W]``; returns it in eval mode on CPU."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    vae = cfg.shape.build(pixels.shape[-1]).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = pixels.to(device)
    down = 2 ** (len(cfg.shape.channels) - 1)
    latent_shape = (cfg.batch_size, cfg.shape.latent_channels, data.shape[-2] // down, data.shape[-1] // down)
    for step in range(cfg.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        eps = torch.randn(latent_shape, generator=gen)
        x = to_model_range(data[idx.to(device)])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * eps.to(device)
            recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon.float(), x)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        loss = mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, cfg.steps, loss.item())
    return vae.eval().cpu()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, device: torch.device | str = "cpu", batch: int = 256) -> torch.Tensor:
    """Posterior means of all images, ``[N, C, h, w]`` float32 on CPU, NOT yet scaled."""
    device = torch.device(device)
    vae = vae.to(device)
    out = []
    for i in range(0, len(pixels), batch):
        out.append(vae.encode(to_model_range(pixels[i : i + batch].to(device))).latent_dist.mean.float().cpu())
    vae.cpu()
    return torch.cat(out)


def set_scale_factor(vae: AutoencoderKL, latents: torch.Tensor) -> float:
    """Record 1 / std(latents) as the VAE's ``scaling_factor`` and return it."""
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor
