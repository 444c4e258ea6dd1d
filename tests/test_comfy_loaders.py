"""ComfyUI's single-component loaders (VAELoader, UNETLoader, CLIPLoader, DualCLIPLoader,
LoraLoaderModelOnly) and the CheckpointLoader / HypernetworkLoader imports, on tiny random
models written here as real files in the layouts ComfyUI's folders hold. References: diffusers'
own conversion functions for the original layouts (``convert_ldm_vae_checkpoint``,
``convert_ldm_unet_checkpoint``, ``convert_open_clip_checkpoint``), the modules themselves for
the diffusers / Hugging Face layouts, transformers' text encoder for prompt encodings, and
graphsd's checkpoint path (tested against diffusers' pipelines elsewhere) for whole graphs."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import sd_tiny
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
from reference import assert_same
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from graphsd import Engine, Settings, WorkflowError
from graphsd.std.comfy import comfy_to_workflow
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt
from graphsd.std.models.loading import builtin_models_dir
from graphsd.std.models.single_file import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, component_tensors
from graphsd.std.text.tokenizer import clip_tokenizer_dir

warnings.filterwarnings("ignore", category=FutureWarning)
TINY = builtin_models_dir() / "graphsd-tiny"
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


# ---- tiny components, as files -----------------------------------------------------------------
def vae(scaling: float = 0.18215) -> AutoencoderKL:
    """A VAE with the SD VAEs' conventions (32 norm groups), small."""
    torch.manual_seed(11)
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=scaling,
    ).eval()


def sd1_unet(**extra) -> UNet2DConditionModel:
    """A U-Net with SD1's conventions (8 attention heads)."""
    return sd_tiny.unet(12, attention_head_dim=8, **extra).eval()


def clip(act: str, projection: bool = False, seed: int = 0):
    """A text encoder with the SD text encoders' conventions: 64-wide attention heads (one head
    below 64), CLIP's vocabulary and 77 positions; ViT-L's quick_gelu, OpenCLIP's gelu."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=1,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def without(prefix: str, tensors: dict) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for folder in ("vae", "unet", "diffusion_models", "clip", "text_encoders"):
        (root / folder).mkdir()
    v = vae()
    ldm_vae = without(VAE_PREFIX, component_tensors("sd1", "vae", v))
    save_file(ldm_vae, root / "vae" / "vae-ft-mse.safetensors")
    save_file(ldm_vae, root / "vae" / "sdxl_vae.safetensors")
    save_file({VAE_PREFIX + k: t for k, t in ldm_vae.items()}, root / "vae" / "whole_checkpoint.safetensors")
    save_file(v.state_dict(), root / "vae" / "diffusers_vae.safetensors")
    old = {
        k.replace("attentions.0.to_q", "attentions.0.query")
        .replace("attentions.0.to_k", "attentions.0.key")
        .replace("attentions.0.to_v", "attentions.0.value")
        .replace("attentions.0.to_out.0", "attentions.0.proj_attn"): t
        for k, t in v.state_dict().items()
    }
    save_file(old, root / "vae" / "old_diffusers_vae.safetensors")
    vae(0.13025).save_pretrained(root / "vae" / "xl_folder")
    sixteen = dict(ldm_vae, **{"decoder.conv_in.weight": torch.zeros(32, 16, 3, 3)})
    save_file(sixteen, root / "vae" / "flux_ae.safetensors")

    u = sd1_unet()
    save_file(without(UNET_PREFIX, component_tensors("sd1", "unet", u)), root / "unet" / "sd1_unet.safetensors")
    save_file(u.state_dict(), root / "diffusion_models" / "diffusers_unet.safetensors")
    sd2 = sd_tiny.unet(13, cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=1).eval()
    save_file(without(UNET_PREFIX, component_tensors("sd2", "unet", sd2)), root / "unet" / "sd2_unet.safetensors")
    xl = sd_tiny.unet(
        14,
        cross_attention_dim=2048,
        use_linear_projection=True,
        attention_head_dim=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).eval()
    save_file(without(UNET_PREFIX, component_tensors("sdxl", "unet", xl)), root / "unet" / "sdxl_unet.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, root / "unet" / "flux1-dev.safetensors")

    te, h = clip("quick_gelu", seed=15), clip("gelu", seed=16)
    save_file(te.state_dict(), root / "text_encoders" / "clip_l.safetensors")
    open_clip = without(TEXT_PREFIXES[("sd2", "text_encoder")], component_tensors("sd2", "text_encoder", h))
    save_file(open_clip, root / "clip" / "open_clip_h.safetensors")
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, root / "clip" / "t5xxl.safetensors")
    clip_l, clip_g = clip("quick_gelu", seed=17), clip("gelu", projection=True, seed=18)
    save_file(clip_l.state_dict(), root / "clip" / "xl_clip_l.safetensors")
    save_file(clip_g.state_dict(), root / "clip" / "xl_clip_g.safetensors")
    StableDiffusionXLPipeline(
        vae=sd_tiny.vae(1),
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        tokenizer=sd_tiny.tokenizer(),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!"),  # SDXL's second one pads with "!"
        unet=sd_tiny.sdxl_unet(3, time_ids=6, cross_attention_dim=64),
        scheduler=sd_tiny.sdxl_scheduler(),
    ).save_pretrained(root / "xl")
    return {"root": root, "vae": v, "unet": u, "sd2": sd2, "xl": xl, "te": te, "h": h, "open_clip": open_clip, "clip_g": clip_g}


@pytest.fixture(scope="module")
def engine(files, tmp_path_factory):
    return Engine(Settings(device="cpu", models_dir=str(files["root"]), output_dir=str(tmp_path_factory.mktemp("out"))))


def load(engine: Engine, node: str, output: str, **inputs):
    result = engine.run({"version": 1, "nodes": {"n": {"type": node, "inputs": inputs}}}, outputs=["n"])
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs["n"][output]


def failure(engine: Engine, node: str, **inputs) -> str:
    result = engine.run({"version": 1, "nodes": {"n": {"type": node, "inputs": inputs}}}, outputs=["n"])
    assert not result.ok
    return result.errors[0].message


def module_of(engine: Engine, handle, role: str):
    return engine.models.get(handle.keys[role])


def float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy (a forward pass is compared in float64, where kernels' orders of summation
    leave differences far below what a wrong configuration makes: see reference.py)."""
    return copy.deepcopy(module).double()


