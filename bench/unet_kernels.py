"""Where a compiled U-Net call spends its GPU time: the kernels of one SD1.5- or SDXL-shaped U-Net
call (random weights, fp16, batch 2 as with classifier-free guidance), compiled the way graphsd's
fast path compiles it (fused q/k/v projections, channels-last, inductor with ``conv_1x1_as_mm``),
grouped by kind, with the floating-point work of each kind and the rate it ran at.

    python bench/unet_kernels.py [--model sd15|sdxl] [--calls 5] [--json out.json]

Printed: milliseconds per call eager, compiled (``default`` mode, profiled) and compiled with CUDA
graphs (``reduce-overhead``, what ``graphsd run --compile`` replays); the compiled call's kernel
time by kind (convolution, matrix product, attention, inductor's fused Triton kernels, other),
each kind's FLOPs (``torch.utils.flop_counter`` on the meta device) and TFLOP/s; the 25 kernels
that took longest; and each scaled-dot-product-attention backend alone at the model's attention
shapes. The point: what a faster fast path would have to beat, kernel by kernel (the same
kernels run under compiled diffusers).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SD15_UNET, SDXL_UNET  # noqa: E402 - the architectures of the GPU benchmark

#: kernel-name fragments of each kind (cuDNN/cuBLAS/flash/inductor names), first match wins
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "xmma")),
    ("triton", ("triton",)),
)
#: the flop counter's operators per kind (SDPA counts as attention, 1x1 convolutions done as
#: matrix products by inductor stay convolutions here)
FLOP_KINDS = {"convolution": ("convolution",), "matmul": ("addmm", "mm", "linear"), "attention": ("bmm", "attention")}


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other")


def build(model: str, device: str) -> tuple[torch.nn.Module, tuple, dict]:
    """A U-Net of the real architecture and one CFG call's inputs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        if model == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET, cross_attention_dim=768)
            latent, context, extra = (2, 4, 64, 64), (2, 77, 768), {}
        else:
            unet = UNet2DConditionModel(
                **SDXL_UNET,
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=256 * 6 + 1280,
            )
            latent, context = (2, 4, 128, 128), (2, 77, 2048)
            time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)  # size, crop, target size
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": time_ids}}
        args = (torch.randn(latent), torch.full((2,), 500.0), torch.randn(context))
    dtype = torch.float16 if device == "cuda" else torch.float32
    cast = {k: {n: t.to(dtype) for n, t in v.items()} for k, v in extra.items()}
    return unet.to(dtype).eval(), (args[0].to(dtype), args[1], args[2].to(dtype)), cast


def flops_by_kind(model: str) -> dict[str, float]:
    """FLOPs of one call per kind, counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, args, extra = build(model, "meta")
    with FlopCounterMode(display=False) as counter:
        unet(args[0], args[1], encoder_hidden_states=args[2], **extra)
    out: dict[str, float] = collections.Counter()
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        kind = next((k for k, ops in FLOP_KINDS.items() if any(name.startswith(o) for o in ops)), "other")
        out[kind] += n
    return dict(out)


def per_call_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def attention_backends(model: str) -> dict[str, dict[str, float | str]]:
    """Microseconds of one SDPA call per backend at the model's self- and cross-attention shapes."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # (heads, query tokens, head dim, key tokens)
    shapes = {
        "sd15": [(8, 4096, 40, 4096), (8, 4096, 40, 77), (8, 1024, 80, 1024), (8, 1024, 80, 77), (8, 256, 160, 256), (8, 64, 160, 64)],
        "sdxl": [(10, 4096, 64, 4096), (10, 4096, 64, 77), (20, 1024, 64, 1024), (20, 1024, 64, 77)],
    }[model]
    out: dict[str, dict[str, float | str]] = {}
    for heads, n, d, m in shapes:
        q = torch.randn(2, heads, n, d, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(2, heads, m, d, device="cuda", dtype=torch.float16) for _ in range(2))
        row: dict[str, float | str] = {}
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    row[backend] = round(per_call_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), 50) * 1000, 1)
            except RuntimeError as exc:  # a backend that does not take this shape
                row[backend] = str(exc).splitlines()[0][:60]
        out[f"{heads}x{n}x{d} @ {m}"] = row
    return out


