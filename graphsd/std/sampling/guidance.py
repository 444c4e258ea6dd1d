"""What the U-Net is asked at each step, and how its answers make one prediction per side.

Both denoise loops (:mod:`~graphsd.std.sampling.loop`, the diffusers convention, and
:mod:`~graphsd.std.sampling.kdiffusion`, ComfyUI's) evaluate their conditionings as ComfyUI's
``calc_cond_batch`` does (comfy/samplers.py):

- each side (negative, positive) is a list of conditionings (:meth:`Conditioning.entries`: one
  for a plain TextEncode, several after ConditioningCombine);
- a conditioning with an ``area`` is evaluated on that rectangle of the latent only (the U-Net
  sees the crop); its weight is ``strength`` inside the area, ramped down linearly over the
  ``min(8, side // 4)`` cells along each edge that does not lie on the latent's border;
- a conditioning with a ``mask`` weighs its prediction by ``mask × mask_strength × strength``
  (the mask resized bilinearly to the latent), without the ramp; with ``mask_bounds`` it is
  evaluated on the mask's bounding box only (at least 8 × 8 cells);
- each side's prediction is the weighted mean of its conditionings' predictions, cell by cell:
  ``Σ w_i p_i / (1e-37 + Σ w_i)`` (0 where no conditioning of the side applies);
- an area on one side makes the other side evaluate that area too, with the conditioning of that
  side which is the smallest to contain it (or its first conditioning without an area), so that
  guidance compares predictions of the same area (ComfyUI's ``create_cond_with_same_area_if_none``).

Conditionings whose crops have one size and that carry the same ControlNet (or none) share one
U-Net call, their text contexts repeated to a common token count (which leaves cross-attention
unchanged); the ControlNets run beside it as :mod:`~graphsd.std.sampling.control` says. A plain negative + positive pair is
the classic single call on the batch ``[uncond, cond]``, and its predictions are the U-Net's
outputs as they are, so a run without combined conditionings computes exactly what it did before
they existed.

The prediction averaged is the U-Net's output (epsilon) in the diffusers convention and the
denoised estimate in ComfyUI's, as ComfyUI averages ``apply_model``'s results.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graphsd.std.models.clip_vision import UNCLIP_KEY, unclip_class_labels
from graphsd.std.models.controlnet import share_with_uncond
from graphsd.types import Conditioning

COUNT_FLOOR = 1e-37
"""ComfyUI's starting weight sum: cells no conditioning covers come out 0 instead of 0/0."""
RAMP_CELLS = 8
"""Cells over which an area's weight ramps down at an edge inside the latent (ComfyUI's fuzz)."""
MIN_BOUNDS_CELLS = 8
"""Smallest side of an area taken from a mask's bounding box."""

#: (height, width, y, x) in latent cells.
Cells = tuple[int, int, int, int]


class DenoiseError(ValueError):
    """The inputs do not make a valid denoise run; the message says how to fix them."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def batched_context(cond: Conditioning, batch: int, tokens: int, device: torch.device, dtype: torch.dtype):
    """The conditioning's context repeated to ``batch`` items and ``tokens`` tokens, and its pooled
    embedding repeated to ``batch`` items. Repeating the whole token sequence k times leaves
    cross-attention unchanged (each repeated key gets 1/k of the weight), which lets prompts of
    different lengths share one U-Net call (as ComfyUI does)."""
    emb = cond.embeddings
    if emb.shape[0] not in (1, batch):
        raise DenoiseError(f"conditioning has batch {emb.shape[0]} but the noise has batch {batch}; use batch 1 or the same batch")
    emb = emb.repeat(batch // emb.shape[0], tokens // emb.shape[1], 1)
    pooled = cond.pooled
    if pooled is not None:
        pooled = pooled.repeat(batch // pooled.shape[0], 1).to(device, dtype)
    return emb.to(device, dtype), pooled


def sdxl_time_ids(info: Any, cond: Conditioning, height: int, width: int, aesthetic_score: float) -> list[float]:
    """SDXL micro-conditioning for one conditioning: ``original_size + crop_top_left +
    target_size`` (base) or ``original_size + crop_top_left + (aesthetic_score,)`` (refiner,
    whose U-Net expects 5 ids instead of 6). Sizes are in pixels, (height, width); a
    conditioning may override them in ``extras`` (``original_size``, ``crop_top_left``,
    ``target_size``, ``aesthetic_score``). ``info`` is the U-Net's ModelInfo."""
    n_ids = info.time_id_count(cond.pooled.shape[-1])
    original = list(cond.extras.get("original_size", (height, width)))
    crop_top_left = list(cond.extras.get("crop_top_left", (0, 0)))
    if n_ids == 5:
        return original + crop_top_left + [float(cond.extras.get("aesthetic_score", aesthetic_score))]
    return original + crop_top_left + list(cond.extras.get("target_size", (height, width)))


