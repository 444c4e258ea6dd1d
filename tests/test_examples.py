"""Every example in workflows/ is valid for graphsd with its installed plugins, and a test runs it.

The runs live beside what each example shows (the table below); a new example without an entry
fails here, and so does an entry whose test no longer names its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphsd import Engine, Settings

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

#: example → the test files that run it through Engine.run (or the CLI) and check its result
RUN_BY = {
    "txt2img.yaml": ["tests/test_main_job.py", "tests/test_sd_workflows.py"],
    "img2img.yaml": ["tests/test_main_job.py", "tests/test_sd_workflows.py"],
    "sdxl_base_refiner.yaml": ["tests/test_sd_workflows.py"],
    "comfy_txt2img.json": ["tests/test_main_job.py", "tests/test_sd_workflows.py"],
    "comfy_ui_txt2img.json": ["tests/test_comfy_ui_format.py"],
    "lora_style.yaml": ["tests/test_lora_style.py"],
    "hypernetwork_style.yaml": ["tests/test_lora_style.py"],
    "ddim_inversion.yaml": ["tests/test_inversion.py"],
    "inpaint.yaml": ["tests/test_inpaint.py"],
    # needs the graphsd-train plugin, which CI installs with the dev tools
    "train_tiny.yaml": ["plugins/graphsd-train/tests/test_training_diffusion.py"],
}


#: files an example names by a param with a default the user is expected to replace (validation
#: checks that named files exist): stand-ins that do
STAND_INS = {
    "img2img.yaml": {"image": str(ROOT / "docs" / "images" / "txt2img.png")},
    "sdxl_base_refiner.yaml": {"base": "graphsd-tiny", "refiner": "graphsd-tiny"},
}


def test_every_example_has_a_test_that_runs_it():
    assert sorted(RUN_BY) == sorted(p.name for p in WORKFLOWS.iterdir() if p.is_file())
    for name, tests in RUN_BY.items():
        for test in tests:
            assert name in (ROOT / test).read_text(), f"{test} does not name {name}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUN_BY))
def test_every_example_validates_with_the_installed_plugins(tmp_path, name):
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    graph = engine.load(WORKFLOWS / name, STAND_INS.get(name))
    assert graph.nodes