def as_float64(value):
    if isinstance(value, dict):
        return {k: as_float64(v) for k, v in value.items()}
    return value.double() if isinstance(value, torch.Tensor) else value


def assert_same_state(ours: torch.nn.Module, reference: dict) -> None:
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


# ---- VAELoader ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae-ft-mse.safetensors", "whole_checkpoint.safetensors", "diffusers_vae", "old_diffusers_vae"])
def test_vae_files_load_the_weights_diffusers_reads(engine, files, name):
    v = files["vae"]
    ldm = without(VAE_PREFIX, component_tensors("sd1", "vae", v))
    reference = convert_ldm_vae_checkpoint(ldm, dict(v.config))  # diffusers' own reading of the original layout
    handle = load(engine, "VAELoader", "vae", vae_name=name)
    ours = module_of(engine, handle, "vae")
    assert_same_state(ours, reference)
    assert_same_state(ours, v.state_dict())
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():  # the same config: norm groups, attention
        assert_same(float64(ours).decode(z).sample, float64(v).decode(z).sample)
    assert handle.info.latent_downscale == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "scale", "expected"),
    [
        ("vae-ft-mse.safetensors", "auto", 0.18215),
        ("sdxl_vae.safetensors", "auto", 0.13025),
        ("sdxl_vae.safetensors", "sd", 0.18215),
        ("vae-ft-mse.safetensors", "sdxl", 0.13025),
        ("xl_folder", "auto", 0.13025),
    ],
)
def test_vae_latent_scale(engine, name, scale, expected):
    assert load(engine, "VAELoader", "vae", vae_name=name, scale=scale).info.scaling_factor == expected