def crop(x: torch.Tensor, area: Cells | None) -> torch.Tensor:
    """The ``area`` of ``x [B, C, H, W]`` (a view), or ``x`` itself for None."""
    if area is None:
        return x
    height, width, y, x0 = area
    return x[:, :, y : y + height, x0 : x0 + width]


@dataclass
class Pass:
    """One conditioning evaluated for one side: ``side`` indexes :meth:`Guidance.predict`'s result,
    ``area`` is where (None: everywhere), ``weight`` ``[B, C, h, w]`` how much (None: 1)."""

    side: int
    area: Cells | None
    weight: torch.Tensor | None


@dataclass
class UNetBatch:
    """Passes whose crops have one size, evaluated in one U-Net call: the text contexts and SDXL's
    added conditioning of the passes stacked in pass order, and for an inpainting U-Net the extra
    input channels (mask and masked-picture latent) of each pass, cropped like its latent."""

    passes: list[Pass]
    context: torch.Tensor
    added: dict[str, torch.Tensor] | None = None
    concat: torch.Tensor | None = None
    #: The ControlNet the passes share (a :class:`~graphsd.std.models.controlnet.Control`), or None.
    control: Any = None
    #: For a U-Net with a projection class embedding (SD2.1-unCLIP): each pass's class labels
    #: ``[B, width]`` stacked in pass order (:func:`unclip_labels`); None for other U-Nets.
    class_labels: torch.Tensor | None = None


#: A loop's U-Net call: (the batch's stacked latent crops as the U-Net takes them, the batch) →
#: the U-Net's output in the loop's working precision.
UNetCall = Callable[[torch.Tensor, UNetBatch], torch.Tensor]
#: Turns one pass's U-Net output into the prediction to average (given the pass's area).
Finish = Callable[[torch.Tensor, "Cells | None"], torch.Tensor]


class Guidance:
    """The U-Net batches of a run and how their outputs make one prediction per side:
    ``[negative, positive]`` with guidance, ``[positive]`` without."""

    def __init__(self, batches: list[UNetBatch], sides: int):
        self.batches, self.sides = batches, sides
        passes = [p for b in batches for p in b.passes]
        per_side = Counter(p.side for p in passes)
        # a side with one conditioning that weighs 1 everywhere: its prediction is the output itself
        self._alone = {p.side for p in passes if per_side[p.side] == 1 and p.area is None and p.weight is None}

    @classmethod
    def single(cls, context: torch.Tensor, added: dict[str, torch.Tensor] | None, guided: bool) -> Guidance:
        """One plain conditioning per side, ``context`` (and ``added``) stacked ``[uncond, cond]``
        when ``guided``."""
        passes = [Pass(0, None, None), Pass(1, None, None)] if guided else [Pass(0, None, None)]
        return cls([UNetBatch(passes, context, added)], len(passes))

    def predict(self, x_in: torch.Tensor, call: UNetCall, finish: Finish | None = None) -> list[torch.Tensor]:
        """Each side's prediction for the latent ``x_in`` (as the U-Net takes it)."""
        out: list[torch.Tensor | None] = [None] * self.sides
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}
        for batch in self.batches:
            n = len(batch.passes)
            model_input = x_in if n == 1 and batch.passes[0].area is None else torch.cat([crop(x_in, p.area) for p in batch.passes])
            for p, o in zip(batch.passes, call(model_input, batch).chunk(n), strict=True):
                if finish is not None:
                    o = finish(o, p.area)
                if p.side in self._alone:
                    out[p.side] = o
                    continue
                if p.side not in sums:
                    sums[p.side] = o.new_zeros((x_in.shape[0], o.shape[1], *x_in.shape[2:]))
                    counts[p.side] = torch.full_like(sums[p.side], COUNT_FLOOR)
                total, count = crop(sums[p.side], p.area), crop(counts[p.side], p.area)
                if p.weight is None:
                    total += o
                    count += 1
                else:
                    total += o * p.weight
                    count += p.weight
        for side, total in sums.items():
            out[side] = total / counts[side]
        return [o for o in out if o is not None]


