"""VRAM-budget benchmark: graphsd under a sweep of ``--vram-budget`` values (partial loading and
weight streaming, :mod:`graphsd.memory`) against diffusers' offloading, on SD1.5-shaped (512x512)
and SDXL-shaped (1024x1024) models with random weights (the real architectures, built by
``bench/gpu.py``), fp16, batch 1, euler, CFG 7.5.

    python bench/vram.py [--models sd15,sdxl] [--budgets none,8,6,4,3,2,1.5,1] \\
        [--anchors model,sequential,group_block,group_leaf] [--steps 20] [--runs 3] [--json out.json] \\
        [--timeout 600] [--timeouts diffusers:group_leaf=120,...] [--trace] [--timeline] [--rounds 1] [--cpus auto]

Each configuration runs in its own process, all in one invocation on the same GPU:

- ``graphsd@B``: ``Engine(Settings(device="cuda", vram_budget_mb=B * 1024))`` (``none``: no budget);
  ``graphsd@BrN``: the same with a streaming ring of N of the largest block (``ModelOffload.ring_blocks``;
  the default otherwise); a trailing ``w`` (``graphsd@1w``) keeps every ResNet whole (the layout before
  the largest were divided into their convolutions); a trailing ``k`` keeps the lowest-resolution blocks
  resident (``ModelOffload.residency = "rank"``), ``s`` the smallest (``"size"``, the default);
- ``graphsd+lora@B`` (``--lora``): the same with a LoRA on the U-Net (``LoraLoader``, a random rank-8
  PEFT-format file over every attention projection, written once per model): its difference is
  from ``graphsd+lora@none`` (streaming must not change the LoRA image), and ``lora_effect`` is
  its largest difference from the unpatched ``graphsd@none`` image (the LoRA must show);
- ``diffusers:model``: ``enable_model_cpu_offload()``;
- ``diffusers:sequential``: ``enable_sequential_cpu_offload()``;
- ``diffusers:group_block`` / ``group_leaf``: ``enable_group_offload(offload_type="block_level",
  num_blocks_per_group=1 | "leaf_level", use_stream=True, record_stream=True)`` (without
  ``record_stream`` every group's offload synchronizes the compute stream: the host waits for the
  GPU once per group, so the leaf level, thousands of groups per U-Net call, crawls).

Each configuration has its own time limit (``--timeout``, or a ``--timeouts`` entry for it); one
that runs out is recorded as timed out, with how far it got (the child reports its set-up and each
image as it goes), and the sweep goes on. The table row of each configuration is printed, and the
``--json`` file rewritten, as soon as it ends, so a run cut short keeps what it measured.

The host's speed drifts between processes on a shared machine (on one host, configurations where
nothing streams ranged from 0.65 to 1.19 s per image), so every process runs on the same CPUs
(``--cpus``: by default those of the GPU's NUMA node) and ``--rounds N`` runs the whole list of
configurations N times, interleaved, pooling each one's images: a drift then meets every
configuration instead of the ones that happened to run during it.

Printed per configuration: seconds per image (median of ``--runs`` after one warm-up image, over all rounds),
peak allocated GPU memory while timing (``torch.cuda.max_memory_allocated``), the process's peak
RSS, the weight bytes streamed per image (graphsd's StreamEvents), and the largest pixel
difference from the unconstrained graphsd image of the same seed (graphsd rows) or from the
first diffusers row (diffusers rows), and any ``workspace_grown`` events (a call that went past
the budget's activation estimate; the next call plans with the difference), and after each timed
image, outside its time, the host's speed (milliseconds of a fixed pure-Python loop: ``host ms``,
the median) and the GPU's SM clock (``nvidia-smi``; lowest-highest), so a slow row says whether
the host or the GPU was slow. ``--trace`` adds, for
the graphsd rows, one more image timed node by node with the device synchronised at each node's
start and end, and the device's kernel, host-to-device copy, overlap and idle time over it
(torch.profiler). ``--timeline`` adds, for the graphsd rows on CUDA, one more image with every U-Net
call's host and device time and, for its middle call, each block's start and end on the host and on
the device (CUDA events) and each streamed block's copy: which blocks waited for a copy, and what the
budget costs the host. ``--smoke`` runs tiny models on the CPU with the budget
policy applied to the CPU (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import CFG, build_model, pipeline_image, txt2img_document, unet_entry  # noqa: E402 - the model builders of the GPU benchmark

BUDGETS = "none,8,6,4,3,2,1.5,1"
LORA_FILE = "bench-lora.safetensors"  # --lora: written into each model's folder
ANCHORS = "model,sequential,group_block,group_leaf"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def progress(message: str) -> None:
    """How far a configuration got (its parent shows the last line if it runs out of time)."""
    print(f"[{time.perf_counter() - STARTED:.1f} s] {message}", file=sys.stderr, flush=True)


STARTED = time.perf_counter()


def memory_gib() -> dict:
    """This process's resident memory from /proc/self/status, GiB: ``rss_gib``, its peak (the
    kernel's high-water mark of its own address space, ``VmHWM``; not ``getrusage``'s
    ``ru_maxrss``, which a child started by ``exec`` inherits from its parent: the sweep's parent,
    which builds the models, would set every row's floor), and now, split into ``anon_gib`` (the
    process's own copies: converted weights, pageable CPU tensors), ``shmem_gib`` (where the CUDA
    driver's pinned allocations show) and ``file_gib`` (weights used in place from their
    memory-mapped ``.safetensors`` files, which the kernel can drop and read again). Without
    /proc, the peak from ``getrusage``."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB -> GiB
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(("Vm", "Rss"))}
    names = {"rss_gib": "VmHWM", "anon_gib": "RssAnon", "shmem_gib": "RssShmem", "file_gib": "RssFile"}
    return {name: kib.get(field, 0) / 2**20 for name, field in names.items()}


