"""Single-file checkpoints: our writer's files read back identically, diffusers' own
``from_single_file`` (offline, with a local config folder) reads them into the same weights,
real SD1.5 / SD2.1 / SDXL shapes give the real configs, pickles stay inert, and CheckpointSave
exports a LoRA-patched model and keeps a tokenizer other than CLIP's (the shipped graphsd-tiny)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from reference import assert_same
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_tiny import save_pipeline, save_sd1, save_sdxl_base
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from graphsd.context import Settings
from graphsd.engine import Engine
from graphsd.std.models.formats import ModelFileError
from graphsd.std.models.hypernetwork import Hypernetwork, build_net, save_hypernetwork
from graphsd.std.models.single_file import (
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    bundled_config,
    derive_text_config,
    derive_unet_config,
    derive_vae_config,
    layout_family,
    load_single_file,
    save_single_file,
    unet_rule,
    vae_rule,
)
from graphsd.std.text.tokenizer import clip_tokenizer

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

warnings.filterwarnings("ignore", category=FutureWarning)
ROLES = ("unet", "vae", "text_encoder", "text_encoder_2")


# ---- tiny models ---------------------------------------------------------------------------------
def tiny_clip(act: str, width: int = 32, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=24)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16,
                         norm_num_groups=16).eval()


def tiny_components(family: str) -> dict:
    """Tiny models with each family's layout. SDXL's two text encoders differ in width, as in
    the real model (diffusers tells them apart by width)."""
    torch.manual_seed(1)
    if family == "sdxl":
        te1, te2 = tiny_clip("quick_gelu", 32, seed=2), tiny_clip("gelu", 64, projection=True, seed=3)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=96, sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 24,
        )
        return {"family": family, "unet": unet.eval(), "vae": tiny_vae(), "text_encoder": te1, "text_encoder_2": te2}
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, sample_size=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4 if family == "sd1" else (2, 2), use_linear_projection=family == "sd2",
    )
    act = "quick_gelu" if family == "sd1" else "gelu"
    return {"family": family, "unet": unet.eval(), "vae": tiny_vae(), "text_encoder": tiny_clip(act, seed=2)}


def diffusers_folder(components: dict, folder: Path) -> Path:
    """The same tiny model as a diffusers folder (the ``config=`` of ``from_single_file``)."""
    family = components["family"]
    scheduler = EulerDiscreteScheduler.from_config(bundled_config(family, "scheduler"))
    models = {r: components[r] for r in ROLES if r in components}
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**models, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(**models, tokenizer=clip_tokenizer(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return save_pipeline(pipe, folder)


def config_of(module) -> dict:
    """A model's config as a plain dict (diffusers or transformers), without bookkeeping."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    bookkeeping = ("architectures", "transformers_version")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_") and k not in bookkeeping}


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def saved(request, tmp_path_factory):
    """(components, single file written by save_single_file, diffusers folder of the same model)."""
    tmp = tmp_path_factory.mktemp(request.param)
    components = tiny_components(request.param)
    components["scheduler_config"] = bundled_config(request.param, "scheduler")
    path = save_single_file(components, tmp / "model.safetensors")
    return components, path, diffusers_folder(components, tmp / "diffusers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(save)``: the diffusers folder ``save`` (sd_tiny.save_sd1, save_sdxl_base)
    writes, made once for the module; the tests only read it."""
    made: dict = {}

    def get(save) -> Path:
        if save not in made:
            made[save] = save(tmp_path_factory.mktemp(save.__name__) / "tiny")
        return made[save]

    return get


# ---- round trip ------------------------------------------------------------------------------------
def test_save_then_load_gives_identical_weights_and_configs(saved):
    components, path, _ = saved
    loaded = load_single_file(path)
    assert loaded["family"] == components["family"]
    for role in ROLES:
        assert (role in loaded) == (role in components)
        if role in components:
            assert_same_weights(components[role], loaded[role], role)
            assert config_of(loaded[role]) == config_of(components[role]), role
    assert loaded["scheduler_config"] == components["scheduler_config"]
    ids = loaded["tokenizer"]("a red circle").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    if components["family"] == "sdxl":
        assert loaded["tokenizer_2"].pad_token == "!"


def test_file_uses_the_original_layout(saved):
    components, path, _ = saved
    keys = set(load_file(path))
    family = components["family"]
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    if family == "sdxl":
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_applied(saved, dtype):
    components, path, _ = saved
    loaded = load_single_file(path, dtype=dtype)
    for role in ROLES:
        if role in components:
            assert {p.dtype for p in loaded[role].parameters()} == {dtype}
            expected = components[role].state_dict()
            for k, v in loaded[role].state_dict().items():
                assert torch.equal(v, expected[k].to(dtype)), f"{role}: {k}"


# ---- diffusers as the reference ----------------------------------------------------------------------
def test_diffusers_from_single_file_reads_the_same_weights(saved):
    components, path, folder = saved
    ours = load_single_file(path)
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    pipeline_cls = StableDiffusionXLPipeline if components["family"] == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert_same_weights(unet, ours["unet"], "unet (UNet2DConditionModel.from_single_file)")
    assert_same_weights(vae, ours["vae"], "vae (AutoencoderKL.from_single_file)")
    for role in ROLES:
        if role in components:
            assert_same_weights(getattr(pipe, role), ours[role], f"{role} (pipeline from_single_file)")
            assert_same_weights(components[role], ours[role], role)


def test_without_metadata_sizes_come_from_the_tensors(saved, tmp_path):
    """A file that does not come from graphsd (no ``graphsd`` metadata): every size is read
    from the shapes and the weights still equal what diffusers reads."""
    components, path, folder = saved
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)
    with safe_open(str(bare), "pt") as f:
        assert "graphsd" not in (f.metadata() or {})
    ours = load_single_file(bare)
    pipeline_cls = StableDiffusionXLPipeline if components["family"] == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_single_file(str(bare), config=str(folder), local_files_only=True)
    for role in ROLES:
        if role in components:
            assert_same_weights(getattr(pipe, role), ours[role], role)
    unet, expected = config_of(ours["unet"]), config_of(components["unet"])
    for key in ["block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types", "up_block_types",
                "in_channels", "out_channels", "use_linear_projection", "transformer_layers_per_block",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim"]:
        assert unet[key] == expected[key], key
    vae, expected = config_of(ours["vae"]), config_of(components["vae"])
    for key in ["block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"]:
        assert vae[key] == expected[key], key
    for role in ("text_encoder", "text_encoder_2"):
        if role in components:
            for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"]:
                assert getattr(ours[role].config, key) == getattr(components[role].config, key), (role, key)
    if components["family"] == "sdxl":
        assert ours["text_encoder_2"].config.projection_dim == components["text_encoder_2"].config.projection_dim
    assert ours["scheduler_config"] == bundled_config(components["family"], "scheduler")


# ---- real architectures (shapes only, on the meta device) -----------------------------------------
def ldm_shapes(module: torch.nn.Module, rule) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes of ``module``'s weights in a single file."""
    out = {}
    for key, value in module.state_dict().items():
        name, how = rule(key)
        out[name] = torch.empty(*value.shape, *((1, 1) if how == "conv" else ()), device="meta")
    return out


def open_clip_shapes(prefix: str, width: int, layers: int, projection: int | None) -> dict[str, torch.Tensor]:
    t = {prefix + "token_embedding.weight": (49408, width), prefix + "positional_embedding": (77, width)}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        t[block + "attn.in_proj_weight"] = (3 * width, width)
        t[block + "mlp.c_fc.weight"] = (4 * width, width)
    if projection:
        t[prefix + "text_projection"] = (width, projection)
    return {k: torch.empty(*s, device="meta") for k, s in t.items()}


def hf_clip_shapes(prefix: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig.from_dict(bundled_config("sd1", "text_encoder")))
    return {prefix + k: v for k, v in te.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_shapes_give_the_real_configs(family):
    """The shape rules reproduce the bundled SD1.5 / SD2.1 / SDXL-base configs from tensors of
    the real sizes (built on the meta device: no memory, no download)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bundled_config(family, "unet"))
        vae = AutoencoderKL.from_config(bundled_config(family, "vae"))
    tensors = {**ldm_shapes(unet, unet_rule(dict(unet.config))), **ldm_shapes(vae, vae_rule(dict(vae.config)))}
    if family == "sd1":
        tensors.update(hf_clip_shapes(TEXT_PREFIXES[("sd1", "text_encoder")]))
    elif family == "sd2":
        tensors.update(open_clip_shapes(TEXT_PREFIXES[("sd2", "text_encoder")], 1024, 24, 1024))
    else:
        tensors.update(hf_clip_shapes(TEXT_PREFIXES[("sdxl", "text_encoder")]))
        tensors.update(open_clip_shapes(TEXT_PREFIXES[("sdxl", "text_encoder_2")], 1280, 32, 1280))
    assert layout_family(tensors) == family
    strip = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    pooled = 1280 if family == "sdxl" else None
    assert derive_unet_config(family, strip(UNET_PREFIX), pooled) == bundled_config(family, "unet")
    assert derive_vae_config(family, strip(VAE_PREFIX)) == bundled_config(family, "vae")
    roles = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for role in roles:
        derived = derive_text_config(family, role, strip(TEXT_PREFIXES[(family, role)]))
        assert derived == bundled_config(family, role), role


# ---- safety and errors -------------------------------------------------------------------------------
class Payload:
    """Unpickling this object creates a marker file (stands for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_ckpt(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload(marker)}, path)
    return path


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    probe_dir, probe = tmp_path / "probe", tmp_path / "probe-marker"
    probe_dir.mkdir()
    torch.load(malicious_ckpt(probe_dir, probe), weights_only=False)  # the payload is real: unsafe loading runs it
    assert probe.exists()

    marker = tmp_path / "marker"
    path = malicious_ckpt(tmp_path, marker)
    with pytest.raises(ModelFileError, match=r"pickle-based.*convert it to \.safetensors.*allow_pickle"):
        load_single_file(path)
    assert not marker.exists()
    with pytest.raises(ModelFileError, match=r"could not be read safely.*weights_only"):
        load_single_file(path, allow_pickle=True)
    assert not marker.exists()


def test_allowed_pickle_checkpoint_loads_with_weights_only(saved, tmp_path, monkeypatch):
    components, path, _ = saved
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = load_single_file(ckpt, allow_pickle=True)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert_same_weights(components["unet"], loaded["unet"], "unet")
    with pytest.raises(ModelFileError, match="pickle-based"):
        load_single_file(ckpt)


def test_unknown_layouts_name_what_was_found(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, lora)
    with pytest.raises(ModelFileError, match=r"not a Stable Diffusion.*2 tensors.*lora_unet_down_blocks_0_attn1_to_q"):
        load_single_file(lora)

    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(4, 4)}, refiner)
    with pytest.raises(ModelFileError, match="SDXL refiner checkpoint"):
        load_single_file(refiner)

    no_vae = tmp_path / "no_vae.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, no_vae)
    with pytest.raises(ModelFileError, match=r"sd1 checkpoint but has no first_stage_model\.\*"):
        load_single_file(no_vae)

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(save_single_file(tiny_components("sd1"), tmp_path / "sd1.safetensors")).items()
               if not k.startswith("model.diffusion_model.out.")}, partial)
    with pytest.raises(ModelFileError, match=r"model\.diffusion_model\.out\.2\.weight is missing"):
        load_single_file(partial)

    with pytest.raises(ModelFileError, match="does not exist"):
        load_single_file(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFileError, match="not a readable .safetensors"):
        load_single_file(broken)
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown checkpoint format '.gguf'"):
        load_single_file(odd)


