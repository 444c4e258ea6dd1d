"""The denoise loops' host cost per step: diffusers' ``ModelMixin.dtype`` walks every submodule of
a model (a few milliseconds for an SD1.5 U-Net, more for SDXL's), so a loop must read a model's
dtype once per run, not at every U-Net call: on a GPU the eager loop is bound by the host."""

import collections
import tempfile

import diffusers.models.modeling_utils as modeling_utils
import pytest
from test_server_harness import txt2img  # workflows/comfy_txt2img.json, sized down

from graphsd import Engine, Settings

pytestmark = pytest.mark.slow  # loads graphsd-tiny (seconds with the model libraries)


def dtype_reads(monkeypatch: pytest.MonkeyPatch, engine: Engine, workflow: dict) -> int:
    reads: collections.Counter = collections.Counter()
    walk = modeling_utils.get_parameter_dtype

    def counted(module):
        reads["dtype"] += 1
        return walk(module)

    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", counted)
    result = engine.run(workflow)
    assert result.ok, result.errors
    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", walk)
    return reads["dtype"]


@pytest.mark.parametrize("cfg", [1.0, 8.0], ids=["one-pass", "cfg"])
def test_the_comfyui_loop_reads_the_models_dtype_a_fixed_number_of_times_whatever_the_steps(monkeypatch, cfg):
    engine = Engine(Settings(output_dir=tempfile.mkdtemp()))
    engine.run(txt2img(seed=0, steps=1, size=32, cfg=cfg))  # the model loaded
    few = dtype_reads(monkeypatch, engine, txt2img(seed=1, steps=2, size=32, cfg=cfg))
    many = dtype_reads(monkeypatch, engine, txt2img(seed=2, steps=6, size=32, cfg=cfg))
    assert few > 0  # the count sees the reads (the test can fail)
    assert many == few
