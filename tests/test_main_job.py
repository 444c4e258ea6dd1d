"""The main job on the shipped graphsd-tiny model: the example workflows as a user runs them,
reproducibility across processes, what a seed change re-runs, and image-to-image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from graphsd_train.evaluate import read_shape
from PIL import Image as PILImage

from graphsd import Engine, Settings

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(output_dir=str(tmp_path_factory.mktemp("out")), device="cpu"))


def pixels(path) -> np.ndarray:
    with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_main_job_command_is_bit_identical_across_processes(tmp_path):
    """The command in a fresh process writes, to the bit, the image this process (which has
    already run other workflows) makes from the same file, with as many threads."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out = subprocess.run(
        [sys.executable, "-m", "graphsd.cli", "run", str(WORKFLOWS / "txt2img.yaml"), "--output-dir", str(tmp_path / "command"), "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )
    [line] = out.stdout.strip().splitlines()
    command = Path(line)
    assert command.name == "txt2img_00001.png"
    [here] = Engine(Settings(output_dir=str(tmp_path / "here"))).run(WORKFLOWS / "txt2img.yaml").files  # device "auto", as the command's
    assert np.array_equal(pixels(command), pixels(here))
    reading = read_shape(pixels(command))
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "white")


@pytest.mark.parametrize("prompt", ["a blue square on a black background", "a yellow triangle on a gray background"])
def test_txt2img_draws_the_prompt(engine, prompt):
    res = engine.run(WORKFLOWS / "txt2img.yaml", params={"prompt": prompt, "seed": 3})
    [path] = res.files
    reading = read_shape(pixels(path))
    assert f"a {reading.color} {reading.shape} on a {reading.background} background" == prompt


def test_seed_change_reruns_noise_denoise_decode_save_only(engine):
    """What re-runs does not depend on the step count: 2 steps instead of the file's 20."""
    engine.run(WORKFLOWS / "txt2img.yaml", params={"seed": 11, "steps": 2})
    res = engine.run(WORKFLOWS / "txt2img.yaml", params={"seed": 12, "steps": 2})
    assert res.executed == ["noise", "denoise", "image", "save"]
    assert {e.node_id for e in res.events if e.kind == "node_cached"} == {"model", "pos", "neg"}
    assert not [e for e in res.events if e.kind == "model" and e.action == "load"]


@pytest.mark.parametrize("background", ["white", "black"])
def test_img2img_recolours_in_place(engine, background):
    source_prompt = f"a red circle on a {background} background"
    [src] = engine.run(WORKFLOWS / "txt2img.yaml", params={"prompt": source_prompt, "seed": 0}).files
    before = read_shape(pixels(src))
    res = engine.run(WORKFLOWS / "img2img.yaml", params={"image": src, "prompt": f"a blue circle on a {background} background", "denoise": 0.6, "seed": 0})
    [out] = res.files
    after = read_shape(pixels(out))
    assert (after.color, after.shape, after.background) == ("blue", "circle", background)
    shift = np.hypot(after.center[0] - before.center[0], after.center[1] - before.center[1])
    assert shift <= 8, f"the circle moved {shift:.1f} px"


def test_comfy_prompt_runs_on_the_builtin_model(engine):
    res = engine.run(WORKFLOWS / "comfy_txt2img.json")
    [path] = res.files
    reading = read_shape(pixels(path))
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "white")


def test_ctrl_c_stops_between_steps_and_leaves_no_file(tmp_path, forks):
    """The command in a process forked past its imports (forkserver.py; the test above runs a
    fresh one end to end)."""
    import signal

    out = tmp_path / "out"
    proc = forks.popen(
        [sys.executable, "-m", "graphsd.cli", "run", str(WORKFLOWS / "txt2img.yaml"), "--set", "steps=400", "--output-dir", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    for line in proc.stderr:  # wait until the denoise loop is running
        if "(UNetDenoiseLoop) run" in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == "" and (not out.exists() or list(out.rglob("*")) == [])
