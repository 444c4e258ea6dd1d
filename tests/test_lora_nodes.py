"""LoraLoader and HypernetworkLoader through ``Engine.run`` on tiny checkpoints saved as
diffusers folders: parity with diffusers' pipelines, branches, no reload on a strength change,
errors a user can make."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

import sd_tiny
from reference import assert_same, assert_sum_in_either_order, diffusers_noise_in_float32
from graphsd import Engine, Settings, WorkflowError
from graphsd.events import ModelEvent, NodeCached
from test_hypernetwork import LAYOUT_B, Transformed, make_file, reference_net
from test_lora import kohya_sd1, kohya_sdxl

warnings.filterwarnings("ignore", category=FutureWarning)
SEED = 77


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    (root / "loras").mkdir()
    (root / "hypernetworks").mkdir()
    save_file(kohya_sd1(sd_tiny.unet(), sd_tiny.text_encoder(), seed=3), root / "loras" / "style.safetensors")
    xl_unet = sd_tiny.sdxl_unet(3, time_ids=6, cross_attention_dim=64)
    save_file(kohya_sdxl(xl_unet, sd_tiny.text_encoder(), sd_tiny.text_encoder(projection=True)), root / "loras" / "xl.safetensors")
    torch.save(make_file(LAYOUT_B, widths=(32, 64), seed=4), root / "hypernetworks" / "hn.pt")
    return root


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    settings = Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path_factory.mktemp("out")))
    return Engine(settings)


def workflow(unet="@model.unet", clip="@model.clip", extra=None, prompt="a red circle", dtype="fp32"):
    return {
        "version": 1,
        "params": {"strength": 1.0},
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": dtype}},
            **(extra or {}),
            "pos": {"type": "TextEncode", "inputs": {"clip": clip, "text": prompt}},
            "neg": {"type": "TextEncode", "inputs": {"clip": clip, "text": "blurry"}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": SEED, "width": 64, "height": 64}},
            "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": unet, "positive": "@pos.cond", "negative": "@neg.cond",
                                                               "noise": "@noise.noise", "steps": 4, "cfg": 5.0, "sampler": "euler"}},
        },
    }


def lora_node(lora="style", model="${strength}", clip="${strength}"):
    return {"lora": {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": lora,
                                                     "strength_model": model, "strength_clip": clip}}}


def run(engine, doc, params=None, outputs=("denoise",)):
    result = engine.run(doc, params=params or {}, outputs=list(outputs))
    assert result.ok, [str(e) for e in result.errors]
    return result


def latent(result):
    return result.outputs["denoise"]["latent"].samples


@functools.cache
def components(folder):
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None).components


def reference_pipe(folder):
    from diffusers import EulerDiscreteScheduler

    parts = dict(components(folder))
    parts = {k: (v if k in ("tokenizer", "scheduler", "safety_checker", "feature_extractor", "image_encoder") or v is None
                 else __import__("copy").deepcopy(v)) for k, v in parts.items()}
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    pipe = StableDiffusionPipeline(**parts).to(dtype=torch.float64)  # compared in float64 (reference.py)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_latent(pipe, **kwargs):
    with diffusers_noise_in_float32():
        return pipe(num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(SEED), **kwargs).images


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lora_loader_matches_diffusers_end_to_end(engine, models, strength):
    ours = latent(run(engine, workflow("@lora.unet", "@lora.clip", lora_node(), dtype="fp64"), {"strength": strength}))
    pipe = reference_pipe(models / "sd1")
    plain = pipe_latent(pipe, prompt="a red circle", negative_prompt="blurry")
    pipe.load_lora_weights(str(models / "loras" / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[strength])
    reference = pipe_latent(pipe, prompt="a red circle", negative_prompt="blurry")
    assert (reference - plain).abs().max() > 1e-2
    assert_same(ours, reference)


@pytest.mark.slow
def test_strength_change_does_not_reload_the_checkpoint(engine):
    doc = workflow("@lora.unet", "@lora.clip", lora_node())
    run(engine, doc, {"strength": 0.3})
    second = run(engine, doc, {"strength": 0.9})
    loads = [e for e in second.events if isinstance(e, ModelEvent) and e.action == "load"]
    assert loads == []
    assert "model" in {e.node_id for e in second.events if isinstance(e, NodeCached)}
    assert "lora" in second.executed and "denoise" in second.executed


@pytest.mark.slow
def test_branches_with_and_without_lora(engine):
    doc = workflow("@lora.unet", "@lora.clip", lora_node())
    doc["nodes"]["plain"] = dict(doc["nodes"]["denoise"], inputs=dict(doc["nodes"]["denoise"]["inputs"], unet="@model.unet"))
    both = run(engine, doc, {"strength": 0.8}, outputs=("denoise", "plain"))
    lora_alone = latent(run(engine, workflow("@lora.unet", "@lora.clip", lora_node()), {"strength": 0.8}))
    fresh = Engine(engine.settings)
    plain_alone = latent(run(fresh, workflow(clip="@lora.clip", extra=lora_node()), {"strength": 0.8}))
    assert torch.equal(both.outputs["denoise"]["latent"].samples, lora_alone)
    assert torch.equal(both.outputs["plain"]["latent"].samples, plain_alone)
    assert not torch.equal(plain_alone, lora_alone)


def test_strength_zero_equals_no_lora(engine):
    with_zero = latent(run(engine, workflow("@lora.unet", "@lora.clip", lora_node()), {"strength": 0.0}))
    plain = latent(run(engine, workflow()))
    assert torch.equal(with_zero, plain)


def _patched_weights(engine, doc, node):
    """Every weight of the U-Net and the text encoder as ``node``'s handles see them."""
    out = engine.run(doc, outputs=[node]).outputs[node]
    weights = {}
    for handle, role in ((out["unet"], "unet"), (out["clip"], "text_encoder")):
        with engine.models.use(handle, role) as module:
            weights.update({f"{role}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return weights


def test_stacked_loras_in_either_order(engine):
    """W + d1 + d2 and W + d2 + d1 are the same sum rounded in two orders: they agree within the
    rounding of two fp32 additions (``reference.assert_sum_in_either_order``; the single-LoRA
    runs give the intermediate sums). Comparing images instead would amplify this rounding
    through every step by an amount no argument bounds."""
    first = {"a": {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": "style", "strength_model": 0.7, "strength_clip": 0.2}},
             "b": {"type": "LoraLoader", "inputs": {"unet": "@a.unet", "clip": "@a.clip", "lora": "style.safetensors", "strength_model": -0.3, "strength_clip": 0.5}}}
    second = {"a": dict(first["a"], inputs=dict(first["b"]["inputs"], unet="@model.unet", clip="@model.clip")),
              "b": dict(first["b"], inputs=dict(first["a"]["inputs"], unet="@a.unet", clip="@a.clip"))}
    one = _patched_weights(engine, workflow("@b.unet", "@b.clip", first), "b")
    two = _patched_weights(engine, workflow("@b.unet", "@b.clip", second), "b")
    only_first = _patched_weights(engine, workflow("@a.unet", "@a.clip", first), "a")
    only_second = _patched_weights(engine, workflow("@a.unet", "@a.clip", second), "a")
    plain = _patched_weights(engine, workflow(extra={"a": dict(first["a"], inputs=dict(first["a"]["inputs"], strength_model=0.0, strength_clip=0.0))}), "a")
    assert_sum_in_either_order(one, two, only_first, only_second)
    changed = sum(not torch.equal(w, plain[name]) for name, w in one.items())
    assert changed > 10  # the LoRAs did patch many weights of both models
    # and the stacked result is not just one of the two LoRAs
    assert not all(torch.equal(one[n], only_first[n]) for n in one)


def test_sdxl_lora_on_sd1_is_a_clear_error(engine):
    result = engine.run(workflow("@lora.unet", "@lora.clip", lora_node("xl")), outputs=["denoise"])
    [error] = result.errors
    assert error.node_id == "lora" and "context width 64" in error.message and "Use a LoRA made for this model" in error.message


def test_missing_lora_lists_where_it_looked(engine, models):
    """Refused at validation, before any model loads, on the node and input that name it."""
    with pytest.raises(WorkflowError) as info:
        engine.run(workflow("@lora.unet", "@lora.clip", lora_node("nope")), outputs=["denoise"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("lora", "lora")
    assert "'nope' not found" in issue.message and str(models / "loras") in issue.message


@pytest.mark.slow
def test_hypernetwork_loader_matches_reference(engine, models, monkeypatch):
    monkeypatch.setattr(engine.settings, "allow_pickle", True)  # as --allow-pickle does
    extra = {"hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": "hn", "strength": 0.7}}}
    result = run(engine, workflow("@hn.unet", extra=extra, dtype="fp64"), outputs=("denoise", "pos", "neg"))
    data = torch.load(models / "hypernetworks" / "hn.pt", weights_only=True)
    pipe = reference_pipe(models / "sd1")
    for m in list(pipe.unet.modules()):
        if isinstance(getattr(m, "to_k", None), torch.nn.Linear) and m.to_k.in_features in data:
            k_sd, v_sd = data[m.to_k.in_features]
            m.to_k = Transformed(m.to_k, reference_net(k_sd, LAYOUT_B), 0.7)
            m.to_v = Transformed(m.to_v, reference_net(v_sd, LAYOUT_B), 0.7)
    reference = pipe_latent(pipe, prompt_embeds=result.outputs["pos"]["cond"].embeddings,
                            negative_prompt_embeds=result.outputs["neg"]["cond"].embeddings)
    plain = latent(run(engine, workflow(dtype="fp64")))
    assert (reference - plain).abs().max() > 1e-2
    assert_same(latent(result), reference)


def test_hypernetwork_pickle_needs_permission(engine):
    extra = {"hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": "hn"}}}
    result = engine.run(workflow("@hn.unet", extra=extra), outputs=["denoise"])
    [error] = result.errors
    assert error.node_id == "hn" and "--allow-pickle" in error.message and "weights_only=True" in error.message
    assert "weights_only=False" not in error.message
    # a workflow cannot allow pickle files by itself
    extra["hn"]["inputs"]["allow_pickle"] = True
    with pytest.raises(WorkflowError, match="allow_pickle"):
        engine.run(workflow("@hn.unet", extra=extra), outputs=["denoise"])


@pytest.mark.parametrize("kind,node,name", [("loras", "LoraLoader", "lora"), ("hypernetworks", "HypernetworkLoader", "hypernetwork")])
def test_a_confined_workflow_reads_patch_files_only_from_its_folders(models, tmp_path, kind, node, name):
    """With read_roots (a workflow from a PNG, or one sent to graphsd serve), a patch file outside
    those folders is refused by name, while the models folder's own files still load."""
    source = next((models / kind).iterdir())
    outside = tmp_path / source.name
    outside.write_bytes(source.read_bytes())
    engine = Engine(Settings(device="cpu", models_dir=str(models), output_dir=str(tmp_path / "out"), read_roots=[str(models)],
                            allow_pickle=True))  # the hypernetwork fixture is a .pt file
    for path, ok in ((str(outside), False), (source.name, True)):
        patch = {"type": node, "inputs": {"unet": "@model.unet", name: path}}
        if node == "LoraLoader":
            patch["inputs"]["clip"] = "@model.clip"
        result = engine.run(workflow(unet="@patch.unet", extra={"patch": patch}), outputs=["patch"])
        assert result.ok is ok, [e.message for e in result.errors]
        if not ok:
            [error] = result.errors
            assert error.node_id == "patch" and f"input '{name}'" in error.message and "lies outside the folders" in error.message
