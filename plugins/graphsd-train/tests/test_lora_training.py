"""TrainLoRA and TrainHypernetwork through ``Engine.run``: the written files load in diffusers
/ in graphsd's loaders with the same result, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import sd_tiny
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from reference import assert_same, diffusers_noise_in_float32
from safetensors.torch import load_file

from graphsd import Engine, Settings
from graphsd.std.models.hypernetwork import load_hypernetwork

warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

PLUGIN_ROOT = Path(__file__).resolve().parents[1]

DATASET_PLUGIN = '''
from pydantic import Field
from graphsd import Node, NodeIO, hookimpl
from graphsd_train.shapes import ShapesDataset
from graphsd.types import Dataset


class Shapes(Dataset):
    def __init__(self, count, resolution):
        self.data = ShapesDataset(seed=3, count=count, resolution=resolution)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


class TestShapes(Node):
    type = "TestShapes"

    class Inputs(NodeIO):
        count: int = Field(8)

    class Outputs(NodeIO):
        dataset: Dataset

    def run(self, inputs, ctx):
        return self.Outputs(dataset=Shapes(inputs.count, 64))


@hookimpl
def graphsd_register_nodes():
    return [TestShapes]
'''


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    sd_tiny.save_sd1(root / "models" / "sd1")
    (root / "plugins").mkdir()
    (root / "plugins" / "test_shapes.py").write_text(textwrap.dedent(DATASET_PLUGIN))
    settings = Settings(device="cpu", models_dir=str(root / "models"), output_dir=str(root / "out"),
                        plugins_dirs=[str(root / "plugins"), str(PLUGIN_ROOT)], load_entry_points=False)
    return Engine(settings)


def nodes(train_type, **train_inputs):
    return {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "data": {"type": "TestShapes", "inputs": {"count": 8}},
        "train": {"type": train_type, "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                  "dataset": "@data.dataset", "batch_size": 4, "lr": 1e-2, **train_inputs}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle on a white background"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": 5, "width": 64, "height": 64}},
        "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": "@train.unet", "positive": "@pos.cond",
                                                           "noise": "@noise.noise", "steps": 3, "cfg": 1.0, "sampler": "euler"}},
    }


def run(engine, doc_nodes, *outputs):
    result = engine.run({"version": 1, "nodes": doc_nodes}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


def test_trained_lora_is_kohya_and_loads_in_diffusers(engine):
    """Training runs in float32 (as it must). The written file is then compared in float64 on
    both sides (reference.py): graphsd's LoraLoader on the checkpoint loaded as fp64 against
    diffusers' load_lora_weights on a float64 pipeline. TrainLoRA's own U-Net output carries
    exactly the numbers written to the file, at strength 1."""
    out = run(engine, nodes("TrainLoRA", name="trained", steps=4, rank=2, alpha=1.0), "train")
    path = out["train"]["path"]
    sd = load_file(path)
    assert sd and all(k.startswith("lora_unet_") and k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in sd)
    assert any(k.endswith("attn2_to_k.lora_up.weight") and v.abs().max() > 0 for k, v in sd.items())
    [patch] = out["train"]["unet"].patches
    assert patch.strengths == {"unet": 1.0} and sum(len(layers) for layers in patch.layers.values()) == len(sd) // 3
    for key, target in patch.lora.targets.items():
        layer = target.layer
        assert torch.equal(layer.tensors["down"], sd[f"{key}.lora_down.weight"])
        assert torch.equal(layer.tensors["up"], sd[f"{key}.lora_up.weight"])
        assert layer.alpha == sd[f"{key}.alpha"].item()

    doc = nodes("TrainLoRA")
    del doc["train"], doc["data"]
    doc["model"]["inputs"]["dtype"] = "fp64"
    doc["lora"] = {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": path, "strength_model": 1.0}}
    doc["denoise"]["inputs"]["unet"] = "@lora.unet"
    doc["plain"] = dict(doc["denoise"], inputs=dict(doc["denoise"]["inputs"], unet="@model.unet"))
    ours = run(engine, doc, "denoise", "plain", "pos")

    pipe = StableDiffusionPipeline.from_pretrained(str(engine.settings.models_dir) + "/sd1", local_files_only=True,
                                                   safety_checker=None).to(dtype=torch.float64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float64}  # PEFT's LoRA layers too
    with diffusers_noise_in_float32():
        reference = pipe(prompt_embeds=ours["pos"]["cond"].embeddings, num_inference_steps=3, guidance_scale=1.0, height=64,
                         width=64, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert (ours["denoise"]["latent"].samples - ours["plain"]["latent"].samples).abs().max() > 1e-3  # the LoRA does something
    assert_same(ours["denoise"]["latent"].samples, reference, "latent")


def test_resumed_lora_training_equals_one_run(engine):
    whole = run(engine, nodes("TrainLoRA", name="whole", steps=6, rank=2, seed=1), "train")["train"]
    run(engine, nodes("TrainLoRA", name="parts", steps=3, rank=2, seed=1), "train")
    parts = run(engine, nodes("TrainLoRA", name="parts", steps=6, rank=2, seed=1, resume=True), "train")["train"]
    a, b = load_file(whole["path"]), load_file(parts["path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert parts["loss"] == whole["loss"]


def test_trained_hypernetwork_is_a1111_and_reloads(engine, monkeypatch):
    doc = nodes("TrainHypernetwork", name="hn", steps=3, layer_structure="1, 2, 1", activation="relu")
    out = run(engine, doc, "train", "denoise")
    hn = load_hypernetwork(out["train"]["path"], allow_pickle=True)
    assert hn.widths == [32, 64] and hn.meta["layer_structure"] == [1, 2, 1] and hn.meta["step"] == 3
    raw = torch.load(out["train"]["path"], weights_only=True)
    assert raw["activation_func"] == "relu" and set(raw[32][0]) == {"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"}
    monkeypatch.setattr(engine.settings, "allow_pickle", True)  # as --allow-pickle does
    doc["hn"] = {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": out["train"]["path"]}}
    doc["denoise"]["inputs"]["unet"] = "@hn.unet"
    reloaded = run(engine, doc, "denoise")
    # The same computation on the same numbers: the same U-Net, cond and noise, and hooks whose
    # nets hold the trained values (written and read back exactly) in freshly allocated float32
    # tensors on both sides. So the latents are equal bit for bit.
    assert torch.equal(reloaded["denoise"]["latent"].samples, out["denoise"]["latent"].samples)


def test_bad_layer_structure_is_explained(engine):
    result = engine.run({"version": 1, "nodes": nodes("TrainHypernetwork", name="x", steps=1, layer_structure="2, 1")}, outputs=["train"])
    [error] = result.errors
    assert error.node_id == "train" and "starting and ending with 1" in error.message
