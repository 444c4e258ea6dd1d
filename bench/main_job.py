"""Benchmark of the main job: `graphsd run workflows/txt2img.yaml` with the built-in model.

Reports, on this machine:
  1. the whole command's wall time (a fresh process each time, imports included), median of N;
  2. the generation time after loading (noise -> denoise -> decode -> save, i.e. a re-run with a
     new seed in a warm Engine), median of N;
  3. the same generation with diffusers' StableDiffusionPipeline on the same model folder,
     measured in the same run, and the ratio graphsd / diffusers.

    python bench/main_job.py [--runs 5] [--python path/to/other/venv/bin/python]

Python's bytecode cache is enabled for the child processes (PYTHONDONTWRITEBYTECODE unset), as
on a normal installation; one untimed warm-up run fills it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "txt2img.yaml"


def command_times(runs: int, out: str, python: str) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [python, "-m", "graphsd.cli", "run", str(WORKFLOW), "--output-dir", out, "-q"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warm-up: fills the bytecode cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def graphsd_generation_times(runs: int, out: str) -> tuple[list[float], dict]:
    from graphsd import Engine, Settings

    engine = Engine(Settings(output_dir=out, device="cpu"))
    graph_params = engine.load(WORKFLOW).params
    engine.run(WORKFLOW)  # loads the model and encodes the prompts
    times = []
    for seed in range(1, runs + 1):
        t0 = time.perf_counter()
        res = engine.run(WORKFLOW, params={"seed": 1000 + seed})
        times.append(time.perf_counter() - t0)
        assert set(res.executed) == {"noise", "denoise", "image", "save"}, res.executed
    return times, graph_params


def diffusers_generation_times(runs: int, params: dict) -> list[float]:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from graphsd.std.models.loading import resolve_model_path

    folder = resolve_model_path("graphsd-tiny", Path("models"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=params["prompt"], negative_prompt=params["negative"], num_inference_steps=params["steps"], guidance_scale=params["cfg"], height=params["height"], width=params["width"])
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for seed in range(1, runs + 1):
        t0 = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images[0].save(os.devnull, format="PNG")
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the environment to time the whole command in, e.g. one made with the README's "
        "install command (a development environment also imports peft, which diffusers loads when present)",
    )
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as out:
        cmd = command_times(args.runs, out, args.python)
        gen, params = graphsd_generation_times(args.runs, out)
    ref = diffusers_generation_times(args.runs, params)
    med = statistics.median
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"whole command `graphsd run workflows/txt2img.yaml` (median of {args.runs}): {med(cmd):.2f} s   (target <= 6 s; {args.python})")
    print(f"generation after loading, graphsd (median of {args.runs}):              {med(gen):.3f} s   (target <= 1 s)")
    print(f"same generation, diffusers StableDiffusionPipeline:                   {med(ref):.3f} s")
    print(f"ratio graphsd / diffusers:                                            {med(gen) / med(ref):.2f}")


if __name__ == "__main__":
    main()
