"""More LoRA formats (LoCon with Tucker cores, diffusers' attention-processor files, PEFT
adapters with lora_alpha / r from their metadata) against independent references, and the
errors for damaged files.

Float tolerances come from the rounding of the operations compared (see ``rounding_bound``):
exact agreement is not expected, since graphsd merges the delta into the weight while the
references apply the low-rank factors one after another.
"""

from __future__ import annotations

import json
import re
import resource
import struct
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_lora import graphsd_patch, kohya_sd1, tiny_sd1, weight_layers

from graphsd.std.models.lora import LoraFormatError, load_lora

warnings.filterwarnings("ignore", category=FutureWarning)

EPS = torch.finfo(torch.float32).eps  # 2⁻²³: twice the unit roundoff u of round-to-nearest


def forward(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s linear map (Linear or Conv2d with its stride/padding) with another weight and bias."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, module.stride, module.padding)


def rounding_bound(module, x: torch.Tensor, abs_delta: torch.Tensor, terms: int) -> float:
    """Largest difference two fp32 evaluations of ``module`` (weight W + Δ) on ``x`` may show.

    Each output is a sum of products; computed in floating point with at most ``terms``
    roundings along the way, it is within ``terms · u · Σ|aᵢ·bᵢ|`` of the exact value (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §3.1, first order; u = eps/2). Two such
    computations are within ``terms · eps · Σ|aᵢ·bᵢ|`` of each other. ``Σ|aᵢ·bᵢ|`` is the map
    applied to ``|x|`` with weight ``|W| + |Δ|`` (``abs_delta`` bounds ``|Δ|`` element-wise: the
    low-rank product of the factors' absolute values), plus ``|bias|``."""
    bias = module.bias.detach().abs() if module.bias is not None else None
    magnitude = forward(module, x.abs(), module.weight.detach().abs() + abs_delta.reshape(module.weight.shape), bias)
    return terms * EPS * magnitude.max().item()


def module_input(module, gen: torch.Generator) -> torch.Tensor:
    if isinstance(module, torch.nn.Linear):
        return torch.randn(3, module.in_features, generator=gen)
    return torch.randn(2, module.in_channels, 8, 8, generator=gen)


def fan_in(module) -> int:
    """Number of products summed into one output of the module (inputs × kernel positions)."""
    return module.weight[0].numel()


# ---- LyCORIS LoCon with Tucker cores ---------------------------------------------------------------
def locon_tucker(unet, gen, rank: int = 4, alpha: float = 2.0) -> tuple[dict, dict]:
    """A LoCon file for every layer: k×k convolutions as down 1×1 / mid k×k / up 1×1 (Tucker),
    the rest as plain down/up. Returns the file's tensors and, per k×k conv, (down, mid, up)."""
    sd, factors = {}, {}
    for n, m in weight_layers(unet):
        stem = "lora_unet_" + n.replace(".", "_")
        out_dim, in_dim = m.weight.shape[:2]
        if m.weight.ndim == 4 and m.weight.shape[2:] != (1, 1):
            down = torch.randn(rank, in_dim, 1, 1, generator=gen) * 0.2
            mid = torch.randn(rank, rank, *m.kernel_size, generator=gen) * 0.2
            up = torch.randn(out_dim, rank, 1, 1, generator=gen) * 0.2
            sd[f"{stem}.lora_mid.weight"] = mid
            factors[n] = (down, mid, up)
        else:
            down = torch.randn(rank, *m.weight.shape[1:], generator=gen) * 0.2
            up = torch.randn(out_dim, rank, *([1, 1] if m.weight.ndim == 4 else []), generator=gen) * 0.2
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd, factors


def test_locon_tucker_equals_the_three_convolutions(tmp_path):
    unet, _ = tiny_sd1()
    rank, alpha, strength = 4, 2.0, 0.7
    sd, factors = locon_tucker(unet, torch.Generator().manual_seed(11), rank, alpha)
    save_file(sd, tmp_path / "locon.safetensors")
    originals = {n: (unet.get_submodule(n).weight.detach().clone(), unet.get_submodule(n).bias) for n in factors}
    patch, match = graphsd_patch(tmp_path / "locon.safetensors", {"unet": unet}, strength)
    assert match.unmatched == [] and match.matched == len(weight_layers(unet))
    assert any(unet.get_submodule(n).stride == (2, 2) for n in factors)  # the downsampler is among them
    patch.apply("unet", unet)

    gen = torch.Generator().manual_seed(12)
    scale = strength * alpha / rank
    for n, (down, mid, up) in factors.items():
        conv = unet.get_submodule(n)
        x = module_input(conv, gen)
        weight, bias = originals[n]
        # Reference, in float64 so that its own rounding is negligible: the original conv plus
        # the LoCon branch as three convolutions in turn (1×1, k×k with the layer's stride and
        # padding, 1×1), never merged into one kernel.
        x64 = x.double()
        branch = F.conv2d(F.conv2d(F.conv2d(x64, down.double()), mid.double(), stride=conv.stride,
                                   padding=conv.padding), up.double())
        plain = F.conv2d(x64, weight.double(), bias.double(), conv.stride, conv.padding)
        reference = plain + scale * branch
        ours = F.conv2d(x64, conv.weight.detach().double(), bias.double(), conv.stride, conv.padding)
        # graphsd's fp32 merge: each kernel entry is a sum of rank² products (the Tucker
        # contraction), then scaled twice and added to the weight: rank² + 3 roundings. The
        # float64 convolutions add nothing measurable, so that is the whole error budget.
        abs_delta = scale * torch.einsum("ijyx,jc,pi->pcyx", mid.abs(), down.flatten(1).abs(), up.flatten(1).abs())
        tol = rounding_bound(conv, x, abs_delta, rank * rank + 3)
        assert (reference - plain).abs().max() > 100 * tol  # the LoCon branch changes far more than the tolerance
        torch.testing.assert_close(ours, reference, atol=tol, rtol=0)


# ---- diffusers' attention-processor files (save_attn_procs, 2023) -------------------------------------
def attention_projections(unet) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}


