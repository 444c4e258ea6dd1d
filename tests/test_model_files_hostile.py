"""Hostile and damaged model files: each is refused with an error that names the file and what
is wrong, before it can cost memory or run code.

- A1111 hypernetworks: a ``layer_structure`` far larger than the stored weights (a memory
  bomb), empty / garbage / pickled-object files, wrong structures, non-finite weights.
- Diffusers folders: ``model_index.json`` may name classes of diffusers and transformers only,
  and a malformed one is a clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from graphsd import Engine, Settings
from graphsd.std.models.hypernetwork import HypernetworkFormatError, load_hypernetwork

# The A1111 layout [1, 2, 1] with relu: Linear 0, ReLU 1, Linear 2.
WIDTH = 64


def net_state(width: int = WIDTH, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"linear.0.weight": torch.randn(2 * width, width, generator=gen), "linear.0.bias": torch.zeros(2 * width),
            "linear.2.weight": torch.randn(width, 2 * width, generator=gen), "linear.2.bias": torch.zeros(width)}


def hn_file(path, **changes):
    data = {WIDTH: [net_state(seed=1), net_state(seed=2)], "layer_structure": [1, 2, 1], "activation_func": "relu",
            "activate_output": False, **changes}
    torch.save(data, path)
    return path


def refused(path) -> str:
    with pytest.raises(HypernetworkFormatError) as info:
        load_hypernetwork(path, allow_pickle=True)
    message = str(info.value)
    assert f"'{path.name}'" in message
    assert "weights_only=False" not in message
    return message


# ---- hypernetworks ----------------------------------------------------------------------------------
def test_valid_file_loads(tmp_path):
    """The reference for the refusals below: the same file, unchanged, loads."""
    hn = load_hypernetwork(hn_file(tmp_path / "ok.pt"), allow_pickle=True)
    assert hn.widths == [WIDTH]
    assert torch.equal(hn.pair(WIDTH)[1][2].weight, net_state(seed=2)["linear.2.weight"])


BOMB_PROBE = textwrap.dedent("""
    import resource, sys, time
    from graphsd.std.models.hypernetwork import HypernetworkFormatError, load_hypernetwork
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        load_hypernetwork(sys.argv[1], allow_pickle=True)
        print("LOADED")
    except HypernetworkFormatError as exc:
        print(exc)
    print(time.perf_counter() - start)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # ru_maxrss is in KiB on Linux
