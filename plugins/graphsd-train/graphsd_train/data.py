"""Image–caption datasets as the training code consumes them.

A dataset is any sequence whose items are ``(image, caption)`` with the image a uint8
``[H, W, 3]`` array (see :class:`~graphsd_train.shapes.ShapesDataset`). Training loads all
images once into one uint8 tensor (:func:`load_images`), so the VAE sees each image only when
it is trained and when the latents are encoded, never again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from graphsd.types import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CaptionedImages(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]: ...


def square_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize (bicubic) to ``resolution`` × ``resolution`` RGB."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class ImageFolderDataset:
    """Images in a folder, each with a caption in a text file of the same stem
    (``cat.png`` + ``cat.txt``); images without a caption file get an empty caption.
    Files are taken in sorted name order, so the dataset is the same on every machine."""

    def __init__(self, folder: str | Path, resolution: int = 128):
        self.folder, self.resolution = Path(folder), resolution
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {str(self.folder)!r} does not exist")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        path = self.files[index]
        text_file = path.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.exists() else ""
        with Image.open(path) as im:
            return square_resize(im, self.resolution), text


def load_images(dataset: Sequence | CaptionedImages, resolution: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """All images as one uint8 tensor ``[N, 3, H, W]`` plus the list of captions.

    With ``resolution`` set, images of another size are centre-cropped and resized to it."""
    pixels, captions = [], []
    for i in range(len(dataset)):
        image, text = dataset[i]
        if resolution is not None and image.shape[:2] != (resolution, resolution):
            image = square_resize(Image.fromarray(image), resolution)
        pixels.append(torch.from_numpy(np.array(image, dtype=np.uint8)))
        captions.append(text)
    if not pixels:
        raise ValueError("the dataset is empty")
    return torch.stack(pixels).permute(0, 3, 1, 2).contiguous(), captions


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], the VAE's input range."""
    return pixels.float() / 127.5 - 1.0


class ImageSet(Dataset):
    """A Dataset socket value over any sequence of ``(uint8 image [H, W, 3], caption)``."""

    def __init__(self, samples: Any):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        return self.samples[index]
