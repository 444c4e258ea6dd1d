"""What real ComfyUI prompts carry besides their graph: image names as the frontend annotates
them and an input folder (`graphsd run --input-dir`), Windows separators in file names, request
bodies wrapping the prompt (serverless workers), and SaveImage's ComfyUI file names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from graphsd import Engine, Settings, WorkflowError
from graphsd.cli import main
from graphsd.std.comfy import translate


def load_and_save(image: str, prefix: str = "out") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def txt2img(ckpt: str = "graphsd-tiny") -> dict:
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def write_png(path: Path, width: int = 16, height: int = 16, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out"))))


# ---- image names and folders -------------------------------------------------------------------
FOLDERS = {"input": Path("/srv/in"), "output": Path("/srv/out"), "temp": Path("/srv/tmp")}


@pytest.mark.parametrize("confine", [False, True], ids=["command line", "served"])
@pytest.mark.parametrize(
    ("image", "path"),
    [
        ("red.png", "/srv/in/red.png"),  # a bare name lies in the input folder, as in ComfyUI
        ("red.png [input]", "/srv/in/red.png"),
        ("sub/red.png [output]", "/srv/out/sub/red.png"),
        ("ComfyUI_temp_abc_00001_.png [temp]", "/srv/tmp/ComfyUI_temp_abc_00001_.png"),
        ("clipspace\\mask.png [input]", "/srv/in/clipspace/mask.png"),  # written on Windows
    ],
)
def test_load_image_names_lie_in_the_folder_their_annotation_names(image, path, confine):
    doc, _ = translate(load_and_save(image), folders=FOLDERS, confine=confine)
    assert doc["nodes"]["1"]["inputs"]["path"] == path


def test_windows_separators_in_model_names_become_slashes_on_both_paths():
    prompt = txt2img("sd15\\dreamy.safetensors")
    prompt["10"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "styles\\night.safetensors", "strength_model": 1, "strength_clip": 1},
    }
    for confine in (False, True):
        nodes = translate(prompt, folders=FOLDERS, confine=confine)[0]["nodes"]
        assert nodes["4"]["inputs"]["path"] == "sd15/dreamy.safetensors"
        assert nodes["10"]["inputs"]["lora"] == "styles/night.safetensors"


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("image", "..\\..\\server.log", "leaves its folder"),
        ("image", "../secret.png [output]", "leaves its folder"),
        ("image", "C:\\Users\\me\\secret.png", "absolute path"),
        ("ckpt_name", "..\\..\\etc\\model.safetensors", "leaves its folder"),
    ],
)
def test_served_prompts_keep_normalised_names_inside_their_folders(engine, field, value, says):
    """The server's translation (the graphsd_comfy_prompt hook) normalises first and confines after,
    so a '\\' is no way out of a folder."""
    prompt = txt2img() | load_and_save("red.png")
    node = "1" if field == "image" else "4"
    prompt[node]["inputs"][field] = value
    folders = {kind: str(folder) for kind, folder in FOLDERS.items()}
    with pytest.raises(WorkflowError) as err:
        engine.pm.hook.graphsd_comfy_prompt(prompt=prompt, nodes=engine.nodes, input_dir="/srv/in", folders=folders)
    [issue] = err.value.issues
    assert (issue.node, issue.field) == (node, field) and says in issue.message


def test_graphsd_run_reads_a_prompts_bare_image_names_from_the_input_dir(tmp_path, monkeypatch, capsys):
    """`--input-dir` (default ./input) is ComfyUI's input folder; a missing image is named with it."""
    monkeypatch.chdir(tmp_path)
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps(load_and_save("red.png [input]", prefix="copy")))
    write_png(tmp_path / "input" / "red.png", value=10)
    write_png(tmp_path / "pictures" / "red.png", value=200)
    assert main(["run", str(prompt), "-q", "--output-dir", "out"]) == 0
    assert main(["run", str(prompt), "-q", "--output-dir", "out", "--input-dir", "pictures"]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["copy_00001_.png", "copy_00002_.png"]
    assert [np.asarray(PILImage.open(p))[0, 0, 0] for p in written] == [10, 200]
    assert main(["run", str(prompt), "-q", "--output-dir", "out", "--input-dir", "elsewhere"]) == 2  # refused at validation
    assert str(Path("elsewhere") / "red.png") in capsys.readouterr().err


# ---- request bodies ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "wrap",
    [
        lambda p: {"prompt": p, "client_id": "me", "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}},
        lambda p: {"input": {"workflow": p, "images": [{"name": "red.png", "image": "iVBORw0..."}]}},
        lambda p: {"input": {"prompt": p}},
        lambda p: {"workflow": p},
        lambda p: {"workflow_json": json.dumps(p)},
        lambda p: {"input": {"workflow_json": json.dumps(p), "return_temp_files": False}},
    ],
    ids=["comfyui", "runpod", "input.prompt", "workflow", "replicate", "input.workflow_json"],
)
def test_a_request_body_reads_as_the_prompt_it_wraps(engine, tmp_path, wrap):
    bare, wrapped = tmp_path / "bare.json", tmp_path / "wrapped.json"
    bare.write_text(json.dumps(txt2img()))
    wrapped.write_text(json.dumps(wrap(txt2img())))
    assert engine.read(wrapped) == engine.read(bare)


def test_an_editor_file_in_a_request_body_reads_too(engine):
    ui = json.loads((Path(__file__).parent / "fixtures" / "comfy_ui" / "txt2img.json").read_text())
    assert engine.read({"input": {"workflow": ui}}) == engine.read(ui)


def test_an_unknown_wrapper_is_named_with_what_graphsd_reads(tmp_path, capsys):
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"job": {"id": 7, "payload": txt2img()}}))
    assert main(["validate", str(body)]) == 2
    err = capsys.readouterr().err
    assert 'ComfyUI workflow at ["job"]["payload"], a wrapper graphsd does not read' in err
    assert '["input"]["workflow"]' in err and "Traceback" not in err