""")


@pytest.mark.slow
def test_layer_structure_bomb_is_refused_with_bounded_memory(tmp_path):
    """A file of ~130 kB whose layer_structure [1, 100000, 1] asks for two 64 × 6,400,000 layers
    per net (3.3 GB of float32 if allocated) is refused from its metadata and shapes alone: the
    process's peak RSS grows by far less than one such layer (bound 300 MB, where reading the
    file itself costs well under 1 MB) and the refusal takes no noticeable time (bound 2 s)."""
    path = hn_file(tmp_path / "bomb.pt", layer_structure=[1, 100000, 1])
    assert path.stat().st_size < 200_000
    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    message, seconds, grown = out.stdout.strip().splitlines()[-3:]
    assert "'bomb.pt'" in message and "[1, 100000, 1]" in message
    assert "linear.0.weight is (128, 64), expected (6400000, 64)" in message
    assert int(grown) < 300 * 2**20, f"peak RSS grew by {int(grown) / 2**20:.0f} MB"
    assert float(seconds) < 2.0


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty (0 bytes)" in refused(tmp_path / "empty.pt")


def test_garbage_bytes(tmp_path):
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).numpy().tobytes())
    assert "not a readable PyTorch file" in refused(tmp_path / "noise.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    data = {WIDTH: [net_state(), net_state()], "name": _Payload(marker)}
    torch.save(data, tmp_path / "objects.pt")
    message = refused(tmp_path / "objects.pt")
    assert not marker.exists()
    assert "contains Python objects beyond tensors" in message and "convert it" in message


def test_pickle_needs_the_allow_pickle_switch(tmp_path):
    path = hn_file(tmp_path / "hn.pt")
    with pytest.raises(HypernetworkFormatError) as info:
        load_hypernetwork(path)
    message = str(info.value)
    assert "'hn.pt'" in message and "--allow-pickle" in message and "weights_only=True" in message
    assert "weights_only=False" not in message


@pytest.mark.parametrize("data,expected", [
    ([1, 2, 3], "holds a list, not an A1111 hypernetwork dict"),
    ({"name": "x"}, "no integer (context width) keys"),
    ({WIDTH: "weights"}, f"width {WIDTH} must be positive and hold [k_net, v_net]"),
    ({WIDTH: [net_state()]}, f"width {WIDTH} must be positive and hold [k_net, v_net]"),
    ({-WIDTH: [net_state(), net_state()]}, f"width {-WIDTH} must be positive"),
    ({WIDTH: [{}, {}]}, "missing linear.0.weight"),
    ({WIDTH: [{0: torch.zeros(1)}, {}]}, "k_net is not a state dict of named tensors"),
    ({WIDTH: [net_state(), {**net_state(), "linear.2.weight": 1.0}]}, "v_net is not a state dict of named tensors"),
    ({WIDTH: [net_state(), {**net_state(), "linear.4.weight": torch.zeros(1)}]}, "unexpected linear.4.weight"),
], ids=["list", "no-widths", "pair-not-list", "one-net", "negative-width", "empty-nets", "int-key", "non-tensor",
        "extra-layer"])
def test_malformed_files_name_what_is_wrong(tmp_path, data, expected):
    torch.save({"activation_func": "relu", **data} if isinstance(data, dict) else data, tmp_path / "bad.pt")
    assert expected in refused(tmp_path / "bad.pt")


@pytest.mark.parametrize("structure", [[2, 4, 2], [1, 2], [1, -2, 1], [1, 0, 1], [1, "2", 1], [1, float("nan"), 1],
                                       [1, float("inf"), 1], [1, True, 1], "1, 2, 1", [1], []])
def test_layer_structure_must_be_positive_numbers_from_1_to_1(tmp_path, structure):
    message = refused(hn_file(tmp_path / "shape.pt", layer_structure=structure))
    assert "layer_structure" in message


@pytest.mark.parametrize("changes,expected", [
    ({"dropout_structure": [0, 0.3]}, "dropout_structure [0, 0.3] must hold one probability"),
    ({"dropout_structure": [0, 2.0, 0]}, "dropout_structure [0, 2.0, 0] must hold one probability"),
    ({"activation_func": ["relu"]}, "unsupported activation function ['relu']"),
    ({"activation_func": "multiheadattention"}, "cannot build layer_structure [1, 2, 1] with activation 'multiheadattention'"),
    ({"step": "many"}, "step 'many' is not an integer"),
])
def test_other_layout_keys_are_checked(tmp_path, changes, expected):
    assert expected in refused(hn_file(tmp_path / "keys.pt", **changes))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    state = net_state(seed=2)
    state["linear.2.weight"][3, 5] = value
    torch.save({WIDTH: [net_state(seed=1), state], "layer_structure": [1, 2, 1], "activation_func": "relu"},
               tmp_path / "diverged.pt")
    message = refused(tmp_path / "diverged.pt")
    assert f"width {WIDTH} v_net: linear.2.weight holds NaN or infinite values" in message


def test_integer_weights_are_refused(tmp_path):
    state = {k: v.to(torch.int64) for k, v in net_state().items()}
    torch.save({WIDTH: [state, state], "activation_func": "relu"}, tmp_path / "ints.pt")
    assert "linear.0.weight holds torch.int64 values" in refused(tmp_path / "ints.pt")


# ---- diffusers folders ---------------------------------------------------------------------------------
INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}


def model_folder(tmp_path, index_text: str):
    """A model folder whose components are empty folders: every refusal below happens before
    any weights are read."""
    folder = tmp_path / "model"
    for role in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / role).mkdir(parents=True)
    (folder / "model_index.json").write_text(index_text)
    return folder


def load_error(tmp_path, folder) -> str:
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), models_dir=str(tmp_path)))
    result = engine.run({"version": 1, "nodes": {"model": {"type": "CheckpointLoader", "inputs": {"path": str(folder)}}}},
                        outputs=["model"])
    [error] = result.errors
    return error.message


@pytest.fixture
def marker_package(tmp_path, monkeypatch):
    """Packages whose import creates a marker file: one outside diffusers/transformers and one
    whose name only starts with "diffusers"."""
    marker = tmp_path / "imported"
    for name in ("graphsd_evil", "diffusers_evil"):
        (tmp_path / "pkgs" / name).mkdir(parents=True)
        (tmp_path / "pkgs" / name / "__init__.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass UNet2DConditionModel: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    yield marker
    for name in ("graphsd_evil", "diffusers_evil"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("role,spec", [
    ("unet", ["graphsd_evil", "UNet2DConditionModel"]),
    ("unet", ["diffusers_evil", "UNet2DConditionModel"]),
    ("text_encoder", ["os", "system"]),
    ("vae", ["subprocess", "Popen"]),
])
def test_model_index_cannot_import_other_modules(tmp_path, marker_package, role, spec):
    folder = model_folder(tmp_path, json.dumps({**INDEX, role: spec}))
    message = load_error(tmp_path, folder)
    assert not marker_package.exists()
    assert str(folder) in message and f"{spec[0]}.{spec[1]} for {role}: refused" in message
    assert "diffusers and transformers only" in message


@pytest.mark.parametrize("role,spec,expected", [
    ("unet", ["diffusers", "logging"], "not a model class (torch.nn.Module) of diffusers"),
    ("unet", ["diffusers", "NoSuchModel"], "not a model class (torch.nn.Module) of diffusers"),
    ("tokenizer", ["transformers", "CLIPTextModel"], "not a tokenizer class (PreTrainedTokenizerBase) of transformers"),
    ("text_encoder", ["transformers.no_such_module", "X"], "module transformers.no_such_module cannot be imported"),
])
def test_model_index_must_name_a_model_class(tmp_path, role, spec, expected):
    folder = model_folder(tmp_path, json.dumps({**INDEX, role: spec}))
    message = load_error(tmp_path, folder)
    assert str(folder) in message and expected in message


@pytest.mark.parametrize("text,expected", [
    ("{not json", "model_index.json cannot be read as JSON"),
    ("[1, 2]", "model_index.json holds a JSON list, not an object"),
    (json.dumps({**INDEX, "unet": "diffusers"}), "unet is 'diffusers', expected [library, class name]"),
    (json.dumps({**INDEX, "vae": ["diffusers", "AutoencoderKL", "x"]}), "vae is ['diffusers', 'AutoencoderKL', 'x']"),
    (json.dumps({**INDEX, "text_encoder": ["transformers", 5]}), "text_encoder is ['transformers', 5]"),
], ids=["invalid-json", "list", "string-spec", "three-items", "number"])
def test_malformed_model_index_names_the_file(tmp_path, text, expected):
    folder = model_folder(tmp_path, text)
    message = load_error(tmp_path, folder)
    assert str(folder) in message and expected in message
