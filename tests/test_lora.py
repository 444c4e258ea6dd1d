"""LoRA patches: parity with diffusers' own LoRA loading, the LyCORIS formats against their
definitions, exact undo, branches, stacking and the model-family error.

Comparisons with diffusers and with the formats' definitions run in float64 on both sides and
allow the rounding bound of ``reference.py`` (:func:`reference.assert_same`); the tiny models are
built in float32 from their seed and then cast, so float32 and float64 models hold the same
numbers, and LoRA files always hold float32 tensors (the same numbers for both sides)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from reference import assert_same, assert_sum_in_either_order
from safetensors.torch import save_file

from graphsd.std.models.lora import LoraPatch, guess_family, load_lora, match_lora
from graphsd.memory import ModelManager
from graphsd.types import UNet

warnings.filterwarnings("ignore", category=FutureWarning)


# ---- tiny models ---------------------------------------------------------------------------------
def tiny_clip(width: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_sd1(dtype: torch.dtype = torch.float32):
    """The tiny SD1 U-Net and text encoder, drawn in float32 from seed 0, then cast to ``dtype``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ).eval()
    return unet.to(dtype), tiny_clip().to(dtype)


def tiny_sdxl(dtype: torch.dtype = torch.float32):
    """The tiny SDXL U-Net and two text encoders, drawn in float32 from seed 0, then cast to ``dtype``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64, sample_size=8, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    ).eval()
    return unet.to(dtype), tiny_clip().to(dtype), tiny_clip(projection=True).to(dtype)


def weight_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def random_lora(name: str, module, gen, rank: int = 4, alpha: float | None = 2.0, std: float = 0.1) -> dict:
    """A kohya-style LoRA layer (down/up/alpha) for ``module`` under the key stem ``name``."""
    if isinstance(module, torch.nn.Linear):
        down = torch.randn(rank, module.in_features, generator=gen) * std
        up = torch.randn(module.out_features, rank, generator=gen) * std
    else:
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) * std
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * std
    out = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def kohya_sd1(unet, te, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in weight_layers(unet):
        sd.update(random_lora("lora_unet_" + n.replace(".", "_"), m, gen, alpha=3.0 if "conv" in n else 2.0))
    for n, m in weight_layers(te):
        sd.update(random_lora("lora_te_text_model_" + n.replace(".", "_").removeprefix("text_model_"), m, gen, alpha=None))
    return sd


# SGM (original LDM/SDXL) names of the tiny SDXL U-Net's blocks, written out by hand from the
# LDM UNetModel layout: input_blocks = conv_in, [res, res, down-op] of block 0, [res+attn ×2]
# of block 1; output_blocks = [res+attn ×3 + upsampler] of up block 0, [res ×3] of up block 1.
SGM_BLOCKS = {
    "conv_in": "input_blocks_0_0",
    "time_embedding.linear_1": "time_embed_0", "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2",
    "down_blocks.0.resnets.0": "input_blocks_1_0", "down_blocks.0.resnets.1": "input_blocks_2_0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0": "input_blocks_4_0", "down_blocks.1.attentions.0": "input_blocks_4_1",
    "down_blocks.1.resnets.1": "input_blocks_5_0", "down_blocks.1.attentions.1": "input_blocks_5_1",
    "mid_block.resnets.0": "middle_block_0", "mid_block.attentions.0": "middle_block_1", "mid_block.resnets.1": "middle_block_2",
    **{f"up_blocks.0.resnets.{j}": f"output_blocks_{j}_0" for j in range(3)},
    **{f"up_blocks.0.attentions.{j}": f"output_blocks_{j}_1" for j in range(3)},
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    **{f"up_blocks.1.resnets.{j}": f"output_blocks_{3 + j}_0" for j in range(3)},
    "conv_out": "out_2",
}
SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def sgm_name(path: str) -> str:
    for prefix in sorted(SGM_BLOCKS, key=len, reverse=True):
        if path == prefix:
            return SGM_BLOCKS[prefix]
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            return SGM_BLOCKS[prefix] + "_" + SGM_RESNET.get(rest, rest).replace(".", "_")
    raise KeyError(path)


def kohya_sdxl(unet, te1, te2, seed=2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in weight_layers(unet):
        sd.update(random_lora("lora_unet_" + sgm_name(n), m, gen, alpha=1.0))
    for prefix, te in (("lora_te1_", te1), ("lora_te2_", te2)):
        for n, m in weight_layers(te):
            if "text_projection" not in n:
                key = "text_model_" + n.removeprefix("text_model.").replace(".", "_")
                sd.update(random_lora(prefix + key, m, gen, alpha=8.0, rank=8))
    return sd


# ---- helpers --------------------------------------------------------------------------------------
def sd1_outputs(unet, te):
    """U-Net output and text-encoder context on fixed random inputs, in the U-Net's dtype (the
    same numbers for every dtype: drawn in float32, then cast)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 1000, (2, 7), generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(unet.dtype)
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx).sample, ctx


