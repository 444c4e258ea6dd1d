"""GPU benchmark: graphsd against diffusers on an SD1.5-shaped model (random weights, the real
architecture), fp16, 512x512, 20 euler steps with CFG, batch 1 - eager and with model-level
offload (graphsd `--vram-budget` vs diffusers `enable_model_cpu_offload`).

    python bench/gpu_sd15.py [--runs 5]

Each configuration runs in its own process (so peak GPU memory is its own); all run in one
invocation on the same GPU, and the ratios graphsd / diffusers are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIZE, CFG, PROMPT = 20, 512, 7.5, "a red circle on a white background"


def build_model(folder: Path) -> None:
    """An SD1.5-shaped diffusers folder with random weights (fp16)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from graphsd.std.text.tokenizer import clip_tokenizer_dir

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512
    )
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir()), unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)


def measure(fn, runs: int) -> tuple[float, float]:
    fn(0)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(1, runs + 1):
        t0 = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def run_graphsd(folder: Path, runs: int, vram_budget_mb: float | None) -> tuple[float, float]:
    from graphsd import Engine, Settings

    engine = Engine(Settings(device="cuda", output_dir=tempfile.mkdtemp(), vram_budget_mb=vram_budget_mb))
    doc = {
        "version": 1,
        "params": {"seed": 0},
        "nodes": {
            "m": {"type": "CheckpointLoader", "inputs": {"path": str(folder), "dtype": "fp16"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": PROMPT}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": "${seed}", "width": SIZE, "height": SIZE}},
            "d": {"type": "UNetDenoiseLoop", "inputs": {"unet": "@m.unet", "positive": "@pos.cond", "negative": "@neg.cond", "noise": "@noise.noise", "steps": STEPS, "cfg": CFG, "sampler": "euler"}},
            "img": {"type": "VAEDecode", "inputs": {"vae": "@m.vae", "latent": "@d.latent"}},
        },
    }

    def once(seed: int) -> None:
        res = engine.run(doc, params={"seed": seed}, outputs=["img"])
        assert res.ok, [str(e) for e in res.errors]

    return measure(once, runs)


def run_diffusers(folder: Path, runs: int, offload: bool) -> tuple[float, float]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.enable_model_cpu_offload() if offload else pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def once(seed: int) -> None:
        pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="pt")

    return measure(once, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:  # child process: one configuration
        folder = Path(args.model)
        t, mem = {
            "graphsd": lambda: run_graphsd(folder, args.runs, None),
            "graphsd_offload": lambda: run_graphsd(folder, args.runs, 1500.0),
            "diffusers": lambda: run_diffusers(folder, args.runs, False),
            "diffusers_offload": lambda: run_diffusers(folder, args.runs, True),
        }[args.config]()
        print(json.dumps({"s": t, "gib": mem}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15"
        build_model(folder)
        results = {}
        for config in ("diffusers", "graphsd", "diffusers_offload", "graphsd_offload"):
            out = subprocess.run([sys.executable, __file__, "--config", config, "--model", str(folder), "--runs", str(args.runs)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SD1.5-shaped, fp16, {SIZE}x{SIZE}, {STEPS} euler steps, CFG {CFG}, median of {args.runs}")
    print(f"{'configuration':<44} {'s / image':>10} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<44} {r['s']:>10.3f} {r['gib']:>9.2f}")
    for g, d in (("graphsd", "diffusers"), ("graphsd_offload", "diffusers_offload")):
        print(f"ratio {g} / {d}: time {results[g]['s'] / results[d]['s']:.2f}, peak memory {results[g]['gib'] / results[d]['gib']:.2f}")


if __name__ == "__main__":
    main()
