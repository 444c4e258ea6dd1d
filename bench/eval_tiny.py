"""Quality table of graphsd-tiny, measured with diffusers' own pipelines and graphsd's evaluator.

    python bench/eval_tiny.py --model graphsd/std/models/builtin/graphsd-tiny --device cuda \
        --out bench/tiny_quality.md --samples bench/tiny_samples.png

Text-to-image: all 54 colour × shape × background captions × 2 seeds, 20 steps, 128×128, for
guidance 7.5 and 1 (no CFG) with the Euler scheduler and guidance 7.5 with DDIM and DPM-Solver++;
the six held-out combinations (never seen in training) are reported separately. Image-to-image:
a generated "a red circle ..." (and other colour pairs) re-prompted with another colour at
strength 0.6 must keep the shape and its place and take the new colour. ``--cpu-timing`` times
one 128² 20-step CFG generation on 2 CPU threads instead.

The captions and the evaluator come from the training plugin: ``pip install ./plugins/graphsd-train``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from graphsd_train.evaluate import read_shape, score_image
from graphsd_train.shapes import ALL_COMBOS, BACKGROUNDS, HELD_OUT, caption
from PIL import Image

SEEDS = (0, 1)
STEPS = 20


def generate(pipe, prompts: list[str], seed: int, cfg: float) -> list[np.ndarray]:
    gens = [torch.Generator("cpu").manual_seed(seed * 1000 + i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=cfg, generator=gens, height=128, width=128, output_type="np")
    return [(img * 255).round().astype(np.uint8) for img in out.images]


def accuracy(pipe, cfg: float) -> tuple[dict, list[np.ndarray]]:
    """Per-split counts of correct attributes, and the seed-0 images (in ALL_COMBOS order)."""
    prompts = [caption(c) for c in ALL_COMBOS]
    stats = {split: {"n": 0, "shape": 0, "color": 0, "background": 0, "all": 0} for split in ("train", "held-out")}
    first = []
    for seed in SEEDS:
        images = generate(pipe, prompts, seed, cfg)
        if seed == SEEDS[0]:
            first = images
        for combo, img in zip(ALL_COMBOS, images):
            s = stats["held-out" if combo in HELD_OUT else "train"]
            score = score_image(img, caption(combo))
            s["n"] += 1
            s["all"] += score.correct
            for k, ok in score.checks.items():
                s[k] += ok
    return stats, first


def img2img_cases(pipe) -> list[str]:
    """Rows of the image-to-image table."""
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    rows = []
    pairs = [("red", "blue", "circle"), ("green", "purple", "square"), ("yellow", "red", "triangle")]
    for src, dst, shape in pairs:
        for bg in BACKGROUNDS:
            for seed in SEEDS:
                init = generate(pipe, [caption((src, shape, bg))], seed, 7.5)[0]
                before = read_shape(init)
                g = torch.Generator("cpu").manual_seed(seed + 77)
                out = i2i(caption((dst, shape, bg)), image=Image.fromarray(init), strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5, generator=g, output_type="np").images[0]
                after = score_image((out * 255).round().astype(np.uint8), caption((dst, shape, bg)))
                shift = float(np.hypot(after.reading.center[0] - before.center[0], after.reading.center[1] - before.center[1]))
                ok = after.correct and shift <= 8.0
                rows.append(f"| {src} {shape} on {bg}, seed {seed} | {before.color} {before.shape} | {after.reading.color} {after.reading.shape} on {after.reading.background} | {shift:.1f} | {'yes' if ok else 'no'} |")
    return rows


def contact_sheet(images: list[np.ndarray], columns: int = 9) -> Image.Image:
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, img in enumerate(images):
        sheet.paste(Image.fromarray(img), ((i % columns) * w, (i // columns) * h))
    return sheet


def pct(s: dict, k: str) -> str:
    return f"{100.0 * s[k] / max(1, s['n']):.1f}%"


def quality(model: str, device: str, out: Path, samples: Path | None) -> None:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    runs = [("euler", EulerDiscreteScheduler, 7.5), ("euler", EulerDiscreteScheduler, 1.0), ("ddim", DDIMScheduler, 7.5), ("dpm++ 2m", DPMSolverMultistepScheduler, 7.5)]
    lines = [
        "# graphsd-tiny quality",
        "",
        f"Model `{Path(model).name}`; {STEPS} steps, 128x128, seeds {list(SEEDS)}, each of the 54 captions; "
        f"device {torch.cuda.get_device_name() if device.startswith('cuda') else device}, {str(dtype).replace('torch.', '')}. "
        "Scored by `graphsd_train.evaluate` (pixel analysis). Held-out combinations were never seen in training.",
        "",
        "Reproduce: `python bench/eval_tiny.py --device cuda --samples bench/tiny_samples.png` "
        "(seed-0 images at guidance 7.5, euler: `bench/tiny_samples.png`).",
        "",
        "| sampler | guidance | split | images | shape | colour | background | all three |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    sheet_images = None
    for name, cls, cfg in runs:
        pipe.scheduler = cls.from_config(base)
        stats, first = accuracy(pipe, cfg)
        if name == "euler" and cfg == 7.5:
            sheet_images = first
        for split, s in stats.items():
            lines.append(f"| {name} | {cfg} | {split} | {s['n']} | {pct(s, 'shape')} | {pct(s, 'color')} | {pct(s, 'background')} | {pct(s, 'all')} |")
        both = {k: stats["train"][k] + stats["held-out"][k] for k in stats["train"]}
        lines.append(f"| {name} | {cfg} | **all 54** | {both['n']} | {pct(both, 'shape')} | {pct(both, 'color')} | {pct(both, 'background')} | **{pct(both, 'all')}** |")
    pipe.scheduler = EulerDiscreteScheduler.from_config(base)
    lines += [
        "",
        "## Image-to-image (strength 0.6, euler, guidance 7.5)",
        "",
        "Generated source image re-prompted with another colour; passes when the result shows the new colour, the same "
        "shape and background, and the shape's centre moved at most 8 px.",
        "",
        "| source | read before | read after | centre shift (px) | pass |",
        "| --- | --- | --- | --- | --- |",
        *img2img_cases(pipe),
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    if samples is not None and sheet_images:
        contact_sheet(sheet_images).save(samples)


def cpu_timing(model: str, threads: int, repeats: int = 5) -> None:
    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a white background"
    pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=128, width=128)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=128, width=128, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t)
    print(f"CPU, {threads} threads, 128x128, {STEPS} steps, guidance 7.5: median {sorted(times)[len(times) // 2]:.3f} s, min {min(times):.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description="graphsd-tiny quality table / CPU timing")
    p.add_argument("--model", default="graphsd/std/models/builtin/graphsd-tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench/tiny_quality.md"))
    p.add_argument("--samples", type=Path, default=None, help="write a contact sheet of the seed-0 images here")
    p.add_argument("--cpu-timing", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.cpu_timing:
        cpu_timing(a.model, a.threads)
    else:
        quality(a.model, a.device, a.out, a.samples)


if __name__ == "__main__":
    main()