def host_probe_ms() -> float:
    """Milliseconds of a fixed piece of pure-Python work: the host's speed right now (the GPU
    machine's images drift by up to ~1.9 x between images; this says whether the host did)."""
    t0 = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i & 7
    return round((time.perf_counter() - t0) * 1e3, 2)


def gpu_clocks(device: str) -> dict:
    """The GPU's SM clock (MHz), power (W), temperature (C) and throttle reasons now, from
    ``nvidia-smi`` (empty when there is none): whether the device slowed down. The GPU is named by
    its PCI address (``CUDA_VISIBLE_DEVICES`` renumbers devices, not ``nvidia-smi``'s ids); the
    throttle field has had two names, and a driver that knows neither still gives the rest."""
    if device != "cuda":
        return {}
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    address = f"{getattr(p, 'pci_domain_id', 0):08X}:{getattr(p, 'pci_bus_id', 0):02X}:{getattr(p, 'pci_device_id', 0):02X}.0"
    names = ["sm_mhz", "watts", "celsius", "throttle"]
    for throttle in ("clocks_event_reasons.active", "clocks_throttle_reasons.active", ""):
        fields = ",".join(["clocks.sm", "power.draw", "temperature.gpu"] + ([throttle] if throttle else []))
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--id={address}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if out.returncode == 0:
            return dict(zip(names, (v.strip() for v in out.stdout.strip().split(",")), strict=False))
    return {}


