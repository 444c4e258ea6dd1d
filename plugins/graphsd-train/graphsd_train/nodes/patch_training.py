"""Train style patches from a dataset: TrainLoRA (kohya-format safetensors) and
TrainHypernetwork (A1111 ``.pt``). See :mod:`graphsd_train.lora` for the method.

Both encode the dataset once (VAE posterior mean × the VAE scale factor; each caption with the
model's text encoder(s), frozen, as ``TextEncode`` does), train the adapter on the frozen U-Net,
write ``<output_dir>/loras/<name>.safetensors`` or ``<output_dir>/hypernetworks/<name>.pt``
and return the U-Net with the result applied at strength 1. With ``resume``, a run continues
from the training state saved beside the file by an earlier run of the same name
(``<name>.train_state.pt``: weights, optimizer, random generator, step), so raising ``steps``
trains on exactly as if the run had never stopped.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from graphsd.context import Context
from graphsd.errors import NodeError
from graphsd.node import Node, NodeIO
from graphsd.paths import file_fingerprint, safe_output_path, write_atomic
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, model_info
from graphsd.std.models.hypernetwork import HypernetworkPatch, save_hypernetwork
from graphsd.std.models.lora import LoraPatch, match_lora, parse_lora
from graphsd.std.text.encode import encode_prompt
from graphsd.types import Clip, Dataset, UNet, Vae
from graphsd_train.data import ImageSet, load_images, to_model_range
from graphsd_train.lora import (
    AdapterTraining,
    TrainingData,
    lora_state_dict,
    make_hypernetwork,
    make_lora,
    save_lora,
    train_hypernetwork,
    train_lora,
)
from graphsd_train.styles import NightShapes

ACTIVATION_CHOICES = Literal["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish", "gelu", "silu"]


@torch.no_grad()
def encode_dataset(dataset: Any, unet: UNet, clip: Clip, vae: Vae, ctx: Context) -> TrainingData:
    """Latents and text contexts of every sample of ``dataset`` (a sequence of
    ``(uint8 image [H, W, 3], caption)``), resized to the U-Net's native resolution."""
    size = int(ctx.models.get(unet.keys["unet"]).config.sample_size) * model_info(unet, "unet").latent_downscale
    try:
        pixels, captions = load_images(dataset, size)
    except (TypeError, ValueError) as exc:
        raise NodeError(f"cannot read the dataset: {exc}", field="dataset") from None
    vae_info = model_info(vae, "vae")
    scale, shift = vae_info.scaling_factor, vae_info.shift_factor
    with ctx.models.use(vae, "vae") as model:
        p = next(model.parameters())
        latents = torch.cat([
            (model.encode(to_model_range(pixels[i:i + 16]).to(p.device, p.dtype)).latent_dist.mean.float().cpu() - shift) * scale
            for i in range(0, len(pixels), 16)
        ])
    tokenizers = model_info(clip, "clip").tokenizers
    roles = [r for r in TOKENIZER_OF_ENCODER if r in clip.keys]
    sdxl = "text_encoder_2" in roles
    unique: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with ExitStack() as stack:
        encoders = [(tokenizers[r], stack.enter_context(ctx.models.use(clip, r))) for r in roles]
        for text in dict.fromkeys(captions):
            unique[text] = encode_prompt(text, encoders, 1, sdxl=sdxl)
    lengths = {unique[c][0].shape[1] for c in captions}
    if len(lengths) != 1:
        raise NodeError("captions longer than 75 tokens are not supported for training; shorten them", field="dataset")
    contexts = torch.cat([unique[c][0] for c in captions]).float()
    pooled = torch.cat([unique[c][1] for c in captions]).float() if sdxl else None
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32) if sdxl else None
    return TrainingData(latents, contexts, pooled, time_ids)


def _output_file(ctx: Context, folder: str, name: str, suffix: str) -> Path:
    return safe_output_path(ctx.output_dir, f"{folder}/{name}{suffix}", field="name")


def _state_file(path: Path, resume: bool) -> Path:
    state = path.with_suffix(".train_state.pt")
    if not resume:
        state.unlink(missing_ok=True)
    return state


def _training(inputs: Any) -> AdapterTraining:
    return AdapterTraining(steps=inputs.steps, lr=inputs.lr, batch_size=inputs.batch_size, seed=inputs.seed)


def _progress(ctx: Context):
    return lambda step, total, loss: ctx.progress(step, total, loss=loss)


class _TrainInputs(NodeIO):
    unet: UNet = Field(description="The U-Net to adapt (load the checkpoint with dtype fp32)")
    clip: Clip = Field(description="Text encoder(s) that encode the captions (frozen)")
    vae: Vae = Field(description="The VAE that encodes the images (frozen)")
    dataset: Dataset = Field(description="Images with captions")
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimisation steps (in total, when resuming)")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(8, ge=1, le=1024, description="Samples per step")
    seed: int = Field(0, ge=0, description="Seed of initialisation, batches, timesteps and noise")
    name: str = Field(
        description="File name (without suffix) inside the output folder; a taken name is saved as <name>_2, ... (nothing is replaced)"
    )
    resume: bool = Field(False, description="Continue from the training state an earlier run of this name left")


