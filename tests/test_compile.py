"""The compiled fast path (``Settings.compile``, ``graphsd run --compile``): off unless asked, the
compiled U-Net and VAE decoder give eager's numbers, patches changed after compiling are seen,
hooks fall back to eager, and compiled artefacts land in the configured cache folder.

Most tests compile with Dynamo + AOTAutograd but run the captured graphs eagerly
(``compile_backend="aot_eager"``): that exercises the fast path's tracing, guards and wrappers on
CPU in seconds; inductor's own kernels (minutes to build on two cores) are exercised by the GPU
benchmark, bench/gpu.py, which also reports their difference from eager in fp16. Comparisons
here are in float64, where the compiled and eager computations are the same arithmetic,
possibly in another order, so they agree within ``reference.tolerance`` (reference.py argues
the bound)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sd_tiny
import torch
from reference import assert_same
from safetensors.torch import load_file, save_file
from test_hypernetwork import LAYOUT_B, make_file
from test_lora import kohya_sd1

from graphsd import Engine, Settings
from graphsd.cli import build_parser
from graphsd.context import COMPILE_MODES
from graphsd.events import ModelEvent
from graphsd.std.models.compile import cache_dir, fp8_eligible, fuse_projections, refresh_projections, twin

SEED = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    (root / "loras").mkdir()
    (root / "hypernetworks").mkdir()
    save_file(kohya_sd1(sd_tiny.unet(), sd_tiny.text_encoder(), seed=3), root / "loras" / "style.safetensors")
    torch.save(make_file(LAYOUT_B, widths=(32, 64), seed=4), root / "hypernetworks" / "hn.pt")
    return root


@pytest.fixture(autouse=True)
def _inductor_cache_env(monkeypatch):
    """The fast path points TORCHINDUCTOR_CACHE_DIR at its cache folder; restored after each test."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def engine(models, tmp_path, **settings) -> Engine:
    return Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path / "out"), allow_pickle=True, **settings))


@pytest.fixture(scope="module")
def eager_engine(models, tmp_path_factory):
    return engine(models, tmp_path_factory.mktemp("eager"))


@pytest.fixture(scope="module")
def fast_engine(models, tmp_path_factory):
    """One engine for the aot_eager tests: its models stay loaded, so Dynamo traces them once.
    Its first run's compile events are kept in ``FIRST_RUN``. Right after that first run (the
    diffusers convention), with nothing else compiled since Dynamo was reset, it runs ComfyUI's
    convention with Dynamo's ``error_on_recompile``; that run's errors are kept in ``SWITCHED``."""
    tmp = tmp_path_factory.mktemp("fast")
    torch._dynamo.reset()  # nothing compiled by earlier tests may serve the switched call
    fast = engine(models, tmp, compile="reduce-overhead", compile_backend="aot_eager", compile_cache_dir=str(tmp / "cache"))
    FIRST_RUN[:] = compile_events(run(fast, workflow()))
    with torch._dynamo.config.patch(error_on_recompile=True):
        switched = fast.run(workflow(convention="comfyui", sampler="dpmpp_2m"), outputs=["denoise", "image"])
    SWITCHED[:] = [str(e) for e in switched.errors] or ([] if switched.ok else ["the run failed without an error"])
    return fast


FIRST_RUN: list[tuple[str, str]] = []
SWITCHED: list[str] = []


def workflow(unet="@model.unet", extra=None, convention="diffusers", sampler="euler"):
    return {
        "version": 1,
        "params": {"strength": 1.0},
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
            **(extra or {}),
            "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "blurry"}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": 64, "height": 64}},
            "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": unet, "positive": "@pos.cond", "negative": "@neg.cond",
                                                               "noise": "@noise.noise", "steps": 3, "cfg": 5.0, "sampler": sampler,
                                                               "convention": convention}},
            "image": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@denoise.latent"}},
        },
    }


LORA = {"lora": {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": "style",
                                                  "strength_model": "${strength}", "strength_clip": 0.0}}}
HYPERNETWORK = {"hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": "hn", "strength": 0.7}}}


def run(engine, doc, params=None, outputs=("denoise", "image")):
    result = engine.run(doc, params=params or {}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result


def pixels(result):
    return result.outputs["image"]["image"].pixels


def latent(result):
    return result.outputs["denoise"]["latent"].samples


def compile_events(result):
    """(action, role) of the run's compile events (a component's key ends in ``:role:dtype``)."""
    return [(e.action, e.key.split(":")[-2]) for e in result.events if isinstance(e, ModelEvent) and e.action.startswith("compile")]


# ---- switching ---------------------------------------------------------------------------------


def test_compile_is_off_unless_asked():
    assert Settings().compile == "off"
    assert Settings(device="cpu").compile == "off"
    assert build_parser().parse_args(["run", "wf.yaml"]).compile == "off"


def test_the_command_line_names_the_modes():
    parser = build_parser()
    assert parser.parse_args(["run", "wf.yaml", "--compile"]).compile == "reduce-overhead"
    assert parser.parse_args(["run", "--compile=max-autotune", "wf.yaml"]).compile == "max-autotune"
    choices = next(a.choices for a in parser._subparsers._group_actions[0].choices["run"]._actions if a.dest == "compile")
    assert tuple(choices) == COMPILE_MODES
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["run", "wf.yaml", "--compile=fastest"])
    assert exit_.value.code == 2