def main() -> None:
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile

    from graphsd.std.models import compile as fast_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--calls", type=int, default=5, help="calls profiled (and timed x4)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    unet, (x, t, context), extra = build(args.model, "cuda")
    if fast_path.FUSE_QKV:
        unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    for name, value in fast_path.INDUCTOR_OPTIONS.items():
        setattr(inductor, name, value)
    result: dict = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with torch.no_grad():

        def call(m):
            return m(x, t, encoder_hidden_states=context, **extra).sample

        result["eager_ms"] = per_call_ms(lambda: call(unet), 4 * args.calls)
        t0 = time.perf_counter()
        compiled = torch.compile(unet, mode="default", dynamic=False)
        call(compiled)
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - t0
        result["compiled_ms"] = per_call_ms(lambda: call(compiled), 4 * args.calls)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                call(compiled)
            torch.cuda.synchronize()
        by_kind: dict[str, float] = collections.Counter()
        by_name: dict[str, float] = collections.Counter()
        count: dict[str, int] = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower() and "memset" not in e.name.lower():
                us = (e.time_range.end - e.time_range.start) / args.calls
                by_kind[kind_of(e.name)] += us
                by_name[e.name[:100]] += us
                count[e.name[:100]] += 1
        flops = flops_by_kind(args.model)
        result["kernels_per_call"] = sum(count.values()) / args.calls
        result["kinds"] = {
            kind: {
                "us": round(us, 1),
                "tflop": round(flops.get(kind, 0) / 1e12, 4),
                "tflops_per_s": round(flops.get(kind, 0) / us / 1e6, 1) if us else None,
            }
            for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])
        }
        result["top"] = [
            [name, round(us, 1), count[name] // args.calls] for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
        ]
        result["sdpa_us"] = attention_backends(args.model)
        torch._dynamo.reset()
        graphs = torch.compile(unet, mode="reduce-overhead", dynamic=False)
        result["cuda_graph_ms"] = per_call_ms(lambda: call(graphs).clone(), 4 * args.calls)
    total_us = sum(v["us"] for v in result["kinds"].values())
    total_flop = sum(flops.values())
    print(f"{result['gpu']}, torch {result['torch']}; {args.model}-shaped U-Net, fp16, batch 2 (CFG)")
    print(f"per call: eager {result['eager_ms']:.2f} ms, compiled {result['compiled_ms']:.2f} ms", end="")
    print(f", with CUDA graphs {result['cuda_graph_ms']:.2f} ms")
    rate = total_flop / total_us / 1e6
    work = f"{total_us / 1000:.2f} ms, {total_flop / 1e12:.3f} TFLOP, {rate:.0f} TFLOP/s"
    print(f"compiled call's kernels: {result['kernels_per_call']:.0f}, {work}")
    print(f"{'kind':<12} {'ms':>6} {'share':>6} {'TFLOP':>7} {'TFLOP/s':>8}")
    for kind, v in result["kinds"].items():
        rate = f"{v['tflops_per_s']:.0f}" if v["tflops_per_s"] else "-"
        print(f"{kind:<12} {v['us'] / 1000:>6.3f} {v['us'] / total_us:>6.1%} {v['tflop']:>7.3f} {rate:>8}")
    print("\nlongest kernels (us per call, launches per call):")
    for name, us, n in result["top"]:
        print(f"  {us:>7.1f} {n:>3}  {name}")
    print("\nscaled-dot-product attention alone (us per call), heads x tokens x head dim @ key tokens:")
    for shape, row in result["sdpa_us"].items():
        print(f"  {shape:<22} " + "  ".join(f"{b.split('_')[0].lower()} {v}" for b, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
