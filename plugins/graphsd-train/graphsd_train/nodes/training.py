"""Training nodes: build a text-to-image model from nothing, save it, and judge what it draws.

``ShapesDataset`` / ``ImageFolderDataset`` → ``TrainVAE`` → ``TrainUNet`` (U-Net and CLIP text
encoder trained jointly on latents encoded once) → ``SaveModel`` (a diffusers folder under the
output directory, loadable by ``CheckpointLoader``); ``EvaluateShapes`` scores generated images
of the shapes dataset. ``workflows/train_tiny.yaml`` is the recipe of the built-in graphsd-tiny.
The methods are in :mod:`graphsd_train` (one module per step).
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.node import Node, NodeIO
from graphsd.paths import safe_output_path
from graphsd.types import Dataset, Image, TrainedModel
from graphsd_train.architecture import NOISE_SCHEDULE, TextEncoderShape, UNetShape, VAEShape
from graphsd_train.data import ImageFolderDataset as FolderImages
from graphsd_train.data import ImageSet, load_images
from graphsd_train.diffusion import CHECKPOINT_NAME, DiffusionTraining, train_diffusion
from graphsd_train.export import save_pipeline
from graphsd_train.shapes import ShapesDataset as Shapes
from graphsd_train.tokenizer import tokenize, train_tokenizer, vocab_info
from graphsd_train.vae import VAETraining, encode_latents, set_scale_factor, train_vae


@dataclass(eq=False)
class TrainedDiffusionModel(TrainedModel):
    """In-memory components of a model being trained (CPU, eval mode). ``TrainVAE`` fills
    ``vae``; ``TrainUNet`` adds ``unet``, ``text_encoder`` and ``tokenizer``."""

    vae: Any
    unet: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    schedule: dict = field(default_factory=lambda: dict(NOISE_SCHEDULE))
    record: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(x is not None for x in (self.vae, self.unet, self.text_encoder, self.tokenizer))


def _widths(text: str, name: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(","))
    except ValueError:
        widths = ()
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise NodeError(f"{name} must be comma-separated positive widths, one per level, e.g. '64,128,192'", field=name)
    return widths


def _groups(widths: tuple[int, ...]) -> int:
    """GroupNorm groups: the largest divisor of every width, at most 32 (SD uses 32)."""
    return math.gcd(reduce(math.gcd, widths), 32)


def _pixels(dataset: Any) -> tuple[Any, list[str]]:
    try:
        return load_images(dataset)
    except (TypeError, ValueError) as exc:
        raise NodeError(f"cannot read the dataset: {exc}", field="dataset") from None


def _progress(ctx: Context, stage: str):
    return lambda step, total, loss: ctx.progress(step, total, loss=loss, stage=stage)


class ShapesDataset(Node):
    type = "ShapesDataset"
    category = "training"
    description = (
        "Synthetic captioned images 'a {color} {shape} on a {background} background' (6 colours, 3 shapes, "
        "3 backgrounds), fully determined by the seed; optionally without the 6 held-out combinations."
    )

    class Inputs(NodeIO):
        seed: int = Field(0, ge=0, description="Seed of the samples (combination order, size, position)")
        count: int = Field(1000, ge=1, le=200_000, description="Number of samples")
        resolution: int = Field(128, ge=32, le=1024, multiple_of=8, description="Image side in pixels")
        held_out: bool = Field(True, description="Leave out the 6 held-out combinations (for measuring generalisation)")

    class Outputs(NodeIO):
        dataset: Dataset = Field(description="Images with captions")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(dataset=ImageSet(Shapes(inputs.seed, inputs.count, inputs.resolution, inputs.held_out)))


class ImageFolderDataset(Node):
    type = "ImageFolderDataset"
    category = "training"
    description = "Images of a folder (png, jpg, webp, bmp), each captioned by the .txt file of the same name."

    class Inputs(NodeIO):
        folder: str = Field(description="Folder holding the images and their .txt captions")
        resolution: int = Field(128, ge=32, le=1024, multiple_of=8, description="Images are centre-cropped and resized to this side")

    class Outputs(NodeIO):
        dataset: Dataset = Field(description="Images with captions")

    @classmethod
    def fingerprint(cls, literals: dict[str, Any], ctx: Context) -> str:
        """Names, sizes and mtimes of the folder's files: editing a caption invalidates the cache."""
        folder = Path(str(literals.get("folder", "")))
        if not folder.is_dir():
            return "missing"
        return "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file())

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        try:
            images = FolderImages(ctx.readable(inputs.folder, "folder"), inputs.resolution)
        except FileNotFoundError as exc:
            raise NodeError(f"{exc}; give an existing folder of images with .txt captions", field="folder") from None
        if len(images) == 0:
            raise NodeError(f"no images in {inputs.folder!r} (png, jpg, jpeg, webp or bmp)", field="folder")
        return self.Outputs(dataset=ImageSet(images))


