"""ComfyUI's Canny (kornia's canny with its defaults) against a reference written here from the
algorithm with numpy and scipy.ndimage (OpenCV is not a dependency): grey values, a 5x5 Gaussian
blur of sigma 1 with mirrored borders, unnormalised Sobel gradients with repeated borders,
non-maximum suppression along the gradient direction rounded to 45 degrees, and hysteresis as
connected components (8-neighbourhood) of above-low pixels that hold an above-high pixel."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from graphsd import Engine, Settings, WorkflowError
from graphsd.std.nodes.canny import Canny
from graphsd.types import Image


def reference_canny(rgb: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges (0/1) of one image ``[H, W, 3]``."""
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    g = np.exp(-(np.arange(-2, 3) ** 2) / 2.0)
    g /= g.sum()
    blurred = scipy.ndimage.correlate(grey, np.outer(g, g), mode="mirror")
    sobel = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = scipy.ndimage.correlate(blurred, sobel, mode="nearest")
    gy = scipy.ndimage.correlate(blurred, sobel.T, mode="nearest")
    magnitude = np.sqrt(gx**2 + gy**2 + 1e-6)
    sector = np.round(np.degrees(np.arctan2(gy, gx)) / 45).astype(int) % 8
    steps = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]
    height, width = grey.shape

    def at(y, x):
        return magnitude[y, x] if 0 <= y < height and 0 <= x < width else 0.0

    thin = np.zeros_like(magnitude)
    for y in range(height):
        for x in range(width):
            dy, dx = steps[sector[y, x]]
            if magnitude[y, x] > at(y + dy, x + dx) and magnitude[y, x] > at(y - dy, x - dx):
                thin[y, x] = magnitude[y, x]
    labels, _ = scipy.ndimage.label(thin > low, structure=np.ones((3, 3)))
    connected = np.unique(labels[thin > high])
    return np.isin(labels, connected[connected > 0]).astype(np.float64)


def edges(pixels: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return Canny().run(Canny.Inputs(image=Image(pixels), low_threshold=low, high_threshold=high), None).image.pixels


@pytest.mark.parametrize("low,high", [(0.4, 0.8), (0.1, 0.2), (0.05, 0.6), (0.3, 0.3)])
def test_canny_equals_the_reference(low, high):
    """Smooth random shapes (a blurred random field, so that there are real edges and long weak
    chains) in a batch of two."""
    rng = np.random.default_rng(0)
    field = scipy.ndimage.gaussian_filter(rng.random((2, 40, 48, 3)), sigma=(0, 2, 2, 0))
    pictures = np.clip((field - field.mean()) * 8 + 0.5, 0, 1)
    out = edges(torch.from_numpy(pictures), low, high)
    assert out.shape == (2, 40, 48, 3) and out.dtype == torch.float64
    for b in range(2):
        expected = reference_canny(pictures[b], low, high)
        assert expected.sum() > 20  # the test sees edges
        for c in range(3):
            np.testing.assert_array_equal(out[b, :, :, c].numpy(), expected)


def test_a_step_gives_one_thin_line_along_it():
    """A vertical step from 0 to 1 through a middle column of 0.5: one column of edge pixels (the
    blurred ramp's steepest column, where non-maximum suppression keeps it), the whole height. A
    step between two columns gives two equal magnitudes, neither above the other, and no edge:
    the suppression is strict, as kornia's."""
    picture = torch.zeros(1, 16, 20, 3, dtype=torch.float64)
    picture[..., 10, :] = 0.5
    picture[..., 11:, :] = 1.0
    out = edges(picture, 0.4, 0.8)[0, :, :, 0]
    assert out[:, 10].sum() == 16 and out.sum() == 16
    between = torch.zeros(1, 16, 20, 3, dtype=torch.float64)
    between[..., 10:, :] = 1.0
    assert edges(between, 0.4, 0.8).sum() == 0


def test_hysteresis_keeps_weak_edge_pixels_that_touch_strong_ones():
    """A vertical edge whose contrast fades from 1 (top) to 0.1 (bottom): its gradient magnitude
    falls from about 2.5 to 0.34 (2.5 x contrast). Between the thresholds 0.3 and 0.8 the lower
    rows are weak, and kept because they continue the strong upper part; the same edge at 0.3 of
    the contrast (magnitudes 0.1 to 0.75) has no strong pixel and gives nothing."""
    contrast = torch.linspace(1.0, 0.1, 24, dtype=torch.float64)
    picture = torch.zeros(1, 24, 24, 3, dtype=torch.float64)
    picture[0, :, 12, :] = (0.5 * contrast)[:, None]
    picture[0, :, 13:, :] = contrast[:, None, None]
    out = edges(picture, 0.3, 0.8)[0, :, :, 0]
    assert out[:, 12].sum() == 24  # rows 18-23 (magnitude 0.34-0.78) too
    assert edges(picture * 0.3, 0.3, 0.8).sum() == 0


def test_rgba_and_grey_pictures():
    rgb = torch.rand(1, 12, 12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rgba = torch.cat([rgb, torch.full((1, 12, 12, 1), 0.3, dtype=torch.float64)], dim=-1)
    assert torch.equal(edges(rgba, 0.1, 0.2), edges(rgb, 0.1, 0.2))
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).sum(-1, keepdim=True)
    torch.testing.assert_close(edges(grey, 0.1, 0.2), edges(rgb, 0.1, 0.2), rtol=0, atol=0)


def test_comfyui_prompt_and_threshold_order():
    engine = Engine(Settings(device="cpu"))
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    engine.load(prompt)
    prompt["2"]["inputs"].update(low_threshold=0.9, high_threshold=0.5)  # kornia refuses this when it runs
    with pytest.raises(WorkflowError) as info:
        engine.load(prompt)
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("2", "low_threshold") and "above high_threshold" in str(issue)
    prompt["2"]["inputs"].update(low_threshold=0.0, high_threshold=0.5)
    with pytest.raises(WorkflowError):
        engine.load(prompt)  # ComfyUI's range starts at 0.01
