"""GPU benchmark of the compiled fast path: diffusers and graphsd, eager and compiled, on
SD1.5-shaped (512x512) and SDXL-shaped (1024x1024) models with random weights and the real
architectures, fp16, batch 1, 20 euler steps, CFG 7.5.

    python bench/gpu.py [--models sd15,sdxl] [--runs 5] [--json results.json]

Each configuration runs in its own process, all in one invocation on the same GPU:

- ``diffusers``: ``StableDiffusion(XL)Pipeline`` on the GPU, eager;
- ``diffusers_compiled``: the same with fused QKV projections, channels-last U-Net and VAE,
  inductor's ``conv_1x1_as_mm``, and ``torch.compile(mode="reduce-overhead", fullgraph=True)``
  on the U-Net and on ``vae.decode`` (diffusers' own recipe for speed);
- ``graphsd``: ``Engine(Settings(device="cuda"))``, eager;
- ``graphsd_fast``: ``Settings(compile="reduce-overhead")`` (``graphsd run --compile``), with an
  empty compile cache folder;
- ``graphsd_fast_2nd``: the same in a second process, with the cache folder the first one filled:
  the warm-up a user pays after a restart;
- ``graphsd_fp8``: ``Settings(compile="fp8")`` (float8 linear layers through torchao; not fp16's
  numbers, so a row of its own, never the headline);
- ``graphsd_autotune``: ``Settings(compile="max-autotune")`` (inductor times matrix and
  convolution kernel choices while compiling: a long first compile);
- ``CONFIG:PRESET`` for a graphsd fast-path row: the same with the fast path's tuning constants
  (graphsd.std.models.compile) set to one of :data:`TUNINGS` (``plain`` is last session's path),
  to measure each lever in one invocation.

``--prewarm N`` first runs every compiled row once in parallel (N processes at a time, each
filling its compile cache), then times the rows one after another as above: each compiled row's
warm-up is then a second process's (a warm cache), and its cold compile (under contention, so
only a bound) is kept as ``cold_parallel``. This fits several compiled rows into one call; a row
whose compile outlasts ``--timeout`` is dropped (on one H200 with five rows at once, the ``all``
preset, whose ``coordinate_descent_tuning`` times kernel variants, and ``graphsd_fp8`` both took
longer than 240 s).

Printed per configuration: seconds per image (median of ``--runs`` after two warm-up images),
peak GPU memory while timing, the warm-up (the first two images, compiles included; the model
load is not in it), the host-device synchronisations during one image (``torch.cuda`` sync debug
mode), for the compiled rows the largest pixel difference (in [0, 1]) from the eager image of
the same library and seed (fp16 rows are checked against :data:`FP16_PIXEL_TOLERANCE`), and the
time of each phase of one more image (text encoding, denoise loop, VAE decode). ``--profile``
adds one more image under torch.profiler per row: the GPU's busy and idle milliseconds (equal
busy times mean the same GPU work). Then the ratios the issue asks for. ``--smoke`` runs the same code on
tiny models on the CPU (for checking the script, not for numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, CFG, PROMPT = 20, 7.5, "a red circle on a white background"
CONFIGS = ("diffusers", "graphsd", "diffusers_compiled", "graphsd_fast", "graphsd_fast_2nd")
#: rows run only when named: fp8 (not fp16's numbers) and max-autotune (a compile of many minutes)
EXTRA_CONFIGS = ("graphsd_fp8", "graphsd_autotune")
#: the largest pixel difference (values in [0, 1]) an fp16 fast path may have from eager: fp16
#: rounding differs between kernels (fused, reordered sums, other convolution algorithms) by
#: about 2**-11 relative per operation, and 20 steps carry it into the image; four 8-bit levels
#: bound what was seen (under one level) with room, while a wrong graph is off by far more
FP16_PIXEL_TOLERANCE = 4 / 255
#: the U-Nets of the real architectures (``UNet2DConditionModel`` arguments; the cross-attention
#: width and SDXL's added conditions come from the text encoders)
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
)
#: fast-path tuning presets (values for graphsd.std.models.compile's constants)
_PLAIN = {"FUSE_QKV": False, "SDPA_BACKENDS": (), "CUDNN_BENCHMARK": False, "INDUCTOR_OPTIONS": {"conv_1x1_as_mm": True}}
_CUDNN_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
TUNINGS = {
    "plain": _PLAIN,
    "qkv": {**_PLAIN, "FUSE_QKV": True},
    "cudnnattn": {**_PLAIN, "FUSE_QKV": True, "SDPA_BACKENDS": _CUDNN_FIRST},
    "convbench": {**_PLAIN, "FUSE_QKV": True, "CUDNN_BENCHMARK": True},
    "all": {
        "FUSE_QKV": True,
        "SDPA_BACKENDS": _CUDNN_FIRST,
        "CUDNN_BENCHMARK": True,
        "INDUCTOR_OPTIONS": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
    },
}


# ---- models -----------------------------------------------------------------------------------
def txt2img_document(model: str, dtype: str, size: int, steps: int) -> dict:
    """The benchmarks' graphsd workflow: text-to-image with ``model`` at ``size``², euler, CFG
    7.5, the seed a param; node ``img`` is the decoded image."""
    return {
        "version": 1,
        "params": {"seed": 0},
        "nodes": {
            "m": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": dtype}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": PROMPT}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": "${seed}", "width": size, "height": size}},
            "d": {
                "type": "UNetDenoiseLoop",
                "inputs": {
                    "unet": "@m.unet",
                    "positive": "@pos.cond",
                    "negative": "@neg.cond",
                    "noise": "@noise.noise",
                    "steps": steps,
                    "cfg": CFG,
                    "sampler": "euler",
                },
            },
            "img": {"type": "VAEDecode", "inputs": {"vae": "@m.vae", "latent": "@d.latent"}},
        },
    }


def pipeline_image(pipe, seed: int, steps: int, size: int) -> torch.Tensor:
    """The benchmarks' diffusers generation (the same prompt, CFG and sampler as
    :func:`txt2img_document`): one image as an (H, W, 3) float tensor on the CPU."""
    out = pipe(
        PROMPT,
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=CFG,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images[0].permute(1, 2, 0).float().cpu()


def build_model(name: str, folder: Path, device: str) -> None:
    """A diffusers folder with random weights of the real architecture (fp16 on CUDA)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from graphsd.std.text.tokenizer import clip_tokenizer_dir

    torch.manual_seed(0)
    tiny = name.startswith("tiny")
    xl = name.endswith("xl")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    with torch.device(device):
        if tiny:
            width = (32, 64)
            unet_config = dict(
                block_out_channels=width,
                layers_per_block=1,
                sample_size=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=4,
                norm_num_groups=8,
            )
            vae_config = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
            l_config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
            g_config = l_config
        else:
            vae_config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024 if xl else 512)
            l_config = dict(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
            g_config = dict(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=20,
                num_hidden_layers=32,
                projection_dim=1280,
                hidden_act="gelu",
            )
            unet_config = SDXL_UNET if xl else SD15_UNET
        clip_l = dict(l_config, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)
        te = CLIPTextModel(CLIPTextConfig(**clip_l))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            force_upcast=False,
            scaling_factor=0.13025 if xl else 0.18215,
            **vae_config,
        )
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        if xl:
            clip_g = dict(g_config, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))
            context = l_config["hidden_size"] + g_config["hidden_size"]
            unet = UNet2DConditionModel(
                cross_attention_dim=context,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8 if tiny else 256,
                projection_class_embeddings_input_dim=(8 if tiny else 256) * 6 + g_config["projection_dim"],
                **unet_config,
            )
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=te,
                text_encoder_2=te2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
                add_watermarker=False,
            )
        else:
            unet = UNet2DConditionModel(cross_attention_dim=l_config["hidden_size"], **unet_config)
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=te,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=EulerDiscreteScheduler(**schedule),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.to(torch.float16 if device == "cuda" else torch.float32).save_pretrained(folder)