class TrainVAE(Node):
    type = "TrainVAE"
    category = "training"
    description = "Train an AutoencoderKL (×8 downsampling with 4 levels, 4 latent channels) on a dataset's images: MSE + small KL."

    class Inputs(NodeIO):
        dataset: Dataset = Field(description="Training images (square, side a multiple of 8)")
        steps: int = Field(2000, ge=1, le=1_000_000, description="Optimizer steps")
        batch_size: int = Field(64, ge=1, le=4096, description="Images per step")
        lr: float = Field(5e-4, gt=0, le=1.0, description="AdamW learning rate")
        kl_weight: float = Field(1e-4, ge=0, description="Weight of the KL term (per-element means)")
        seed: int = Field(0, ge=0, description="Seed of the initial weights and of the batches")
        channels: str = Field("32,64,128,128", description="Widths of the encoder/decoder levels; n levels halve n-1 times")

    class Outputs(NodeIO):
        model: TrainedModel = Field(description="The trained VAE (feed TrainUNet)")
        loss: float = Field(description="Mean loss of the last 10% of steps")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        widths = _widths(inputs.channels, "channels")
        pixels, _ = _pixels(inputs.dataset)
        if pixels.shape[-1] % 2 ** (len(widths) - 1):
            raise NodeError(f"image side {pixels.shape[-1]} is not divisible by {2 ** (len(widths) - 1)}", field="channels")
        shape = VAEShape(widths, norm_groups=_groups(widths))
        cfg = VAETraining(inputs.steps, inputs.batch_size, inputs.lr, inputs.kl_weight, inputs.seed, shape)
        losses: list[float] = []

        def progress(step: int, total: int, loss: float) -> None:
            losses.append(loss)
            ctx.progress(step, total, loss=loss, stage="vae")

        vae = train_vae(pixels, cfg, ctx.device, progress)
        tail = losses[-max(1, len(losses) // 10):]
        return self.Outputs(model=TrainedDiffusionModel(vae=vae), loss=sum(tail) / len(tail))


class TrainUNet(Node):
    type = "TrainUNet"
    category = "training"
    description = (
        "Train a text-conditioned UNet2DConditionModel (ε-prediction, SD noise schedule) together with a small "
        "CLIP text encoder and a BPE tokenizer learnt from the captions; latents are encoded once with the VAE."
    )

    class Inputs(NodeIO):
        dataset: Dataset = Field(description="Training images with captions")
        vae: TrainedModel = Field(description="A trained VAE (from TrainVAE)")
        steps: int = Field(4000, ge=1, le=10_000_000, description="Optimizer steps")
        batch_size: int = Field(256, ge=1, le=8192, description="Latents per step")
        lr: float = Field(4e-4, gt=0, le=1.0, description="Peak AdamW learning rate (warm-up, then cosine to 10%)")
        seed: int = Field(0, ge=0, description="Seed of the initial weights, batches, timesteps and noise")
        caption_dropout: float = Field(0.1, ge=0, le=1, description="Probability of training on the empty caption (for CFG)")
        ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the weights' moving average that is returned")
        unet_channels: str = Field("64,128,192", description="U-Net level widths (cross-attention in all but the last)")
        layers_per_block: int = Field(1, ge=1, le=4, description="ResNet (+ attention) layers per U-Net level")
        text_width: int = Field(128, ge=8, le=2048, description="Text encoder width (= cross-attention width)")
        text_layers: int = Field(4, ge=1, le=24, description="Text encoder transformer layers")
        text_heads: int = Field(4, ge=1, le=32, description="Text encoder attention heads (must divide text_width)")
        checkpoint_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end)")
        resume: bool = Field(
            False, description="Continue from the checkpoint of an earlier run with the same name (false: start afresh, removing it)"
        )
        name: str = Field("graphsd-tiny", description="Checkpoint folder: <output_dir>/checkpoints/<name>")

    class Outputs(NodeIO):
        model: TrainedModel = Field(description="VAE, U-Net, text encoder and tokenizer (feed SaveModel)")
        loss: float = Field(description="Mean loss of the last 10% of steps")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        vae = inputs.vae
        if not isinstance(vae, TrainedDiffusionModel) or vae.vae is None:
            raise NodeError("needs the model output of TrainVAE", field="vae")
        widths = _widths(inputs.unet_channels, "unet_channels")
        if inputs.text_width % inputs.text_heads:
            raise NodeError(f"text_width {inputs.text_width} is not divisible by text_heads {inputs.text_heads}", field="text_heads")
        pixels, captions = _pixels(inputs.dataset)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_tokenizer(captions, tmp)
        autoencoder = copy.deepcopy(vae.vae)  # the scale factor is set on a copy: upstream outputs stay as they were
        latents = encode_latents(autoencoder, pixels, ctx.device)
        scale = set_scale_factor(autoencoder, latents)
        cfg = DiffusionTraining(
            steps=inputs.steps, batch_size=inputs.batch_size, lr=inputs.lr, warmup=min(200, max(1, inputs.steps // 10)),
            caption_dropout=inputs.caption_dropout, ema_decay=inputs.ema_decay, seed=inputs.seed,
            checkpoint_every=inputs.checkpoint_every,
            unet=UNetShape(widths, inputs.layers_per_block, attention_heads=math.gcd(8, widths[0]), norm_groups=_groups(widths)),
            text=TextEncoderShape(inputs.text_width, inputs.text_layers, inputs.text_heads),
        )
        ckpt_dir = safe_output_path(ctx.output_dir, f"checkpoints/{inputs.name}", field="name")
        if not inputs.resume:
            (ckpt_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        try:
            trained = train_diffusion(
                latents * scale, tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0], vocab_info(tokenizer),
                cfg, ctx.device, _progress(ctx, "unet"), ckpt_dir,
            )
        except ValueError as exc:
            raise NodeError(f"{exc}; use the settings of the run that wrote it, or set resume to false", field="resume") from None
        tail = trained.losses[-max(1, len(trained.losses) // 10):]
        record = {**vae.record, "unet_steps": trained.steps_done, "latent_scale_factor": scale}
        model = TrainedDiffusionModel(autoencoder, trained.unet, trained.text_encoder, tokenizer, dict(cfg.schedule), record)
        return self.Outputs(model=model, loss=sum(tail) / len(tail))


class SaveModel(Node):
    type = "SaveModel"
    category = "training"
    output_node = True
    description = (
        "Write a trained model as a diffusers folder (fp16 safetensors) under the output directory, atomically; "
        "never deletes or replaces anything unless overwrite is set."
    )

    class Inputs(NodeIO):
        model: TrainedModel = Field(description="A complete model (from TrainUNet)")
        name: str = Field("graphsd-tiny", description="Folder name (or relative path) inside the output directory")
        dtype: Literal["fp16", "fp32"] = Field("fp16", description="Weight precision of the saved files")
        overwrite: bool = Field(
            False,
            description=(
                "Replace a model folder of this name. Without it nothing existing is touched: a taken "
                "name is saved as <name>_2, <name>_3, ...; a folder that is not a model is never replaced"
            ),
        )

    class Outputs(NodeIO):
        path: str = Field(description="The written folder (feed CheckpointLoader.path)")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        model = inputs.model
        if not isinstance(model, TrainedDiffusionModel) or not model.complete:
            raise NodeError("needs the model output of TrainUNet (VAE, U-Net, text encoder and tokenizer)", field="model")
        folder = safe_output_path(ctx.output_dir, inputs.name, field="name")
        dtype = torch.float16 if inputs.dtype == "fp16" else torch.float32
        folder = save_pipeline(folder, model.unet, model.vae, model.text_encoder, model.tokenizer, model.schedule,
                               dtype=dtype, overwrite=inputs.overwrite)
        ctx.wrote_file(folder)
        return self.Outputs(path=str(folder))


class EvaluateShapes(Node):
    type = "EvaluateShapes"
    category = "training"
    output_node = True
    description = (
        "Check by pixel analysis that images show the caption 'a {color} {shape} on a {background} background': "
        "score = fraction of shape, colour and background that are right, averaged over the batch."
    )

    class Inputs(NodeIO):
        image: Image = Field(description="Generated image(s)")
        caption: str = Field(description="What the image should show, e.g. 'a red circle on a white background'")

    class Outputs(NodeIO):
        score: float = Field(description="Mean fraction of correct attributes (1.0 = all right)")
        correct: bool = Field(description="Every image has all three attributes right")
        report: str = Field(description="One line per image: what was expected and what was seen")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        try:
            from graphsd_train.evaluate import score_image  # here: it imports scipy, seconds at every start-up

            scores = [score_image(px.cpu().numpy(), inputs.caption) for px in inputs.image.pixels]
        except ValueError as exc:
            raise NodeError(str(exc), field="caption") from None
        return self.Outputs(
            score=sum(s.score for s in scores) / len(scores),
            correct=all(s.correct for s in scores),
            report="\n".join(s.report() for s in scores),
        )


#: The node classes of this module, registered by :func:`graphsd_train.graphsd_register_nodes`.
NODES: list[type[Node]] = [ShapesDataset, ImageFolderDataset, TrainVAE, TrainUNet, SaveModel, EvaluateShapes]