def test_an_unknown_mode_or_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'; use one of: off, reduce-overhead"):
        Settings(compile="fastest")
    with pytest.raises(ValueError, match="unknown compile backend 'tvm'"):
        Engine(Settings(device="cpu", load_entry_points=False), compile_backend="tvm")


@pytest.mark.slow
def test_both_conventions_run_one_compiled_unet(fast_engine):
    """ComfyUI's convention calls the U-Net with its timestep as diffusers' does (one float32
    number), so switching conventions does not recompile it (the fixture's switched run, made
    with ``error_on_recompile`` right after the first compile)."""
    assert SWITCHED == []


@pytest.mark.slow
def test_eager_runs_put_nothing_on_the_fast_path(eager_engine):
    result = run(eager_engine, workflow())
    assert compile_events(result) == []


# ---- the compiled path gives eager's numbers --------------------------------------------------


def with_seed(doc, seed):
    doc["nodes"]["noise"]["inputs"]["seed"] = seed
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("convention, sampler", [("diffusers", "euler"), ("comfyui", "dpmpp_2m")])
def test_compiled_equals_eager(fast_engine, eager_engine, convention, sampler):
    doc = workflow(convention=convention, sampler=sampler)
    ours = run(fast_engine, doc)
    assert_same(latent(ours), latent(run(eager_engine, doc)), "denoised latent")
    assert_same(pixels(ours).double(), pixels(run(eager_engine, doc)).double(), "decoded image")
    # another seed reuses the compiled wrappers (no new compile event) and still matches
    second = run(fast_engine, with_seed(workflow(convention=convention, sampler=sampler), SEED + 1))
    assert compile_events(second) == []
    assert_same(latent(second), latent(run(eager_engine, with_seed(workflow(convention=convention, sampler=sampler), SEED + 1))))


@pytest.mark.slow
def test_each_component_is_compiled_once_per_engine(fast_engine):
    assert sorted(FIRST_RUN) == [("compile", "unet"), ("compile", "vae")]
    assert compile_events(run(fast_engine, with_seed(workflow(), SEED + 3))) == []


# ---- patches after compiling ------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_strength_change_after_compiling_gives_the_patched_result(fast_engine, eager_engine):
    # fast_engine compiled the U-Net without the LoRA
    results = {}
    for strength in (1.0, 0.4, -0.8):
        ours = run(fast_engine, workflow("@lora.unet", LORA), {"strength": strength})
        assert ("compile_skipped", "unet") not in compile_events(ours)
        assert_same(latent(ours), latent(run(eager_engine, workflow("@lora.unet", LORA), {"strength": strength})), f"strength {strength}")
        results[strength] = latent(ours)
    assert (results[1.0] - results[0.4]).abs().max() > 1e-3  # the strength does change the image
    # without the LoRA again: the weights were restored, and the compiled graph sees them
    plain = with_seed(workflow(), SEED + 2)
    assert_same(latent(run(fast_engine, plain)), latent(run(eager_engine, plain)), "LoRA removed")


@pytest.mark.slow
def test_a_hypernetwork_runs_eagerly_and_says_so(fast_engine, eager_engine):
    ours = run(fast_engine, workflow("@hn.unet", HYPERNETWORK))
    assert ("compile_skipped", "unet") in compile_events(ours)
    reference = run(eager_engine, workflow("@hn.unet", HYPERNETWORK))
    assert_same(latent(ours), latent(reference), "with hypernetwork")
    plain = run(eager_engine, workflow())
    assert (latent(reference) - latent(plain)).abs().max() > 1e-3  # the hypernetwork does change the image


@pytest.mark.slow
def test_a_model_saved_after_compiling_holds_the_same_weights(fast_engine, eager_engine):
    """The fast path turns conv weights channels-last; a checkpoint written afterwards must
    still hold them (dense) with the same values. (The text encoder comes from a second loader
    whose encoder never ran: transformers adds forward hooks to an encoder on its first run,
    which CheckpointSave refuses, with or without the fast path.)"""
    save = {"clip32": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp32"}},
            "save": {"type": "CheckpointSave", "inputs": {"unet": "@model.unet", "clip": "@clip32.clip", "vae": "@model.vae",
                                                          "filename": "saved"}}}
    doc = workflow(extra=save)
    ours = load_file(run(fast_engine, doc, outputs=["save"]).outputs["save"]["path"])
    reference = load_file(run(eager_engine, doc, outputs=["save"]).outputs["save"]["path"])
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


