"""The compiled fast path: the U-Net and the VAE decoder through ``torch.compile``.

``Settings.compile`` (``graphsd run --compile[=MODE]``) picks the mode; :data:`graphsd.context.COMPILE_MODES`
lists them:

- ``off`` (the default, on every device): eager PyTorch, as before. A first compile of an SD1.5
  U-Net takes on the order of a minute, far more than the few seconds a single image costs, so
  compiling pays only where many images of one shape follow (a server, a grid, a batch job).
- ``reduce-overhead`` (what ``--compile`` alone means): inductor's fused kernels, replayed as
  CUDA graphs, so a U-Net call is one graph launch instead of a thousand kernel launches (on the
  CPU there are no CUDA graphs: inductor's C++ kernels only).
- ``default``: inductor's kernels without CUDA graphs (less memory held by graph pools).
- ``max-autotune`` / ``max-autotune-no-cudagraphs``: also benchmarks matrix and convolution
  kernel choices while compiling (a much longer first compile), with or without CUDA graphs.

:func:`fast` is called where a node hands a component to its hot loop (the denoise loops, the
non-tiled VAE decode). When the setting is off it returns the module unchanged. Otherwise it
returns a light wrapper around the module placed by the ModelManager, which

- turns the weights to channels-last memory format once (the layout inductor's convolutions
  want; the module stays so while it is loaded, and saving copies tensors contiguous);
- compiles the call (U-Net) or ``decode`` (VAE) with ``dynamic=False``: each latent shape
  (batch, height, width, CFG on or off) compiles once and then runs its own specialised code;
- copies outputs out of CUDA-graph memory, which the next replay overwrites, so callers may keep
  them as long as they like (a few hundred kilobytes per step);
- passes every other attribute (``dtype``, ``config``, ...) through to the module.

**Patches.** A LoRA adds into the weights in place. A compiled graph reads the weights as inputs
on every call (and a CUDA graph reads them from the same memory), so a new strength, a removed
LoRA or a stack of them is seen without recompiling. A hypernetwork works through forward hooks;
Dynamo does not guard on what a hook does, so a compiled graph would keep running the hook it saw
first. A component that carries forward hooks therefore runs eagerly, and the run's events say so
(``ModelEvent`` action ``compile_skipped``); ``compile`` marks a component put on the fast path.

**Warm-up.** Compiled artefacts (inductor's FX-graph and AOTAutograd caches, Triton kernels,
autotuning results) are written under ``Settings.compile_cache_dir``, else
``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``~/.cache/graphsd/torch-compile`` (under
``$XDG_CACHE_HOME`` when set), so another process that compiles the same model at the same shape
skips code generation: only Dynamo's tracing and the CUDA-graph capture are paid again.

**Tuning** (module constants below; bench/gpu.py's ``CONFIG:PRESET`` rows override them to measure each):
fused attention projections (:data:`FUSE_QKV`: one matrix product for q, k and v, one for a
cross-attention's k and v, computed on a twin of the module that shares its weights, so the
original stays as it was and a patch applied to it is copied into the fused weights each time
the fast path is taken), the scaled-dot-product attention kernels preferred while tracing
(:data:`SDPA_BACKENDS`), cuDNN's convolution autotuning (:data:`CUDNN_BENCHMARK`) and extra
inductor options (:data:`INDUCTOR_OPTIONS`).

**fp8** (``Settings.compile = "fp8"``, never the default): ``reduce-overhead`` with the U-Net's
large linear layers (attention projections, feed-forward) quantized to float8 with dynamic
per-tensor scales through ``torchao`` (Hopper or newer GPUs; ``pip install torchao``). The
quantized weights live in the twin, made from the weights with the handle's patches applied;
another set of patches (a LoRA strength, say) makes another twin and compiles it again. Its
output differs from fp16's by more than rounding: bench/gpu.py reports the difference on a GPU,
bench/fp8_error.py emulates the rounding on the CPU (graphsd-tiny's outlines move by a pixel).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from graphsd.context import Context, Settings
from graphsd.errors import NodeError
from graphsd.events import ModelEvent

#: inductor options added to every mode: a 1x1 convolution is a matrix product over channels,
#: which on channels-last data is one GEMM (the U-Nets' shortcut and projection convolutions)
INDUCTOR_OPTIONS: dict[str, Any] = {"conv_1x1_as_mm": True}

#: fuse each attention's q/k/v projections (k/v for cross-attention) into one linear layer:
#: measured on an H200 (SD1.5 512², bench/gpu.py): 0.151 s / image fused vs 0.158 s unfused
FUSE_QKV = True

#: scaled-dot-product attention kernels in order of preference while the graph is traced on a
#: CUDA device (names of ``torch.nn.attention.SDPBackend``), or () for PyTorch's own choice
#: (cuDNN attention first measured slower on an H200: 0.161 s vs 0.151 s per SD1.5 image)
SDPA_BACKENDS: tuple[str, ...] = ()

#: let cuDNN time its convolution algorithms on the first call of each shape (CUDA only)
CUDNN_BENCHMARK = False

#: what :func:`fast` compiles per role: the method called in the hot loop
METHODS = {"unet": "__call__", "vae": "decode"}


def cache_dir(settings: Settings) -> Path:
    """Where compiled artefacts persist (see the module docstring for the order of choices)."""
    if settings.compile_cache_dir:
        return Path(settings.compile_cache_dir).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphsd" / "torch-compile"


def use_cache_dir(settings: Settings) -> Path:
    """Point inductor's caches at :func:`cache_dir` (a process-wide environment variable that
    inductor reads whenever it looks up or stores an artefact)."""
    folder = cache_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    return folder


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any submodule carries forward hooks or pre-hooks (a hypernetwork's)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def uses_cuda_graphs(settings: Settings) -> bool:
    return settings.compile_backend == "inductor" and settings.compile in ("reduce-overhead", "max-autotune", "fp8")


def torch_mode(settings: Settings) -> str:
    """The ``torch.compile`` mode behind ``Settings.compile`` (fp8 runs as reduce-overhead)."""
    return "reduce-overhead" if settings.compile == "fp8" else settings.compile


def compile_function(fn: Any, settings: Settings) -> Any:
    """``torch.compile(fn)`` in the configured mode and backend, shapes static."""
    if settings.compile_backend != "inductor":  # a debugging backend ("eager", "aot_eager"): modes are inductor's
        return torch.compile(fn, backend=settings.compile_backend, dynamic=False)
    from torch._inductor import list_mode_options

    options = {**list_mode_options(torch_mode(settings)), **INDUCTOR_OPTIONS}
    return torch.compile(fn, options=options, dynamic=False)


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s tree of submodules holding the same parameter and buffer objects:
    what is changed in place on the module's weights (a patch) is the twin's too, while layers
    replaced in the twin (fused or quantized projections) leave the module as it was."""
    memo: dict[int, Any] = {id(t): t for t in chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def fusable(module: torch.nn.Module) -> list[Any]:
    """The diffusers attention layers of ``module`` whose projections can be fused: every one
    runs the default processor (no IP-Adapter or other custom processor), else none."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if not all(type(m.processor) is AttnProcessor2_0 for m in layers):
        return []
    return layers


@torch.no_grad()
def fuse_projections(module: torch.nn.Module) -> list[Any]:
    """Fuse the projections of :func:`fusable` layers in ``module`` (a twin) and return them."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    layers = fusable(module)
    for layer in layers:
        layer.fuse_projections(fuse=True)
        layer.set_processor(FusedAttnProcessor2_0())
    return layers


@torch.no_grad()
def refresh_projections(layers: list[Any]) -> None:
    """Copy the separate q/k/v weights (as the patches left them) into the fused ones, in place
    (a CUDA graph reads them from the same memory)."""
    for layer in layers:
        names = ("to_k", "to_v") if layer.is_cross_attention else ("to_q", "to_k", "to_v")
        parts = [getattr(layer, name) for name in names]
        fused = layer.to_kv if layer.is_cross_attention else layer.to_qkv
        torch.cat([p.weight for p in parts], out=fused.weight)
        if fused.bias is not None:
            torch.cat([p.bias for p in parts], out=fused.bias)


def check_fp8(device: torch.device) -> None:
    """Refuse fp8 where float8 matrix products do not run: torchao's need compute capability 8.9."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise NodeError(
            f"compile mode fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); this run is on {where}: "
            "use --compile (fp16) or --compile=off"
        )


def fp8_eligible(layer: torch.nn.Module, name: str) -> bool:
    """Whether fp8 mode quantizes this layer (``name`` its path in the U-Net): the large linear
    layers (attention projections, feed-forward; float8 matrix products need dimensions that are
    multiples of 16), not the time and added-condition embeddings nor the resnets' projections
    of the time embedding (one row per image: nothing to gain, precision to lose)."""
    if not isinstance(layer, torch.nn.Linear) or "embedding" in name or name.endswith("time_emb_proj"):
        return False
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def quantize_fp8(module: torch.nn.Module) -> None:
    """The module's :func:`fp8_eligible` layers to float8 weights and activations (dynamic
    per-tensor scales) through torchao."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        raise RuntimeError("compile mode fp8 needs the torchao package: pip install torchao") from None

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(), filter_fn=fp8_eligible)