def attn_procs_file(unet, gen, rank: int = 4) -> dict:
    """Keys as ``LoRAAttnProcessor`` saved them: no ``unet.`` prefix, ``<attn>.processor.to_q_lora.down.weight``."""
    sd = {}
    for n, m in attention_projections(unet).items():
        attn, proj = (n.removesuffix(".to_out.0"), "to_out") if n.endswith(".to_out.0") else n.rsplit(".", 1)
        sd[f"{attn}.processor.{proj}_lora.down.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.2
        sd[f"{attn}.processor.{proj}_lora.up.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.2
    return sd


def check_modules_equal_peft(ours_model, peft_model, paths, gen) -> None:
    """Each patched module of ``ours_model`` against the same module of ``peft_model`` (PEFT's
    LoRA layer: base output plus ``B(A(x)) · scale``) on a random input."""
    for path in paths:
        ours, ref = ours_model.get_submodule(path), peft_model.get_submodule(path)
        base = ref.get_base_layer()
        x = module_input(base, gen)
        with torch.no_grad():
            expected, got, plain = ref(x), ours(x), base(x)
        (adapter,) = ref.lora_A.keys()
        a, b, scale = ref.lora_A[adapter].weight, ref.lora_B[adapter].weight, ref.scaling[adapter]
        rank = a.shape[0]
        abs_delta = scale * (b.flatten(1).abs() @ a.flatten(1).abs())
        # Roundings along each side's longest chain: PEFT sums fan_in products for A·x, rank for
        # B·(A·x), scales, adds it to the base output and the bias; graphsd sums rank products
        # per merged weight entry, scales twice, adds to the weight, then sums fan_in products
        # and adds the bias. Both stay within fan_in + rank + 4.
        tol = rounding_bound(base, x, abs_delta, fan_in(base) + rank + 4)
        assert (expected - plain).abs().max() > 100 * tol, path  # the adapter changes far more than the tolerance
        torch.testing.assert_close(got, expected, atol=tol, rtol=0, msg=lambda m: f"{path}: {m}")


def test_diffusers_attn_procs_file_equals_diffusers(tmp_path):
    unet, _ = tiny_sd1()
    save_file(attn_procs_file(unet, torch.Generator().manual_seed(21)), tmp_path / "pytorch_lora_weights.safetensors")
    patch, match = graphsd_patch(tmp_path / "pytorch_lora_weights.safetensors", {"unet": unet}, 1.0)
    paths = attention_projections(unet)
    assert match.unmatched == [] and set(match.layers["unet"]) == set(paths)
    patch.apply("unet", unet)

    # diffusers' own loader for this layout (the pipeline's load_lora_weights keeps only
    # "unet."-prefixed keys, so the U-Net's loader is called with prefix=None, as diffusers advises)
    ref, _ = tiny_sd1()
    ref.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix=None, adapter_name="a")
    assert ref.peft_config["a"].lora_alpha == ref.peft_config["a"].r  # scale 1
    check_modules_equal_peft(unet, ref, paths, torch.Generator().manual_seed(22))


# ---- PEFT adapters: lora_alpha / r from the file's metadata -----------------------------------------
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]


def peft_paths(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_diffusers_lora_metadata_scales_by_alpha_over_r(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, _ = tiny_sd1()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        rank_pattern={"^down_blocks.0.attentions.0.proj_in": 2}, alpha_pattern={"attn2.to_k": 3})
    torch.manual_seed(31)  # init_lora_weights=False: random A and B
    ref.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref),
                                              unet_lora_adapter_metadata=config.to_dict())
    unet, _ = tiny_sd1()
    patch, match = graphsd_patch(tmp_path / "pytorch_lora_weights.safetensors", {"unet": unet}, 1.0)
    paths = peft_paths(ref)
    assert match.unmatched == [] and set(match.layers["unet"]) == set(paths)
    assert {ref.get_submodule(p).scaling["default"] for p in paths} == {2.0, 4.0, 0.75}  # alpha/r, pattern overrides
    patch.apply("unet", unet)
    check_modules_equal_peft(unet, ref, paths, torch.Generator().manual_seed(32))


