"""ControlNets: ControlNetLoader / DiffControlNetLoader read the layouts ControlNets come in, and
ControlNetApply / ControlNetApplyAdvanced steer both denoise loops as ComfyUI does.

- Loading: the original layout is written here from its definition (the U-Net encoder's LDM
  names, ``input_hint_block``, ``zero_convs``, ``middle_block_out``), checked against diffusers'
  own reader of that layout (``convert_controlnet_checkpoint``); graphsd must read it, diffusers'
  single-file layout and a folder into the very weights and the same outputs.
- Sampling, diffusers convention: the latents equal diffusers' ``StableDiffusionControlNetPipeline``
  (one ControlNet, and two stacked ones as its ``MultiControlNetModel``) and
  ``StableDiffusionXLControlNetPipeline`` in float64, to ``reference.py``'s rounding bound.
  ``start_percent`` / ``end_percent`` are ComfyUI's window of noise levels, computed here from its
  published rule (sigma at timestep ``(1 - percent) · 999``), which maps onto the pipeline's
  ``control_guidance_start`` / ``end`` for these steps.
- Sampling, ComfyUI convention, through a ComfyUI API prompt: an Euler loop written here
  (k-diffusion's Euler on the model's sigmas, the hint cropped and resized by ComfyUI's rule,
  the ControlNet acting in its window) gives graphsd's latents.

The tiny ControlNets are made from the tiny U-Nets (``ControlNetModel.from_unet``) with random
weights in the layers it zero-initialises, so that they change the result: each parity test also
checks that the ControlNet moved the latents far beyond the tolerance.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import sd_tiny
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from PIL import Image as PILImage
from reference import U32, assert_same, diffusers_noise_in_float32, tolerance
from safetensors.torch import save_file

from graphsd import Engine, Settings
from graphsd.errors import WorkflowError
from graphsd.server.objectinfo import native_entry
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt
from graphsd.std.models.controlnet import Control, ControlNet
from graphsd.std.models.family import ModelInfo
from graphsd.std.nodes.controlnet import ControlNetApply, ControlNetApplyAdvanced
from graphsd.std.sampling.guidance import plan_guidance
from graphsd.std.sampling.sigmas import SigmaTable
from graphsd.types import Area, Conditioning, Image

SEED = 1234
ZERO_INITIALISED = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


def randomise(net: ControlNetModel, seed: int) -> ControlNetModel:
    """``net`` with random weights where ``from_unet`` puts zeros (else it would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(ZERO_INITIALISED):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def tiny_sdxl_controlnet(seed: int = 5) -> ControlNetModel:
    """A small ControlNet with SDXL base's added conditioning (256-wide numbers beside a
    1280-wide pooled embedding, as a single file must have) and two transformer layers in its
    second block; heads as the SDXL family has them for these widths (one per block)."""
    unet = sd_tiny.unet(
        seed,
        cross_attention_dim=64,
        use_linear_projection=True,
        attention_head_dim=[1, 1],
        transformer_layers_per_block=[1, 2],
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )
    return randomise(ControlNetModel.from_unet(unet), seed)


# ---- the original layout, from its definition ------------------------------------------------
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def original_names(config) -> dict[str, str]:
    """diffusers module → module of the original ControlNet: the U-Net encoder's LDM names
    (``input_blocks``: conv_in, then per block L resnets (+ attention) and a downsampler but after
    the last; ``middle_block``: resnet, attention, resnet), the hint encoder's convolutions at the
    even indices of ``input_hint_block``, one zero convolution per input block, ``middle_block_out``."""
    n, per = len(config["down_block_types"]), config["layers_per_block"]
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (2 * (len(config['conditioning_embedding_out_channels']) - 1) + 1)}",
        "controlnet_mid_block": "middle_block_out.0",
    }
    table |= {f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * j + 2}" for j in range(6)}
    table |= {f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(n * (per + 1))}
    for b in range(n):
        for j in range(per):
            table[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{1 + b * (per + 1) + j}.0"
            table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{1 + b * (per + 1) + j}.1"
        table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (per + 1)}.0.op"
    return table