@contextmanager
def cuda_tuning(device: torch.device) -> Iterator[None]:
    """:data:`SDPA_BACKENDS` and :data:`CUDNN_BENCHMARK` for the duration of a compiled call on CUDA."""
    if device.type != "cuda":
        yield
        return
    with ExitStack() as stack:
        if SDPA_BACKENDS:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS], set_priority=True))
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = CUDNN_BENCHMARK or before
        stack.callback(setattr, torch.backends.cudnn, "benchmark", before)
        yield


class FastModule:
    """A module whose hot method (``__call__`` or ``decode``) runs compiled; everything else is
    the module's own. ``target`` is the module or its twin with fused/quantized projections;
    ``fused`` lists the twin's fused layers to refresh from the patched weights. Outputs are
    copied when CUDA graphs hold them."""

    def __init__(self, module: torch.nn.Module, target: torch.nn.Module, method: str, settings: Settings, fused: list[Any]):
        self.module, self.target, self.method, self.fused = module, target, method, fused
        self.device = next(module.parameters()).device
        self.copy_outputs = uses_cuda_graphs(settings)
        self.compiled = compile_function(target if method == "__call__" else getattr(target, method), settings)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        with cuda_tuning(self.device):
            out = self.compiled(*args, **kwargs)
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, out) if self.copy_outputs else out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.method != "__call__":
            return self.module(*args, **kwargs)
        return self._run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == self.method:
            return self._run
        return getattr(self.module, name)


