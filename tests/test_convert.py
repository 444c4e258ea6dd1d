"""`graphsd convert IN OUT`: any ComfyUI file graphsd reads (API prompt, editor file, a PNG with a
``prompt`` chunk or with only a ``workflow`` chunk) written as a graphsd workflow. The round trip is
the test: the written YAML runs and gives exactly the image the ComfyUI file gives (graphsd-tiny,
64 px, 2-3 steps; two engines, so neither run is answered from the other's cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from graphsd import Engine, Settings
from graphsd.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "comfy_ui"


def api_txt2img(seed: int, prefix: str) -> dict:
    """ComfyUI's default text-to-image graph, as "Save (API)" writes it, on graphsd-tiny."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a green square on a gray background", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def api_img2img(prefix: str) -> dict:
    """Image to image from an input image named as the frontend annotates it."""
    prompt = api_txt2img(8, prefix)
    prompt["3"]["inputs"].update(denoise=0.5, latent_image=["11", 0])
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "example.png [input]"}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    del prompt["5"]
    return prompt


def png_with(path: Path, **chunks: dict) -> Path:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, json.dumps(value))
    PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, pnginfo=info)
    return path


def ui_file(name: str, prefix: str) -> dict:
    """A fixture of the real frontend's editor files, saving under ``prefix``."""
    ui = json.loads((FIXTURES / f"{name}.json").read_text())
    [save] = [n for n in ui["nodes"] if n["type"] == "SaveImage"]
    save["widgets_values"][0] = prefix
    return ui


def pixels(result) -> list[np.ndarray]:
    assert result.ok, [str(e) for e in result.errors]
    return [np.asarray(PILImage.open(p)) for p in result.files]


def convert(*args: str) -> int:
    return main(["convert", *args])


@pytest.mark.slow
def test_every_kind_of_comfyui_file_converts_to_a_yaml_that_makes_the_same_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input").mkdir()
    PILImage.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "input" / "example.png")
    ui_img2img = ui_file("img2img", "workflow_png")
    sources = {
        "api.json": (tmp_path / "api.json", api_txt2img(1, "api")),
        "ui.json": (tmp_path / "ui.json", ui_file("txt2img", "ui")),
        "request.json": (tmp_path / "request.json", {"input": {"workflow": api_txt2img(2, "request")}}),
    }
    for path, doc in sources.values():
        path.write_text(json.dumps(doc))
    # ComfyUI's PNGs carry both chunks (graphsd reads the prompt); an image edited elsewhere may keep only the editor's
    files = [path for path, _ in sources.values()]
    files.append(png_with(tmp_path / "prompt.png", prompt=api_img2img("prompt_png"), workflow=ui_img2img))
    files.append(png_with(tmp_path / "workflow.png", workflow=ui_img2img))

    comfy = Engine(Settings(device="cpu", output_dir=str(tmp_path / "from_comfy")))
    graphsd = Engine(Settings(device="cpu", output_dir=str(tmp_path / "from_yaml")))
    for source in files:
        target = tmp_path / f"{source.stem}_{source.suffix[1:]}.yaml"
        assert convert(str(source), str(target)) == 0
        document = yaml.safe_load(target.read_text())
        assert document["version"] == 1 and all(node["type"] != "KSampler" for node in document["nodes"].values())
        original, converted = pixels(comfy.run(source)), pixels(graphsd.run(target))
        assert len(original) == 1 and original[0].shape == (64, 64, 3), source.name
        assert np.array_equal(original[0], converted[0]), source.name
    # the image names the ComfyUI import gives: ComfyUI's, in both
    names = sorted(p.name for p in (tmp_path / "from_yaml").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "from_comfy").iterdir())
    assert "api_00001_.png" in names and "workflow_png_00001_.png" in names


def test_the_yaml_reads_back_as_the_workflow_graphsd_runs(tmp_path, capsys, monkeypatch):
    """YAML, JSON (a target ending in .json) and '-' (printed) hold the same graphsd workflow, the one
    `graphsd run` would run for the ComfyUI file; LoadImage's name becomes a path in --input-dir."""
    monkeypatch.chdir(tmp_path)  # the picture must be there: convert validates, which checks named files
    (tmp_path / "pictures").mkdir()
    PILImage.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "pictures" / "example.png")
    source = tmp_path / "prompt.json"
    source.write_text(json.dumps({"prompt": api_img2img("x"), "client_id": "someone"}))
    assert convert(str(source), str(tmp_path / "out.yaml"), "--input-dir", "pictures") == 0
    assert convert(str(source), str(tmp_path / "out.json"), "--input-dir", "pictures") == 0
    capsys.readouterr()
    assert convert(str(source), "-", "--input-dir", "pictures") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = Engine(Settings(device="cpu", input_dir="pictures")).read(source)
    assert yaml.safe_load((tmp_path / "out.yaml").read_text()) == expected == printed
    assert json.loads((tmp_path / "out.json").read_text()) == expected
    assert expected["nodes"]["10"] == {"type": "LoadImage", "inputs": {"path": str(Path("pictures") / "example.png")}}
    assert (tmp_path / "out.yaml").read_text().startswith("# prompt.json, converted by graphsd convert\n")


def test_convert_writes_nothing_for_a_file_that_cannot_run_and_never_replaces_unasked(tmp_path, capsys):
    source = tmp_path / "prompt.json"
    bad = api_txt2img(1, "x")
    bad["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    bad["12"] = {"class_type": "FancyUpscaler", "inputs": {}}
    source.write_text(json.dumps(bad))
    assert convert(str(source), str(tmp_path / "out.yaml")) == 2
    err = capsys.readouterr().err
    assert "FancyUpscaler (node 12)" in err and "no_such_sampler" in err and "Traceback" not in err
    assert not (tmp_path / "out.yaml").exists()

    source.write_text(json.dumps(api_txt2img(1, "x")))
    (tmp_path / "out.yaml").write_text("mine")
    assert convert(str(source), str(tmp_path / "out.yaml")) == 2
    assert "exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (tmp_path / "out.yaml").read_text() == "mine"
    assert convert(str(source), str(tmp_path / "out.yaml"), "--overwrite") == 0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["nodes"]["9"]["inputs"]["naming"] == "comfyui"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml", "prompt.json"]  # no temporary left