def original_layout(net: ControlNetModel, prefix: str = "control_model.", state: dict | None = None) -> dict[str, torch.Tensor]:
    """``state`` (by default ``net``'s weights) under the original names, with ``prefix``."""
    table = original_names(net.config)
    added = {k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items()}
    table |= added  # SDXL's added conditioning, by diffusers' own table
    out = {}
    for key, value in (net.state_dict() if state is None else state).items():
        parts = key.split(".")
        cut = next(c for c in range(len(parts) - 1, 0, -1) if ".".join(parts[:c]) in table)
        rest = parts[cut:]
        if ".resnets." in ".".join(parts[:cut]) and rest[0] in RESNET:
            rest = [RESNET[rest[0]], *rest[1:]]
        out[prefix + ".".join([table[".".join(parts[:cut])], *rest])] = value.clone()
    return out


@pytest.mark.parametrize(
    "make", [lambda: randomise(ControlNetModel.from_unet(sd_tiny.unet(attention_head_dim=8)), 1), tiny_sdxl_controlnet]
)
def test_the_original_layout_written_here_is_what_diffusers_reads(make):
    net = make()
    converted = convert_controlnet_checkpoint(original_layout(net), dict(net.config))
    state = net.state_dict()
    added = [k for k in state if k.startswith("add_embedding.")]  # diffusers' converter leaves these to its U-Net table
    assert set(converted) == set(state) - set(added)
    assert all(torch.equal(converted[k], state[k]) for k in converted)


# ---- loading -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A models folder with controlnet/ in it."""
    root = tmp_path_factory.mktemp("models")
    (root / "controlnet").mkdir()
    return root


@pytest.fixture(scope="module")
def files(root):
    """<models>/controlnet with one tiny ControlNet in each layout."""
    folder = root / "controlnet"
    sd1 = randomise(ControlNetModel.from_unet(sd_tiny.unet(attention_head_dim=8)), 1)
    xl = tiny_sdxl_controlnet()
    save_file(original_layout(sd1), folder / "sd1_original.safetensors")
    torch.save(original_layout(sd1, prefix=""), folder / "sd1_original_bare.pth")
    save_file(sd1.state_dict(), folder / "sd1_diffusers.safetensors")
    save_file(original_layout(xl), folder / "xl_original.safetensors")
    save_file(xl.state_dict(), folder / "xl_diffusers.safetensors")
    sd1.save_pretrained(folder / "sd1_folder")
    return root, {"sd1": sd1, "xl": xl}


@pytest.fixture(scope="module")
def engines(root):
    """Engines on the models folder, without and with --allow-pickle."""
    return {
        allow: Engine(Settings(device="cpu", models_dir=str(root), output_dir=str(root / "out"), allow_pickle=allow))
        for allow in (False, True)
    }


def load(engine, name):
    return engine.run({"version": 1, "nodes": {"cn": {"type": "ControlNetLoader", "inputs": {"control_net_name": name}}}}, outputs=["cn"])


def refused(result, *says):
    """The run failed with a user error on ControlNetLoader's control_net_name (no traceback) that says ``says``."""
    assert not result.ok and len(result.errors) == 1
    error = result.errors[0]
    assert error.error_type == "NodeError" and "input 'control_net_name'" in error.message, error
    assert all(s in error.message for s in says), error.message


def loaded_module(result):
    handle = result.outputs["cn"]["control_net"]
    return handle.manager.get(handle.keys["controlnet"])


def settings(net) -> dict:
    """The config entries ``ControlNetModel`` is built from (lists and tuples alike)."""
    params = inspect.signature(ControlNetModel.__init__).parameters
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in net.config.items() if k in params}
    return out | {"upcast_attention": bool(out["upcast_attention"])}  # SDXL's config says null: off, as False