# ---- fused attention projections on a twin ----------------------------------------------------


def unet_inputs(unet):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    return x, torch.tensor(500.0), context


@torch.no_grad()
def test_fused_projections_live_on_a_twin_that_follows_the_weights():
    """The fast path fuses q/k/v on a twin sharing the U-Net's weights: the U-Net itself keeps its
    layers (a checkpoint saved later is unchanged), the twin computes the same function, and a
    weight changed in place (a patch) reaches the fused layers when they are refreshed."""
    unet = sd_tiny.unet().double()
    keys = set(unet.state_dict())
    fused_twin = twin(unet)
    layers = fuse_projections(fused_twin)
    assert layers and set(unet.state_dict()) == keys
    shared = [p for n, p in fused_twin.named_parameters() if "to_qkv" not in n and "to_kv" not in n]
    assert all(a is b for a, b in zip(unet.parameters(), shared, strict=True))
    x, t, context = unet_inputs(unet)
    assert_same(fused_twin(x, t, context).sample, unet(x, t, context).sample, "fused projections")
    to_k = next(m for m in unet.modules() if hasattr(m, "to_k") and m.is_cross_attention).to_k
    to_k.weight.mul_(1.5)  # what a LoRA does in place
    patched = unet(x, t, context).sample
    assert (fused_twin(x, t, context).sample - patched).abs().max() > 1e-6  # stale until refreshed
    refresh_projections(layers)
    assert_same(fused_twin(x, t, context).sample, patched, "after a patch")


@pytest.mark.slow
def test_with_fused_projections_a_lora_strength_change_gives_the_patched_result(models, tmp_path, eager_engine, monkeypatch):
    """The fast path with FUSE_QKV on: its fused layers are refreshed from the patched weights
    on each run, so each LoRA strength (and none) gives eager's latent, and the U-Net's own
    layers stay unfused (a checkpoint saved afterwards has the usual keys)."""
    monkeypatch.setattr("graphsd.std.models.compile.FUSE_QKV", True)
    fused = engine(models, tmp_path, compile="reduce-overhead", compile_backend="aot_eager", compile_cache_dir=str(tmp_path / "cache"))
    for strength in (1.0, -0.8):
        ours = run(fused, workflow("@lora.unet", LORA), {"strength": strength})
        assert_same(latent(ours), latent(run(eager_engine, workflow("@lora.unet", LORA), {"strength": strength})), f"strength {strength}")
    assert_same(latent(run(fused, workflow())), latent(run(eager_engine, workflow())), "LoRA removed")
    unet = next(e.module for e in fused.models.entries.values() if isinstance(e.module, torch.nn.Module) and hasattr(e.module, "up_blocks"))
    assert not any("to_qkv" in k or "to_kv" in k for k in unet.state_dict())


@pytest.mark.slow
def test_fp8_is_refused_where_float8_does_not_run(models, tmp_path):
    result = engine(models, tmp_path, compile="fp8", compile_backend="aot_eager").run(workflow(), outputs=["denoise"])
    assert not result.ok
    message = str(result.errors[0])
    assert "denoise" in message and "compile mode fp8 needs an NVIDIA GPU of compute capability 8.9" in message
    assert "this run is on cpu" in message


def test_fp8_takes_every_transformer_projection_and_no_embedding():
    """fp8 mode quantizes the attention projections and feed-forward layers of every transformer
    block (with SDXL's linear in/out projections), never a layer that works on the time or
    added-condition embedding (one row per image: nothing to gain, precision to lose)."""
    unet = sd_tiny.sdxl_unet(0, time_ids=6, cross_attention_dim=48)
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    chosen = {n for n, m in unet.named_modules() if fp8_eligible(m, n)}
    in_blocks = {n for n in linears if ".transformer_blocks." in n or n.endswith((".proj_in", ".proj_out"))}
    embeddings = {n for n in linears if n.startswith(("time_embedding.", "add_embedding.")) or ".resnets." in n}
    assert in_blocks and embeddings and linears == in_blocks | embeddings
    assert chosen == in_blocks


# ---- where compiled artefacts persist ---------------------------------------------------------


def test_the_cache_folder_follows_the_setting_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(Settings()) == tmp_path / "xdg" / "graphsd" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert cache_dir(Settings()) == tmp_path / "inductor"
    assert cache_dir(Settings(compile_cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"


@pytest.mark.slow
def test_a_compiled_run_points_inductor_at_the_cache_folder(fast_engine):
    """Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it stores or looks up an artefact (FX
    graphs, kernels, autotuning); the GPU benchmark measures what a warm folder saves."""
    run(fast_engine, with_seed(workflow(), SEED + 4))
    folder = Path(fast_engine.settings.compile_cache_dir)
    assert folder.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder.resolve())
