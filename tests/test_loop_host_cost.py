"""The host cost of a model's dtype: diffusers' ``ModelMixin.dtype`` walks every submodule of a
model (looking for layerwise-casting hooks; a few milliseconds for an SD1.5 U-Net, more for
SDXL's), and on a GPU the eager loop is bound by the host. graphsd reads a model's dtype from its
first weights (``graphsd.types.weight_dtype``): the answer is diffusers', and an image (either
sampling convention, with previews) makes no walk at all."""

import collections
import tempfile

import diffusers.models.modeling_utils as modeling_utils
import pytest
import sd_tiny
import torch
from test_server_harness import txt2img  # workflows/comfy_txt2img.json, sized down

from graphsd import Engine, Settings
from graphsd.types import weight_dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_dtype_is_what_diffusers_answers(dtype):
    for model in (sd_tiny.unet(), sd_tiny.vae()):
        model.to(dtype)
        assert weight_dtype(model) == model.dtype == dtype


def test_weight_dtype_skips_the_parts_a_model_keeps_in_float32_as_diffusers_does():
    model = sd_tiny.unet().to(torch.float16)
    model.conv_in.to(torch.float32)  # the first weights, kept in float32
    model._keep_in_fp32_modules = ["conv_in"]
    assert weight_dtype(model) == model.dtype == torch.float16
    model._keep_in_fp32_modules = None
    assert weight_dtype(model) == model.dtype == torch.float32


def walks(monkeypatch: pytest.MonkeyPatch, run) -> int:
    """How many times ``run()`` makes diffusers walk a model for its dtype."""
    reads: collections.Counter = collections.Counter()
    walk = modeling_utils.get_parameter_dtype

    def counted(module):
        reads["dtype"] += 1
        return walk(module)

    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", counted)
    try:
        run()
    finally:
        monkeypatch.setattr(modeling_utils, "get_parameter_dtype", walk)
    return reads["dtype"]


@pytest.mark.slow  # loads graphsd-tiny (seconds with the model libraries)
@pytest.mark.parametrize("convention", ["diffusers", "comfyui"])
def test_an_image_makes_no_walk_for_a_models_dtype(monkeypatch, convention):
    engine = Engine(Settings(output_dir=tempfile.mkdtemp()))
    if convention == "diffusers":  # the main job's workflow
        workflow, params = "workflows/txt2img.yaml", {"steps": 3, "width": 32, "height": 32, "seed": 1}
    else:  # ComfyUI's API prompt, with classifier-free guidance
        workflow, params = txt2img(seed=1, steps=3, size=32, cfg=8.0), None
    events = []
    result = engine.run(workflow, params, previews=True, on_event=events.append)
    assert result.ok, result.errors
    assert any(e.kind == "preview" for e in events)  # previews decode with the VAE at every step
    unet = engine.models.get(next(k for k in list(engine.models.entries) if k.split(":")[-2:-1] == ["unet"]))
    assert walks(monkeypatch, lambda: unet.dtype) == 1  # the count sees a walk (so the test can fail)
    engine.cache.clear()
    assert walks(monkeypatch, lambda: engine.run(workflow, params, previews=True).ok) == 0