def test_mismatched_text_width_is_reported(tmp_path):
    tensors = load_file(save_single_file(tiny_components("sd1"), tmp_path / "sd1.safetensors"))
    prefix = TEXT_PREFIXES[("sd1", "text_encoder")]
    for k in [k for k in tensors if k.startswith(prefix)]:
        del tensors[k]
    tensors.update({prefix + k: v for k, v in tiny_clip("quick_gelu", width=64).state_dict().items()})
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    with pytest.raises(ModelFileError, match="attends to 32-wide text embeddings but the text encoder.* give 64"):
        load_single_file(bad)


# ---- the CheckpointSave node -----------------------------------------------------------------------
def kohya_lora(unet: torch.nn.Module, te: torch.nn.Module, path: Path) -> Path:
    """A small kohya LoRA on one attention projection of the U-Net and of the text encoder."""
    gen = torch.Generator().manual_seed(5)
    targets = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": unet.get_submodule(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": te.get_submodule("encoder.layers.0.self_attn.q_proj")}
    sd = {}
    for name, layer in targets.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=gen)
    save_file(sd, path)
    return path


def test_checkpoint_save_exports_the_patched_model(tiny_folder, tmp_path):
    model = tiny_folder(save_sd1)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    lora = kohya_lora(pipe.unet, pipe.text_encoder, tmp_path / "style.safetensors")
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), models_dir=str(tmp_path)))
    workflow = {"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(model)}},
        "lora": {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": str(lora),
                                                  "strength_model": 0.7, "strength_clip": 0.5}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@lora.unet", "clip": "@lora.clip", "vae": "@model.vae",
                                                      "filename": "merged/styled"}},
    }}
    result = engine.run(workflow, outputs=["save", "lora"])
    assert result.ok, result.to_dict()
    written = tmp_path / "out" / "merged" / "styled.safetensors"
    assert Path(result.outputs["save"]["path"]) == written.resolve()
    assert [Path(f) for f in result.files] == [written.resolve()]
    exported = load_single_file(written)
    handles = result.outputs["lora"]
    for role, handle in (("unet", handles["unet"]), ("text_encoder", handles["clip"])):
        with engine.models.use(handle, role) as patched:
            assert_same_weights(patched, exported[role], f"patched {role}")
        base = getattr(pipe, role)
        assert_same_weights(base, engine.models.get(handle.keys[role]), f"{role} restored after saving")
        changed = [k for k, v in base.state_dict().items() if not torch.equal(v, exported[role].state_dict()[k])]
        assert changed == [{"unet": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                            "text_encoder": "encoder.layers.0.self_attn.q_proj.weight"}[role]]
    assert_same_weights(pipe.vae, exported["vae"], "vae")
    reference = StableDiffusionPipeline.from_single_file(str(written), config=str(model), local_files_only=True)
    assert_same_weights(reference.unet, exported["unet"], "unet read by diffusers")