@pytest.mark.parametrize(
    "name,model",
    [
        ("sd1_original.safetensors", "sd1"),
        ("sd1_original_bare.pth", "sd1"),
        ("sd1_diffusers", "sd1"),
        ("sd1_folder", "sd1"),
        ("xl_original.safetensors", "xl"),
        ("xl_diffusers.safetensors", "xl"),
    ],
)
@pytest.mark.slow
def test_every_layout_loads_into_the_same_controlnet(files, engines, name, model):
    result = load(engines[name.endswith(".pth")], name)
    assert result.ok, [str(e) for e in result.errors]
    ours, theirs = loaded_module(result), files[1][model]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert settings(ours) == settings(theirs)  # heads, transformer depth, projections, ...: the same network


def test_a_pickle_controlnet_needs_allow_pickle(root, engines):
    torch.save({"zero_convs.0.0.weight": torch.zeros(1)}, root / "controlnet" / "bare.pth")
    result = load(engines[False], "bare.pth")
    refused(result, "--allow-pickle")


@pytest.mark.parametrize(
    "tensors,says",
    [
        ({"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, "Control-LoRA"),
        ({"adapter.body.0.resnets.0.block1.weight": torch.zeros(1)}, "T2I-Adapter"),
        ({"control_model.zero_convs.0.0.weight": torch.zeros(1), "task_embedding": torch.zeros(1)}, "union"),
        ({"controlnet_x_embedder.weight": torch.zeros(1)}, "SD3, Flux"),
        ({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, "not a ControlNet: it holds 1 tensors"),
    ],
)
def test_other_files_are_refused_by_name(engines, tmp_path, tensors, says):
    save_file(tensors, tmp_path / "x.safetensors")
    result = load(engines[False], str(tmp_path / "x.safetensors"))  # a path of its own
    refused(result, says)


def test_a_missing_controlnet_is_refused_at_validation_naming_the_folder_and_what_is_there(root, engines):
    save_file({"x": torch.zeros(1)}, root / "controlnet" / "canny.safetensors")
    workflow = {"version": 1, "nodes": {"cn": {"type": "ControlNetLoader", "inputs": {"control_net_name": "nothing.safetensors"}}}}
    with pytest.raises(WorkflowError) as excinfo:
        engines[False].load(workflow)
    [issue] = excinfo.value.issues
    assert (issue.node, issue.field) == ("cn", "control_net_name")
    text = f"{issue.message} {issue.hint or ''}"
    assert "canny.safetensors" in text and str(root / "controlnet") in text, text


@pytest.mark.slow
def test_a_difference_controlnet_gets_the_models_unet_added(tmp_path):
    """A diff ControlNet stores W - U for the layers the U-Net has; DiffControlNetLoader gives W
    back, up to the two float32 roundings (of W - U when written, of (W - U) + U when loaded),
    each within U32 of its result: |loaded - W| <= U32 (|W - U| + |W|) (1 + U32) < 2 U32 (|W| + |U|)."""
    sd_tiny.save_sd1(tmp_path / "sd1")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd1" / "unet")
    net = randomise(ControlNetModel.from_unet(sd_tiny.unet(seed=9, attention_head_dim=8)), 2)
    base = unet.state_dict()
    state = net.state_dict()
    shared = [k for k in state if k in base and base[k].shape == state[k].shape]
    assert len(shared) > 20 and any(k.startswith("down_blocks.1.attentions") for k in shared)
    diff = {k: v - base[k] if k in shared else v for k, v in state.items()}
    (tmp_path / "controlnet").mkdir()
    save_file({**original_layout(net, state=diff), "difference": torch.zeros(1)}, tmp_path / "controlnet" / "diff_control.safetensors")
    engine = Engine(Settings(device="cpu", models_dir=str(tmp_path), output_dir=str(tmp_path / "out")))
    nodes = {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "cn": {"type": "DiffControlNetLoader", "inputs": {"model": "@model.unet", "control_net_name": "diff_control.safetensors"}},
    }
    result = engine.run({"version": 1, "nodes": nodes}, outputs=["cn"])
    assert result.ok, [str(e) for e in result.errors]
    loaded = loaded_module(result).state_dict()
    for k, v in state.items():
        bound = 2 * U32 * (v.abs() + base[k].abs()) if k in shared else 0
        assert ((loaded[k] - v).abs() <= bound).all(), k
    plain = {"cn": {"type": "ControlNetLoader", "inputs": {"control_net_name": "diff_control"}}}
    refused(engine.run({"version": 1, "nodes": plain}, outputs=["cn"]), "DiffControlNetLoader")


# ---- what applying records ---------------------------------------------------------------------
def cond(width=8, **extra) -> Conditioning:
    return Conditioning(torch.zeros(1, 77, width), **extra)


def handle(name="a") -> ControlNet:
    return ControlNet(None, {"controlnet": name})


HINT = Image(torch.rand(1, 16, 16, 3))


def test_apply_advanced_shares_one_application_per_earlier_controlnet_between_both_sides():
    first = Control(handle("first"), torch.zeros(1, 3, 16, 16))
    positive = Conditioning.of_entries([cond(control=first), cond()])
    negative = cond()
    inputs = ControlNetApplyAdvanced.Inputs(
        positive=positive, negative=negative, control_net=handle(), image=HINT, strength=0.5, start_percent=0.2, end_percent=0.7
    )
    out = ControlNetApplyAdvanced().run(inputs, None)
    (p1, p2), (n1,) = out.positive.entries(), out.negative.entries()
    assert p1.control.previous is first and p2.control.previous is None and p2.control is n1.control
    assert (p1.control.strength, p1.control.start_percent, p1.control.end_percent, p1.control.to_uncond) == (0.5, 0.2, 0.7, False)
    assert torch.equal(p1.control.hint, HINT.pixels.movedim(-1, 1))
    same = ControlNetApplyAdvanced().run(inputs.model_copy(update={"strength": 0.0}), None)
    assert same.positive is positive and same.negative is negative


def test_apply_stacks_on_each_entry_and_is_given_to_the_uncond():
    first = Control(handle("first"), torch.zeros(1, 3, 16, 16))
    out = ControlNetApply().run(
        ControlNetApply.Inputs(conditioning=cond(control=first), control_net=handle(), image=HINT, strength=2.0), None
    )
    control = out.conditioning.control
    assert control.previous is first and control.to_uncond and control.chain() == [first, control]
    grey = ControlNetApply().run(
        ControlNetApply.Inputs(conditioning=cond(), control_net=handle(), image=Image(torch.rand(2, 8, 8, 1)), strength=1.0), None
    )
    assert grey.conditioning.control.hint.shape == (2, 3, 8, 8)  # a grey hint is repeated into three channels


def plan(positive, negative):
    return plan_guidance(ModelInfo("sd1"), positive, negative, True, (1, 4, 8, 8), (2.5, 6.0), torch.device("cpu"), torch.float32)


def test_controlnet_apply_reaches_a_negative_without_controlnet_as_in_comfyui():
    applied = Control(handle(), torch.zeros(1, 3, 64, 64), to_uncond=True)
    batches = plan(cond(control=applied), cond()).batches
    assert len(batches) == 1 and batches[0].control is applied and len(batches[0].passes) == 2  # one call, as diffusers'
    advanced = Control(handle(), torch.zeros(1, 3, 64, 64))  # ControlNetApplyAdvanced's: the negative keeps none
    batches = plan(cond(control=advanced), cond()).batches
    assert sorted(len(b.passes) for b in batches) == [1, 1] and {b.control for b in batches} == {advanced, None}
    own = Control(handle("own"), torch.zeros(1, 3, 64, 64))  # a negative with a ControlNet of its own keeps it
    batches = plan(cond(control=applied), cond(control=own)).batches
    assert {b.control for b in batches} == {applied, own}
    area = Conditioning.of_entries([cond(), cond(control=applied, area=Area(4, 4))])  # a ControlNet on an area stays there
    batches = plan(area, cond()).batches
    assert [b.control for b in batches if b.control is not None] == [applied] and all(
        p.area is not None for b in batches if b.control is applied for p in b.passes
    )


# ---- sampling, diffusers convention --------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD1 and SDXL models, and ControlNets made from their U-Nets in <models>/controlnet."""
    root = tmp_path_factory.mktemp("sampling")
    sd_tiny.save_sd1(root / "sd1")
    sd_tiny.save_sdxl_base(root / "xl")
    for name, model, seed in (("sd1_a", "sd1", 1), ("sd1_b", "sd1", 2), ("xl_a", "xl", 3)):
        unet = UNet2DConditionModel.from_pretrained(root / model / "unet")
        randomise(ControlNetModel.from_unet(unet), seed).save_pretrained(root / "controlnet" / name)
    for name, size, seed in (("hint.png", (64, 64), 3), ("hint2.png", (64, 64), 4), ("wide.png", (96, 80), 5)):
        pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        PILImage.fromarray(pixels).save(root / name)
    return root


@pytest.fixture(scope="module")
def engine(models):
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(models / "out")))


@pytest.fixture(scope="module", autouse=True)
def same_noise():
    with diffusers_noise_in_float32():
        yield


def run(engine, nodes, *wanted):
    result = engine.run({"version": 1, "nodes": nodes}, outputs=list(wanted))
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs


def workflow(models, model, apply=None, positive="@pos.cond", negative="@neg.cond", steps=5):
    """Prompts, hints and ControlNets (only what the loop needs runs), the ``apply`` nodes, and the
    loop on the conditionings ``positive`` / ``negative`` (euler, cfg 7.5)."""
    return {
        "model": {"type": "CheckpointLoader", "inputs": {"path": model, "dtype": "fp64"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
        "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "blurry"}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": 64, "height": 64}},
        **{name: {"type": "LoadImage", "inputs": {"path": str(models / f"{name}.png")}} for name in ("hint", "hint2")},
        **{cn: {"type": "ControlNetLoader", "inputs": {"control_net_name": cn, "dtype": "fp64"}} for cn in ("sd1_a", "sd1_b", "xl_a")},
        **(apply or {}),
        "denoise": {
            "type": "UNetDenoiseLoop",
            "inputs": {
                "unet": "@model.unet",
                "positive": positive,
                "negative": negative,
                "noise": "@noise.noise",
                "steps": steps,
                "cfg": 7.5,
                "sampler": "euler",
            },
        },
    }


def applied(*layers):
    """ControlNetApply nodes on the positive prompt, one per (ControlNet, hint, strength), stacked;
    and the link to the last one's conditioning."""
    nodes, source = {}, "@pos.cond"
    for i, (cn, hint, strength) in enumerate(layers):
        nodes[f"apply{i}"] = {
            "type": "ControlNetApply",
            "inputs": {"conditioning": source, "control_net": f"@{cn}.control_net", "image": f"@{hint}.image", "strength": strength},
        }
        source = f"@apply{i}.conditioning"
    return nodes, source


def reference_pipeline(models, model, nets):
    cls, base_cls = (
        (StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)
        if model == "xl"
        else (StableDiffusionControlNetPipeline, StableDiffusionPipeline)
    )
    extra = {} if model == "xl" else {"safety_checker": None, "requires_safety_checker": False}
    base = base_cls.from_pretrained(models / model, local_files_only=True, **extra)
    controlnet = [ControlNetModel.from_pretrained(models / "controlnet" / n) for n in nets]
    components = {k: v for k, v in base.components.items() if k not in ("scheduler", "image_encoder")}
    pipe = cls(
        **components,
        controlnet=controlnet if len(controlnet) > 1 else controlnet[0],
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config),
    ).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(out, pooled):
    kwargs = {"prompt_embeds": out["pos"]["cond"].embeddings, "negative_prompt_embeds": out["neg"]["cond"].embeddings}
    if pooled:
        kwargs |= {"pooled_prompt_embeds": out["pos"]["cond"].pooled, "negative_pooled_prompt_embeds": out["neg"]["cond"].pooled}
    return kwargs