@pytest.mark.slow
def test_vae_files_of_other_kinds_are_refused_with_the_field(engine):
    assert "16 latent channels" in failure(engine, "VAELoader", vae_name="flux_ae.safetensors")
    with pytest.raises(WorkflowError) as info:  # a file that is not there: refused before anything runs
        engine.run({"version": 1, "nodes": {"n": {"type": "VAELoader", "inputs": {"vae_name": "missing.safetensors"}}}}, outputs=["n"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("n", "vae_name") and "vae-ft-mse.safetensors" in issue.message  # lists what is there
    assert "not a VAE" in failure(engine, "VAELoader", vae_name="../unet/sd1_unet.safetensors")


# ---- UNETLoader --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "key", "family", "prediction"),
    [
        ("sd1_unet.safetensors", "unet", "sd1", "epsilon"),
        ("diffusers_unet.safetensors", "unet", "sd1", "epsilon"),
        ("sd2_unet.safetensors", "sd2", "sd2", "v_prediction"),
        ("sdxl_unet.safetensors", "xl", "sdxl", "epsilon"),
    ],
)
def test_unet_files_load_the_weights_diffusers_reads(engine, files, name, key, family, prediction):
    expected = files[key]
    handle = load(engine, "UNETLoader", "model", unet_name=name)
    ours = module_of(engine, handle, "unet")
    if not name.startswith("diffusers"):
        ldm = component_tensors(family, "unet", expected)
        assert_same_state(ours, convert_ldm_unet_checkpoint(ldm, dict(expected.config)))
    assert_same_state(ours, expected.state_dict())
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, expected.config.cross_attention_dim, generator=g)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.randn(1, 6, generator=g)}}
    extra = extra if family == "sdxl" else {}
    with torch.no_grad():  # the same configuration (attention heads, projections, added conditioning), in float64
        assert_same(
            float64(ours)(x.double(), 500, context.double(), **as_float64(extra)).sample,
            float64(expected)(x.double(), 500, context.double(), **as_float64(extra)).sample,
        )
    info = handle.info
    assert (info.family, info.scheduler_config.get("prediction_type", "epsilon")) == (family, prediction)  # diffusers default
    assert info.takes_time_ids == (family == "sdxl")


@pytest.mark.slow
def test_unet_loader_refuses_other_families_and_fp8(engine):
    assert "Flux" in failure(engine, "UNETLoader", unet_name="flux1-dev.safetensors")
    with pytest.raises(WorkflowError, match="weight_dtype"):
        engine.run({"version": 1, "nodes": {"n": {"type": "UNETLoader", "inputs": {"unet_name": "x", "weight_dtype": "fp8_e4m3fn"}}}})