def test_checkpoint_save_refuses_a_hypernetwork(tiny_folder, tmp_path):
    model = tiny_folder(save_sd1)
    meta = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False, "activate_output": False,
            "dropout_structure": [0, 0, 0], "use_dropout": False, "last_layer_dropout": False}
    hn = Hypernetwork({32: (build_net(32, meta), build_net(32, meta))}, meta)
    save_hypernetwork(hn, tmp_path / "hn.pt")
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), models_dir=str(tmp_path),
                             allow_pickle=True))
    result = engine.run({"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(model)}},
        "hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": str(tmp_path / "hn.pt")}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@hn.unet", "clip": "@model.clip", "vae": "@model.vae"}},
    }})
    [error] = result.errors
    assert error.node_id == "save" and "hypernetwork" in error.message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))


def test_checkpoint_save_after_the_text_encoder_has_run(tiny_folder, tmp_path):
    """Hooks that libraries add for their own bookkeeping (transformers captures outputs through
    forward hooks once a text encoder has run) are no patch: the checkpoint is saved, unchanged."""
    model = tiny_folder(save_sd1)
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), models_dir=str(tmp_path)))
    workflow = {"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(model)}},
        "text": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae"}},
    }}
    assert engine.run(workflow, outputs=["text"]).ok
    result = engine.run(workflow, outputs=["save"])
    assert result.ok, result.to_dict()
    exported = load_single_file(Path(result.outputs["save"]["path"]))
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    assert_same_weights(pipe.text_encoder, exported["text_encoder"], "text encoder")


