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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from graphsd.context import Context, Settings
from graphsd.events import ModelEvent

#: inductor options added to every mode: a 1x1 convolution is a matrix product over channels,
#: which on channels-last data is one GEMM (the U-Nets' shortcut and projection convolutions)
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}

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
    return settings.compile_backend == "inductor" and settings.compile in ("reduce-overhead", "max-autotune")


def compile_function(fn: Any, settings: Settings) -> Any:
    """``torch.compile(fn)`` in the configured mode and backend, shapes static."""
    if settings.compile_backend != "inductor":  # a debugging backend ("eager", "aot_eager"): modes are inductor's
        return torch.compile(fn, backend=settings.compile_backend, dynamic=False)
    from torch._inductor import list_mode_options

    options = {**list_mode_options(settings.compile), **INDUCTOR_OPTIONS}
    return torch.compile(fn, options=options, dynamic=False)


class FastModule:
    """A module whose hot method (``__call__`` or ``decode``) runs compiled; everything else is
    the module's own. Outputs are copied when CUDA graphs hold them."""

    def __init__(self, module: torch.nn.Module, method: str, settings: Settings):
        self.module = module
        self.method = method
        self.copy_outputs = uses_cuda_graphs(settings)
        self.compiled = compile_function(module if method == "__call__" else getattr(module, method), settings)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
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
    use_cache_dir(settings)

    def build(placed: torch.nn.Module) -> FastModule:
        placed.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (accepted at run time, absent from the stubs)
        return FastModule(placed, METHODS[role], settings)

    wrapper, made = ctx.models.derived(key, ("compile", role, settings.compile, settings.compile_backend), build)
    if made:
        ctx.emit(ModelEvent(run_id=ctx.run_id, action="compile", key=key, device=device))
    return wrapper