def fast(ctx: Context, ref: Any, role: str, module: Any) -> Any:
    """``module`` (the component ``ref.keys[role]``, as ``ctx.models.use`` yielded it) on the
    fast path when ``Settings.compile`` asks for one, else ``module`` itself. Call it inside the
    ``use`` block, after the patches are applied."""
    settings = ctx.settings
    if settings.compile == "off" or role not in METHODS or not isinstance(module, torch.nn.Module):
        return module
    key = ref.keys[role]
    device = str(next(module.parameters()).device)
    if has_hooks(module):
        ctx.emit(ModelEvent(run_id=ctx.run_id, action="compile_skipped", key=key, device=device))
        return module
    fp8 = settings.compile == "fp8" and role == "unet"
    if fp8:
        check_fp8(next(module.parameters()).device)
    use_cache_dir(settings)

    def build(placed: torch.nn.Module) -> FastModule:
        placed.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (accepted at run time, absent from the stubs)
        if not (FUSE_QKV or fp8) or not (fp8 or fusable(placed)):
            return FastModule(placed, placed, METHODS[role], settings, [])
        target = twin(placed)
        fused = fuse_projections(target) if FUSE_QKV else []
        if fp8:  # quantized from the weights as patched now: the tag below keys it on the patches
            quantize_fp8(target)
            fused = []
        return FastModule(placed, target, METHODS[role], settings, fused)

    tag: tuple[Any, ...] = ("compile", role, settings.compile, settings.compile_backend, FUSE_QKV)
    if fp8:
        tag += tuple(p.fingerprint() for p in ref.patches)
    wrapper, made = ctx.models.derived(key, tag, build)
    refresh_projections(wrapper.fused)
    if made:
        ctx.emit(ModelEvent(run_id=ctx.run_id, action="compile", key=key, device=device))
    return wrapper
