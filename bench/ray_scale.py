"""Ray scale-out benchmark (issues #14 and #15): ``graphsd batch``'s machinery (RayPool, routing,
exactly-once rows) with 1, 2, 4 workers.

    python bench/ray_scale.py                      # CPU: simulated work, then graphsd-tiny
    python bench/ray_scale.py --device cuda --gpus 2 --model sd15 --jobs 40   # one worker per GPU
    python bench/ray_scale.py --smoke              # a quick check of the script

Simulated work: a plugin written by this script, a loader node that takes ``--load-s`` seconds
the first time a worker loads a model name (it is then held, as a checkpoint is) and a work node
that sleeps ``--work-s`` seconds and writes one small file. Real work: graphsd-tiny at 64x64
(CPU), or an SD1.5-shaped checkpoint with random weights (bench/gpu.py's builder; three copies
for the mix) at 512x512, 20 euler steps, fp16 (GPU).

For each worker count N, on fresh workers:

- ``warm``: every worker first runs one job (its model loaded), then ``--jobs`` jobs of one model;
- ``loads``: models unloaded, then ``--jobs`` jobs over three models in a random order;
- efficiency = T(1 worker) / (N x T(N workers)), the same jobs; images/s = jobs / T;
- dispatch overhead per job: a job's time at the caller minus its time inside the worker
  (median and 95th percentile over the warm jobs);
- model loads: jobs that loaded a model (from the workers' ModelEvents).

Then, with the most workers: one worker killed as the 5th job starts its work; the rows lost (not
done), duplicated (a row folder with more than one output, or files outside the rows' folders),
the extra loads and the time against the same stream unharmed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLUGIN = """
import time
from pathlib import Path
import torch
from pydantic import Field
from graphsd import Node, NodeIO, hookimpl
from graphsd.paths import write_atomic

class SimLoader(Node):
    type = "SimLoader"
    category = "loaders"
    description = "Benchmark: 'loads' a model named name (load_s seconds the first time a worker loads it)."
    class Inputs(NodeIO):
        name: str = Field("m0")
        load_s: float = Field(0.5, ge=0)
    class Outputs(NodeIO):
        model: str = Field(description="the key")
    def run(self, inputs, ctx):
        key = "sim:" + inputs.name
        def load():
            time.sleep(inputs.load_s)
            return torch.nn.Linear(1, 1)
        ctx.models.load(key, load)
        return self.Outputs(model=key)

class SimWork(Node):
    type = "SimWork"
    category = "image"
    description = "Benchmark: work_s seconds of work with a model, then one small file."
    output_node = True
    class Inputs(NodeIO):
        model: str = Field("")
        work_s: float = Field(0.25, ge=0)
        seed: int = Field(0)
    class Outputs(NodeIO):
        paths: list[str] = Field(default_factory=list)
    def run(self, inputs, ctx):
        end = time.perf_counter() + inputs.work_s
        while time.perf_counter() < end:
            ctx.progress(0, 1)
            time.sleep(min(0.02, max(end - time.perf_counter(), 0)))
        path = write_atomic(Path(ctx.output_dir) / f"sim_{inputs.seed}.txt", lambda t: t.write_text(inputs.model))
        ctx.wrote_file(path)
        return self.Outputs(paths=[str(path)])

@hookimpl
def graphsd_register_nodes():
    return [SimLoader, SimWork]
