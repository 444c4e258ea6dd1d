"""A1111 hypernetworks: file reading, the patched U-Net against a reference written from the
format's definition, strength 0, exact undo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assert_same
from test_lora import sd1_outputs, tiny_sd1

from graphsd.std.models.hypernetwork import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkFormatError,
    HypernetworkPatch,
    load_hypernetwork,
    save_hypernetwork,
)

# Two layouts of A1111's ``linear`` Sequential, with the indices its layers get:
# A: [1, 2, 1], relu, no layer norm, no dropout, no output activation → Linear 0, ReLU 1, Linear 2
# B: [1, 2, 2, 1], tanh, layer norm, dropout (last layer too), output activation →
#    Linear 0, Tanh 1, LN 2, Dropout 3, Linear 4, Tanh 5, LN 6, Dropout 7, Linear 8, Tanh 9, LN 10
LAYOUT_A = {"meta": {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
                     "use_dropout": False, "activate_output": False, "last_layer_dropout": False},
            "linears": [0, 2], "norms": [], "act": torch.relu}
LAYOUT_B = {"meta": {"layer_structure": [1, 2, 2, 1], "activation_func": "tanh", "is_layer_norm": True,
                     "use_dropout": True, "activate_output": True, "last_layer_dropout": True},
            "linears": [0, 4, 8], "norms": [2, 6, 10], "act": torch.tanh}


def make_file(layout, widths=(32, 64), seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    data = {**layout["meta"], "name": "test", "step": 12}
    structure = layout["meta"]["layer_structure"]
    for w in widths:
        pair = []
        for _ in range(2):
            sd = {}
            for i, idx in enumerate(layout["linears"]):
                n_in, n_out = int(w * structure[i]), int(w * structure[i + 1])
                sd[f"linear.{idx}.weight"] = torch.randn(n_out, n_in, generator=gen) * 0.2
                sd[f"linear.{idx}.bias"] = torch.randn(n_out, generator=gen) * 0.1
            for i, idx in enumerate(layout["norms"]):
                n_out = int(w * structure[i + 1])
                sd[f"linear.{idx}.weight"] = 1 + torch.randn(n_out, generator=gen) * 0.1
                sd[f"linear.{idx}.bias"] = torch.randn(n_out, generator=gen) * 0.1
            pair.append(sd)
        data[w] = pair
    return data


def reference_net(sd: dict, layout) -> callable:
    """x + net(x)·s from the format's definition, with plain tensor operations (in x's dtype)."""
    last = len(layout["linears"]) - 1

    def f(x, s):
        p = {k: v.to(x.dtype) for k, v in sd.items()}
        h = x
        for i, idx in enumerate(layout["linears"]):
            h = h @ p[f"linear.{idx}.weight"].T + p[f"linear.{idx}.bias"]
            if i < last or layout["meta"]["activate_output"]:
                h = layout["act"](h)
            if layout["norms"]:
                n = layout["norms"][i]
                h = F.layer_norm(h, h.shape[-1:], p[f"linear.{n}.weight"], p[f"linear.{n}.bias"])
        return x + h * s

    return f


class Transformed(torch.nn.Module):
    """Reference: replace a projection by ``proj(f(x))``."""

    def __init__(self, proj, f, s):
        super().__init__()
        self.proj, self.f, self.s = proj, f, s

    def forward(self, x):
        return self.proj(self.f(x, self.s))


def reference_unet(data: dict, layout, strength: float, dtype: torch.dtype = torch.float32):
    unet, te = tiny_sd1(dtype)
    touched = 0
    for m in list(unet.modules()):
        if hasattr(m, "to_k") and isinstance(m.to_k, torch.nn.Linear) and m.to_k.in_features in data:
            k_sd, v_sd = data[m.to_k.in_features]
            m.to_k = Transformed(m.to_k, reference_net(k_sd, layout), strength)
            m.to_v = Transformed(m.to_v, reference_net(v_sd, layout), strength)
            touched += 1
    return unet, te, touched


@pytest.mark.parametrize("layout", [LAYOUT_A, LAYOUT_B], ids=["relu", "tanh-norm-dropout"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_patch_matches_reference(tmp_path, layout, strength):
    """Both U-Nets in float64 (graphsd casts the hypernetwork to the U-Net's dtype; the reference
    computes in its input's dtype): reference.py's bound."""
    data = make_file(layout)
    torch.save(data, tmp_path / "hn.pt")
    hn = load_hypernetwork(tmp_path / "hn.pt", allow_pickle=True)
    assert hn.widths == [32, 64] and hn.meta["step"] == 12
    unet, te = tiny_sd1(torch.float64)
    base = sd1_outputs(unet, te)[0]
    undo = HypernetworkPatch(hn, "fp", strength).apply("unet", unet)
    ours = sd1_outputs(unet, te)[0]
    ref_unet, ref_te, touched = reference_unet(data, layout, strength, torch.float64)
    assert touched == 8  # 4 transformer blocks: attn2 (32-wide context) and attn1 (32 or 64 wide)
    ref = sd1_outputs(ref_unet, ref_te)[0]
    assert (ref - base).abs().max() > 1e-3
    assert_same(ours, ref, "U-Net output")
    undo()
    assert torch.equal(sd1_outputs(unet, te)[0], base)
    assert all(not m._forward_pre_hooks for m in unet.modules())


def test_only_matching_widths_are_patched(tmp_path):
    data = make_file(LAYOUT_A, widths=(64,))
    unet, te = tiny_sd1()
    hn = Hypernetwork.from_state(data)
    undo = HypernetworkPatch(hn, "fp", 1.0).apply("unet", unet)
    hooked = [n for n, m in unet.named_modules() if m._forward_pre_hooks]
    assert hooked and all(unet.get_submodule(n).in_features == 64 for n in hooked)
    assert all(".attn1." in n for n in hooked)  # the cross-attention context is 32 wide
    undo()


def test_strength_zero_and_other_roles_do_nothing():
    hn = Hypernetwork.from_state(make_file(LAYOUT_A))
    unet, te = tiny_sd1()
    assert HypernetworkPatch(hn, "fp", 0.0).apply("unet", unet) is None
    assert HypernetworkPatch(hn, "fp", 1.0).apply("text_encoder", te) is None
    assert HypernetworkPatch(hn, "fp", 0.5).fingerprint() != HypernetworkPatch(hn, "fp", 0.6).fingerprint()


def test_round_trip_and_pickle_permission(tmp_path):
    hn = Hypernetwork.from_state(make_file(LAYOUT_B))
    save_hypernetwork(hn, tmp_path / "hn.pt")
    with pytest.raises(HypernetworkFormatError, match="pickle"):
        load_hypernetwork(tmp_path / "hn.pt")
    again = load_hypernetwork(tmp_path / "hn.pt", allow_pickle=True)
    x = torch.randn(3, 64)
    assert torch.equal(again.pair(64)[1](x), hn.pair(64)[1](x))
    raw = torch.load(tmp_path / "hn.pt", weights_only=True)
    assert raw["layer_structure"] == [1, 2, 2, 1] and sorted(k for k in raw if isinstance(k, int)) == [32, 64]
    assert set(raw[32][0]) == {f"linear.{i}.{p}" for i in (0, 2, 4, 6, 8, 10) for p in ("weight", "bias")}


def test_activation_names_follow_a1111():
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish and ACTIVATIONS["linear"] is torch.nn.Identity
    for name, cls in (("gelu", torch.nn.GELU), ("mish", torch.nn.Mish), ("softsign", torch.nn.Softsign),
                      ("leakyrelu", torch.nn.LeakyReLU), ("elu", torch.nn.ELU), ("silu", torch.nn.SiLU)):
        assert ACTIVATIONS[name] is cls


def test_bad_files_are_explained(tmp_path):
    with pytest.raises(HypernetworkFormatError, match="no integer"):
        Hypernetwork.from_state({"layer_structure": [1, 2, 1]})
    bad = make_file(LAYOUT_A)
    bad["layer_structure"] = [1, 3, 1]
    with pytest.raises(HypernetworkFormatError, match="do not fit"):
        Hypernetwork.from_state(bad)
    bad = make_file(LAYOUT_A)
    bad["activation_func"] = "nonsense"
    with pytest.raises(HypernetworkFormatError, match="unsupported activation"):
        Hypernetwork.from_state(bad)


# ---- every activation, with and without the output activation, against the format's definition ----
# A1111 (modules/hypernetworks/hypernetwork.py) names its activations by a table: "linear" is none,
# "swish" is torch's Hardswish (x·relu6(x + 3)/6), the other names are torch's activation classes
# lower-cased. Written here as formulas, so a table that read "swish" as SiLU (x·sigmoid(x), the
# usual meaning of the word) fails.
FORMULAS = {
    "linear": lambda x: x,
    "relu": lambda x: x.clamp(min=0),
    "leakyrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "swish": lambda x: x * (x + 3).clamp(0, 6) / 6,
    "tanh": torch.tanh,
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "softsign": lambda x: x / (1 + x.abs()),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
}


def a1111_layout(structure, activation, activate_output, layer_norm, dropout_structure):
    """Indices of the Linear and LayerNorm layers in A1111's ``linear`` Sequential: per layer i a
    Linear, then the activation (not after the last Linear unless activate_output; none for
    "linear"), a LayerNorm if is_layer_norm, a Dropout where dropout_structure[i + 1] > 0."""
    index, linears, norms = 0, [], []
    for i in range(len(structure) - 1):
        linears.append(index)
        index += 1
        if activation != "linear" and (i < len(structure) - 2 or activate_output):
            index += 1
        if layer_norm:
            norms.append(index)
            index += 1
        if dropout_structure[i + 1] > 0:
            index += 1
    return linears, norms


@pytest.mark.parametrize("activation", sorted(FORMULAS))
@pytest.mark.parametrize("activate_output", [False, True], ids=["hidden", "output too"])
@pytest.mark.parametrize("shape", ["plain", "norm-dropout"])
def test_every_activation_is_placed_as_the_format_defines(activation, activate_output, shape):
    structure = [1, 2, 1] if shape == "plain" else [1, 1.5, 2, 1]
    dropout = [0.0] * len(structure) if shape == "plain" else [0.0, 0.3, 0.3, 0.0]
    layer_norm = shape != "plain"
    linears, norms = a1111_layout(structure, activation, activate_output, layer_norm, dropout)
    layout = {
        "meta": {"layer_structure": structure, "activation_func": activation, "is_layer_norm": layer_norm,
                 "use_dropout": shape != "plain", "dropout_structure": dropout, "activate_output": activate_output,
                 "last_layer_dropout": shape != "plain"},
        "linears": linears, "norms": norms, "act": FORMULAS[activation],
    }
    data = make_file(layout, widths=(32,), seed=3)
    hn = Hypernetwork.from_state(data)
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3  # past Hardswish's ±3 knees
    for net, sd in zip(hn.pair(32), data[32], strict=True):
        ours = x + net.to(torch.float64)(x) * 0.7
        assert_same(ours, reference_net(sd, layout)(x, 0.7), f"{activation} net")


def test_swish_with_the_output_activation_patches_the_unet_as_the_format_defines(tmp_path):
    """The reported case, through the file and the U-Net patch: swish (Hardswish) after every
    Linear, the last one included."""
    layout = {**LAYOUT_A, "meta": {**LAYOUT_A["meta"], "activation_func": "swish", "activate_output": True},
              "act": FORMULAS["swish"]}
    data = make_file(layout)
    torch.save(data, tmp_path / "swish.pt")
    hn = load_hypernetwork(tmp_path / "swish.pt", allow_pickle=True)
    assert [type(m).__name__ for m in hn.pair(32)[0]] == ["Linear", "Hardswish", "Linear", "Hardswish"]
    unet, te = tiny_sd1(torch.float64)
    HypernetworkPatch(hn, "fp", 1.0).apply("unet", unet)
    ref_unet, ref_te, _ = reference_unet(data, layout, 1.0, torch.float64)
    assert_same(sd1_outputs(unet, te)[0], sd1_outputs(ref_unet, ref_te)[0], "U-Net output")
