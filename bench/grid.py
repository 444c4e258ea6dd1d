"""Branch batching: a grid of independent text-to-image branches, batched vs one by one.

The grid is every colour × shape × background of graphsd-tiny's captions, each with 2 seeds:
108 branches ``TextEncode → LatentNoise → UNetDenoiseLoop → VAEDecode → SaveImage`` in one
workflow (one negative prompt, one prompt encode per caption). The same workflow runs twice in
this invocation, each in a fresh engine after an untimed warm-up: with ``max_batch`` (default
16: the executor runs the ready denoise loops and decodes of equal settings as batches) and with
``max_batch 1`` (every node alone, as graphsd ran before batching). Prints the seconds of each,
the ratio, and the largest difference between the two runs' images (floats in [0, 1], and
8-bit levels as saved).

    python bench/grid.py [--device cpu|cuda] [--dtype fp32|fp16] [--steps 20] [--branches 108]
                         [--max-batch 16] [--smoke] [--json OUT]

``--smoke`` runs 6 branches of 2 steps, to check the set-up quickly (e.g. before a GPU run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# graphsd-tiny's vocabulary (its training captions read "a {color} {shape} on a {background} background")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray")
SEEDS = (0, 1)


def grid_branches() -> list[tuple[str, int]]:
    """(prompt, seed) of every branch, in a fixed order: 6 × 3 × 3 captions × 2 seeds = 108."""
    captions = [f"a {c} {s} on a {b} background" for c, s, b in itertools.product(COLORS, SHAPES, BACKGROUNDS)]
    return [(caption, seed) for caption in captions for seed in SEEDS]


def grid_workflow(branches: list[tuple[str, int]], steps: int, dtype: str = "fp32", size: int = 128, cfg: float = 7.5) -> dict:
    """One workflow with a branch per (prompt, seed); prompts shared by their branches are encoded once."""
    nodes: dict[str, Any] = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny", "dtype": dtype}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": ""}},
    }
    prompts: dict[str, str] = {}
    for i, (prompt, seed) in enumerate(branches):
        if prompt not in prompts:
            prompts[prompt] = f"p{len(prompts):03d}"
            nodes[prompts[prompt]] = {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": prompt}}
        b = f"b{i:03d}"
        nodes[f"{b}_noise"] = {"type": "LatentNoise", "inputs": {"seed": seed, "width": size, "height": size}}
        nodes[f"{b}_denoise"] = {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@model.unet",
                "positive": f"@{prompts[prompt]}.cond",
                "negative": "@neg.cond",
                "noise": f"@{b}_noise.noise",
                "steps": steps,
                "cfg": cfg,
                "sampler": "euler",
            },
        }
        nodes[f"{b}_image"] = {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": f"@{b}_denoise.latent"}}
        nodes[f"{b}_save"] = {"type": "SaveImage", "inputs": {"image": f"@{b}_image.image", "prefix": f"grid_{b}"}}
    return {"version": 1, "nodes": nodes}


def run_grid(
    device: str, workflow: dict, warmup: dict, max_batch: int, out: str
) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """Seconds of one run of ``workflow`` in a fresh engine (after an untimed run of ``warmup``
    and with the output cache emptied), each branch's image, and seconds per node type."""
    from graphsd import Engine, Settings

    engine = Engine(Settings(device=device, output_dir=out, max_batch=max_batch))
    engine.run(warmup)  # loads the model, first calls
    engine.cache.clear()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = engine.run(workflow)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"the grid run failed: {result.errors[0]}")
    images = {n: v["image"].pixels for n, v in result.outputs.items() if n.endswith("_image")}
    per_type: dict[str, float] = {}
    for e in result.events:
        if e.kind == "node_done":
            per_type[e.node_type] = per_type.get(e.node_type, 0.0) + e.duration_s
    batches = [e.size for e in result.events if e.kind == "node_batch" and not e.error]
    per_type["batches"] = float(len(batches))
    return seconds, images, per_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="weights (default fp32 on CPU, fp16 on CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="denoise steps per branch (default 20)")
    parser.add_argument("--branches", type=int, default=108, help="run the first N branches of the grid (default all 108)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched run's max_batch (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--first", choices=("batched", "one-by-one"), default="batched", help="which run goes first (on a shared machine, try both)"
    )
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="CUDA float32: exact float32 matrix products and convolutions (PyTorch lets cuDNN use TF32 by default)",
    )
    parser.add_argument("--smoke", action="store_true", help="6 branches of 2 steps: a quick check of the set-up")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.smoke:
        args.branches, args.steps = 6, 2
    dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    branches = grid_branches()[: args.branches]
    workflow = grid_workflow(branches, args.steps, dtype)
    warmup = grid_workflow([("a red circle on a white background", 1000), ("a red circle on a white background", 1001)], 1, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in ("batched", "one-by-one") if args.first == "batched" else ("one-by-one", "batched"):
            runs[name] = run_grid(args.device, workflow, warmup, args.max_batch if name == "batched" else 1, str(Path(tmp) / name))
    (t_batched, batched, types_b), (t_single, single, types_s) = runs["batched"], runs["one-by-one"]
    diff = max(float((batched[n] - single[n]).abs().max()) for n in single)
    levels = max(int(((batched[n] * 255).round() - (single[n] * 255).round()).abs().max()) for n in single)
    figures = {
        "device": args.device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "branches": len(branches),
        "steps": args.steps,
        "max_batch": args.max_batch,
        "first": args.first,
        "tf32": torch.backends.cudnn.allow_tf32 and args.device.startswith("cuda"),
        "batched_s": round(t_batched, 3),
        "one_by_one_s": round(t_single, 3),
        "speedup": round(t_single / t_batched, 2),
        "max_pixel_diff": diff,
        "max_8bit_levels_diff": levels,
        "batched_node_seconds": {k: round(v, 3) for k, v in types_b.items()},
        "one_by_one_node_seconds": {k: round(v, 3) for k, v in types_s.items()},
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"{len(branches)} branches × {args.steps} steps on {args.device} ({dtype}, {torch.get_num_threads()} threads)")
    print(f"  batched (max_batch {args.max_batch}): {t_batched:8.2f} s")
    print(f"  one by one (max_batch 1): {t_single:8.2f} s")
    print(f"  speed-up: {t_single / t_batched:.2f}×")
    print(f"  max pixel difference: {diff:.3g} (in [0, 1]); {levels} 8-bit level(s)")
    print(f"  node seconds, batched: {figures['batched_node_seconds']}")
    print(f"  node seconds, one by one: {figures['one_by_one_node_seconds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