"""


def sim_workflow(load_s: float, work_s: float) -> dict:
    return {
        "version": 1,
        "params": {"model": "m0", "seed": 0},
        "nodes": {
            "load": {"type": "SimLoader", "inputs": {"name": "${model}", "load_s": load_s}},
            "work": {"type": "SimWork", "inputs": {"model": "@load.model", "work_s": work_s, "seed": "${seed}"}},
        },
    }


def real_workflow(model: str, size: int, steps: int, dtype: str) -> dict:
    return {
        "version": 1,
        "params": {"model": model, "seed": 0},
        "nodes": {
            "m": {"type": "CheckpointLoader", "inputs": {"path": "${model}", "dtype": dtype}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": "a red circle on a white background"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": "${seed}", "width": size, "height": size}},
            "d": {
                "type": "UNetDenoiseLoop",
                "inputs": {"unet": "@m.unet", "positive": "@pos.cond", "negative": "@neg.cond", "noise": "@noise.noise", "steps": steps},
            },
            "img": {"type": "VAEDecode", "inputs": {"vae": "@m.vae", "latent": "@d.latent"}},
            "save": {"type": "SaveImage", "inputs": {"image": "@img.image", "prefix": "img", "embed_workflow": False}},
        },
    }


class Bench:
    def __init__(self, args, base: Path, workflow: dict, models: list[str], plugins: list[str], models_dir: str):
        from graphsd import Engine, Settings

        self.args = args
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.workflow_path = base / "workflow.json"
        self.workflow_path.write_text(json.dumps(workflow))
        self.models = models
        self.settings = Settings(device=args.device, output_dir=str(base / "out"), models_dir=models_dir, plugins_dirs=plugins)
        self.engine = Engine(dataclasses_replace(self.settings, device="cpu"))
        self.counter = 0

    def batch(self, pool, rows: list[dict], on_event=None):
        from graphsd.batch import BatchOptions, run_batch

        self.counter += 1
        out = self.base / f"run{self.counter}"
        params = self.base / f"rows{self.counter}.jsonl"
        params.write_text("".join(json.dumps(r) + "\n" for r in rows))
        settings = dataclasses_replace(self.settings, output_dir=str(out))
        loads = []

        def events(row, event):
            if event.get("kind") == "model" and event.get("action") == "load":
                loads.append(row.name)
            if on_event is not None:
                on_event(row, event)

        pool.stats.overheads.clear()
        t0 = time.perf_counter()
        result, code = run_batch(BatchOptions(str(self.workflow_path), str(params), settings, progress=False), self.engine, pool, events)
        seconds = time.perf_counter() - t0
        return out, result, seconds, len(set(loads)), list(pool.stats.overheads)

    def stream(self, n: int, mixed: bool, seed: int = 0) -> list[dict]:
        rng = random.Random(seed)
        return [{"seed": 1000 * seed + i, "model": rng.choice(self.models) if mixed else self.models[0]} for i in range(n)]


def dataclasses_replace(settings, **kw):
    import dataclasses

    return dataclasses.replace(settings, **kw)


def check_once(out: Path, result) -> tuple[int, int]:
    """(rows lost, rows duplicated): a row not done, or a folder with more or fewer than one
    output; any other file or folder there counts as a duplicate too."""
    lost = sum(r.status != "done" for r in result)
    names = {r.name for r in result}
    dup = 0
    for entry in out.iterdir():
        if entry.name == "batch-manifest.json":
            continue
        if entry.name not in names or not entry.is_dir():
            dup += 1
        elif len([p for p in entry.rglob("*") if p.is_file()]) != 1:
            dup += 1
    return lost, dup


def measure(bench: Bench, counts: list[int], label: str) -> dict:
    from graphsd.distributed.ray_pool import RayPool

    args = bench.args
    table: dict = {"label": label, "rows": []}
    base: dict = {}
    for n in counts:
        pool = RayPool(bench.settings, workers=n, threads=args.threads)
        t0 = time.perf_counter()
        pool.wait_ready(timeout=900)
        start_s = time.perf_counter() - t0
        # warm: each worker has the model loaded (and its first job done), then the stream
        bench.batch(pool, [{"seed": -1 - i, "model": bench.models[0]} for i in range(n)])
        out, result, warm_s, warm_loads, overheads = bench.batch(pool, bench.stream(args.jobs, False, seed=1))
        assert all(r.status == "done" for r in result), [r.error for r in result if r.status != "done"][:3]
        pool.free(unload_models=True, free_memory=True)
        out, result, loads_s, mixed_loads, _ = bench.batch(pool, bench.stream(args.jobs, True, seed=2))
        assert all(r.status == "done" for r in result), [r.error for r in result if r.status != "done"][:3]
        row = {
            "workers": n,
            "start_s": round(start_s, 1),
            "warm_s": round(warm_s, 2),
            "warm_jobs_per_s": round(args.jobs / warm_s, 3),
            "loads_s": round(loads_s, 2),
            "loads_jobs_per_s": round(args.jobs / loads_s, 3),
            "model_loads_mixed": mixed_loads,
            "models": len(bench.models),
            "dispatch_ms_median": round(1000 * statistics.median(overheads), 2),
            "dispatch_ms_p95": round(1000 * sorted(overheads)[int(0.95 * (len(overheads) - 1))], 2),
        }
        if n == counts[0]:
            base = row
        row["efficiency_warm"] = round(base["warm_s"] * counts[0] / (n * warm_s), 3)
        row["efficiency_loads"] = round(base["loads_s"] * counts[0] / (n * loads_s), 3)
        if n == counts[-1] and n > 1:
            row.update(killed(bench, pool))
        pool.shutdown()
        table["rows"].append(row)
        print(json.dumps(row), flush=True)
    return table


def killed(bench: Bench, pool) -> dict:
    """The mixed stream again (warm models) with one worker killed as the 5th job starts its
    work: lost and duplicated rows, extra loads, time against the same stream unharmed."""
    args = bench.args
    deaths = pool.stats.deaths
    _, _, clean_s, clean_loads, _ = bench.batch(pool, bench.stream(args.jobs, True, seed=3))
    fired = threading.Event()

    def kill(row, event):
        if row.index == 5 and event.get("kind") == "node_start" and not fired.is_set() and event.get("node_id") in ("work", "d"):
            fired.set()
            pool.kill(row.worker)

    out, result, seconds, loads, _ = bench.batch(pool, bench.stream(args.jobs, True, seed=4), kill)
    lost, dup = check_once(out, result)
    return {
        "killed_worker": fired.is_set(),
        "killed_deaths": pool.stats.deaths - deaths,
        "killed_lost": lost,
        "killed_duplicated": dup,
        "killed_extra_loads": loads - clean_loads,
        "killed_s": round(seconds, 2),
        "unharmed_s": round(clean_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--gpus", type=int, default=0, help="with --device cuda: measure 1 .. this many workers, one per GPU")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (CPU)")
    parser.add_argument("--jobs", type=int, default=96, help="jobs per stream")
    parser.add_argument("--work-s", type=float, default=0.25, help="simulated work per job (s)")
    parser.add_argument("--load-s", type=float, default=1.0, help="simulated model load (s)")
    parser.add_argument("--model", default="tiny", help="real work: tiny (graphsd-tiny) | sd15 (SD1.5-shaped, random weights)")
    parser.add_argument("--skip", default="", help="comma-separated: sim, real")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--json", help="write the tables here")
    parser.add_argument("--smoke", action="store_true", help="few short jobs: checks the script, measures little")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.work_s, args.load_s = 8, 0.05, 0.1
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from graphsd.distributed.ray_pool import connect

    counts = list(range(1, args.gpus + 1)) if args.device.startswith("cuda") else [int(c) for c in args.workers.split(",")]
    base = Path(tempfile.mkdtemp(prefix="graphsd-ray-bench-"))
    connect("", num_cpus=max(max(counts), os.cpu_count() or 1))
    results: dict = {"device": args.device, "jobs": args.jobs, "tables": []}
    try:
        if "sim" not in args.skip:
            plugins = base / "plugins"
            plugins.mkdir()
            (plugins / "graphsd_bench_sim.py").write_text(PLUGIN)
            bench = Bench(args, base / "sim", sim_workflow(args.load_s, args.work_s), ["m0", "m1", "m2"], [str(plugins)], str(base))
            results["tables"].append(measure(bench, counts, f"simulated: {args.work_s} s work, {args.load_s} s load"))
        if "real" not in args.skip:
            models_dir = base / "models"
            names = ["ckpt-a", "ckpt-b", "ckpt-c"]
            if args.model == "tiny":
                tiny = ROOT / "graphsd" / "std" / "models" / "builtin" / "graphsd-tiny"
                for name in names:
                    shutil.copytree(tiny, models_dir / name)
                size, steps, dtype = 64, 4, "fp32"
            else:
                sys.path.insert(0, str(ROOT / "bench"))
                from gpu import build_model

                build_model(args.model, models_dir / names[0], "cuda" if args.device.startswith("cuda") else "cpu")
                for name in names[1:]:
                    shutil.copytree(models_dir / names[0], models_dir / name)
                size, steps, dtype = 512, 20, "fp16" if args.device.startswith("cuda") else "fp32"
            if args.smoke:
                size, steps = 32, 1
            real_counts = counts if args.device.startswith("cuda") else [c for c in counts if c <= (os.cpu_count() or 1)]
            bench = Bench(args, base / "real", real_workflow("ckpt-a", size, steps, dtype), names, [], str(models_dir))
            label = f"{args.model} {size}x{size}, {steps} steps, {dtype}, {args.device}"
            results["tables"].append(measure(bench, real_counts, label))
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