@dataclass
class _Entry:
    """A conditioning with its area and mask resolved on the latent. ``what`` gives the text
    context, pooled embedding and extras (ComfyUI's model conditioning), which a same-area copy
    takes from the other side."""

    what: Conditioning
    area: Cells | None
    mask: torch.Tensor | None  # [B, h, w] at the latent's size
    strength: float
    mask_strength: float
    control: Any = None  # the ControlNet applied, which a same-area copy keeps (as in ComfyUI)


def _resolve(cond: Conditioning, h: int, w: int) -> _Entry:
    """Relative areas in cells, the mask at the latent's size, mask bounds as the area."""
    area: Cells | None = None
    if cond.area is not None:
        a = cond.area
        if a.relative:
            area = (max(1, round(a.height * h)), max(1, round(a.width * w)), round(a.y * h), round(a.x * w))
        else:
            area = (int(a.height), int(a.width), int(a.y), int(a.x))
    mask = cond.mask
    if mask is not None:
        if tuple(mask.shape[1:]) != (h, w):
            mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear").squeeze(1)
        if cond.mask_bounds:
            rows, cols = torch.nonzero(mask.abs().amax(dim=0), as_tuple=True)
            if rows.numel() == 0:
                area = (MIN_BOUNDS_CELLS, MIN_BOUNDS_CELLS, 0, 0)
            else:
                y, x = int(rows.min()), int(cols.min())
                area = (max(MIN_BOUNDS_CELLS, int(rows.max()) - y + 1), max(MIN_BOUNDS_CELLS, int(cols.max()) - x + 1), y, x)
    return _Entry(cond, area, mask, cond.strength, cond.mask_strength, cond.control)


def _inside(inner: Cells, outer: Cells) -> bool:
    (ih, iw, iy, ix), (oh, ow, oy, ox) = inner, outer
    return iy >= oy and ix >= ox and iy + ih <= oy + oh and ix + iw <= ox + ow


def _add_same_area(others: list[_Entry], entry: _Entry) -> None:
    """Give the other side a conditioning on ``entry``'s area unless it has one there."""
    if entry.area is None:
        return
    smallest: _Entry | None = None
    for o in others:
        if o.area is None:
            smallest = smallest or o
        elif _inside(entry.area, o.area):
            if smallest is None or smallest.area is None or math.prod(smallest.area[:2]) > math.prod(o.area[:2]):
                smallest = o
    if smallest is None or smallest.area == entry.area:
        return
    others.append(_Entry(smallest.what, entry.area, entry.mask, entry.strength, entry.mask_strength, entry.control))