def assert_steered(ours, plain, reference):
    """The ControlNet moved the latents by far more than the comparison's tolerance."""
    assert (ours - plain).abs().max() > 1e6 * tolerance(reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,layers",
    [("sd1", [("sd1_a", "hint", 0.8)]), ("sd1", [("sd1_a", "hint", 0.8), ("sd1_b", "hint2", 1.3)]), ("xl", [("xl_a", "hint", 0.7)])],
    ids=["sd1", "sd1-two-stacked", "sdxl"],
)
def test_controlnet_apply_matches_diffusers_controlnet_pipelines(engine, models, model, layers):
    nodes, positive = applied(*layers)
    out = run(engine, workflow(models, model, nodes, positive), "denoise", "pos", "neg")
    plain = run(engine, workflow(models, model), "denoise")["denoise"]["latent"].samples
    pipe = reference_pipeline(models, model, [cn for cn, _, _ in layers])
    images = [PILImage.open(models / f"{hint}.png") for _, hint, _ in layers]
    scales = [s for _, _, s in layers]
    reference = pipe(
        **embeds(out, pooled=model == "xl"),
        image=images if len(images) > 1 else images[0],
        controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0],
        num_inference_steps=5,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images
    ours = out["denoise"]["latent"].samples
    assert_same(ours, reference)
    assert_steered(ours, plain, reference)


