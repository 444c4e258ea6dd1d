"""The numeric error of ``--compile=fp8``, emulated on the CPU: images of graphsd-tiny (trained
weights) and of an SD1.5-shaped model (random weights), exact against the U-Net's fp8 layers.

    python bench/fp8_error.py [--models graphsd-tiny,sd15] [--seeds 4] [--steps 20]

fp8 mode quantizes the U-Net's :func:`graphsd.std.models.compile.fp8_eligible` linear layers with
torchao's ``Float8DynamicActivationFloat8WeightConfig``: weights and each call's activations
scaled per tensor to float8 e4m3 (largest magnitude to 448), multiplied with float32
accumulation. torchao runs that only on GPUs of compute capability 8.9+, so here each eligible
layer's weight and input are rounded the same way (scale, cast to ``torch.float8_e4m3fn``, back)
and multiplied in float32: the rounding fp8 adds, without the GPU's accumulation order (a
second-order difference). Printed per model: the largest and the mean pixel difference (values
in [0, 1]) of the fp8 image from the exact one over the seeds, beside (``--fp16-models``) the
difference fp16 weights and activations make on their own (the same run in fp16): the scale of
rounding the fast path's tolerance allows (``bench/gpu.py``'s ``FP16_PIXEL_TOLERANCE``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import FP16_PIXEL_TOLERANCE, build_model, txt2img_document, unet_entry  # noqa: E402 - the model builders of the GPU benchmark

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded through float8 e4m3 with one dynamic scale for the whole tensor, in float32."""
    scale = t.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def emulate_fp8(unet: torch.nn.Module) -> int:
    """Make each fp8-eligible linear layer of ``unet`` compute as fp8 mode does (in place; a
    benchmark's model only). Returns the number of layers."""
    from graphsd.std.models.compile import fp8_eligible

    layers = [(name, layer) for name, layer in unet.named_modules() if fp8_eligible(layer, name)]
    for _, layer in layers:
        weight = to_fp8(layer.weight)
        bias = None if layer.bias is None else layer.bias.float()

        def forward(x: torch.Tensor, weight: torch.Tensor = weight, bias: torch.Tensor | None = bias) -> torch.Tensor:
            return F.linear(to_fp8(x), weight, bias).to(x.dtype)

        layer.forward = forward
    return len(layers)


def images(model: str, dtype: str, size: int, steps: int, seeds: int, fp8: bool) -> tuple[list[torch.Tensor], int]:
    """One image per seed (graphsd on the CPU), the U-Net's fp8 layers emulated when ``fp8``."""
    from graphsd import Engine, Settings

    engine = Engine(Settings(device="cpu", output_dir=tempfile.mkdtemp()))
    doc = txt2img_document(model, dtype, size, steps)
    assert engine.run(doc, outputs=["m"]).ok
    layers = 0
    if fp8:
        unet = unet_entry(engine)[1].module
        layers = emulate_fp8(unet)
    out = []
    for seed in range(seeds):
        result = engine.run(doc, params={"seed": seed}, outputs=["img"])
        assert result.ok, [str(e) for e in result.errors]
        out.append(result.outputs["img"]["image"].pixels[0].float())
    return out, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="graphsd-tiny,sd15", help="comma-separated: graphsd-tiny (128x128), sd15 (256x256)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fp16-models", default="graphsd-tiny", help="models that also get the fp16 comparison (slow on most CPUs)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, size = (name, 128) if name == "graphsd-tiny" else (str(Path(tmp) / name), 256)
            if name != "graphsd-tiny":
                build_model(name, Path(model), "cpu")
            exact, _ = images(model, "fp32", size, args.steps, args.seeds, fp8=False)
            fp8, layers = images(model, "fp32", size, args.steps, args.seeds, fp8=True)
            d8 = torch.stack([(a - b).abs() for a, b in zip(fp8, exact, strict=True)])
            row = [name, size, layers, f"{d8.max().item():.4f}", f"{d8.mean().item():.5f}", "-", "-"]
            if name in args.fp16_models.split(","):
                fp16, _ = images(model, "fp16", size, args.steps, args.seeds, fp8=False)
                d16 = torch.stack([(a - b).abs() for a, b in zip(fp16, exact, strict=True)])
                row[5:] = f"{d16.max().item():.4f}", f"{d16.mean().item():.5f}"
            rows.append(row)
    print(f"\nfp8 (emulated) and fp16 against float32, {args.seeds} seeds, {args.steps} euler steps, CFG 7.5; pixel values in [0, 1]")
    print(f"{'model':<14} {'size':>5} {'fp8 layers':>10} {'fp8 max':>8} {'fp8 mean':>9} {'fp16 max':>9} {'fp16 mean':>9}")
    for name, size, layers, m8, a8, m16, a16 in rows:
        print(f"{name:<14} {size:>5} {layers:>10} {m8:>8} {a8:>9} {m16:>9} {a16:>9}")
    print(f"(the fast path's fp16 tolerance: {FP16_PIXEL_TOLERANCE:.4f}, four 8-bit levels)")


if __name__ == "__main__":
    main()