# ---- CLIPLoader / DualCLIPLoader ---------------------------------------------------------------
@pytest.mark.slow
def test_clip_l_file_encodes_prompts_like_transformers(engine, files):
    te = files["te"]
    handle = load(engine, "CLIPLoader", "clip", clip_name="clip_l.safetensors", type="stable_diffusion")
    assert_same_state(module_of(engine, handle, "text_encoder"), te.state_dict())
    assert handle.info.family == "sd1"
    nodes = {
        "c": {"type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors"}},
        "t": {"type": "TextEncode", "inputs": {"clip": "@c.clip", "text": "a red circle"}},
    }
    cond = engine.run({"version": 1, "nodes": nodes}, outputs=["t"]).outputs["t"]["cond"].embeddings
    tokenizer = sd_tiny.tokenizer()
    ids = tokenizer("a red circle", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(cond, te(ids).last_hidden_state, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_open_clip_file_loads_as_sd2s_text_encoder_as_diffusers_converts_it(engine, files):
    prefix = TEXT_PREFIXES[("sd2", "text_encoder")]
    checkpoint = {prefix + k: t for k, t in files["open_clip"].items()}
    converted = convert_open_clip_checkpoint(files["h"], checkpoint, prefix=prefix)
    reference = {k.removeprefix("text_model."): t for k, t in converted.items()}  # transformers 5 names it without
    handle = load(engine, "CLIPLoader", "clip", clip_name="open_clip_h.safetensors")
    ours = module_of(engine, handle, "text_encoder")
    assert_same_state(ours, reference)
    assert_same_state(ours, files["h"].state_dict())
    assert ours.config.hidden_act == "gelu"
    assert handle.info.family == "sd2" and handle.info.tokenizers["text_encoder"].pad_token == "!"


@pytest.mark.slow
def test_dual_clip_sdxl_pair_encodes_like_the_sdxl_checkpoint(engine, files):
    nodes = {
        "c": {
            "type": "DualCLIPLoader",
            "inputs": {"clip_name1": "xl_clip_l.safetensors", "clip_name2": "xl_clip_g.safetensors", "type": "sdxl"},
        },
        "m": {"type": "CheckpointLoader", "inputs": {"path": "xl"}},
        "ours": {"type": "TextEncode", "inputs": {"clip": "@c.clip", "text": "a blue square"}},
        "ref": {"type": "TextEncode", "inputs": {"clip": "@m.clip", "text": "a blue square"}},
    }
    out = engine.run({"version": 1, "nodes": nodes}, outputs=["ours", "ref"]).outputs
    assert torch.equal(out["ours"]["cond"].embeddings, out["ref"]["cond"].embeddings)
    # the pooled embedding is the projection W·h of the same h: a 32-term dot product whose two
    # kernels may sum in another order, so each differs by at most 2·31·u·Σ|W||h| (u = 2^-24)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
    ids = tokenizer("a blue square", padding="max_length", max_length=77, return_tensors="pt").input_ids
    clip_g = files["clip_g"]
    with torch.no_grad():
        h = clip_g.text_model(ids).pooler_output
        bound = 2 * 31 * 2.0**-24 * (h.abs() @ clip_g.text_projection.weight.abs().T)
    assert ((out["ours"]["cond"].pooled - out["ref"]["cond"].pooled).abs() <= bound).all()
    assert torch.allclose(out["ref"]["cond"].pooled, clip_g.text_projection(h), rtol=0, atol=float(bound.max()))


@pytest.mark.slow
def test_clip_loaders_refuse_other_families(engine):
    for node, inputs in (
        ("CLIPLoader", {"clip_name": "x", "type": "sd3"}),
        ("DualCLIPLoader", {"clip_name1": "x", "clip_name2": "y", "type": "flux"}),
    ):
        with pytest.raises(WorkflowError, match="another model family") as err:
            engine.run({"version": 1, "nodes": {"n": {"type": node, "inputs": inputs}}})
        assert err.value.issues[0].field == "type"
    assert "T5" in failure(engine, "CLIPLoader", clip_name="t5xxl.safetensors")
    tiny_te = TINY / "text_encoder" / "model.safetensors"
    assert "vocabulary" in failure(engine, "CLIPLoader", clip_name=str(tiny_te))  # graphsd-tiny's own tokenizer is not CLIP's


# ---- ComfyUI prompts ---------------------------------------------------------------------------
def comfy_prompt() -> dict:
    prompt = json.loads((WORKFLOWS / "comfy_txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "graphsd-tiny"
    prompt["5"]["inputs"].update(width=64, height=64, batch_size=1)
    prompt["3"]["inputs"].update(steps=2, seed=5)
    return prompt


def test_loader_classes_import_as_native_nodes():
    prompt = comfy_prompt()
    prompt["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}}
    prompt["21"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "u.safetensors", "weight_dtype": "default"}}
    prompt["22"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "c.safetensors", "type": "stable_diffusion", "device": "default"}}
    prompt["3"]["inputs"]["model"] = ["21", 0]
    prompt["6"]["inputs"]["clip"] = ["22", 0]
    prompt["8"]["inputs"]["vae"] = ["20", 0]
    nodes = comfy_to_workflow(prompt, Engine(Settings(device="cpu")).registry.nodes)["nodes"]
    assert nodes["20"] == {"type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}}
    assert (nodes["3"]["inputs"]["unet"], nodes["6"]["inputs"]["clip"], nodes["8"]["inputs"]["vae"]) == ("@21.model", "@22.clip", "@20.vae")


def test_checkpoint_loader_and_hypernetwork_loader_import_onto_graphsds_nodes():
    prompt = comfy_prompt()
    prompt["4"] = {"class_type": "CheckpointLoader", "inputs": {"config_name": "v1-inference.yaml", "ckpt_name": "graphsd-tiny"}}
    prompt["20"] = {"class_type": "HypernetworkLoader", "inputs": {"model": ["4", 0], "hypernetwork_name": "night.pt", "strength": 0.5}}
    prompt["3"]["inputs"]["model"] = ["20", 0]
    nodes = comfy_to_workflow(prompt)["nodes"]
    assert nodes["4"] == {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}}
    assert nodes["20"] == {"type": "HypernetworkLoader", "inputs": {"unet": "@4.unet", "hypernetwork": "night.pt", "strength": 0.5}}
    assert nodes["3"]["inputs"]["unet"] == "@20.unet" and nodes["6"]["inputs"]["clip"] == "@4.clip"
    prompt["20"]["inputs"]["strength"] = 11.0
    with pytest.raises(WorkflowError, match="strength"):
        comfy_to_workflow(prompt)


@pytest.mark.slow
def test_component_loaders_give_the_checkpoints_image(tmp_path):
    """graphsd-tiny's U-Net as an original-layout U-Net file (UNETLoader) and its VAE as a diffusers
    folder (VAELoader), with the checkpoint's text encoder: the image of the whole checkpoint,
    pixel for pixel (the U-Net's config is derived from its tensors and SD1's conventions, which
    graphsd-tiny follows). And LoraLoaderModelOnly patches the U-Net as LoraLoader does."""
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    unet = UNet2DConditionModel.from_pretrained(TINY / "unet")
    save_file(without(UNET_PREFIX, component_tensors("sd1", "unet", unet)), models / "unet" / "tiny_unet.safetensors")
    shutil.copytree(TINY / "vae", models / "vae" / "tiny_vae")
    engine = Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path / "out")))
    plain = comfy_prompt()
    parts = comfy_prompt()
    parts["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_unet.safetensors", "weight_dtype": "default"}}
    parts["21"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_vae"}}
    parts["3"]["inputs"]["model"] = ["20", 0]
    parts["8"]["inputs"]["vae"] = ["21", 0]
    images = []
    for prompt in (plain, parts):
        result = engine.run(prompt, outputs=["8"])
        assert result.ok, [str(e) for e in result.errors]
        images.append(result.outputs["8"]["image"].pixels)
    assert torch.equal(images[0], images[1])

    lora = comfy_prompt()
    lora["20"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["4", 0], "lora_name": "night.safetensors", "strength_model": 0.7},
    }
    lora["21"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "night.safetensors", "strength_model": 0.7, "strength_clip": 0.3},
    }
    result = engine.run(lora, outputs=["20", "21"])
    assert result.ok, [str(e) for e in result.errors]
    only, both = result.outputs["20"]["model"], result.outputs["21"]["unet"]
    with engine.models.use(only, "unet") as m:
        ours = {n: p.clone() for n, p in m.named_parameters()}
    with engine.models.use(both, "unet") as m:
        assert all(torch.equal(p, ours[n]) for n, p in m.named_parameters())
    assert any(not torch.equal(p, ours[n]) for n, p in unet.named_parameters())