def _ramp(weight: torch.Tensor, area: Cells, h: int, w: int) -> None:
    """In place: the weight falls linearly to 1/n over the n = min(8, side // 4) outer cells of
    each edge of ``area`` that lies inside the latent."""
    height, width, y, x = area
    for dim, (size, offset, full) in ((2, (height, y, h)), (3, (width, x, w))):
        cells = min(RAMP_CELLS, size // 4)
        for t in range(cells):
            factor = (t + 1) / cells
            if offset != 0:
                weight.narrow(dim, t, 1).mul_(factor)
            if offset + size < full:
                weight.narrow(dim, size - 1 - t, 1).mul_(factor)


def _pass(entry: _Entry, side: int, field: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Pass:
    batch, channels, h, w = shape
    area = entry.area
    if area is not None:
        height, width, y, x = area
        height, width = min(h - y, height), min(w - x, width)
        if height <= 0 or width <= 0 or y < 0 or x < 0:
            raise DenoiseError(
                f"a {field} conditioning's area (from cell x={x}, y={y}) lies outside the {w}x{h}-cell latent; move it inside the picture",
                field,
            )
        area = (height, width, y, x)
    size = (batch, channels, area[0] if area else h, area[1] if area else w)
    if entry.mask is not None:
        mask = crop(entry.mask[:batch].unsqueeze(1), area).squeeze(1).to(device, dtype) * entry.mask_strength
        if batch % mask.shape[0]:
            raise DenoiseError(
                f"a {field} conditioning's mask has batch {mask.shape[0]} but the noise has batch {batch}; use one mask or one per image",
                field,
            )
        weight: torch.Tensor | None = mask.unsqueeze(1).repeat(batch // mask.shape[0], channels, 1, 1) * entry.strength
    elif area is None and entry.strength == 1.0:
        weight = None
    else:
        weight = torch.full(size, entry.strength, dtype=dtype, device=device)
        if area is not None:
            _ramp(weight, area, h, w)
    return Pass(side, area, weight)


def is_plain(cond: Conditioning) -> bool:
    """One conditioning that weighs 1 everywhere: no combined entries, area, mask or ControlNet.
    Such conditionings of several branches can be stacked into one U-Net batch (:func:`merge_plans`)."""
    unweighted = cond.area is None and cond.mask is None and not cond.mask_bounds and cond.strength == 1.0
    return unweighted and not cond.combined and cond.control is None


def merge_plans(plans: list[Guidance]) -> Guidance:
    """One plan for several branches whose latents are stacked along the batch axis, in order:
    each plan must be one U-Net batch of plain passes (one per side, as plain conditionings
    make), of equal token counts. Each side's text contexts (and SDXL's added conditioning, and
    class labels) are stacked branch after branch, so the U-Net's output splits per side as for
    one branch, and each branch's rows are its own prediction."""
    first = plans[0]
    for plan in plans:
        if len(plan.batches) != 1 or plan.sides != first.sides:
            raise DenoiseError("only plain conditionings can be batched across branches")
        batch = plan.batches[0]
        if batch.concat is not None or batch.control is not None or any(p.area is not None or p.weight is not None for p in batch.passes):
            raise DenoiseError("only plain conditionings can be batched across branches")
    sides = first.sides

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        parts = [t.chunk(sides) for t in tensors]
        return torch.cat([part[side] for side in range(sides) for part in parts])

    batches = [plan.batches[0] for plan in plans]
    added = None
    if batches[0].added is not None:
        added = {name: stack([b.added[name] for b in batches if b.added is not None]) for name in batches[0].added}
    labels = None
    if batches[0].class_labels is not None:
        labels = stack([b.class_labels for b in batches if b.class_labels is not None])
    merged = UNetBatch(list(batches[0].passes), stack([b.context for b in batches]), added, None, None, labels)
    return Guidance([merged], sides)


def max_passes(positive: Conditioning, negative: Conditioning | None, guided: bool) -> int:
    """An upper bound of the conditionings evaluated at each step (each area can add one to the
    other side), for memory estimates."""
    sides = [positive] + ([negative] if negative is not None else [])
    copies = sum(1 for c in sides for e in c.entries() if e.area is not None or e.mask_bounds)
    return len(positive.entries()) + (len(negative.entries()) if guided and negative is not None else 0) + copies


def unclip_labels(info: Any, cond: Conditioning, batch: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A conditioning's class labels for a U-Net with a projection class embedding, repeated to
    ``batch`` items (ComfyUI's ``unclip_adm``): its unCLIPConditioning images noise-augmented
    with the sampler's ``seed``, or zeros without them (a negative prompt) or without the
    checkpoint's noise augmentation."""
    width = info.class_labels_width
    unclips = tuple(cond.extras.get(UNCLIP_KEY, ()))
    if not unclips or info.noise_augmentor is None:
        labels = torch.zeros(1, width)
    else:
        labels = unclip_class_labels(unclips, info.noise_augmentor, seed, width // 2)
        if labels.shape[-1] != width:
            raise DenoiseError(
                f"the unCLIP image embedding is {labels.shape[-1] // 2} wide but this model takes {width // 2}-wide ones; "
                "encode the image with the CLIP vision model of the unCLIP checkpoint",
                "positive",
            )
    return labels.repeat(batch, 1).to(device, dtype)


def plan_guidance(
    info: Any,
    positive: Conditioning,
    negative: Conditioning | None,
    guided: bool,
    shape: tuple[int, ...],
    scores: tuple[float, float],
    device: torch.device,
    dtype: torch.dtype,
    concat: Callable[[Conditioning], torch.Tensor] | None = None,
    seed: int = 0,
) -> Guidance:
    """The U-Net batches for a latent of ``shape``: ``negative`` is evaluated only when
    ``guided`` (but its areas count either way, as in ComfyUI); ``scores`` are SDXL refiners'
    aesthetic scores of the negative and positive side; ``concat`` gives an inpainting U-Net's
    extra channels ``[B, 1 + C, h, w]`` for a conditioning; ``seed`` (the sampler's) draws unCLIP's
    noise augmentation. ``info`` is the U-Net's ModelInfo."""
    batch, _, h, w = shape
    size = (h * info.latent_downscale, w * info.latent_downscale)
    given = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
    resolved = {name: [_resolve(c, h, w) for c in cond.entries()] for name, cond in given.items()}
    for name, entries in resolved.items():  # positive first, as ComfyUI; entries grow while we walk them
        i = 0
        while i < len(entries):
            for other, other_entries in resolved.items():
                if other != name:
                    _add_same_area(other_entries, entries[i])
            i += 1
    if negative is not None:
        share_with_uncond(resolved["positive"], resolved["negative"])

    sides = ["negative", "positive"] if guided else ["positive"]
    score = {"negative": scores[0], "positive": scores[1]}
    groups: dict[tuple[int, int, int], list[tuple[Pass, str, _Entry]]] = {}
    for index, name in enumerate(sides):
        for entry in resolved[name]:
            p = _pass(entry, index, name, shape, device, dtype)
            crop_size = (p.area[0], p.area[1]) if p.area else (h, w)
            groups.setdefault((*crop_size, id(entry.control)), []).append((p, name, entry))

    extra: dict[int, torch.Tensor] = {}
    batches = []
    for members in groups.values():
        tokens = math.lcm(*(e.what.embeddings.shape[1] for _, _, e in members))
        parts = [batched_context(e.what, batch, tokens, device, dtype) for _, _, e in members]
        context = torch.cat([emb for emb, _ in parts])
        added = None
        if info.takes_time_ids:
            if any(pooled is None for _, pooled in parts):
                raise DenoiseError("this SDXL model needs pooled text embeddings: encode the prompt with the model's own clip", "positive")
            ids = [sdxl_time_ids(info, e.what, size[0], size[1], score[name]) for _, name, e in members]
            time_ids = torch.tensor(ids, dtype=dtype).repeat_interleave(batch, dim=0).to(device)
            added = {"text_embeds": torch.cat([pooled for _, pooled in parts]), "time_ids": time_ids}
        channels = None
        if concat is not None:
            for _, _, e in members:
                if id(e.what) not in extra:
                    extra[id(e.what)] = concat(e.what)
            channels = torch.cat([crop(extra[id(e.what)], p.area) for p, _, e in members])
        labels = None
        if getattr(info, "class_labels_width", None):
            labels = torch.cat([unclip_labels(info, e.what, batch, seed, device, dtype) for _, _, e in members])
        batches.append(UNetBatch([p for p, _, _ in members], context, added, channels, members[0][2].control, labels))
    return Guidance(batches, len(sides))