def sdxl_outputs(unet, te1, te2):
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 1000, (1, 7), generator=gen)
    x = torch.randn(1, 4, 8, 8, generator=gen).to(unet.dtype)
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        ctx = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        cond = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=unet.dtype)}
        return unet(x, torch.tensor([400]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample, ctx


def apply_all(patch, components: dict):
    undos = [patch.apply(role, m) for role, m in components.items()]
    return lambda: [u() for u in reversed(undos) if u is not None]


def graphsd_patch(path, components, strength):
    lora = load_lora(path)
    match = match_lora(lora, components)
    return LoraPatch(lora, match.layers, {role: strength for role in components}), match


def assert_all_float64(*models):
    """Every parameter is float64: diffusers' LoRA layers (PEFT) included, so the reference
    computes in float64 as reference.py requires."""
    for model in models:
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.float64}, dtypes


# ---- parity with diffusers (both sides in float64, reference.py) ----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd1_kohya_equals_diffusers(tmp_path, strength):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, te = tiny_sd1(torch.float64)
    path = tmp_path / "sd1.safetensors"
    save_file(kohya_sd1(unet, te), path)
    base = sd1_outputs(unet, te)
    patch, match = graphsd_patch(path, {"unet": unet, "text_encoder": te}, strength)
    assert match.unmatched == [] and match.matched == len(weight_layers(unet)) + len(weight_layers(te))
    undo = apply_all(patch, {"unet": unet, "text_encoder": te})
    ours = sd1_outputs(unet, te)
    undo()

    ref_unet, ref_te = tiny_sd1(torch.float64)
    pipe = StableDiffusionPipeline(unet=ref_unet, text_encoder=ref_te, vae=None, tokenizer=None, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[strength])
    assert_all_float64(pipe.unet, pipe.text_encoder)
    ref = sd1_outputs(pipe.unet, pipe.text_encoder)
    assert (ref[1] - base[1]).abs().max() > 1e-2 and (ref[0] - base[0]).abs().max() > 1e-2  # the LoRA does something
    assert_same(ours[1], ref[1], "text-encoder context")
    assert_same(ours[0], ref[0], "U-Net output")


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sdxl_kohya_sgm_names_equal_diffusers(tmp_path, strength):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet, te1, te2 = tiny_sdxl(torch.float64)
    path = tmp_path / "sdxl.safetensors"
    save_file(kohya_sdxl(unet, te1, te2), path)
    components = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    base = sdxl_outputs(unet, te1, te2)
    patch, match = graphsd_patch(path, components, strength)
    assert match.unmatched == []
    undo = apply_all(patch, components)
    ours = sdxl_outputs(unet, te1, te2)
    undo()

    r_unet, r_te1, r_te2 = tiny_sdxl(torch.float64)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=r_te1, text_encoder_2=r_te2, tokenizer=None, tokenizer_2=None,
                                     unet=r_unet, scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[strength])
    assert_all_float64(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    ref = sdxl_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert (ref[0] - base[0]).abs().max() > 1e-2 and (ref[1] - base[1]).abs().max() > 1e-2
    assert_same(ours[1], ref[1], "text-encoder context")
    assert_same(ours[0], ref[0], "U-Net output")


# ---- other formats against their definitions -----------------------------------------------------
# The models are float64 and the expected deltas are computed in float64 from the very float32
# tensors written to the file (cast first, then multiplied), so graphsd (which computes a
# float64 model's deltas in float64) and the definition evaluate the same exact expression,
# only with other kernels and in another order: reference.py's bound applies.
def expected_weights(model, deltas: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() + strength * deltas[n].reshape(m.weight.shape)
            for n, m in model.named_modules() if n in deltas}


def check_weights(model, expected):
    for n, w in expected.items():
        assert_same(model.get_submodule(n).weight.detach(), w, n)


def test_peft_keys_apply_b_times_a(tmp_path):
    unet, te = tiny_sd1(torch.float64)
    gen = torch.Generator().manual_seed(3)
    sd, deltas = {}, {}
    for n, m in weight_layers(unet)[:12] + [(f"te:{n}", m) for n, m in weight_layers(te)[:4]]:
        role, path = ("text_encoder", n[3:]) if n.startswith("te:") else ("unet", n)
        layer = random_lora("x", m, gen)
        a, b = layer["x.lora_down.weight"], layer["x.lora_up.weight"]
        if path.endswith(("attn1.to_k", "attn1.to_out.0")):  # diffusers' old attention-processor spelling
            stem = path.replace("attn1.to_k", "attn1.processor.to_k").replace("attn1.to_out.0", "attn1.processor.to_out")
            sd[f"{role}.{stem}_lora.down.weight"], sd[f"{role}.{stem}_lora.up.weight"] = a, b
        elif path.endswith("attn1.to_v"):
            sd[f"{role}.{path}.lora.down.weight"], sd[f"{role}.{path}.lora.up.weight"] = a, b
        else:
            sd[f"{role}.{path}.lora_A.weight"], sd[f"{role}.{path}.lora_B.weight"] = a, b
        deltas[(role, path)] = b.flatten(1).double() @ a.flatten(1).double()  # PEFT: no alpha in the file → scale 1
    save_file(sd, tmp_path / "peft.safetensors")
    components = {"unet": unet, "text_encoder": te}
    expected = {role: expected_weights(components[role], {p: d for (r, p), d in deltas.items() if r == role}, 0.8)
                for role in components}
    patch, match = graphsd_patch(tmp_path / "peft.safetensors", components, 0.8)
    assert match.matched == 16 and not match.unmatched
    apply_all(patch, components)
    for role, model in components.items():
        check_weights(model, expected[role])


def conv_and_linear(unet):
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv3 = "down_blocks.0.resnets.0.conv1"
    conv1 = "down_blocks.1.resnets.0.conv_shortcut"
    return {n: unet.get_submodule(n) for n in (linear, conv3, conv1)}


def test_loha_matches_its_definition(tmp_path):
    unet, _ = tiny_sd1(torch.float64)
    gen = torch.Generator().manual_seed(4)
    sd, deltas, rank, alpha = {}, {}, 4, 2.0
    for n, m in conv_and_linear(unet).items():
        out_dim, in_dim = m.weight.shape[0], m.weight[0].numel()
        w = {k: torch.randn(*shape, generator=gen) * 0.3 for k, shape in
             (("w1_a", (out_dim, rank)), ("w1_b", (rank, in_dim)), ("w2_a", (out_dim, rank)), ("w2_b", (rank, in_dim)))}
        stem = "lora_unet_" + n.replace(".", "_")
        sd.update({f"{stem}.hada_{k}": v for k, v in w.items()})
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        # Hadamard product of two low-rank products, scaled by alpha / rank (FedPara / LyCORIS LoHa)
        w = {k: v.double() for k, v in w.items()}
        delta = torch.einsum("or,ri->oi", w["w1_a"], w["w1_b"]) * torch.einsum("or,ri->oi", w["w2_a"], w["w2_b"])
        deltas[n] = delta * (alpha / rank)
    save_file(sd, tmp_path / "loha.safetensors")
    expected = expected_weights(unet, deltas, 0.7)
    patch, match = graphsd_patch(tmp_path / "loha.safetensors", {"unet": unet}, 0.7)
    assert match.matched == 3
    patch.apply("unet", unet)
    check_weights(unet, expected)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product from its definition: block (i, j) is a[i, j] · b."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def test_lokr_matches_its_definition(tmp_path):
    unet, _ = tiny_sd1(torch.float64)
    gen = torch.Generator().manual_seed(5)
    sd, deltas = {}, {}
    for i, (n, m) in enumerate(conv_and_linear(unet).items()):
        out_dim, in_dim = m.weight.shape[:2]
        k = m.weight[0, 0].numel()
        a, b = 4, 2  # w1: [a, b] full; w2: [out/a, in/b · k] as a rank-r product, or full
        w1 = torch.randn(a, b, generator=gen) * 0.1  # the file's float32 numbers, from which the delta is computed
        stem = "lora_unet_" + n.replace(".", "_")
        sd[f"{stem}.lokr_w1"] = w1
        if i % 2 == 0:
            rank, alpha = 2, 1.0
            w2a, w2b = torch.randn(out_dim // a, rank, generator=gen), torch.randn(rank, in_dim // b * k, generator=gen)
            sd[f"{stem}.lokr_w2_a"], sd[f"{stem}.lokr_w2_b"], sd[f"{stem}.alpha"] = w2a, w2b, torch.tensor(alpha)
            w2, scale = w2a.double() @ w2b.double(), alpha / rank
        else:
            w2 = torch.randn(out_dim // a, in_dim // b * k, generator=gen)
            sd[f"{stem}.lokr_w2"], sd[f"{stem}.alpha"] = w2, torch.tensor(5.0)
            w2, scale = w2.double(), 1.0  # no decomposed factor: alpha is not used
        deltas[n] = kron(w1.double(), w2).reshape(m.weight.shape) * scale
    save_file(sd, tmp_path / "lokr.safetensors")
    expected = expected_weights(unet, deltas, -0.5)
    patch, match = graphsd_patch(tmp_path / "lokr.safetensors", {"unet": unet}, -0.5)
    assert match.matched == 3
    patch.apply("unet", unet)
    check_weights(unet, expected)


# ---- undo, branches, stacking, strength 0 ----------------------------------------------------------
def test_undo_restores_bit_for_bit(tmp_path):
    unet, te = tiny_sd1()
    save_file(kohya_sd1(unet, te), tmp_path / "a.safetensors")
    before = {k: v.clone() for k, v in {**unet.state_dict(), **{f"te.{k}": v for k, v in te.state_dict().items()}}.items()}
    patch, _ = graphsd_patch(tmp_path / "a.safetensors", {"unet": unet, "text_encoder": te}, 0.77)
    for _ in range(3):
        undo = apply_all(patch, {"unet": unet, "text_encoder": te})
        assert not torch.equal(unet.conv_in.weight, before["conv_in.weight"])
        undo()
    after = {**unet.state_dict(), **{f"te.{k}": v for k, v in te.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)


def handle(manager, key, *patches):
    return UNet(manager, {"unet": key}, patches=patches)


def test_two_branches_through_the_manager(tmp_path):
    unet, te = tiny_sd1()
    save_file(kohya_sd1(unet, te), tmp_path / "a.safetensors")
    manager = ModelManager("cpu")
    key = manager.add("unet", unet)
    plain_ref = sd1_outputs(copy.deepcopy(unet), te)[0]
    patch, _ = graphsd_patch(tmp_path / "a.safetensors", {"unet": unet}, 1.0)
    reference = copy.deepcopy(unet)
    apply_all(patch, {"unet": reference})
    lora_ref = sd1_outputs(reference, te)[0]
    with_lora, without = handle(manager, key, patch), handle(manager, key)
    for ref, expected in ((with_lora, lora_ref), (without, plain_ref), (with_lora, lora_ref), (without, plain_ref)):
        with manager.use(ref, "unet") as module:
            assert torch.equal(sd1_outputs(module, te)[0], expected)
    assert with_lora.fingerprint() != without.fingerprint()


def test_stacking_is_order_independent(tmp_path):
    """W + d1 + d2 and W + d2 + d1 (float32 U-Net) are the same sum rounded in two orders: they
    agree within the rounding of two additions (``reference.assert_sum_in_either_order``). The
    U-Net's outputs would amplify this rounding by an amount no argument bounds, so the weights
    are compared."""
    unet, te = tiny_sd1()
    save_file(kohya_sd1(unet, te, seed=1), tmp_path / "a.safetensors")
    save_file(kohya_sd1(unet, te, seed=9), tmp_path / "b.safetensors")
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    pa, _ = graphsd_patch(tmp_path / "a.safetensors", {"unet": unet}, 0.8)
    pb, _ = graphsd_patch(tmp_path / "b.safetensors", {"unet": unet}, -0.4)
    manager = ModelManager("cpu")
    key = manager.add("unet", unet)

    def weights(*patches):
        with manager.use(handle(manager, key, *patches), "unet") as module:
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    one, two, only_a, only_b = weights(pa, pb), weights(pb, pa), weights(pa), weights(pb)
    assert_sum_in_either_order(one, two, only_a, only_b)
    changed = sum(not torch.equal(w, original[name]) for name, w in one.items())
    assert changed == len(weight_layers(unet))  # both LoRAs patch every Linear / Conv2d weight
    assert not torch.equal(one["conv_in.weight"], only_a["conv_in.weight"])  # the stack holds both LoRAs
    assert not torch.equal(one["conv_in.weight"], only_b["conv_in.weight"])
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())


def test_strength_zero_is_unpatched(tmp_path):
    unet, te = tiny_sd1()
    save_file(kohya_sd1(unet, te), tmp_path / "a.safetensors")
    base = sd1_outputs(unet, te)[0]
    patch, _ = graphsd_patch(tmp_path / "a.safetensors", {"unet": unet}, 0.0)
    assert patch.apply("unet", unet) is None
    assert torch.equal(sd1_outputs(unet, te)[0], base)


def test_roles_without_layers_are_untouched(tmp_path):
    unet, te = tiny_sd1()
    sd = {k: v for k, v in kohya_sd1(unet, te).items() if k.startswith("lora_unet_")}
    save_file(sd, tmp_path / "unet_only.safetensors")
    patch, _ = graphsd_patch(tmp_path / "unet_only.safetensors", {"unet": unet, "text_encoder": te}, 1.0)
    assert patch.apply("text_encoder", te) is None and patch.apply("vae", torch.nn.Linear(2, 2)) is None


# ---- what does not fit ------------------------------------------------------------------------------
def test_sdxl_lora_on_sd1_names_the_family(tmp_path):
    from graphsd.std.models.lora import LoraFormatError, check_family

    sdxl_unet, te1, te2 = tiny_sdxl()
    save_file(kohya_sdxl(sdxl_unet, te1, te2), tmp_path / "sdxl.safetensors")
    unet, te = tiny_sd1()
    lora = load_lora(tmp_path / "sdxl.safetensors")
    assert guess_family(lora) == "a model (cross-attention context width 64)"
    with pytest.raises(LoraFormatError, match="context width 64.*context width is 32"):
        check_family(lora, {"unet": unet, "text_encoder": te})
    check_family(lora, {"unet": sdxl_unet, "text_encoder": te1, "text_encoder_2": te2})


def test_lora_matching_nothing_is_reported(tmp_path):
    unet, te = tiny_sd1()
    gen = torch.Generator().manual_seed(0)
    sd = random_lora("lora_unet_no_such_layer", torch.nn.Linear(8, 8), gen)
    sd.update(random_lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", torch.nn.Linear(32, 37), gen))
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(32)
    sd.update(random_lora("lora_unet_conv_in", torch.nn.Conv2d(5, 32, 3), gen))  # 5 input channels, not 4
    save_file(sd, tmp_path / "x.safetensors")
    lora = load_lora(tmp_path / "x.safetensors")
    match = match_lora(lora, {"unet": unet, "text_encoder": te})
    assert match.matched == 0 and len(match.unmatched) == 4
    assert guess_family(lora) == "sdxl (two text encoders)"


def test_pickle_lora_needs_permission(tmp_path):
    from graphsd.std.models.lora import LoraFormatError

    unet, te = tiny_sd1()
    torch.save(kohya_sd1(unet, te), tmp_path / "old.pt")
    with pytest.raises(LoraFormatError, match="pickle"):
        load_lora(tmp_path / "old.pt")
    assert load_lora(tmp_path / "old.pt", allow_pickle=True).targets


def test_loha_tucker_cores_rebuild_the_conv_kernel(tmp_path):
    unet, _ = tiny_sd1(torch.float64)
    name = "down_blocks.0.resnets.0.conv1"
    conv = unet.get_submodule(name)
    out_dim, in_dim, kh, kw = conv.weight.shape
    gen = torch.Generator().manual_seed(8)
    r = 3
    w = {"hada_t1": (r, r, kh, kw), "hada_w1_a": (r, out_dim), "hada_w1_b": (r, in_dim),
         "hada_t2": (r, r, kh, kw), "hada_w2_a": (r, out_dim), "hada_w2_b": (r, in_dim)}
    w = {k: torch.randn(*shape, generator=gen) * 0.3 for k, shape in w.items()}

    def factor(t, a, b):  # per kernel position: aᵀ · t[:, :, y, x] · b (Tucker-2 reconstruction)
        return torch.stack([torch.stack([a.T @ t[:, :, y, x] @ b for x in range(kw)], -1) for y in range(kh)], -2)

    w64 = {k: v.double() for k, v in w.items()}  # the file's float32 numbers, multiplied in float64
    delta = factor(w64["hada_t1"], w64["hada_w1_a"], w64["hada_w1_b"]) * factor(w64["hada_t2"], w64["hada_w2_a"], w64["hada_w2_b"])
    stem = "lora_unet_" + name.replace(".", "_")
    save_file({**{f"{stem}.{k}": v for k, v in w.items()}, f"{stem}.alpha": torch.tensor(1.5)}, tmp_path / "t.safetensors")
    expected = expected_weights(unet, {name: delta * 1.5 / r}, 1.0)
    patch, match = graphsd_patch(tmp_path / "t.safetensors", {"unet": unet}, 1.0)
    assert match.matched == 1
    patch.apply("unet", unet)
    check_weights(unet, expected)


def test_a_delta_does_not_depend_on_the_order_its_rank_terms_are_summed():
    """Under a VRAM budget a streamed layer's delta is computed on the CPU and a resident one's on
    the GPU, whose matrix products sum the rank terms in another order: the delta must be the
    same either way, or an fp16 weight rounds differently where it streams. Reordering the rank
    components (the same LoRA) stands in for the other device's order; the delta must also be the
    exact product rounded once to float32."""
    from graphsd.std.models.lora import LoraLayer

    gen = torch.Generator().manual_seed(3)
    rank = 64
    down, up = torch.randn(rank, 96, generator=gen), torch.randn(80, rank, generator=gen)
    order = torch.randperm(rank, generator=gen)
    shape = torch.Size((80, 96))
    delta = LoraLayer("lora", {"down": down, "up": up}, alpha=8.0).delta(shape)
    reordered = LoraLayer("lora", {"down": down[order], "up": up[:, order]}, alpha=8.0).delta(shape)
    assert delta.dtype == torch.float32
    assert torch.equal(delta, reordered)
    assert torch.equal(delta, (up.double() @ down.double() * (8.0 / rank)).float())


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_delta_added_in_pieces_of_rows_equals_the_whole_delta(monkeypatch, kernel):
    """A LoRA is added into each weight a few rows at a time (bounded temporaries on the device):
    the pieces must cover every row once and equal the whole delta to the bit (the addition is
    elementwise, so the patched weight is then the one the whole delta gives)."""
    import graphsd.std.models.lora as lora_module
    from graphsd.std.models.lora import LoraLayer

    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 10, kernel)
    down = torch.randn(3, 6, kernel, kernel, generator=gen)
    up = torch.randn(10, 3, 1, 1, generator=gen)
    layer = LoraLayer("lora", {"down": down, "up": up}, alpha=2.0)
    shape = conv.weight.shape
    whole = layer.delta(shape)
    monkeypatch.setattr(lora_module, "DELTA_PIECE", 2 * 6 * kernel * kernel + 1)  # two rows a piece, the last one alone
    pieces = list(layer.pieces(shape))
    assert [rows for rows, _ in pieces] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    assert torch.equal(torch.cat([d for _, d in pieces]), whole)