@pytest.mark.slow
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("open_folder", [False, True])
def test_peft_adapter_config_scales_by_alpha_over_r(tmp_path, use_rslora, open_folder):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_sd1()
    torch.manual_seed(41)
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=TARGETS,
                                          init_lora_weights=False))
    ref.save_pretrained(tmp_path)  # adapter_model.safetensors (keys base_model.model.…) + adapter_config.json
    unet, _ = tiny_sd1()
    path = tmp_path if open_folder else tmp_path / "adapter_model.safetensors"
    patch, match = graphsd_patch(path, {"unet": unet}, 1.0)
    model = ref.base_model.model
    paths = peft_paths(model)
    assert match.unmatched == [] and set(match.layers["unet"]) == set(paths)
    assert {model.get_submodule(p).scaling["default"] for p in paths} == {4.0 if use_rslora else 2.0}  # 8/√4, 8/4
    patch.apply("unet", unet)
    check_modules_equal_peft(unet, model, paths, torch.Generator().manual_seed(42))


def test_peft_metadata_rank_must_match_tensors(tmp_path):
    unet, _ = tiny_sd1()
    gen = torch.Generator().manual_seed(0)
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(name)
    sd = {f"unet.{name}.lora_A.weight": torch.randn(2, layer.in_features, generator=gen),
          f"unet.{name}.lora_B.weight": torch.randn(layer.out_features, 2, generator=gen)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.peft_type": "LORA"})}
    save_file(sd, tmp_path / "l.safetensors", metadata=meta)
    with pytest.raises(LoraFormatError, match=r"'l.safetensors'.*rank 4.*rank 2"):
        load_lora(tmp_path / "l.safetensors")


# ---- damaged files ----------------------------------------------------------------------------------
@pytest.fixture
def real_lora(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file(kohya_sd1(*tiny_sd1()), path)
    return path


def test_truncated_safetensors_names_the_file(tmp_path, real_lora):
    data = real_lora.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match=r"'half\.safetensors' is truncated"):
        load_lora(tmp_path / "half.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoraFormatError, match=r"'empty\.safetensors' is empty"):
        load_lora(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("header", ["length", "tensor"])
def test_huge_safetensors_claims_fail_fast(tmp_path, header):
    if header == "length":  # the 8-byte header length claims 2⁶² bytes
        data = struct.pack("<Q", 2**62) + b"{}"
    else:  # a 2²¹ × 2²¹ fp32 tensor (16 TiB) in a 130-byte file
        meta = json.dumps({"x.lora_down.weight": {"dtype": "F32", "shape": [2**21, 2**21], "data_offsets": [0, 2**44]}})
        data = struct.pack("<Q", len(meta)) + meta.encode() + bytes(16)
    (tmp_path / "huge.safetensors").write_bytes(data)
    peak_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(LoraFormatError, match=r"'huge\.safetensors' is truncated or damaged"):
        load_lora(tmp_path / "huge.safetensors")
    # refused from the header alone: no allocation of the claimed size (ru_maxrss is in KiB), no read
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024
    assert time.perf_counter() - start < 5.0


class Payload:
    """An object that is not a tensor: torch.load(weights_only=True) refuses it."""


def test_pickle_messages_never_advise_weights_only_false(tmp_path, real_lora):
    from safetensors.torch import load_file

    tensors = load_file(real_lora)
    torch.save(tensors, tmp_path / "plain.pt")
    with pytest.raises(LoraFormatError) as refused:
        load_lora(tmp_path / "plain.pt")
    message = str(refused.value)
    assert "'plain.pt'" in message and "--allow-pickle" in message and "weights_only=True" in message
    assert ".safetensors" in message and "weights_only=False" not in message

    torch.save({**tensors, "extra": Payload()}, tmp_path / "payload.pt")
    with pytest.raises(LoraFormatError) as refused:
        load_lora(tmp_path / "payload.pt", allow_pickle=True)
    message = str(refused.value)
    assert "'payload.pt'" in message and "Payload" in message and ".safetensors" in message
    assert "weights_only=False" not in message

    data = (tmp_path / "plain.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match=r"'cut\.pt' is truncated"):
        load_lora(tmp_path / "cut.pt", allow_pickle=True)


def test_folder_without_a_lora_file(tmp_path):
    with pytest.raises(LoraFormatError, match="adapter_model.safetensors"):
        load_lora(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, real_lora, bad):
    from safetensors.torch import load_file

    tensors = load_file(real_lora)
    keys = sorted(k for k in tensors if k.endswith(".lora_up.weight"))
    first, later = keys[3], keys[-1]
    tensors[later][0, 0] = float("nan")
    tensors[first][1, 0] = bad
    save_file(tensors, tmp_path / "diverged.safetensors")
    expected = rf"'diverged\.safetensors': '{re.escape(first)}' holds NaN or infinite.*diverged training run"
    with pytest.raises(LoraFormatError, match=expected):
        load_lora(tmp_path / "diverged.safetensors")