@pytest.mark.parametrize("filename,message", [
    ("../escape.safetensors", "leaves the output directory"),
    ("/tmp/abs.safetensors", "absolute path"),
    ("link/model.safetensors", "outside the output directory"),
    ("model.ckpt", "written as .safetensors only"),
])
def test_checkpoint_save_confines_the_path(tiny_folder, tmp_path, filename, message):
    model = tiny_folder(save_sd1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path, target_is_directory=True)
    engine = Engine(Settings(device="cpu", output_dir=str(out), models_dir=str(tmp_path)))
    result = engine.run({"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(model)}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                      "filename": filename}},
    }})
    assert not result.ok
    assert message in result.errors[0].message
    assert not list(tmp_path.glob("*.safetensors")) and not list(out.rglob("*.safetensors"))


def fp64_txt2img(source: str, tag: str, positive: str, negative: str, size: int, steps: int) -> dict:
    """Text-to-image nodes (ids suffixed with ``tag``) on the model at ``source``, loaded in float64."""
    return {
        f"model{tag}": {"type": "CheckpointLoader", "inputs": {"path": source, "dtype": "fp64"}},
        f"pos{tag}": {"type": "TextEncode", "inputs": {"clip": f"@model{tag}.clip", "text": positive}},
        f"neg{tag}": {"type": "TextEncode", "inputs": {"clip": f"@model{tag}.clip", "text": negative}},
        f"noise{tag}": {"type": "LatentNoise", "inputs": {"seed": 3, "width": size, "height": size}},
        f"denoise{tag}": {"type": "UNetDenoiseLoop", "inputs": {
            "unet": f"@model{tag}.unet", "positive": f"@pos{tag}.cond", "negative": f"@neg{tag}.cond",
            "noise": f"@noise{tag}.noise", "steps": steps, "cfg": 5.0, "sampler": "euler"}},
        f"image{tag}": {"type": "VAEDecode", "inputs": {"vae": f"@model{tag}.vae", "latent": f"@denoise{tag}.latent"}},
    }