class TrainLoRA(Node):
    type = "TrainLoRA"
    category = "training"
    description = "Train a LoRA on a frozen U-Net from images with captions; writes a kohya-format .safetensors file."
    output_node = True

    class Inputs(_TrainInputs):
        rank: int = Field(4, ge=1, le=256, description="LoRA rank (rows of lora_down)")
        alpha: float = Field(4.0, gt=0.0, le=1024.0, description="LoRA alpha: the delta is scaled by alpha / rank")
        targets: str = Field("attention", description="attention, attention_ff, all, or a regular expression on module paths")

    class Outputs(NodeIO):
        unet: UNet = Field(description="The U-Net with the trained LoRA applied at strength 1")
        path: str = Field(description="The written .safetensors file")
        loss: float = Field(description="Mean loss of the last 10 % of the steps")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        path = _output_file(ctx, "loras", inputs.name, ".safetensors")
        data = encode_dataset(inputs.dataset, inputs.unet, inputs.clip, inputs.vae, ctx)
        with ctx.models.use(inputs.unet, "unet") as unet:
            try:
                adapters = make_lora(unet, inputs.targets, inputs.rank, inputs.alpha, inputs.seed)
                record = train_lora(unet, data, adapters, _training(inputs), dict(model_info(inputs.unet, "unet").scheduler_config),
                                    _progress(ctx), _state_file(path, inputs.resume))
            except ValueError as exc:
                raise NodeError(str(exc)) from None
        path = write_atomic(path, lambda tmp: save_lora(adapters, tmp, {"ss_steps": str(record.steps_done)}))
        ctx.wrote_file(path)
        lora = parse_lora(lora_state_dict(adapters), path.name, file_fingerprint(path))
        match = match_lora(lora, {"unet": ctx.models.get(inputs.unet.keys["unet"])})
        patched = inputs.unet.with_patches(LoraPatch(lora, match.layers, {"unet": 1.0}))
        return self.Outputs(unet=patched, path=str(path), loss=_tail_mean(record.losses))


class TrainHypernetwork(Node):
    type = "TrainHypernetwork"
    category = "training"
    description = "Train an A1111 hypernetwork on a frozen U-Net from images with captions; writes a .pt file."
    output_node = True

    class Inputs(_TrainInputs):
        layer_structure: str = Field("1, 2, 1", description="Layer widths as multiples of the context width, from 1 to 1")
        activation: ACTIVATION_CHOICES = Field("relu", description="Activation after each hidden layer (A1111 names)")
        layer_norm: bool = Field(False, description="LayerNorm after every linear layer")
        dropout: bool = Field(False, description="Dropout (p=0.3) after hidden layers while training")

    class Outputs(NodeIO):
        unet: UNet = Field(description="The U-Net with the trained hypernetwork applied at strength 1")
        path: str = Field(description="The written .pt file")
        loss: float = Field(description="Mean loss of the last 10 % of the steps")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        structure = _layer_structure(inputs.layer_structure)
        path = _output_file(ctx, "hypernetworks", inputs.name, ".pt")
        data = encode_dataset(inputs.dataset, inputs.unet, inputs.clip, inputs.vae, ctx)
        with ctx.models.use(inputs.unet, "unet") as unet:
            hn = make_hypernetwork(unet, structure, inputs.activation, inputs.layer_norm, inputs.dropout, inputs.seed, inputs.name)
            try:
                record = train_hypernetwork(unet, data, hn, _training(inputs), dict(model_info(inputs.unet, "unet").scheduler_config),
                                            _progress(ctx), _state_file(path, inputs.resume))
            except ValueError as exc:
                raise NodeError(str(exc)) from None
        hn.cpu()
        path = write_atomic(path, lambda tmp: save_hypernetwork(hn, tmp))
        ctx.wrote_file(path)
        patched = inputs.unet.with_patches(HypernetworkPatch(hn, file_fingerprint(path), 1.0))
        return self.Outputs(unet=patched, path=str(path), loss=_tail_mean(record.losses))


class NightShapesDataset(Node):
    type = "NightShapesDataset"
    category = "training"
    description = ("The shapes dataset in the 'night' style (black background, shape unchanged), same captions: "
                   "the data the shipped style LoRA and hypernetwork were trained on.")

    class Inputs(NodeIO):
        seed: int = Field(0, ge=0, description="Seed of the samples (shape, colour, position, size)")
        count: int = Field(256, ge=1, le=100_000, description="Number of samples")
        resolution: int = Field(128, ge=32, le=1024, multiple_of=8, description="Image side in pixels")

    class Outputs(NodeIO):
        dataset: Dataset = Field(description="Night-style shape images with their captions")

    def run(self, inputs: Any, ctx: Context) -> NodeIO:
        return self.Outputs(dataset=ImageSet(NightShapes(inputs.seed, inputs.count, inputs.resolution)))


def _layer_structure(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        values = []
    if len(values) < 2 or values[0] != 1 or values[-1] != 1 or any(v <= 0 for v in values):
        raise NodeError(f"layer_structure {text!r} must be comma-separated positive numbers starting and ending with 1, e.g. '1, 2, 1'",
                        field="layer_structure")
    return [int(v) if v.is_integer() else v for v in values]


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return float(sum(tail) / len(tail)) if tail else float("nan")


#: The node classes of this module, registered by :func:`graphsd_train.graphsd_register_nodes`.
NODES: list[type[Node]] = [TrainLoRA, TrainHypernetwork, NightShapesDataset]
