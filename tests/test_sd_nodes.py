"""Stable Diffusion nodes: noise, model loading and reuse, handles, interruption, caching and
the errors a user can cause."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import sd_tiny
from graphsd import Engine, Settings, WorkflowError
from graphsd.events import ModelEvent, NodeStart, Progress
from graphsd.std.models.loading import candidate_paths
from graphsd.std.nodes.sd import CheckpointLoader
from graphsd.std.sampling.schedulers import SAMPLERS

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd_tiny.save_sd1(root / "sd1")
    sd_tiny.save_sdxl_refiner(root / "checkpoints" / "refiner")
    return root


def make_engine(models, tmp_path, **settings):
    settings = {"device": "cpu", **settings}
    return Engine(Settings(models_dir=str(models), output_dir=str(tmp_path / "out"), **settings))


@pytest.fixture
def engine(models, tmp_path):
    return make_engine(models, tmp_path)


def doc(nodes, params=None):
    return {"version": 1, "params": params or {}, "nodes": nodes}


def noise_node(seed=5, **extra):
    return {"type": "LatentNoise", "inputs": {"seed": seed, "width": 64, "height": 48, **extra}}


def txt2img(model="sd1", sampler="euler", steps=3, **extra):
    return doc(
        {
            "model": {"type": "CheckpointLoader", "inputs": {"path": model}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
            "neg": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": ""}},
            "noise": {"type": "LatentNoise", "inputs": {"seed": "${seed}", "width": 64, "height": 64}},
            "denoise": {
                "type": "UNetDenoiseLoop",
                "inputs": {
                    "unet": "@model.unet", "positive": "@pos.cond", "negative": "@neg.cond",
                    "noise": "@noise.noise", "steps": steps, "sampler": sampler, **extra,
                },
            },
        },
        params={"seed": 1},
    )


def only_error(result):
    assert result.status == "failed"
    [failure] = result.errors
    return failure


# ---- noise -------------------------------------------------------------------------------
def test_noise_is_a_cpu_generator_draw_and_repeats_for_a_seed(engine, models, tmp_path):
    first = engine.run(doc({"n": noise_node(batch_size=2)}), outputs=["n"]).outputs["n"]["noise"]
    again = make_engine(models, tmp_path).run(
        doc({"n": noise_node(batch_size=2)}), outputs=["n"]
    ).outputs["n"]["noise"]
    other = engine.run(doc({"n": noise_node(seed=6)}), outputs=["n"]).outputs["n"]["noise"]
    assert first.samples.shape == (2, 4, 6, 8) and first.samples.device.type == "cpu"
    assert torch.equal(first.samples, again.samples)
    for i in range(2):
        expected = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(5 + i))
        assert torch.equal(first.samples[i : i + 1], expected)
    assert torch.equal(other.samples[0], first.samples[1])  # item i of seed s == item 0 of seed s + i
    g = torch.Generator().manual_seed(5)
    torch.randn((1, 4, 6, 8), generator=g)
    assert torch.equal(first.generator_state[0], g.get_state())


def test_noise_does_not_depend_on_the_engine_device(models, tmp_path):
    cpu = make_engine(models, tmp_path).run(doc({"n": noise_node()}), outputs=["n"]).outputs["n"]["noise"]
    meta = make_engine(models, tmp_path, device="meta").run(doc({"n": noise_node()}), outputs=["n"])
    assert meta.ok, meta.errors
    assert torch.equal(meta.outputs["n"]["noise"].samples, cpu.samples)


def test_noise_copies_the_shape_of_a_latent(engine):
    nodes = {"empty": {"type": "EmptyLatent", "inputs": {"width": 32, "height": 16, "batch_size": 3}}, "n": noise_node(latent="@empty.latent")}
    out = engine.run(doc(nodes), outputs=["n", "empty"]).outputs
    assert out["empty"]["latent"].samples.shape == (3, 4, 2, 4)
    assert not out["empty"]["latent"].samples.any()
    assert out["n"]["noise"].samples.shape == (3, 4, 2, 4)


# ---- loading -----------------------------------------------------------------------------
def test_model_is_loaded_once_and_reused(engine, models):
    events = []
    nodes = {
        "a": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "b": {"type": "CheckpointLoader", "inputs": {"path": str(models / "sd1")}},
    }
    result = engine.run(doc(nodes), outputs=["a", "b"], on_event=events.append)
    assert result.ok, result.errors
    actions = [(e.action, e.key.split(":")[1]) for e in events if isinstance(e, ModelEvent)]
    roles = ["unet", "vae", "text_encoder", "tokenizer"]
    assert actions == [("load", r) for r in roles] + [("reuse", r) for r in roles]
    a, b = result.outputs["a"], result.outputs["b"]
    assert a["unet"].keys == b["unet"].keys
    assert engine.models.get(a["unet"].keys["unet"]) is engine.models.get(b["unet"].keys["unet"])


def test_handles_describe_the_model(engine):
    result = engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}}, "r": {"type": "CheckpointLoader", "inputs": {"path": "refiner"}}}), outputs=["m", "r"])
    assert result.ok, result.errors
    m, r = result.outputs["m"], result.outputs["r"]
    info = m["unet"].info
    assert m["clip"].info is info and m["vae"].info is info  # one set of facts per checkpoint
    assert info.family == "sd1" and info.scheduler_config["_class_name"] == "PNDMScheduler"
    assert info.scaling_factor == 0.18215 and info.latent_downscale == 8
    assert list(info.tokenizers) == ["text_encoder"] and not info.takes_time_ids
    assert r["unet"].info.family == "sdxl" and r["unet"].info.takes_time_ids
    assert set(r["clip"].keys) == {"text_encoder_2"} and list(r["clip"].info.tokenizers) == ["text_encoder_2"]


def test_dtype_is_part_of_the_component_key(engine):
    result = engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "bf16"}}}), outputs=["m"])
    assert result.ok, result.errors
    unet = engine.models.get(result.outputs["m"]["unet"].keys["unet"])
    assert unet.dtype == torch.bfloat16 and result.outputs["m"]["unet"].keys["unet"].endswith(":bf16")


def test_fingerprint_changes_when_a_weight_file_is_replaced(engine, models, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(models / "sd1", copy)
    ctx = type("Ctx", (), {"models_dir": models})()
    before = CheckpointLoader.fingerprint({"path": str(copy)}, ctx)
    assert before == CheckpointLoader.fingerprint({"path": str(copy)}, ctx)
    weights = next((copy / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert CheckpointLoader.fingerprint({"path": str(copy)}, ctx) != before


def test_missing_model_says_where_it_looked(engine, models):
    """Refused at validation, before anything runs, on the node and input that name it."""
    with pytest.raises(WorkflowError) as info:
        engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": "nope"}}}), outputs=["m"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("m", "path")
    for place in candidate_paths("nope", models):
        assert str(place) in issue.message


def test_pickle_only_weights_are_refused_unless_allowed(engine, models, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    shutil.copytree(models / "sd1", folder)
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(folder / "vae").save_pretrained(folder / "vae", safe_serialization=False)
    (next((folder / "vae").glob("*.safetensors"))).unlink()
    failure = only_error(engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": str(folder)}}}), outputs=["m"]))
    assert "pickle" in failure.message and "--allow-pickle" in failure.message
    monkeypatch.setattr(engine.settings, "allow_pickle", True)  # as --allow-pickle does
    allowed = engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": str(folder)}}}), outputs=["m"])
    assert allowed.ok, allowed.errors


# ---- the denoise loop --------------------------------------------------------------------
def test_progress_once_per_step_and_interruption_between_steps(engine):
    events = []
    result = engine.run(txt2img(steps=4), outputs=["denoise"], on_event=events.append)
    assert result.ok
    assert [(e.value, e.total) for e in events if isinstance(e, Progress)] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    seen = []

    def interrupt_after_first_step(event):
        seen.append(event)
        if isinstance(event, Progress) and event.value == 1:
            engine.interrupt()

    stopped = engine.run(txt2img(steps=4), params={"seed": 2}, outputs=["denoise"], on_event=interrupt_after_first_step)
    assert stopped.status == "interrupted"
    assert [e.value for e in seen if isinstance(e, Progress)] == [1]


def test_changing_the_seed_reruns_only_noise_and_denoise(engine):
    engine.run(txt2img(), outputs=["denoise"])
    events = []
    result = engine.run(txt2img(), params={"seed": 9}, outputs=["denoise"], on_event=events.append)
    assert result.ok
    assert [e.node_id for e in events if isinstance(e, NodeStart)] == ["noise", "denoise"]


def test_every_sampler_runs_with_each_schedule_it_supports(engine):
    for name, factory in SAMPLERS.items():
        for schedule in ("normal", "karras") if factory.keywords["karras"] else ("normal",):
            result = engine.run(txt2img(sampler=name, schedule=schedule), outputs=["denoise"])
            assert result.ok, (name, schedule, result.errors)
            assert torch.isfinite(result.outputs["denoise"]["latent"].samples).all()


@pytest.mark.parametrize(
    "extra,field,words",
    [
        ({"denoise": 0.5}, "denoise", ["start latent"]),
        ({"start_step": 2}, "start_step", ["latent"]),
    ],
)
def test_denoise_errors_name_the_field_and_the_fix(engine, extra, field, words):
    failure = only_error(engine.run(txt2img(**extra), outputs=["denoise"]))
    assert failure.node_id == "denoise" and f"input '{field}'" in failure.message
    for word in words:
        assert word in failure.message


def test_a_sampler_without_a_karras_schedule_is_refused_before_anything_runs(engine):
    """diffusers' DDIM has no karras schedule: refused at validation, naming what works."""
    with pytest.raises(WorkflowError) as info:
        engine.run(txt2img(sampler="ddim", schedule="karras"), outputs=["denoise"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("denoise", "schedule")
    for word in ("karras", "normal", "euler", "comfyui"):
        assert word in str(issue)


def test_unknown_sampler_is_reported_before_anything_runs(engine):
    with pytest.raises(WorkflowError) as info:
        engine.run(txt2img(sampler="dpm_fast"), outputs=["denoise"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("denoise", "sampler")
    assert "unknown sampler 'dpm_fast'" in str(issue) and "euler_ancestral" in str(issue)


def test_noise_with_wrong_channel_count_is_refused(engine):
    workflow = txt2img()
    workflow["nodes"]["noise"]["inputs"]["channels"] = 3
    failure = only_error(engine.run(workflow, outputs=["denoise"]))
    assert "input 'noise'" in failure.message and "channels to 4" in failure.message


def test_vae_encode_refuses_sizes_that_are_not_multiples_of_8(engine, tmp_path):
    from PIL import Image as PILImage

    PILImage.new("RGB", (30, 20), "red").save(tmp_path / "odd.png")
    nodes = {
        "m": {"type": "CheckpointLoader", "inputs": {"path": "sd1"}},
        "load": {"type": "LoadImage", "inputs": {"path": str(tmp_path / "odd.png")}},
        "enc": {"type": "VAEEncode", "inputs": {"vae": "@m.vae", "image": "@load.image"}},
    }
    failure = only_error(engine.run(doc(nodes), outputs=["enc"]))
    assert "input 'image'" in failure.message and "24x16" in failure.message


# ---- single-file checkpoints -------------------------------------------------------------
@pytest.fixture(scope="module")
def single_file(models):
    from diffusers import StableDiffusionPipeline

    from graphsd.std.models.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(models / "sd1", local_files_only=True, safety_checker=None)
    components = {"family": "sd1", "unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "scheduler_config": dict(pipe.scheduler.config)}
    return save_single_file(components, models / "checkpoints" / "tiny.safetensors")


def test_single_file_checkpoint_gives_the_same_latents_as_its_folder(engine, single_file):
    folder = engine.run(txt2img("sd1"), outputs=["denoise"])
    events = []
    single = engine.run(txt2img("tiny.safetensors"), outputs=["denoise", "model"], on_event=events.append)
    assert folder.ok and single.ok, single.errors
    assert single.outputs["model"]["unet"].info.family == "sd1"
    assert (folder.outputs["denoise"]["latent"].samples - single.outputs["denoise"]["latent"].samples).abs().max() <= 1e-5
    assert {e.action for e in events if isinstance(e, ModelEvent)} == {"load"}

    again = []
    reload = doc({"m": {"type": "CheckpointLoader", "inputs": {"path": str(single_file)}}})
    assert engine.run(reload, outputs=["m"], on_event=again.append).ok
    assert {e.action for e in again if isinstance(e, ModelEvent)} == {"reuse"}


def test_pickle_checkpoint_file_needs_allow_pickle(engine, models):
    ckpt = models / "checkpoints" / "old.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    failure = only_error(engine.run(doc({"m": {"type": "CheckpointLoader", "inputs": {"path": "old.ckpt"}}}), outputs=["m"]))
    assert "input 'path'" in failure.message and "pickle" in failure.message.lower()
