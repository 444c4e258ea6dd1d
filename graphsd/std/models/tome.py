"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion", ToMe for SD), as ComfyUI's TomePatchModel applies it.

In each self-attention layer that works on the full-resolution latent (one token per latent
cell), the attention's queries are reduced before the attention and the result is spread back
afterwards:

- **Bipartite soft matching with a 2D-random partition** (paper, section 3 and "random 2D
  partition"): the tokens are split into destinations, one per 2×2 cell of the token grid
  (chosen at random in each cell; rows and columns left over by an odd grid stay sources), and
  sources (the rest). Each source is paired with its most similar destination by cosine
  similarity of the tokens (ComfyUI uses the attention's input itself as the metric); the ``r =
  int(N × ratio)`` sources with the most similar pairs are merged into their destinations (each
  destination becomes the mean of itself and the sources merged into it, "mean" merging), the
  other sources are kept.
- **Merge the queries only** (ComfyUI's choice): the attention runs with the ``N - r`` merged
  tokens as queries and all ``N`` tokens as keys and values.
- **Unmerge**: each output token goes back to its place, and every merged source takes the
  output of the destination it was merged into.

The random choice of destinations comes, as in ComfyUI, from a fresh draw at each call; graphsd
draws it from a generator seeded with the call's timestep and the layer's index, so the same
inputs give the same picture. Ratio 0 changes nothing; layers at lower resolutions (the 2×, 4×,
8× downsampled ones) are left alone, as in ComfyUI (so SDXL, whose attention starts at 2×, is
unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

STRIDE = 2
"""Side of the grid cells that each hold one destination token."""


@dataclass
class Matching:
    """A bipartite soft matching of ``n`` tokens: destination and source positions, and which
    sources are merged (into which destination) or kept."""

    n: int
    dst: torch.Tensor  # [num_dst] token positions
    src: torch.Tensor  # [num_src] token positions
    merged: torch.Tensor  # [B, r] indices into src, most similar first
    kept: torch.Tensor  # [B, num_src - r] indices into src
    into: torch.Tensor  # [B, r] indices into dst: where each merged source goes

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` → ``[B, N - r, C]``: the kept sources, then the destinations, each the
        mean of itself and the sources merged into it."""
        batch, _, channels = x.shape
        src, dst = x[:, self.src], x[:, self.dst]
        kept = src.gather(1, self.kept.unsqueeze(-1).expand(-1, -1, channels))
        moving = src.gather(1, self.merged.unsqueeze(-1).expand(-1, -1, channels))
        index = self.into.unsqueeze(-1).expand(-1, -1, channels)
        sums = dst.scatter_add(1, index, moving)
        counts = torch.ones(batch, dst.shape[1], 1, dtype=x.dtype, device=x.device).scatter_add(
            1, self.into.unsqueeze(-1), torch.ones_like(moving[..., :1])
        )
        return torch.cat([kept, sums / counts], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, N - r, C]`` (as :meth:`merge` orders tokens) → ``[B, N, C]``: each token back
        at its position, a merged source taking its destination's value."""
        batch, _, channels = y.shape
        kept_count = self.kept.shape[1]
        kept, dst = y[:, :kept_count], y[:, kept_count:]
        src = torch.empty(batch, self.src.numel(), channels, dtype=y.dtype, device=y.device)
        src.scatter_(1, self.kept.unsqueeze(-1).expand(-1, -1, channels), kept)
        src.scatter_(1, self.merged.unsqueeze(-1).expand(-1, -1, channels), dst.gather(1, self.into.unsqueeze(-1).expand(-1, -1, channels)))
        out = torch.empty(batch, self.n, channels, dtype=y.dtype, device=y.device)
        out[:, self.dst] = dst
        out[:, self.src] = src
        return out


def partition(height: int, width: int, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) token positions of a ``height × width`` grid (row-major), with one
    destination per ``STRIDE × STRIDE`` cell at ``choice[cell row, cell column]`` (0 .. STRIDE² - 1,
    row-major inside the cell); tokens outside the whole cells are sources."""
    rows, cols = height // STRIDE, width // STRIDE
    cy, cx = torch.div(choice, STRIDE, rounding_mode="floor"), choice % STRIDE
    y = torch.arange(rows, device=choice.device).view(-1, 1) * STRIDE + cy
    x = torch.arange(cols, device=choice.device).view(1, -1) * STRIDE + cx
    dst = (y * width + x).flatten()
    is_dst = torch.zeros(height * width, dtype=torch.bool, device=choice.device)
    is_dst[dst] = True
    return dst, (~is_dst).nonzero().flatten()


def bipartite_soft_matching(metric: torch.Tensor, height: int, width: int, r: int, choice: torch.Tensor) -> Matching:
    """The matching of the tokens ``metric [B, N, C]`` (N = height × width) that merges ``r``
    sources (at most the number of sources), destinations chosen by ``choice`` (see
    :func:`partition`)."""
    dst, src = partition(height, width, choice)
    r = min(r, src.numel())
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src] @ unit[:, dst].transpose(-1, -2)
        best, into = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return Matching(metric.shape[1], dst, src, merged, order[:, r:], into.gather(1, merged))


def destination_choice(step: int, layer: int, rows: int, cols: int) -> torch.Tensor:
    """Which token of each ``STRIDE × STRIDE`` cell is the destination (0 .. STRIDE² - 1, row-major
    in the cell): uniformly at random, from a CPU generator seeded with the U-Net call's timestep
    (× 1000, rounded: ``step``) and the self-attention layer's index, so a run can be repeated."""
    generator = torch.Generator().manual_seed(step * 1009 + layer)
    return torch.randint(STRIDE * STRIDE, (rows, cols), generator=generator)


def _merging_applies(tokens: int, height: int, width: int, r: int) -> bool:
    return r > 0 and tokens == height * width and height > 1 and width > 1


class TomePatch:
    """ToMe at ``ratio`` on a U-Net (role ``unet``), as a patch: forward hooks on the U-Net (to
    see the latent's size and the timestep of each call) and on each transformer block's
    self-attention (merge before, unmerge after); undo removes them."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def fingerprint(self) -> str:
        return f"tome:{self.ratio!r}"

    def apply(self, role: str, module: torch.nn.Module) -> Callable[[], None] | None:
        from diffusers.models.attention import BasicTransformerBlock  # here: importing diffusers costs seconds at start-up

        layers = [m.attn1 for m in module.modules() if isinstance(m, BasicTransformerBlock)]
        if role != "unet" or self.ratio <= 0 or not layers:
            return None
        call: dict[str, Any] = {}

        def see_call(_unet: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            step = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            call.update(size=tuple(sample.shape[-2:]), step=round(step * 1000))

        handles = [module.register_forward_pre_hook(see_call, with_kwargs=True)]
        for index, attn in enumerate(layers):
            handles += self._hook(attn, index, call)

        def undo() -> None:
            for h in handles:
                h.remove()

        return undo

    def _hook(self, attn: torch.nn.Module, index: int, call: dict[str, Any]) -> list[Any]:
        pending: list[Matching | None] = []

        def before(_attn: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs["hidden_states"]
            height, width = call.get("size", (0, 0))
            r = int(hidden.shape[1] * self.ratio)
            if kwargs.get("encoder_hidden_states") is not None or not _merging_applies(hidden.shape[1], height, width, r):
                pending.append(None)
                return None
            choice = destination_choice(call["step"], index, height // STRIDE, width // STRIDE).to(hidden.device)
            matching = bipartite_soft_matching(hidden, height, width, r, choice)
            pending.append(matching)
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return (matching.merge(hidden), *args[1:]), {**rest, "encoder_hidden_states": hidden}

        def after(_attn: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            matching = pending.pop()
            return matching.unmerge(output) if matching is not None else None

        return [attn.register_forward_pre_hook(before, with_kwargs=True), attn.register_forward_hook(after, with_kwargs=True)]