def sd_sigmas() -> np.ndarray:
    """SD's noise levels: sigma_t = sqrt((1 - abar_t) / abar_t), abar the cumulative product of
    1 - beta, the betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def percent_sigma(table: np.ndarray, percent: float) -> float:
    """ComfyUI's percent_to_sigma: sigma at timestep (1 - percent) · 999, log-linear between steps."""
    t = (1 - percent) * 999
    lo, hi = math.floor(t), math.ceil(t)
    return math.exp((1 - (t - lo)) * math.log(table[lo]) + (t - lo) * math.log(table[hi]))


@pytest.mark.slow
def test_start_and_end_percent_are_comfyuis_window_of_noise_levels(engine, models):
    start, end, steps = 0.3, 0.75, 10
    apply = {
        "adv": {
            "type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": "@pos.cond",
                "negative": "@neg.cond",
                "control_net": "@sd1_a.control_net",
                "image": "@hint.image",
                "strength": 1.2,
                "start_percent": start,
                "end_percent": end,
            },
        }
    }
    out = run(engine, workflow(models, "sd1", apply, "@adv.positive", "@adv.negative", steps=steps), "denoise", "pos", "neg")
    pipe = reference_pipeline(models, "sd1", ["sd1_a"])
    pipe.scheduler.set_timesteps(steps)
    table = sd_sigmas()
    sigmas = [table[int(t)] for t in pipe.scheduler.timesteps]
    acting = [i for i, s in enumerate(sigmas) if percent_sigma(table, end) <= s <= percent_sigma(table, start)]
    first, last = acting[0], acting[-1] + 1
    assert acting == list(range(first, last)) and 0 < first < last < steps  # a window inside the schedule
    reference = pipe(
        **embeds(out, pooled=False),
        image=PILImage.open(models / "hint.png"),
        controlnet_conditioning_scale=1.2,
        control_guidance_start=first / steps,
        control_guidance_end=last / steps,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(SEED),
        output_type="latent",
    ).images
    assert_same(out["denoise"]["latent"].samples, reference)


