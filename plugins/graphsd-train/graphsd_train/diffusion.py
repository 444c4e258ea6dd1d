"""Train a text-conditioned noise predictor (U-Net + CLIP text encoder, jointly) on latents.

One step (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 1, in the
latent space of Rombach et al. 2022): draw a batch of latents ``x0`` and their captions, a
timestep ``t`` uniform in [0, T), noise ``ε ~ N(0, I)``; form
``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` and minimise ``MSE(ε_θ(x_t, t, text(c)), ε)``.
Captions are replaced by the empty caption with probability ``caption_dropout`` so that the same
network also predicts unconditionally, which classifier-free guidance needs (Ho & Salimans 2022).

The text encoder is trained jointly with the U-Net: graphsd builds its models from nothing, and
a frozen randomly initialised encoder would only give the U-Net arbitrary embeddings to decode.

An exponential moving average of both networks' weights is kept and returned (the EMA starts
with a warm-up, ``decay_t = min(decay, (1 + t) / (10 + t))``). All randomness (batches, timesteps,
noise, dropout) comes from one CPU generator seeded with ``seed``; a checkpoint stores it with
the weights, EMA and optimizer, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphsd_train.architecture import NOISE_SCHEDULE, TextEncoderShape, UNetShape

ProgressFn = Callable[[int, int, float], None]
CHECKPOINT_NAME = "diffusion_checkpoint.pt"


@dataclass(frozen=True)
class DiffusionTraining:
    steps: int = 4000
    batch_size: int = 256
    lr: float = 4e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    unet: UNetShape = field(default_factory=UNetShape)
    text: TextEncoderShape = field(default_factory=TextEncoderShape)
    schedule: dict = field(default_factory=lambda: dict(NOISE_SCHEDULE))


@dataclass
class TrainedDiffusion:
    """EMA weights of the trained networks (eval mode, CPU) and the training record."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    steps_done: int
    losses: list[float]


def alphas_cumprod(schedule: dict) -> torch.Tensor:
    """ᾱ_t for SD's "scaled_linear" schedule: β linear in sqrt space from beta_start to beta_end."""
    if schedule["beta_schedule"] != "scaled_linear":
        raise ValueError("only the scaled_linear schedule is implemented")
    n = schedule["num_train_timesteps"]
    betas = torch.linspace(schedule["beta_start"] ** 0.5, schedule["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _lr_factor(step: int, cfg: DiffusionTraining) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_diffusion(
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    vocab: dict[str, int],
    cfg: DiffusionTraining,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    checkpoint_dir: str | Path | None = None,
    max_seconds: float | None = None,
) -> TrainedDiffusion:
    """Train on scaled latents ``[N, C, h, w]`` with token ids ``[N, L]``.

    ``empty_ids`` ``[L]`` are the ids of the empty caption (caption dropout); ``vocab`` gives
    the vocabulary size and special ids (``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``vocab_size``). With ``checkpoint_dir``, a checkpoint found there is resumed and one is
    written every ``checkpoint_every`` steps and at the end. ``max_seconds`` stops early
    (``steps_done`` says where).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    text = cfg.text.build(vocab["vocab_size"], vocab["bos_token_id"], vocab["eos_token_id"], vocab["pad_token_id"])
    unet = cfg.unet.build(latents.shape[-1], latents.shape[1], cfg.text.width)
    text.to(device).train()
    unet.to(device).train()
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        try:
            for module, key in ((text, "text"), (unet, "unet"), (ema_text, "ema_text"), (ema_unet, "ema_unet")):
                module.load_state_dict(state[key])
            opt.load_state_dict(state["opt"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"checkpoint {ckpt_path} was written with other network settings: {str(exc)[:200]}") from None
        gen.set_state(state["generator"].cpu())
        step, losses = int(state["step"]), list(state["losses"].tolist())

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": step, "losses": torch.tensor(losses, dtype=torch.float64), "generator": gen.get_state(), "opt": opt.state_dict()}
        for module, key in ((text, "text"), (unet, "unet"), (ema_text, "ema_text"), (ema_unet, "ema_unet")):
            state[key] = module.state_dict()
        _save_checkpoint(ckpt_path, state)

    abar = alphas_cumprod(cfg.schedule).to(device)
    data, ids_all, empty = latents.to(device), input_ids.to(device), empty_ids.to(device)
    use_bf16 = device.type == "cuda"
    started = time.monotonic()
    while step < cfg.steps:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        t = torch.randint(len(abar), (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, *data.shape[1:]), generator=gen).to(device)
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout).to(device)
        idx, t = idx.to(device), t.to(device)
        ids = torch.where(drop[:, None], empty[None, :], ids_all[idx])
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * data[idx] + (1.0 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            context = text(ids).last_hidden_state
            pred = unet(x_t, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _update_ema(ema_text, text, decay)
        _update_ema(ema_unet, unet, decay)
        step += 1
        losses.append(loss.item())
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
        if progress is not None:
            progress(step, cfg.steps, losses[-1])
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
    checkpoint()
    return TrainedDiffusion(ema_unet.cpu().eval(), ema_text.cpu().eval(), step, losses)
