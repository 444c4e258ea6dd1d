"""A styled variant of the shapes dataset, a measure of the style, and the recipe of the style
LoRA and hypernetwork shipped with graphsd.

Style "stripes": the shape keeps its outline and colour, but every other horizontal band of
:data:`BAND` pixels is drawn in a darker shade of its colour (× :data:`SHADE`). Captions are
unchanged, so the style lives in the patch, not in the prompt.

:func:`stripe_score` measures the style without a learned model: horizontal bands make
intensities differ between pixels :data:`BAND` rows apart far more than between pixels
:data:`BAND` columns apart, whereas a plain circle, square or triangle gives about the same
difference both ways (only at its edges). The score is the mean vertical minus the mean
horizontal absolute difference at that lag, in units of the 0–1 intensity range.

Recipe (``python -m graphsd.training.styles --model graphsd-tiny --out DIR``): encode a
striped dataset with graphsd-tiny's VAE and text encoder and train, through the
``TrainLoRA`` / ``TrainHypernetwork`` nodes, a rank-8 LoRA on the attention and
feed-forward layers and a ``[1, 2, 1]`` hypernetwork (see :data:`RECIPE`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphsd.training.shapes import BACKGROUNDS, ShapesDataset
from graphsd.types import Dataset

BAND = 12
SHADE = 0.45


def add_stripes(image: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Darken every other horizontal band of the shape's pixels (those not of the background
    colour; shapes are drawn without anti-aliasing, so the test is exact)."""
    out = image.copy()
    shape = np.any(image != np.asarray(background, dtype=np.uint8), axis=-1)
    rows = (np.arange(image.shape[0]) // BAND) % 2 == 1
    dark = shape & rows[:, None]
    out[dark] = (image[dark].astype(np.float32) * SHADE).round().astype(np.uint8)
    return out


class StripedShapes:
    """:class:`~graphsd.training.shapes.ShapesDataset` with the stripes style; same samples
    and captions."""

    def __init__(self, seed: int = 0, count: int = 1000, resolution: int = 128):
        self.plain = ShapesDataset(seed=seed, count=count, resolution=resolution, held_out=True)

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        image, text = self.plain[index]
        background = BACKGROUNDS[self.plain.sample(index).combo[2]]
        return add_stripes(image, background), text


class ImageSet(Dataset):
    """A Dataset socket value over any sequence of ``(uint8 image [H, W, 3], caption)``."""

    def __init__(self, samples: Any):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        return self.samples[index]


def stripe_score(image: Any) -> float:
    """Mean |I(y + BAND) − I(y)| − mean |I(x + BAND) − I(x)| of the grey-level image in [0, 1]
    (accepts a uint8 or float ``[H, W, 3]`` array)."""
    arr = np.asarray(image, dtype=np.float64)
    grey = (arr / 255.0 if arr.max() > 1.0 else arr)[..., :3].mean(axis=-1)
    vertical = np.abs(grey[BAND:, :] - grey[:-BAND, :]).mean()
    horizontal = np.abs(grey[:, BAND:] - grey[:, :-BAND]).mean()
    return float(vertical - horizontal)


#: Settings of the shipped patches (trained on CPU).
RECIPE = {
    "dataset": {"seed": 11, "count": 384},
    "lora": {"rank": 8, "alpha": 8.0, "targets": "attention_ff", "steps": 600, "lr": 2e-3, "batch_size": 8, "seed": 0},
    "hypernetwork": {"layer_structure": "1, 2, 1", "activation": "relu", "steps": 600, "lr": 2e-3, "batch_size": 8, "seed": 0},
}


def recipe_workflow(model: str, kind: str, name: str) -> dict:
    """The workflow that trains one shipped patch (``kind``: lora or hypernetwork)."""
    node = {"lora": "TrainLoRA", "hypernetwork": "TrainHypernetwork"}[kind]
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": model}},
            "data": {"type": "StripedShapesDataset", "inputs": RECIPE["dataset"]},
            "train": {"type": node, "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                "dataset": "@data.dataset", "name": name, **RECIPE[kind]}},
        },
    }


def main(argv: list[str] | None = None) -> None:
    from graphsd import Engine, Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="graphsd-tiny")
    parser.add_argument("--out", required=True, help="output folder (loras/ and hypernetworks/ are written inside)")
    parser.add_argument("--only", choices=("lora", "hypernetwork"))
    args = parser.parse_args(argv)
    engine = Engine(Settings(device="cpu", output_dir=args.out, load_entry_points=False))
    for kind in ("lora", "hypernetwork"):
        if args.only not in (None, kind):
            continue
        started = time.monotonic()
        result = engine.run(recipe_workflow(args.model, kind, "stripes"), outputs=["train"],
                            on_event=lambda e: print(e.to_dict()) if getattr(e, "value", 1) % 50 == 0 and e.kind == "progress" else None)
        if not result.ok:
            raise SystemExit("\n".join(str(e) for e in result.errors))
        out = result.outputs["train"]
        print(json.dumps({"kind": kind, "path": out["path"], "loss": out["loss"], "seconds": round(time.monotonic() - started)}))


if __name__ == "__main__":
    main()