@pytest.mark.parametrize("save_model", [save_sd1, save_sdxl_base], ids=["sd1", "sdxl"])
def test_checkpoint_loader_reads_a_saved_checkpoint(tiny_folder, tmp_path, save_model):
    """CheckpointSave → CheckpointLoader of the file generates the image of the original folder.

    The weights are equal bit for bit (tests above), so both images are the same arithmetic;
    but not on the same memory: a float32 single file's tensors are used where the file put them
    (not at the 64-byte alignment of fresh allocations), and CPU matrix kernels may take another
    code path, hence another summation order, for other alignments. So both are drawn in float64
    and may differ by rounding only: reference.py's bound."""
    model = tiny_folder(save_model)
    out = tmp_path / "out"
    engine = Engine(Settings(device="cpu", output_dir=str(out), models_dir=str(tmp_path)))
    saved = engine.run({"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": str(model)}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                      "filename": "tiny"}},
    }})
    assert saved.ok, saved.to_dict()

    nodes = {**fp64_txt2img(str(model), "a", "a red circle", "blurry", 64, 3),
             **fp64_txt2img(str(out / "tiny.safetensors"), "b", "a red circle", "blurry", 64, 3)}
    result = engine.run({"version": 1, "nodes": nodes},
                        outputs=["imagea", "imageb"])
    assert result.ok, result.to_dict()
    assert_same(result.outputs["imageb"]["image"].pixels, result.outputs["imagea"]["image"].pixels, "image")


def test_checkpoint_save_keeps_the_tokenizer_of_the_builtin_model(tmp_path):
    """graphsd-tiny's text encoder has its own 568-token vocabulary: its single file carries the
    tokenizer, so the reloaded model encodes prompts as the folder does and draws the same image.
    Without the stored tokenizer, loading refuses the file. (Compared in float64 within
    reference.py's bound, for the reason given in the test above; another tokenizer would give
    other token ids, and embeddings that differ by far more.)"""
    out = tmp_path / "out"
    engine = Engine(Settings(device="cpu", output_dir=str(out), models_dir=str(tmp_path)))
    saved = engine.run({"version": 1, "nodes": {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
        "save": {"type": "CheckpointSave", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "vae": "@model.vae",
                                                      "filename": "tiny"}},
    }})
    assert saved.ok, saved.to_dict()
    written = out / "tiny.safetensors"

    prompts = ("a red circle on a white background", "", 64, 4)
    nodes = {**fp64_txt2img("graphsd-tiny", "a", *prompts), **fp64_txt2img(str(written), "b", *prompts)}
    result = engine.run({"version": 1, "nodes": nodes},
                        outputs=["posa", "posb", "nega", "negb", "imagea", "imageb"])
    assert result.ok, result.to_dict()
    for node in ("pos", "neg"):
        assert_same(result.outputs[f"{node}b"]["cond"].embeddings, result.outputs[f"{node}a"]["cond"].embeddings, node)
    assert_same(result.outputs["imageb"]["image"].pixels, result.outputs["imagea"]["image"].pixels, "image")

    with safe_open(str(written), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["graphsd.tokenizer"]).keys() == {"tokenizer"}
    stripped = tmp_path / "no_tokenizer.safetensors"
    save_file(load_file(written), stripped, metadata={k: v for k, v in metadata.items() if k != "graphsd.tokenizer"})
    with pytest.raises(ModelFileError, match="568-token vocabulary, not the 49408 tokens of the CLIP tokenizer"):
        load_single_file(stripped)
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(written), hostile, metadata={**metadata, "graphsd.tokenizer": json.dumps(
        {"tokenizer": {"../../escaped.json": "{}"}})})
    with pytest.raises(ModelFileError, match="'graphsd.tokenizer' metadata is damaged"):
        load_single_file(hostile)
    assert not (Path(tempfile.gettempdir()).parent / "escaped.json").exists()


def test_standard_clip_tokenizers_are_not_stored(saved, tmp_path):
    """Models with the standard CLIP tokenizer(s) get no tokenizer metadata: the loader supplies it."""
    components = {**saved[0], "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer()}
    with safe_open(str(save_single_file(components, tmp_path / "model.safetensors")), framework="pt") as f:
        assert "graphsd.tokenizer" not in f.metadata()
