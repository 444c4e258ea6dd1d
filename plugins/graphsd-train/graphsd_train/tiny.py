"""Train graphsd-tiny from nothing: ``python -m graphsd_train.tiny --out DIR [--device cuda]``.

Steps: render the shapes dataset (held-out combinations excluded), train the tokenizer on its
captions, train the VAE, encode all latents once, train the U-Net and text encoder jointly,
save a diffusers folder (fp16 safetensors). The defaults are the shipped model's recipe; every
size can be made small for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from graphsd_train.data import load_images
from graphsd_train.diffusion import DiffusionTraining, train_diffusion
from graphsd_train.export import save_pipeline
from graphsd_train.shapes import HELD_OUT, ShapesDataset, caption
from graphsd_train.tokenizer import tokenize, train_tokenizer, vocab_info
from graphsd_train.vae import VAETraining, encode_latents, set_scale_factor, train_vae


def _printer(stage: str, every: int):
    started = time.monotonic()

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"[{stage}] step {step}/{total} loss {loss:.5f} ({time.monotonic() - started:.0f}s)", flush=True)

    return progress


def build(
    out: Path, seed: int, count: int, vae: VAETraining, diffusion: DiffusionTraining, device: str,
    max_seconds: float | None = None, checkpoint_dir: Path | None = None, log_every: int = 100,
) -> dict:
    """Run the whole recipe and return a record of it (also written to the folder's README)."""
    t0 = time.monotonic()
    dataset = ShapesDataset(seed=seed, count=count, resolution=128, held_out=True)
    pixels, captions = load_images(dataset)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(captions, tmp)
    t1 = time.monotonic()
    autoencoder = train_vae(pixels, vae, device, _printer("vae", log_every))
    latents = encode_latents(autoencoder, pixels, device)
    scale = set_scale_factor(autoencoder, latents)
    t2 = time.monotonic()
    trained = train_diffusion(
        latents * scale,
        tokenize(tokenizer, captions),
        tokenize(tokenizer, [""])[0],
        vocab_info(tokenizer),
        diffusion,
        device,
        _printer("unet", log_every),
        checkpoint_dir,
        max_seconds,
    )
    t3 = time.monotonic()
    record = {
        "dataset": {"seed": seed, "count": count, "held_out": sorted(caption(c) for c in HELD_OUT)},
        "vae": asdict(vae),
        "diffusion": {**asdict(diffusion), "steps_done": trained.steps_done},
        "latent_scale_factor": scale,
        "final_loss_mean_100": sum(trained.losses[-100:]) / max(1, len(trained.losses[-100:])),
        "seconds": {"data": round(t1 - t0, 1), "vae": round(t2 - t1, 1), "unet": round(t3 - t2, 1)},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
    }
    readme = (
        "# graphsd-tiny\n\nA tiny text-to-image latent diffusion model that graphsd trained itself on its "
        "synthetic shapes dataset (`a {color} {shape} on a {background} background`, 128x128).\n"
        "Reproduce with `python -m graphsd_train.tiny --out DIR --device cuda`.\n\n"
        f"```json\n{json.dumps(record, indent=2)}\n```\n"
    )
    save_pipeline(out, trained.unet, autoencoder, trained.text_encoder, tokenizer, diffusion.schedule, readme=readme, overwrite=True)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=24000)
    p.add_argument("--vae-steps", type=int, default=VAETraining.steps)
    p.add_argument("--vae-batch-size", type=int, default=VAETraining.batch_size)
    p.add_argument("--unet-steps", type=int, default=DiffusionTraining.steps)
    p.add_argument("--batch-size", type=int, default=DiffusionTraining.batch_size)
    p.add_argument("--lr", type=float, default=DiffusionTraining.lr)
    p.add_argument("--max-seconds", type=float, default=None, help="stop the U-Net stage early after this long")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="resume from / write U-Net checkpoints here")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    a = p.parse_args(argv)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae = VAETraining(steps=a.vae_steps, batch_size=a.vae_batch_size, seed=a.seed)
    diffusion = replace(
        DiffusionTraining(), steps=a.unet_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, checkpoint_every=a.checkpoint_every
    )
    record = build(a.out, a.seed, a.count, vae, diffusion, a.device, a.max_seconds, a.checkpoint_dir, a.log_every)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