def test_ui_format_widgets_map_onto_the_loader_merge_and_upscale_classes():
    """The editor's file stores widget values in the class's widget order (optional ones, like
    CLIPLoader's device, last): they land on ComfyUI's input names."""
    widgets = {
        1: ("CheckpointLoader", ["v1-inference.yaml", "graphsd-tiny"]),
        2: ("VAELoader", ["sdxl_vae.safetensors"]),
        3: ("UNETLoader", ["u.safetensors", "default"]),
        4: ("CLIPLoader", ["c.safetensors", "stable_diffusion", "cpu"]),
        5: ("DualCLIPLoader", ["l.safetensors", "g.safetensors", "sdxl", "default"]),
        6: ("LoraLoaderModelOnly", ["night.safetensors", 0.5]),
        7: ("HypernetworkLoader", ["night.pt", 0.7]),
        8: ("ModelMergeBlocks", [0.1, 0.2, 0.3]),
        9: ("UpscaleModelLoader", ["4x.pth"]),
    }
    links = [[1, 1, 0, 6, 0, "MODEL"], [2, 6, 0, 7, 0, "MODEL"], [3, 3, 0, 8, 0, "MODEL"], [4, 7, 0, 8, 1, "MODEL"]]
    inputs = {6: [("model", 1)], 7: [("model", 2)], 8: [("model1", 3), ("model2", 4)]}
    ui = {
        "last_node_id": 9,
        "nodes": [
            {
                "id": i,
                "type": t,
                "mode": 0,
                "widgets_values": w,
                "inputs": [{"name": n, "type": "MODEL", "link": k} for n, k in inputs.get(i, [])],
            }
            for i, (t, w) in widgets.items()
        ],
        "links": links,
    }
    prompt = ui_to_prompt(ui, class_definitions(Engine(Settings(device="cpu")).registry.nodes))
    assert {i: prompt[str(i)]["inputs"] for i in widgets} == {
        1: {"config_name": "v1-inference.yaml", "ckpt_name": "graphsd-tiny"},
        2: {"vae_name": "sdxl_vae.safetensors", "scale": "auto"},
        3: {"unet_name": "u.safetensors", "weight_dtype": "default"},
        4: {"clip_name": "c.safetensors", "type": "stable_diffusion", "device": "cpu"},
        5: {"clip_name1": "l.safetensors", "clip_name2": "g.safetensors", "type": "sdxl", "device": "default"},
        6: {"lora_name": "night.safetensors", "strength_model": 0.5, "model": ["1", 0]},
        7: {"hypernetwork_name": "night.pt", "strength": 0.7, "model": ["6", 0]},
        8: {"input": 0.1, "middle": 0.2, "out": 0.3, "model1": ["3", 0], "model2": ["7", 0]},
        9: {"model_name": "4x.pth"},
    }
