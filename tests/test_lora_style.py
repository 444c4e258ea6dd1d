"""The shipped "night" LoRA and hypernetwork on graphsd-tiny, through the example workflows:
the style grows with the strength while shape and colour stay what the prompt asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from graphsd_train.evaluate import score_image
from graphsd_train.styles import night_score

from graphsd import Engine, Settings
from graphsd.events import ModelEvent

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
PROMPTS = [("a red circle on a white background", 1), ("a blue square on a gray background", 2),
           ("a yellow triangle on a white background", 3), ("a green square on a gray background", 4)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out"))))


def images(engine, workflow, strength):
    out, events = [], []
    for prompt, seed in PROMPTS:
        result = engine.run(WORKFLOWS / workflow, params={"strength": strength, "prompt": prompt, "seed": seed, "steps": 12},
                            outputs=["image"])
        assert result.ok, [str(e) for e in result.errors]
        out.append((result.outputs["image"]["image"].pixels[0].numpy(), prompt))
        events += result.events
    return out, events


@pytest.mark.parametrize("workflow", ["lora_style.yaml", "hypernetwork_style.yaml"])
def test_style_grows_with_strength_and_keeps_the_subject(engine, workflow):
    scores, correct = {}, {}
    for i, strength in enumerate((0.0, 0.5, 1.0)):
        imgs, events = images(engine, workflow, strength)
        scores[strength] = float(np.mean([night_score(img) for img, _ in imgs]))
        correct[strength] = sum(score_image(img, prompt).checks["shape"] and score_image(img, prompt).checks["color"]
                                for img, prompt in imgs)
        if i > 0:  # a new strength re-runs the patch node, never the checkpoint load
            assert not [e for e in events if isinstance(e, ModelEvent) and e.action == "load"]
    assert scores[0.0] < scores[0.5] < scores[1.0], scores
    assert scores[1.0] - scores[0.0] > 0.5, scores
    assert correct[1.0] >= len(PROMPTS) - 1, correct