# ---- sampling, ComfyUI convention, through a ComfyUI prompt ---------------------------------------
def comfy_prompt(models, start, end):
    """A ComfyUI API prompt: the tiny SD1 model, a ControlNet applied with ControlNetApplyAdvanced
    to a hint of another size and aspect ratio, KSampler euler / karras. The model and the
    ControlNet are loaded in float64 (graphsd's CheckpointLoader and ControlNetLoader's dtype, which
    a prompt may name), to compare with a float64 reference."""
    return {
        "1": {"class_type": "graphsd.CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": str(models / "wide.png")}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd1_a", "dtype": "fp64"}},
        "6": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["2", 0],
                "negative": ["3", 0],
                "control_net": ["5", 0],
                "image": ["4", 0],
                "strength": 0.9,
                "start_percent": start,
                "end_percent": end,
                "vae": ["1", 2],
            },
        },
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["6", 0],
                "negative": ["6", 1],
                "latent_image": ["7", 0],
                "seed": SEED,
                "steps": 6,
                "cfg": 7.5,
                "sampler_name": "euler",
                "scheduler": "karras",
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "controlnet"}},
    }


def comfy_hint(path) -> torch.Tensor:
    """ComfyUI's hint for a 64×64 picture: the image cropped about its centre to a square (the
    longer side trimmed by round((W - W·aspect_new/aspect_old) / 2) on each end), then resized
    nearest-exact."""
    pixels = torch.from_numpy(np.array(PILImage.open(path).convert("RGB"))).float().div(255).movedim(-1, 0)[None]
    h, w = pixels.shape[-2:]
    x = round((w - w * (1 / (w / h))) / 2) if w > h else 0
    return F.interpolate(pixels[..., :, x : w - x], size=(64, 64), mode="nearest-exact").double()


