"""Train style patches on a frozen model: LoRA adapters (written in kohya's format) and A1111
hypernetworks.

Both use the noise-prediction objective of :mod:`graphsd_train.diffusion` (Ho et al. 2020,
Algorithm 1, in latent space) with the base U-Net and text encoder frozen: draw latents
``x0`` and their (pre-computed) text contexts, ``t`` uniform in [0, T), ``ε ~ N(0, I)``, form
``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` and minimise ``MSE(ε_θ(x_t, t, c), ε)`` over the
adapter's parameters only.

- **LoRA** (Hu et al. 2021, arXiv:2106.09685): each target layer ``W`` gets ``down`` (rank r,
  same kernel as ``W``) and ``up`` (1×1, initialised to zero, so training starts from the base
  model) and computes ``W x + up(down(x))·alpha/r``. Saved as
  ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
- **Hypernetwork** (A1111): a :class:`~graphsd.std.models.hypernetwork.Hypernetwork` for every
  context width of the U-Net's attention layers, applied through the same hooks as at
  inference (strength 1), initialised as A1111's "Normal" option (weights N(0, 0.01), biases 0).

All randomness comes from one CPU generator seeded with ``seed``. A checkpoint (adapter
weights, optimizer state, generator state, step, losses) lets a run resume exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from graphsd.std.models.hypernetwork import Hypernetwork, HypernetworkPatch, attention_layers, build_net, dropout_structure
from graphsd_train.diffusion import alphas_cumprod

ProgressFn = Callable[[int, int, float], None]

#: Named sets of target layers (regular expressions on diffusers module paths).
TARGETS = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "attention_ff": r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2)|\.proj_(in|out))$",
    "all": r"(attentions|resnets|downsamplers|upsamplers)\.",
}


@dataclass(frozen=True)
class AdapterTraining:
    """Settings shared by LoRA and hypernetwork training."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0


@dataclass
class TrainingData:
    """What the training loop draws from: scaled latents ``[N, C, h, w]``, text contexts
    ``[N, T, W]`` and (SDXL) pooled embeddings ``[N, P]`` and ``time_ids`` ``[6]``."""

    latents: torch.Tensor
    contexts: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@dataclass
class TrainingRecord:
    steps_done: int
    losses: list[float]


# ---- LoRA -----------------------------------------------------------------------------------------


class LoraAdapter(torch.nn.Module):
    """``up(down(x))·alpha/rank`` for one Linear or Conv2d layer."""

    def __init__(self, layer: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, torch.nn.Linear):
            self.down = torch.nn.Linear(layer.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = torch.nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)


def target_layers(unet: torch.nn.Module, targets: str) -> list[str]:
    """Module paths of the Linear / Conv2d layers selected by ``targets`` (a name of
    :data:`TARGETS` or a regular expression searched in each module path)."""
    pattern = re.compile(TARGETS.get(targets, targets))
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.search(n)]