def test_a_broken_workflow_json_string_is_a_clear_error(engine):
    with pytest.raises(WorkflowError, match="workflow_json is not a JSON workflow"):
        engine.read({"input": {"workflow_json": '{"3": {"class_type": '}})


# ---- SaveImage's ComfyUI names -----------------------------------------------------------------
def saved(engine: Engine, prompt: dict) -> list[str]:
    result = engine.run(prompt)
    assert result.ok, [str(e) for e in result.errors]
    return [Path(p).relative_to(Path(engine.settings.output_dir).resolve()).as_posix() for p in result.files]


def test_comfyui_names_continue_after_the_highest_number_there(tmp_path):
    out = tmp_path / "out"
    engine = Engine(Settings(device="cpu", output_dir=str(out), input_dir=str(tmp_path / "in")))
    write_png(tmp_path / "in" / "red.png")
    write_png(tmp_path / "in" / "blue.png", value=30)
    write_png(out / "portraits" / "face_00007_.png")  # ComfyUI's counter continues after it
    (out / "portraits" / "face_00011.png").write_bytes(b"graphsd-named: not ComfyUI's")
    (out / "portraits" / "face_00003_.png").write_bytes(b"kept")
    assert saved(engine, load_and_save("red.png", "portraits/face")) == ["portraits/face_00008_.png"]
    assert saved(engine, load_and_save("blue.png [input]", "portraits/face")) == ["portraits/face_00009_.png"]
    assert (out / "portraits" / "face_00003_.png").read_bytes() == b"kept"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # written atomically, no temporary left
    # a native graphsd workflow keeps graphsd's names, numbered after graphsd's own
    native = {
        "version": 1,
        "nodes": {
            "load": {"type": "LoadImage", "inputs": {"path": str(tmp_path / "in" / "red.png")}},
            "save": {"type": "SaveImage", "inputs": {"image": "@load.image", "prefix": "portraits/face"}},
        },
    }
    assert saved(engine, native) == ["portraits/face_00012.png"]


def test_comfyui_prefix_variables_and_batch_numbers(tmp_path):
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path / "out"), input_dir=str(tmp_path)))
    write_png(tmp_path / "wide.png", width=48, height=32)
    year = time.localtime().tm_year
    assert saved(engine, load_and_save("wide.png", "%year%/shot_%width%x%height%")) == [f"{year}/shot_48x32_00001_.png"]


@pytest.mark.slow
def test_a_batch_is_numbered_from_one_counter_as_comfyui_numbers_it(tmp_path):
    """ComfyUI's SaveImage: image i of a batch gets the counter + i, and %batch_num% its index."""
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    prompt = txt2img()
    prompt["5"]["inputs"]["batch_size"] = 2
    prompt["9"]["inputs"]["filename_prefix"] = "b%batch_num%"
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "plain", "images": ["8", 0]}}
    assert sorted(saved(engine, prompt)) == ["b0_00001_.png", "b1_00002_.png", "plain_00001_.png", "plain_00002_.png"]