def measure(once, args) -> dict:
    """One warm-up image, then ``--runs`` timed ones with the peak allocation over them; after
    each image the host's speed (:func:`host_probe_ms`) and the GPU's clocks (:func:`gpu_clocks`),
    outside the timed span."""
    progress("set up; warm-up image")
    first = once(0)
    _sync(args.device)
    progress("warm-up image done")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    machine: list[dict] = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        once(1 + i)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        machine.append({"host_ms": host_probe_ms(), **gpu_clocks(args.device)})
        progress(f"image {i + 1}: {times[-1]:.3f} s {machine[-1]}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    return {"s": statistics.median(times), "times": times, "machine": machine, "gib": peak, **memory_gib(), "first": first}


def write_lora(model: Path, path: Path, rank: int = 8) -> None:
    """A random rank-``rank`` LoRA over every attention projection of ``model``'s U-Net, in PEFT /
    diffusers spelling (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, no alpha: scale 1).
    Each delta's elements have a fifth of its weight's spread: a style that shows in the image."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"))
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            down = torch.randn(rank, module.in_features, generator=gen)
            up = torch.randn(module.out_features, rank, generator=gen) * (0.2 * float(module.weight.std()) / rank**0.5)
            tensors[f"unet.{name}.lora_A.weight"] = down.half().contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = up.half().contiguous()
    save_file(tensors, str(path))


def run_graphsd(args, budget: float | None, ring_blocks: int | None = None, lora: Path | None = None) -> dict:
    from graphsd import Engine, Settings
    from graphsd.memory import ModelOffload

    settings = Settings(device=args.device, output_dir=tempfile.mkdtemp(), vram_budget_mb=budget * 1024 if budget else None)
    engine = Engine(settings)
    if budget and args.device == "cpu":  # --smoke: the budget's mechanics on the CPU
        engine.models.strategy = ModelOffload(int(budget * 2**30), on_cpu=True)
    if ring_blocks is not None and isinstance(engine.models.strategy, ModelOffload):
        engine.models.strategy.ring_blocks = ring_blocks
    dtype = "fp16" if args.device == "cuda" else "fp32"
    doc = txt2img_document(args.model, dtype, args.size, args.steps)
    if lora is not None:
        lora_inputs = {"unet": "@m.unet", "clip": "@m.clip", "lora": str(lora), "strength_clip": 0.0}
        doc["nodes"]["l"] = {"type": "LoraLoader", "inputs": lora_inputs}
        doc["nodes"]["d"]["inputs"]["unet"] = "@l.unet"
    assert engine.run(doc, outputs=["m"]).ok
    streamed: list[dict] = []

    grown: list[str] = []

    def on_event(event) -> None:
        if event.kind == "stream":
            streamed.append(event.to_dict())
        elif event.kind == "model" and event.action == "workspace_grown":  # a call went past the budget's estimate
            grown.append(f"{event.key.rsplit(':', 2)[-2] if ':' in event.key else event.key} +{event.nbytes / 2**20:.0f} MiB")

    def once(seed: int) -> torch.Tensor:
        streamed.clear()
        engine.cache.clear()  # every image encodes its prompts again, as the first one does
        res = engine.run(doc, params={"seed": seed}, outputs=["img"], on_event=on_event)
        assert res.ok, [str(e) for e in res.errors]
        return res.outputs["img"]["image"].pixels[0]

    result = measure(once, args)
    result["grown"] = grown
    uses = [e for e in streamed if e["action"] == "use"]
    if args.trace:
        result["trace"] = trace(engine, doc, args)
    if args.timeline and args.device == "cuda":
        result["timeline"] = timeline(engine, doc, args)
    # keys are "<file hash>:<component>:<dtype>": one entry per component (its last plan)
    plans = {e["key"].split(":")[-2] if e["key"].count(":") >= 2 else e["key"]: e for e in streamed if e["action"] == "plan"}
    result["streamed_gib"] = sum(e["bytes_moved"] for e in uses) / 2**30
    result["split"] = {
        key: {
            "resident_mib": e["resident_bytes"] / 2**20,
            "streamed_mib": e["streamed_bytes"] / 2**20,
            "ring_mib": e["ring_bytes"] / 2**20,
            "workspace_mib": e["workspace_bytes"] / 2**20,
        }
        for key, e in plans.items()
    }
    return result


def trace(engine, doc: dict, args) -> dict:
    """Where one more image's time goes: each node's seconds (the device synchronised at every
    node's start and end), and over the image the device's kernel time, its host-to-device copy
    time and bytes, and the wall time (torch.profiler). Kernels + copies close to the wall time
    means the copies did not overlap the computation; a wall time far above both means the host
    (Python, hooks, launches) or waits between the streams held the device up."""
    from torch.profiler import ProfilerActivity, profile

    nodes: dict[str, float] = {}
    started: dict[str, float] = {}

    def on_event(event) -> None:
        if event.kind in ("node_start", "node_done"):
            _sync(args.device)
            now = time.perf_counter()
            name = event.node_id
            if event.kind == "node_start":
                started[name] = now
            elif name in started:
                nodes[name] = round(now - started.pop(name), 4)

    engine.cache.clear()
    activities = [ProfilerActivity.CUDA] if args.device == "cuda" else [ProfilerActivity.CPU]  # host-side profiling would slow the host
    _sync(args.device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        assert engine.run(doc, params={"seed": 99}, outputs=["img"], on_event=on_event).ok
        _sync(args.device)
    wall = time.perf_counter() - t0
    kernels, copies = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        if "memcpy htod" in name:
            copies.append((e.time_range.start, e.time_range.end))
        elif "memcpy" not in name and "memset" not in name:
            kernels.append((e.time_range.start, e.time_range.end))
    kernel, copy, both = _covered(kernels), _covered(copies), _covered(kernels + copies)
    host = host_side(engine, doc, args) if args.device == "cuda" else {}
    return {
        **host,
        "wall_s": round(wall, 4),
        "kernel_s": round(kernel, 4),  # time at least one kernel ran
        "htod_s": round(copy, 4),  # time a host-to-device copy ran
        "overlap_s": round(kernel + copy - both, 4),  # both at once
        "idle_s": round(wall - both, 4),  # neither (the host or a wait held the device up)
        "nodes": nodes,
    }


def timeline(engine, doc: dict, args, call: int | None = None) -> dict:
    """One more image; for one U-Net call in its middle (the ``call``-th), each block's start and
    end on the host (ms from the call's start) and on the device (ms from the call's start on the
    compute stream, CUDA events), and each streamed block's copy: when the host issued it and when
    it ended on the copy stream. A streamed block that starts on the device later than its host
    start plus the device's lag waited for its copy; the rows say which blocks and by how much."""
    from graphsd.memory import Streamer

    call = call or max(1, args.steps // 2)
    key, entry = unet_entry(engine)
    state = {"calls": 0}
    marks: list[tuple[str, str, float, torch.cuda.Event]] = []

    def mark(kind: str, name: str, stream=None) -> None:
        if state["calls"] == call:
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
            marks.append((kind, name, time.perf_counter(), event))

    spans: list[list] = []  # every call: host start and end, device start and end events

    def call_start(*_) -> None:
        state["calls"] += 1
        mark("call", "")
        spans.append([time.perf_counter(), None, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
        spans[-1][2].record()

    def call_end(*_) -> None:
        mark("end", "")
        spans[-1][1] = time.perf_counter()
        spans[-1][3].record()

    hooks = [entry.module.register_forward_pre_hook(call_start), entry.module.register_forward_hook(call_end)]
    for block in engine.models.layout(key).blocks:
        hooks.append(block.module.register_forward_pre_hook(lambda *_, n=block.name: mark("start", n)))
        hooks.append(block.module.register_forward_hook(lambda *_, n=block.name: mark("stop", n)))
    issue = Streamer._issue

    def timed_issue(self, i: int, start: int) -> None:
        issue(self, i, start)
        if self.copy_stream is not None:
            mark("copied", self.layout.blocks[i].name, self.copy_stream)

    Streamer._issue = timed_issue
    engine.cache.clear()
    torch.cuda.synchronize()
    began = time.perf_counter()
    try:
        assert engine.run(doc, params={"seed": 97}, outputs=["img"]).ok
        torch.cuda.synchronize()
        ended = time.perf_counter()
    finally:
        Streamer._issue = issue
        for h in hooks:
            h.remove()
    if not marks:
        return {}
    _, _, host0, gpu0 = marks[0]
    streamer = entry.streamer
    streamed = {streamer.layout.blocks[i].name for i in streamer.streamed} if streamer is not None else set()
    sizes = {b.name: b.nbytes for b in engine.models.layout(key).blocks}
    rows = [
        [kind, name, round((host - host0) * 1e3, 3), round(gpu0.elapsed_time(event), 3), name in streamed, sizes.get(name, 0)]
        for kind, name, host, event in marks
    ]
    calls = [[round((h0 - began) * 1e3, 2), round((h1 - h0) * 1e3, 2), round(e0.elapsed_time(e1), 2)] for h0, h1, e0, e1 in spans]
    # the image's time, and each call's start (ms into the image), host and device milliseconds
    return {"call": call, "rows": rows, "image_ms": round((ended - began) * 1e3, 1), "calls": calls}


def host_side(engine, doc: dict, args) -> dict:
    """One more image, unprofiled: the host's time from the denoise loop's first U-Net call to
    its last call's return (no synchronisation; near the image's time when the host, not the
    device, sets the pace), and the calls that made the host wait for the device (CUDA's sync
    debug mode: each blocking call warns, with the Python line that made it)."""
    import warnings

    unet = unet_entry(engine)[1].module
    marks: list[float] = []
    hooks = [
        unet.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter()) if not marks else None),
        unet.register_forward_hook(lambda *_: marks.append(time.perf_counter())),
    ]
    engine.cache.clear()
    _sync(args.device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert engine.run(doc, params={"seed": 98}, outputs=["img"]).ok
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for h in hooks:
            h.remove()
    waits: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            where = f"{Path(w.filename).name}:{w.lineno}"
            waits[where] = waits.get(where, 0) + 1
    return {"host_unet_s": round(marks[-1] - marks[0], 4) if len(marks) > 1 else None, "host_waits": waits}


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by a union of (start, end) intervals in microseconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def run_diffusers(args, anchor: str) -> dict:
    import diffusers

    index = json.loads((Path(args.model) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = cls.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(args.device)
    if anchor == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif anchor == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif anchor.startswith("group"):
        level = anchor.removeprefix("group_")
        blocks = {"num_blocks_per_group": 1} if level == "block" else {}
        stream = args.device == "cuda"
        pipe.enable_group_offload(device, offload_type=f"{level}_level", use_stream=stream, record_stream=stream, **blocks)
    else:
        pipe.to(device)

    def once(seed: int) -> torch.Tensor:
        return pipeline_image(pipe, seed, args.steps, args.size)

    return measure(once, args)


def child(args) -> None:
    kind, _, value = args.config.partition("@") if "@" in args.config else args.config.partition(":")
    if kind.startswith("graphsd"):
        if value.endswith("w"):  # whole ResNets: none divided into its convolutions (the layout before they were)
            from graphsd.std.models import streaming

            streaming._split_resnets = lambda units: units
            value = value[:-1]
        if value[-1:] in ("s", "k"):  # residency by size (the default) or by rank (ModelOffload.residency)
            from graphsd.memory import ModelOffload

            ModelOffload.residency = "size" if value.endswith("s") else "rank"
            value = value[:-1]
        budget, _, ring = value.partition("r")
        lora = Path(args.model) / LORA_FILE if kind == "graphsd+lora" else None
        result = run_graphsd(args, None if budget == "none" else float(budget), int(ring) if ring else None, lora)
    else:
        result = run_diffusers(args, value)
    torch.save(result.pop("first"), args.image)
    print(json.dumps(result))


def bench_model(name: str, args, tmp: Path, everything: dict) -> None:
    folder = tmp / name
    t0 = time.perf_counter()
    build_model(name, folder, args.device)
    print(f"[{name}] built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    size = args.size or {"sd15": 512, "sdxl": 1024}.get(name, 64)
    results: dict = everything.setdefault(name, {})
    configs = [f"graphsd@{b}" for b in args.budgets] + [f"diffusers:{a}" for a in args.anchors]
    if args.lora:
        write_lora(folder, folder / LORA_FILE)
        configs[len(args.budgets) : len(args.budgets)] = [f"graphsd+lora@{b}" for b in args.lora]
    for _ in range(args.rounds):  # rounds interleave the configurations, so a drift of the host's speed meets all of them
        for config in configs:
            run_config(name, config, configs, folder, size, args, tmp, results)


def run_config(name: str, config: str, configs: list[str], folder: Path, size: int, args, tmp: Path, results: dict) -> None:
    """One configuration's process. In a later round (``--rounds``) its images join the earlier
    rounds': the median is over all of them, the peaks are the highest, the differences the largest."""
    image = tmp / f"{name}-{config.replace(':', '-').replace('@', '-')}.pt"
    command = [sys.executable, __file__, "--config", config, "--model", str(folder), "--size", str(size)]
    command += ["--steps", str(args.steps), "--runs", str(args.runs), "--device", args.device, "--image", str(image)]
    command += ["--trace"] if args.trace else []
    command += ["--timeline"] if args.timeline and config.startswith("graphsd") else []
    limit = args.timeouts.get(config, args.timeout)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired as timeout:
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr or ""
        reached = [line for line in stderr.splitlines() if line.startswith("[") and " s] " in line]
        results.setdefault(config, {"timeout": limit, "reached": reached[-1] if reached else "start-up"})
        finished(name, config, results, args)
        return
    if out.returncode:
        results[config] = {"error": out.stderr[-3000:]}
        print(f"[{name}] {config} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        finished(name, config, results, args)
        return
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    reference = next(
        (
            tmp / f"{name}-{c.replace(':', '-').replace('@', '-')}.pt"
            for c in configs
            if c.split("@")[0].split(":")[0] == config.split("@")[0].split(":")[0] and c in results and "error" not in results[c]
        ),
        None,
    )
    if reference is not None and reference.exists() and image.exists():
        r["diff"] = float((torch.load(image) - torch.load(reference)).abs().max())
    plain = tmp / f"{name}-graphsd-none.pt"
    if config.startswith("graphsd+lora") and plain.exists() and image.exists():
        r["lora_effect"] = float((torch.load(image) - torch.load(plain)).abs().max())
    print(f"[{name}] {config}: {json.dumps(r)}", file=sys.stderr, flush=True)
    earlier = results.get(config)
    if earlier is not None and "times" in earlier:  # a later round: pool its images with the earlier ones
        r["round_s"] = earlier.get("round_s", [earlier["s"]]) + [r["s"]]
        r["times"] = earlier["times"] + r["times"]
        r["machine"] = earlier.get("machine", []) + r.get("machine", [])
        r["s"] = statistics.median(r["times"])
        for key in ("gib", "rss_gib", "diff", "process_s"):
            if key in earlier and key in r:
                r[key] = max(r[key], earlier[key])
    results[config] = r
    finished(name, config, results, args)


def finished(name: str, config: str, results: dict, args) -> None:
    """A configuration ended: its table row now, and the JSON with everything so far."""
    print(f"[{name}] {row(config, results[config], results)}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(args.everything, indent=1))


HEADER = (
    f"{'configuration':<22} {'s / image':>9} {'× none':>7} {'peak GiB':>9} {'≤ budget':>9} {'RSS GiB':>8} "
    f"{'streamed GiB/img':>16} {'max |Δpixel|':>12} {'host ms':>8} {'SM MHz':>11}"
)


def row(config: str, r: dict, results: dict) -> str:
    """One configuration's line of the table (a failure or a time-out says so)."""
    if "timeout" in r:
        return f"{config:<22} timed out after {r['timeout']:.0f} s (last reached: {r['reached']})"
    if "error" in r:
        lines = r["error"].strip().splitlines()
        return f"{config:<22} failed: {lines[-1] if lines else '?'}"
    kind = config.partition("@")[0] if config.startswith("graphsd") else "graphsd"
    base = results.get(f"{kind}@none", {}).get("s")
    ratio = f"{r['s'] / base:.2f}" if base else "-"
    budget = config.partition("@")[2].rstrip("wsk").partition("r")[0]
    within = "-" if budget in ("", "none") else ("yes" if r["gib"] <= 1.05 * float(budget) else "NO")
    streamed = f"{r['streamed_gib']:.2f}" if "streamed_gib" in r else "-"
    diff = f"{r['diff']:.3g}" if "diff" in r else "-"
    effect = f"  (LoRA changes the image by {r['lora_effect']:.3g})" if "lora_effect" in r else ""
    # the images' host probes (median) and the GPU's SM clocks (lowest-highest): a slow row on a slow host or GPU says so
    machine = r.get("machine") or []
    host = f"{statistics.median(m['host_ms'] for m in machine):.1f}" if machine else "-"
    clocks = sorted(int(m["sm_mhz"]) for m in machine if str(m.get("sm_mhz", "")).isdigit())
    sm = f"{clocks[0]}-{clocks[-1]}" if clocks else "-"
    return (
        f"{config:<22} {r['s']:>9.3f} {ratio:>7} {r['gib']:>9.2f} {within:>9} {r['rss_gib']:>8.2f} {streamed:>16} {diff:>12}"
        f" {host:>8} {sm:>11}{effect}"
    )


def cpu_list(text: str) -> set[int]:
    """CPUs of a list like ``0-7,16`` (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin_cpus(spec: str, device: str) -> list[int]:
    """Run this process and its children on the CPUs ``spec`` names (``auto``: those of the GPU's
    NUMA node, whose copies from pinned memory do not cross sockets, where the kernel says; ``all``:
    no change). The same CPUs for every configuration take one source of spread out of the times.
    Returns the CPUs used."""
    allowed = os.sched_getaffinity(0)
    wanted = allowed
    if spec == "auto" and device == "cuda":
        props = torch.cuda.get_device_properties(0)
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        local = Path(f"/sys/bus/pci/devices/{bus}/local_cpulist")
        wanted = cpu_list(local.read_text()) & allowed if local.exists() else allowed
    elif spec not in ("auto", "all"):
        wanted = cpu_list(spec) & allowed
    if wanted and wanted != allowed:
        os.sched_setaffinity(0, wanted)
    return sorted(wanted or allowed)


def link_speed() -> dict:
    """Host-to-device copy speed from pinned memory, GB/s: one 1 GiB copy, and the same bytes in
    16 KiB copies (what copying a model tensor by tensor costs at worst)."""
    big = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dest = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    speeds = {}
    for label, piece in (("one_copy", 2**30), ("16KiB_copies", 2**14)):
        dest[: 2**20].copy_(big[: 2**20], non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, 2**30 if piece == 2**30 else 2**27, piece):
            dest[start : start + piece].copy_(big[start : start + piece], non_blocking=True)
        torch.cuda.synchronize()
        speeds[label] = (2**30 if piece == 2**30 else 2**27) / (time.perf_counter() - t0) / 1e9
    return speeds


def report(name: str, results: dict, args) -> None:
    print(f"\n{name}: {args.steps} euler steps, CFG {CFG}, median of {args.runs} after 1 warm-up image")
    print(HEADER)
    for config, r in results.items():
        print(row(config, r, results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (tiny, tinyxl with --smoke)")
    parser.add_argument("--budgets", default=BUDGETS, help="GiB, comma-separated; none = no budget")
    parser.add_argument("--anchors", default=ANCHORS, help="diffusers offloading: model, sequential, group_block, group_leaf")
    parser.add_argument("--lora", default="", help="budgets (GiB, or none) for graphsd+lora rows, e.g. none,1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration's process this many times, interleaved")
    parser.add_argument(
        "--cpus", default="auto", help="CPUs the processes run on: auto (the GPU's NUMA node, on CUDA), all, or a list like 0-7,16"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds one configuration may take")
    parser.add_argument(
        "--timeouts", default="", help="limits for single configurations, e.g. diffusers:group_leaf=120,graphsd@1=90 (seconds)"
    )
    parser.add_argument("--json", help="also write the results here (after every configuration)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    parser.add_argument(
        "--trace", action="store_true", help="graphsd rows: also time each node and the device's kernels and copies of one image"
    )
    parser.add_argument(
        "--timeline", action="store_true", help="graphsd rows (CUDA): each block's host and device start/end and copy of one U-Net call"
    )
    for hidden in ("--config", "--model", "--image"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help="image side in pixels (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument(
        "--device", default="cuda", help="cpu: the budget's policy applied on the CPU (fp32; its peak RSS is meaningful, its times are not)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.config:
        child(args)
        return
    if args.smoke:
        args.device, args.steps, args.runs = "cpu", 2, 1
        args.models = args.models if args.models.startswith("tiny") else "tiny,tinyxl"
        args.budgets = "none,0.016" if args.budgets == BUDGETS else args.budgets
        args.anchors = "group_block" if args.anchors == ANCHORS else args.anchors
    args.timeouts = {c: float(v) for c, _, v in (item.rpartition("=") for item in args.timeouts.split(",") if item)}
    args.budgets = args.budgets.split(",")
    args.anchors = [a for a in args.anchors.split(",") if a]
    args.lora = [b for b in args.lora.split(",") if b]
    everything: dict = {}
    args.everything = everything
    everything["host"] = {"cpus": pin_cpus(args.cpus, args.device), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    print(f"host: {everything['host']}", file=sys.stderr, flush=True)
    if args.device == "cuda":
        everything["link_gb_s"] = link_speed()
        print(f"host-to-device from pinned memory, GB/s: {everything['link_gb_s']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench_model(name, args, Path(tmp), everything)
    if args.device == "cuda":
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; fp16, batch 1")
    for name, results in everything.items():
        if name not in ("link_gb_s", "host"):
            report(name, results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
