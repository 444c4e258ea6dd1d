"""Comparing graphsd with an independent reference, with tolerances that follow from rounding.

Parity tests run both sides in float64 (graphsd's ``dtype: fp64``, the reference's modules
``.to(torch.float64)``). Both then perform the same arithmetic, possibly in another order
(batched or split matrix products, other kernels, another thread count), and each result
differs from the exact value by a sum of rounding errors of relative size at most
u = 2**-53 each (first-order analysis, Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 3). On the tiny test models every output value is fed by at most
:data:`ROUNDINGS` roundings (≤ 30 steps × ≤ 50 layers in sequence × sums of ≤ 512 terms, with
room to spare), each scaled by at most the largest magnitude in play, so two orders differ by
no more than ``2 · ROUNDINGS · u · magnitude`` ≈ 2e-10 × magnitude. A real discrepancy (a
wrong sigma, a missing term, a misplaced weight) moves latents by 1e-3 or more, seven orders of
magnitude above that.

Noise: graphsd draws its seeded noise as float32 on the CPU in every precision; diffusers
draws it in the pipeline's dtype, so with a float64 pipeline it would draw other numbers.
:func:`diffusers_noise_in_float32` makes diffusers draw the same float32 numbers (then cast),
for its pipelines and for the per-step noise of ancestral and SDE schedulers alike.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

U64 = 2.0**-53
ROUNDINGS = 10**6


def tolerance(*references: torch.Tensor) -> float:
    """The largest difference two float64 computations of ``references`` may show."""
    magnitude = max([1.0] + [float(r.detach().abs().max()) for r in references])
    return 2 * ROUNDINGS * U64 * magnitude


def assert_same(ours: torch.Tensor, reference: torch.Tensor, what: str = "result") -> None:
    """``ours`` equals the float64 ``reference`` up to :func:`tolerance`."""
    assert ours.dtype == reference.dtype == torch.float64, f"compare in float64, got {ours.dtype} and {reference.dtype}"
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    diff = float((ours.detach().cpu() - reference.detach().cpu()).abs().max())
    bound = tolerance(reference)
    assert diff <= bound, f"{what}: differs by {diff:.3g}, more than rounding allows ({bound:.3g})"


U32 = 2.0**-24


def assert_sum_in_either_order(one: dict, two: dict, first: dict, second: dict) -> None:
    """Weights W + d1 + d2 (``one``) and W + d2 + d1 (``two``), each delta computed alone and
    identically in both, are the same float32 sum rounded in two orders. Each addition rounds its
    result r to within U32·|r| (round to nearest), so each order lies within U32·(|its
    intermediate sum| + |itself|) of the exact sum, and the two differ per element by at most
    U32·(|W + d1| + |W + d2| + |both results|); ``first`` / ``second`` are the single-patch
    weights W + d1 and W + d2, the intermediate sums exactly as the stacks compute them."""
    for name, w in one.items():
        bound = U32 * (first[name].abs() + second[name].abs() + w.abs() + two[name].abs())
        assert ((w - two[name]).abs() <= bound).all(), name


@contextlib.contextmanager
def diffusers_noise_in_float32() -> Iterator[None]:
    """While active, diffusers' ``randn_tensor`` draws float32 numbers and casts them to the
    dtype asked for, as graphsd's noise is drawn."""
    import diffusers.pipelines  # noqa: F401 - load the modules that hold a reference to it
    import diffusers.schedulers  # noqa: F401
    from diffusers.utils import torch_utils

    original = torch_utils.randn_tensor

    def randn_float32(shape, generator=None, device=None, dtype=None, layout=None):
        drawn = original(shape, generator=generator, device=device, dtype=torch.float32, layout=layout)
        return drawn.to(dtype or torch.float32)

    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("diffusers") and getattr(m, "randn_tensor", None) is original]
    for module in holders:
        module.randn_tensor = randn_float32
    try:
        yield
    finally:
        for module in holders:
            module.randn_tensor = original