def unet_entry(engine) -> tuple:
    """The key and ModelManager entry of the U-Net an Engine has loaded (keys end ``:unet:<n>``)."""
    return next((k, e) for k, e in engine.models.entries.items() if k.split(":")[-2:-1] == ["unet"])


# ---- one configuration (child process) --------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, runs: int, device: str) -> dict:
    """Two warm-up images, then ``runs`` timed ones; peak memory while timing; the host syncs of
    one more image."""
    t0 = time.perf_counter()
    first = fn(0)
    fn(1)
    synchronize(device)
    warmup = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(2 + i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    syncs = None
    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(100)
                synchronize(device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchronizing" in str(w.message) for w in caught)
    return {"s": statistics.median(times), "times": times, "gib": peak, "warmup": warmup, "syncs": syncs, "first": first}


def prewarm(fn, device: str) -> dict:
    """One image (compiles, fills the cache), for ``--prewarm``."""
    t0 = time.perf_counter()
    first = fn(0)
    synchronize(device)
    return {"cold_parallel": time.perf_counter() - t0, "first": first}


def device_profile(fn, device: str) -> dict:
    """One more image under torch.profiler (device activity only, so the host runs at its own
    pace): the wall time, the time at least one kernel or copy ran on the GPU (busy), the rest
    (idle: the host, a launch or a synchronisation held the GPU up), and the number of kernels.
    Equal busy times mean equal GPU work: what is left between two rows is then idle time."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return {}
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn(301)
        synchronize(device)
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return {}
    busy, (start, end) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > end:
            busy, start = busy + end - start, a
        end = max(end, b)
    busy += end - start
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "mem" not in e.name.lower())
    return {"wall_ms": wall * 1e3, "busy_ms": busy / 1e3, "idle_ms": wall * 1e3 - busy / 1e3, "kernels": kernels}


def timed(fn, device: str):
    """``fn``'s result and its seconds, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def run_graphsd(args, mode: str) -> dict:
    from graphsd import Engine, Settings
    from graphsd.events import NodeDone

    if args.tuning:
        import graphsd.std.models.compile as fast_path

        for name, value in TUNINGS[args.tuning].items():
            setattr(fast_path, name, value)
    size = args.size
    settings = Settings(
        device=args.device,
        output_dir=tempfile.mkdtemp(),
        compile=mode,
        compile_cache_dir=args.cache,
        compile_backend=args.backend,
    )
    engine = Engine(settings)
    doc = txt2img_document(args.model, "fp16" if args.device == "cuda" else "fp32", size, args.steps)
    t0 = time.perf_counter()
    assert engine.run(doc, outputs=["m"]).ok
    load = time.perf_counter() - t0

    def once(seed: int) -> torch.Tensor:
        res = engine.run(doc, params={"seed": seed}, outputs=["img"])
        assert res.ok, [str(e) for e in res.errors]
        return res.outputs["img"]["image"].pixels[0]

    if args.prewarm_only:
        return {"load": load, **prewarm(once, args.device)}
    result = measure(once, args.runs, args.device)
    if args.profile:
        result["profile"] = device_profile(once, args.device)
    # phases of one more image: the nodes' own durations (the denoise node ends with the latent on
    # the CPU and the decode node checks the pixels, so each waits for its GPU work)
    res = engine.run(doc, params={"seed": 200}, outputs=["img"])
    nodes = {e.node_id: e.duration_s for e in res.events if isinstance(e, NodeDone)}
    result["phases"] = {"text": nodes.get("pos", 0.0) + nodes.get("neg", 0.0), "denoise": nodes.get("d"), "decode": nodes.get("img")}
    return {"load": load, **result}


def run_diffusers(args, compiled: bool) -> dict:
    import diffusers
    import torch._inductor.config

    device = args.device
    t0 = time.perf_counter()
    index = json.loads((Path(args.model) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = cls.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if args.backend == "inductor":
            torch._inductor.config.conv_1x1_as_mm = True
            options = dict(mode="reduce-overhead", fullgraph=True)
        else:
            options = dict(backend=args.backend, fullgraph=True)
        pipe.unet = torch.compile(pipe.unet, **options)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **options)
    load = time.perf_counter() - t0

    def once(seed: int) -> torch.Tensor:
        return pipeline_image(pipe, seed, args.steps, args.size)

    if args.prewarm_only:
        return {"load": load, **prewarm(once, device)}
    result = measure(once, args.runs, device)
    if args.profile:
        result["profile"] = device_profile(once, device)
    # phases of one more image: prompt encoding and VAE decode timed with a sync around each, the
    # denoise loop is the rest
    spent = {"text": 0.0, "decode": 0.0}

    def timing(phase: str, fn):
        def wrapped(*a, **k):
            out, seconds = timed(lambda: fn(*a, **k), device)
            spent[phase] += seconds
            return out

        return wrapped

    pipe.encode_prompt, pipe.vae.decode = timing("text", pipe.encode_prompt), timing("decode", pipe.vae.decode)
    _, total = timed(lambda: once(200), device)
    result["phases"] = {**spent, "denoise": total - spent["text"] - spent["decode"]}
    return {"load": load, **result}


def child(args) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache  # each row compiles into its own folder (graphsd's rows share one)
    config, _, args.tuning = args.config.partition(":")
    result = {
        "diffusers": lambda: run_diffusers(args, False),
        "diffusers_compiled": lambda: run_diffusers(args, True),
        "graphsd": lambda: run_graphsd(args, "off"),
        "graphsd_fast": lambda: run_graphsd(args, "reduce-overhead"),
        "graphsd_fast_2nd": lambda: run_graphsd(args, "reduce-overhead"),
        "graphsd_fp8": lambda: run_graphsd(args, "fp8"),
        "graphsd_autotune": lambda: run_graphsd(args, "max-autotune"),
    }[config]()
    torch.save(result.pop("first"), args.image)
    print(json.dumps(result))


# ---- the whole benchmark ----------------------------------------------------------------------


def compiled(config: str) -> bool:
    """Whether a row compiles (and so can be prewarmed)."""
    return config.split(":")[0] in ("diffusers_compiled", "graphsd_fast", *EXTRA_CONFIGS)


def bench_model(name: str, args, tmp: Path, everything: dict) -> dict:
    """Every configuration on model ``name``; ``everything[name]`` and ``--json`` are updated
    after each, so an interrupted invocation keeps what it measured."""
    folder = tmp / name
    t0 = time.perf_counter()
    build_model(name, folder, args.device)
    print(f"[{name}] built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    size = {"sd15": 512, "sdxl": 1024}.get(name, 64)
    results: dict[str, dict] = everything.setdefault(name, {})

    def command(config: str, prewarm_only: bool) -> list[str]:
        cache = tmp / f"cache-{name}-{'graphsd' if config.startswith('graphsd') else config}"
        image = tmp / f"{name}-{config}{'-cold' if prewarm_only else ''}.pt"
        return [
            sys.executable, __file__, "--config", config, "--model", str(folder), "--size", str(size), "--steps", str(args.steps),
            "--runs", str(args.runs), "--device", args.device, "--backend", args.backend, "--cache", str(cache), "--image", str(image),
        ] + (["--prewarm-only"] if prewarm_only else []) + (["--profile"] if args.profile else [])  # fmt: skip

    def finish(config: str, out: subprocess.CompletedProcess | None, seconds: float, key: str) -> None:
        if out is None:
            results[key] = {"error": f"timed out after {args.timeout} s"}
        elif out.returncode:
            results[key] = {"error": out.stderr[-2000:]}
            print(f"[{name}] {key} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            return
        else:
            results[key] = json.loads(out.stdout.strip().splitlines()[-1])
            results[key]["process"] = seconds
        print(f"[{name}] {key}: {json.dumps(results[key])}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(everything, indent=1))

    def logs_of(config: str) -> tuple[Path, Path]:
        return tmp / f"prewarm-{name}-{config}.out", tmp / f"prewarm-{name}-{config}.err"

    if args.prewarm:  # compile every compiled row once, in parallel, before timing any
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 2) // args.prewarm))}
        waiting = [c for c in args.configs if compiled(c) and not c.endswith("_2nd")]
        running: list[tuple[str, subprocess.Popen, float]] = []
        while waiting or running:
            while waiting and len(running) < args.prewarm:
                config = waiting.pop(0)
                logs = logs_of(config)
                with logs[0].open("w") as out, logs[1].open("w") as err:  # files, not pipes: a full pipe would stall the child
                    # a session of its own: on a timeout the whole group goes, inductor's compile workers too
                    # (left running, they would slow the rows timed next)
                    proc = subprocess.Popen(
                        command(config, True), stdout=out, stderr=err, text=True, cwd=ROOT, env=env, start_new_session=True
                    )
                running.append((config, proc, time.perf_counter()))
            time.sleep(1)
            for item in [r for r in running if r[1].poll() is not None or time.perf_counter() - r[2] > args.timeout]:
                config, proc, started = item
                running.remove(item)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                done = subprocess.CompletedProcess(proc.args, proc.returncode, *(f.read_text() for f in logs_of(config)))
                finish(config, done if proc.returncode != -9 else None, time.perf_counter() - started, f"{config} (cold)")
    for config in args.configs:
        if "error" in results.get(f"{config} (cold)", {}):  # its compile failed or outlasted --timeout: again would too
            continue
        t0 = time.perf_counter()
        try:
            out = subprocess.run(command(config, False), capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            out = None
        finish(config, out, time.perf_counter() - t0, config)
        cold = results.pop(f"{config} (cold)", None)
        if cold and "error" in cold:
            results[f"{config} (cold)"] = cold
        elif cold and "error" not in results[config]:
            results[config]["cold_parallel"] = cold.get("cold_parallel")
    for fast in results:
        eager = "diffusers" if fast.startswith("diffusers") else "graphsd"
        a, b = tmp / f"{name}-{fast}.pt", tmp / f"{name}-{eager}.pt"
        if fast != eager and "error" not in results[fast] and a.exists() and b.exists():
            results[fast]["diff"] = float((torch.load(a) - torch.load(b)).abs().max())
            results[fast]["within_tolerance"] = None if "fp8" in fast else results[fast]["diff"] <= FP16_PIXEL_TOLERANCE
    return results


def report(name: str, results: dict, runs: int) -> None:
    print(f"\n{name}: median of {runs} after 2 warm-up images; phases of one more image (s)")
    print(
        f"{'configuration':<26} {'s / image':>9} {'peak GiB':>8} {'warm-up s':>9} {'cold s':>7} {'syncs':>5} {'max |Δpixel|':>12}"
        f" {'text':>6} {'denoise':>7} {'decode':>6}"
    )
    for config, r in results.items():
        if "error" in r:
            print(f"{config:<26} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        syncs = "-" if r.get("syncs") is None else str(r["syncs"])
        diff = f"{r['diff']:.3g}{'' if r.get('within_tolerance') in (True, None) else '!'}" if "diff" in r else "-"
        cold = f"{r['cold_parallel']:.0f}" if r.get("cold_parallel") else "-"
        ph = r.get("phases") or {}
        widths = (("text", 6), ("denoise", 7), ("decode", 6))
        phases = " ".join(f"{ph[k]:>{w}.3f}" if ph.get(k) is not None else f"{'-':>{w}}" for k, w in widths)
        print(f"{config:<26} {r['s']:>9.3f} {r['gib']:>8.2f} {r['warmup']:>9.1f} {cold:>7} {syncs:>5} {diff:>12} {phases}")
    print(f"  ('!': over the fp16 tolerance of {FP16_PIXEL_TOLERANCE:.4f}; 'cold': first compile while other rows compiled too)")
    profiled = {c: r["profile"] for c, r in results.items() if r.get("profile")}
    if profiled:
        print(f"\n{'one more image, profiled':<26} {'wall ms':>8} {'GPU busy':>8} {'idle':>6} {'kernels':>7}")
        for config, p in profiled.items():
            print(f"{config:<26} {p['wall_ms']:>8.1f} {p['busy_ms']:>8.1f} {p['idle_ms']:>6.1f} {p['kernels']:>7}")

    def ratio(a: str, b: str, what: str) -> None:
        if all(c in results and "error" not in results[c] for c in (a, b)):
            print(f"  {what}: {a} / {b} = {results[a]['s'] / results[b]['s']:.2f}")

    for fast in [c for c in results if c.startswith(("graphsd_fast", *EXTRA_CONFIGS)) and not c.endswith("(cold)")]:
        ratio(fast, "diffusers_compiled", "vs compiled diffusers (issue: fast path <= 0.66 SD1.5, <= 0.70 SDXL)")
    ratio("graphsd", "diffusers", "eager vs eager (issue: <= 1.02)")
    ratio("graphsd_fast", "graphsd", "graphsd fast path vs graphsd eager")
    ratio("diffusers_compiled", "diffusers", "diffusers compiled vs eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (tiny, tinyxl with --smoke)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, aot_eager: checks the script, measures nothing")
    parser.add_argument("--prewarm", type=int, default=0, metavar="N", help="compile the compiled rows first, N processes at a time")
    parser.add_argument("--profile", action="store_true", help="profile one more image per row: GPU busy and idle time (CUDA)")
    parser.add_argument("--prewarm-only", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--config", "--model", "--cache", "--image"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="inductor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.config:
        child(args)
        return
    if args.smoke:
        args.device, args.backend, args.steps, args.runs = "cpu", "aot_eager", 2, 1
        args.models = args.models if args.models.startswith("tiny") else "tiny,tinyxl"
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c.split(":")[0] not in (*CONFIGS, *EXTRA_CONFIGS) or c.partition(":")[2] not in ("", *TUNINGS)]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; use {', '.join(CONFIGS + EXTRA_CONFIGS)}, CONFIG:{'|'.join(TUNINGS)}")
    everything = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench_model(name, args, Path(tmp), everything)
    if args.device == "cuda":
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; fp16, batch 1, {args.steps} euler steps, CFG {CFG}")
    for name, results in everything.items():
        report(name, results, args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