def comfy_euler(unet, net, table, noise, context, hint, strength, window, cfg, sigmas):
    """k-diffusion's Euler with classifier-free guidance on D(x, sigma) = x - sigma · eps (the
    U-Net sees x / sqrt(sigma² + 1) at the timestep of the nearest sigma), starting from
    noise · sqrt(1 + sigma_0²); the ControlNet's residuals × strength added while
    low <= sigma <= high."""
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    low, high = window
    torch.set_grad_enabled(False)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        model_input = torch.cat([x, x]) / math.sqrt(s * s + 1)
        t = table.timestep(s)
        extra = {}
        if low <= s <= high:
            down, mid = net(
                model_input,
                t,
                encoder_hidden_states=context,
                controlnet_cond=torch.cat([hint, hint]),
                conditioning_scale=strength,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps = unet(model_input, t, encoder_hidden_states=context, **extra).sample
        uncond, cond = (torch.cat([x, x]) - eps * s).chunk(2)
        denoised = uncond + cfg * (cond - uncond)
        x = x + (x - denoised) / s * (s_next - s)
    torch.set_grad_enabled(True)
    return x


@pytest.mark.slow
def test_a_comfyui_prompt_with_controlnet_apply_advanced_runs_comfyuis_semantics(models, tmp_path):
    from graphsd.std.sampling.sigmas import comfy_sigmas

    start, end = 0.2, 0.8
    engine = Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path)))
    result = engine.run(comfy_prompt(models, start, end), outputs=["8", "2", "3"])
    assert result.ok, [str(e) for e in result.errors]
    out = result.outputs
    pipe = reference_pipeline(models, "sd1", ["sd1_a"])
    table = SigmaTable(dict(pipe.scheduler.config))
    sigmas = comfy_sigmas(table, "karras", 6).tolist()
    window = (percent_sigma(sd_sigmas(), end), percent_sigma(sd_sigmas(), start))
    assert 0 < sum(window[0] <= s <= window[1] for s in sigmas[:-1]) < 6  # some steps with, some without
    context = torch.cat([out["3"]["cond"].embeddings, out["2"]["cond"].embeddings])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED)).double()
    hint = comfy_hint(models / "wide.png")
    reference = comfy_euler(pipe.unet, pipe.controlnet, table, noise, context, hint, 0.9, window, 7.5, sigmas)
    plain = comfy_euler(pipe.unet, pipe.controlnet, table, noise, context, hint, 0.9, (math.inf, math.inf), 7.5, sigmas)
    assert_same(out["8"]["latent"].samples, reference)
    assert_steered(reference, plain, reference)