def make_lora(unet: torch.nn.Module, targets: str, rank: int, alpha: float, seed: int) -> torch.nn.ModuleDict:
    """Fresh adapters (``up`` zero) for the selected layers, keyed by module path with ``.``
    replaced by ``_`` (the kohya spelling), initialised from ``seed``."""
    names = target_layers(unet, targets)
    if not names:
        raise ValueError(f"no Linear/Conv2d layer of the U-Net matches the targets {targets!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.ModuleDict({n.replace(".", "_"): LoraAdapter(unet.get_submodule(n), rank, alpha) for n in names})


def _lora_hooks(unet: torch.nn.Module, adapters: torch.nn.ModuleDict) -> Callable[[], None]:
    index = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    handles = [
        unet.get_submodule(index[key]).register_forward_hook(lambda _m, args, out, a=adapter: out + a(args[0]))
        for key, adapter in adapters.items()
    ]
    return lambda: [h.remove() for h in handles]


def lora_state_dict(adapters: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The adapters in kohya's format (``lora_unet_*.lora_down.weight`` / ``lora_up`` / ``alpha``)."""
    out: dict[str, torch.Tensor] = {}
    for key, a in adapters.items():
        out[f"lora_unet_{key}.lora_down.weight"] = a.down.weight.detach().float().cpu().contiguous()
        out[f"lora_unet_{key}.lora_up.weight"] = a.up.weight.detach().float().cpu().contiguous()
        out[f"lora_unet_{key}.alpha"] = torch.tensor(float(a.alpha))
    return out


def save_lora(adapters: torch.nn.ModuleDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a kohya-format safetensors file (with kohya's ``ss_network_*`` metadata)."""
    from safetensors.torch import save_file

    first = next(iter(adapters.values()))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank), "ss_network_alpha": str(first.alpha)}
    save_file(lora_state_dict(adapters), str(path), metadata={**meta, **(metadata or {})})


def train_lora(
    unet: torch.nn.Module,
    data: TrainingData,
    adapters: torch.nn.ModuleDict,
    cfg: AdapterTraining,
    schedule: dict,
    progress: ProgressFn | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> TrainingRecord:
    """Train ``adapters`` (from :func:`make_lora`) on the frozen ``unet`` in place."""
    remove = _lora_hooks(unet, adapters)
    try:
        return _train(unet, data, adapters, cfg, schedule, progress, checkpoint)
    finally:
        remove()


# ---- hypernetworks -----------------------------------------------------------------------------------


def make_hypernetwork(unet: torch.nn.Module, layer_structure: list[float], activation: str, layer_norm: bool,
                      use_dropout: bool, seed: int, name: str = "hypernetwork") -> Hypernetwork:
    """A fresh hypernetwork with a net pair for every input width of the U-Net's attention
    ``to_k`` layers (A1111 "Normal" initialisation: weights N(0, 0.01), biases 0)."""
    meta = {"layer_structure": list(layer_structure), "activation_func": activation, "is_layer_norm": layer_norm,
            "use_dropout": use_dropout, "activate_output": False, "last_layer_dropout": False,
            "dropout_structure": dropout_structure(list(layer_structure), use_dropout, False), "name": name, "step": 0}
    widths = sorted({a.to_k.in_features for a in attention_layers(unet)})
    gen = torch.Generator().manual_seed(seed)
    nets = {}
    for w in widths:
        pair = (build_net(w, meta), build_net(w, meta))
        for net in pair:
            for layer in net:
                if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
                    layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
                    layer.bias.data.zero_()
        nets[w] = pair
    return Hypernetwork(nets, meta)


def train_hypernetwork(
    unet: torch.nn.Module,
    data: TrainingData,
    hypernetwork: Hypernetwork,
    cfg: AdapterTraining,
    schedule: dict,
    progress: ProgressFn | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> TrainingRecord:
    """Train ``hypernetwork`` on the frozen ``unet`` in place (applied at strength 1)."""
    _require_float32(unet)
    hypernetwork.to(next(unet.parameters()).device).train().requires_grad_(True)
    remove = HypernetworkPatch(hypernetwork, "training", 1.0).apply("unet", unet)
    try:
        record = _train(unet, data, hypernetwork, cfg, schedule, progress, checkpoint)
    finally:
        if remove is not None:
            remove()
        hypernetwork.eval().requires_grad_(False)
    hypernetwork.meta["step"] = int(hypernetwork.meta.get("step") or 0) + record.steps_done
    return record


# ---- the shared loop ----------------------------------------------------------------------------------


def _require_float32(unet: torch.nn.Module) -> None:
    if next(unet.parameters()).dtype != torch.float32:
        raise ValueError("adapters are trained on a float32 U-Net: load the checkpoint with dtype fp32")


def _train(unet, data: TrainingData, trainable: torch.nn.Module, cfg: AdapterTraining, schedule: dict,
           progress: ProgressFn | None, checkpoint: str | os.PathLike | None) -> TrainingRecord:
    _require_float32(unet)
    device = next(unet.parameters()).device
    trainable.to(device=device).train().requires_grad_(True)
    params = list(trainable.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["weights"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        step, losses = int(state["step"]), state["losses"].tolist()
    abar = alphas_cumprod(schedule).to(device)
    try:
        while step < cfg.steps:
            losses.append(_step(unet, data, cfg.batch_size, abar, gen, opt))
            step += 1
            if progress is not None:
                progress(step, cfg.steps, losses[-1])
    finally:
        trainable.eval().requires_grad_(False)
        if ckpt is not None:
            _save_state(ckpt, {"weights": trainable.state_dict(), "opt": opt.state_dict(), "generator": gen.get_state(),
                               "step": step, "losses": torch.tensor(losses, dtype=torch.float64)})
    return TrainingRecord(step, losses)


def _step(unet, data: TrainingData, batch: int, abar: torch.Tensor, gen: torch.Generator, opt) -> float:
    """One optimisation step of the ε-prediction loss; returns the loss."""
    device = abar.device
    idx = torch.randint(len(data.latents), (batch,), generator=gen)
    t = torch.randint(len(abar), (batch,), generator=gen)
    noise = torch.randn((batch, *data.latents.shape[1:]), generator=gen).to(device)
    a = abar[t.to(device)].view(-1, 1, 1, 1)
    x_t = a.sqrt() * data.latents[idx].to(device) + (1 - a).sqrt() * noise
    kwargs = {}
    if data.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": data.pooled[idx].to(device),
                                       "time_ids": data.time_ids.to(device).expand(batch, -1)}
    pred = unet(x_t, t.to(device), encoder_hidden_states=data.contexts[idx].to(device), **kwargs).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
