"""A styled variant of the shapes dataset, a measure of the style, and the recipe of the style
LoRA and hypernetwork shipped with graphsd.

Style "night": every background becomes black while the shape keeps its form, colour, size
and position; captions are unchanged ("... on a white background"), so the style lives in the
patch, not in the prompt. (graphsd-tiny's VAE only reproduces the flat palette it was trained
on: finer styles such as stripes, outlines or pastel tints do not survive its encoder, so a
patch could not learn them.)

:func:`night_score` measures the style without a learned model: one minus the mean grey level
(0–1) of the image's two-pixel border, which is background in every shapes image.

Recipe (``python -m graphsd_train.styles --out DIR``): encode a night-styled dataset with
graphsd-tiny's VAE and text encoder and train, through the ``TrainLoRA`` /
``TrainHypernetwork`` nodes, a rank-8 LoRA on the attention and feed-forward layers and a
``[1, 2, 1]`` hypernetwork (see :data:`RECIPE`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from graphsd_train.shapes import BACKGROUNDS, ShapesDataset

NIGHT = (0, 0, 0)


def to_night(image: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Paint the background pixels black (shapes are drawn without anti-aliasing, so every
    pixel of the background colour is background)."""
    out = image.copy()
    out[np.all(image == np.asarray(background, dtype=np.uint8), axis=-1)] = NIGHT
    return out


class NightShapes:
    """:class:`~graphsd_train.shapes.ShapesDataset` in the night style: same samples and
    captions, black backgrounds."""

    def __init__(self, seed: int = 0, count: int = 1000, resolution: int = 128):
        self.plain = ShapesDataset(seed=seed, count=count, resolution=resolution, held_out=True)

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        image, text = self.plain[index]
        return to_night(image, BACKGROUNDS[self.plain.sample(index).combo[2]]), text


def night_score(image: Any) -> float:
    """1 − mean grey level of the 2-pixel border (accepts uint8 or float ``[H, W, 3]``)."""
    arr = np.asarray(image)
    grey = (arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 1.0))[..., :3].mean(axis=-1)
    border = np.concatenate([grey[:2].ravel(), grey[-2:].ravel(), grey[:, :2].ravel(), grey[:, -2:].ravel()])
    return float(1.0 - border.mean())


#: Settings of the shipped patches (trained on CPU).
RECIPE = {
    "dataset": {"seed": 11, "count": 384},
    "lora": {"rank": 8, "alpha": 8.0, "targets": "attention_ff", "steps": 1000, "lr": 3e-3, "batch_size": 8, "seed": 0},
    "hypernetwork": {"layer_structure": "1, 2, 1", "activation": "relu", "steps": 1000, "lr": 2e-3, "batch_size": 8, "seed": 0},
}


def recipe_workflow(model: str, kind: str, name: str) -> dict:
    """The workflow that trains one shipped patch (``kind``: lora or hypernetwork)."""
    node = {"lora": "TrainLoRA", "hypernetwork": "TrainHypernetwork"}[kind]
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": model}},
            "data": {"type": "NightShapesDataset", "inputs": RECIPE["dataset"]},
            "train": {"type": node, "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                "dataset": "@data.dataset", "name": name, **RECIPE[kind]}},
        },
    }


def _print_progress(event: Any) -> None:
    if event.kind == "progress" and event.value % 50 == 0:
        print(f"step {event.value}/{event.total} loss {event.info.get('loss', float('nan')):.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from graphsd import Engine, Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="graphsd-tiny")
    parser.add_argument("--out", required=True, help="output folder (loras/ and hypernetworks/ are written inside)")
    parser.add_argument("--only", choices=("lora", "hypernetwork"))
    args = parser.parse_args(argv)
    engine = Engine(Settings(device="cpu", output_dir=args.out))  # the training nodes come from this package's entry point
    for kind in ("lora", "hypernetwork"):
        if args.only not in (None, kind):
            continue
        started = time.monotonic()
        result = engine.run(recipe_workflow(args.model, kind, "night"), outputs=["train"], on_event=_print_progress)
        if not result.ok:
            raise SystemExit("\n".join(str(e) for e in result.errors))
        out = result.outputs["train"]
        print(json.dumps({"kind": kind, "path": out["path"], "loss": out["loss"], "seconds": round(time.monotonic() - started)}))


if __name__ == "__main__":
    main()