def test_ui_format_widgets_map_onto_the_controlnet_classes(engines):
    """The editor's file stores widget values in the class's widget order (graphsd's dtype after
    ComfyUI's widgets, so a ComfyUI file leaves it at its default): they land on ComfyUI's names."""
    widgets = {
        1: ("ControlNetLoader", ["control_v11p_sd15_canny.pth"]),
        2: ("DiffControlNetLoader", ["diff_control_sd15_canny.safetensors"]),
        3: ("ControlNetApply", [0.8]),
        4: ("ControlNetApplyAdvanced", [0.9, 0.1, 0.6]),
    }
    inputs = {3: [("control_net", 1)], 4: [("control_net", 2)]}
    ui = {
        "last_node_id": 4,
        "nodes": [
            {
                "id": i,
                "type": t,
                "mode": 0,
                "widgets_values": w,
                "inputs": [{"name": n, "type": "CONTROL_NET", "link": k} for n, k in inputs.get(i, [])],
            }
            for i, (t, w) in widgets.items()
        ],
        "links": [[1, 1, 0, 3, 0, "CONTROL_NET"], [2, 2, 0, 4, 0, "CONTROL_NET"]],
    }
    prompt = ui_to_prompt(ui, class_definitions(engines[False].registry.nodes))
    assert {i: prompt[str(i)]["inputs"] for i in widgets} == {
        1: {"control_net_name": "control_v11p_sd15_canny.pth", "dtype": "fp32"},
        2: {"control_net_name": "diff_control_sd15_canny.safetensors", "dtype": "fp32"},
        3: {"strength": 0.8, "control_net": ["1", 0]},
        4: {"strength": 0.9, "start_percent": 0.1, "end_percent": 0.6, "control_net": ["2", 0]},
    }


def test_object_info_entries_have_comfyuis_types_ranges_and_the_files(root, engines):
    """What ``graphsd serve`` lists for the classes: CONTROL_NET sockets (so the frontend links them
    to ComfyUI's nodes), ComfyUI's input order and ranges, the files in <models>/controlnet."""
    engine = engines[False]
    types = {k: v for result in engine.pm.hook.graphsd_comfy_types() for k, v in (result or {}).items()}
    save_file({"x": torch.zeros(1)}, root / "controlnet" / "depth.safetensors")
    entries = {
        name: native_entry(engine.nodes[name], name, "nodes", types, engine.nodes[name].input_choices(str(root), ""))
        for name in ("ControlNetLoader", "DiffControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced")
    }
    assert entries["ControlNetLoader"]["output"] == entries["DiffControlNetLoader"]["output"] == ["CONTROL_NET"]
    assert "depth.safetensors" in entries["ControlNetLoader"]["input"]["required"]["control_net_name"][0]
    assert "depth.safetensors" in entries["DiffControlNetLoader"]["input"]["required"]["control_net_name"][0]
    advanced = entries["ControlNetApplyAdvanced"]
    assert advanced["input_order"] == {
        "required": ["positive", "negative", "control_net", "image", "strength", "start_percent", "end_percent"],
        "optional": ["vae"],
    }
    required = advanced["input"]["required"]
    assert [required[k][0] for k in ("positive", "control_net", "image")] == ["CONDITIONING", "CONTROL_NET", "IMAGE"]
    assert (required["strength"][1]["min"], required["strength"][1]["max"]) == (0.0, 10.0)
    assert (required["end_percent"][1]["min"], required["end_percent"][1]["max"], required["end_percent"][1]["default"]) == (0.0, 1.0, 1.0)
    assert advanced["output"] == ["CONDITIONING", "CONDITIONING"] and entries["ControlNetApply"]["output"] == ["CONDITIONING"]
