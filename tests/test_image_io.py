"""LoadImage / SaveImage: atomic numbered writes, embedded workflows, path confinement, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from graphsd import Engine, Settings, WorkflowError
from graphsd.cli import main
from graphsd.workflow import PNG_WORKFLOW_KEY


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    PILImage.fromarray(arr).save(path)
    return path, arr


def copy_workflow(src, prefix="copy"):
    return {
        "version": 1,
        "params": {"src": str(src), "prefix": prefix},
        "nodes": {
            "load": {"type": "LoadImage", "inputs": {"path": "${src}"}},
            "save": {"type": "SaveImage", "inputs": {"image": "@load.image", "prefix": "${prefix}"}},
        },
    }


def test_save_numbers_files_without_overwriting(tmp_path, picture):
    src, arr = picture
    out = tmp_path / "out"
    out.mkdir()
    (out / "copy_00001.png").write_bytes(b"existing")
    engine = Engine(Settings(output_dir=str(out), device="cpu"))
    res = engine.run(copy_workflow(src))
    assert res.ok and [Path(f).name for f in res.files] == ["copy_00002.png"]
    assert (out / "copy_00001.png").read_bytes() == b"existing"
    assert np.array_equal(np.asarray(PILImage.open(res.files[0]).convert("RGB")), arr)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_png_carries_the_workflow_and_reruns(tmp_path, picture, capsys):
    src, arr = picture
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, copy_workflow(src))), "--output-dir", str(out), "-q"]) == 0
    first = Path(capsys.readouterr().out.strip())
    embedded = json.loads(PILImage.open(first).text[PNG_WORKFLOW_KEY])
    assert embedded["nodes"]["load"]["type"] == "LoadImage" and embedded["params"]["src"] == str(src)
    # the image it reads lies outside the folders a workflow from a PNG may read, unless trusted
    assert main(["run", str(first), "--output-dir", str(out), "-q"]) == 1
    assert "--trust-workflow" in capsys.readouterr().err
    assert main(["run", str(first), "--output-dir", str(out), "-q", "--trust-workflow"]) == 0
    second = Path(capsys.readouterr().out.strip())
    assert second != first and np.array_equal(np.asarray(PILImage.open(second).convert("RGB")), arr)


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "a/../../b", "..\\win"])
def test_save_rejects_paths_outside_output_dir(tmp_path, picture, prefix):
    src, _ = picture
    engine = Engine(Settings(output_dir=str(tmp_path / "out"), device="cpu"))
    res = engine.run(copy_workflow(src, prefix))
    assert res.status == "failed"
    [failure] = res.errors
    assert failure.node_id == "save" and "prefix" in failure.message and failure.error_type == "NodeError"
    assert not list(tmp_path.glob("**/*escape*")) and not Path("/tmp/abs_00001.png").exists()


def test_save_rejects_symlink_escape(tmp_path, picture):
    src, _ = picture
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "link")
    engine = Engine(Settings(output_dir=str(out), device="cpu"))
    res = engine.run(copy_workflow(src, "link/x"))
    assert res.status == "failed" and "symbolic link" in res.errors[0].message
    assert list(outside.iterdir()) == []


def test_save_into_subfolder(tmp_path, picture):
    src, _ = picture
    engine = Engine(Settings(output_dir=str(tmp_path / "out"), device="cpu"))
    res = engine.run(copy_workflow(src, "sub/pic"))
    assert res.ok and Path(res.files[0]) == (tmp_path / "out" / "sub" / "pic_00001.png").resolve()


def test_load_missing_image_is_a_clear_error(tmp_path, picture):
    """Refused at validation, before anything runs, naming the files that are in that folder."""
    engine = Engine(Settings(output_dir=str(tmp_path), device="cpu"))
    with pytest.raises(WorkflowError) as info:
        engine.run(copy_workflow(tmp_path / "missing.png"))
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("load", "path")
    assert "does not exist" in issue.message and picture[0].name in issue.message


def test_cli_validate_reports_problems_with_exit_2(tmp_path, capsys):
    bad = _write(tmp_path, {"version": 1, "nodes": {"s": {"type": "SaveImag", "inputs": {}}, "l": {"type": "LoadImage", "inputs": {}}}})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "did you mean 'SaveImage'" in err and "missing required input 'path'" in err
    assert "Traceback" not in err


def test_cli_run_json_and_failed_exit_code(tmp_path, picture, capsys):
    src, _ = picture
    good = _write(tmp_path, copy_workflow(src))
    assert main(["run", str(good), "--output-dir", str(tmp_path / "o"), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "success" and len(data["files"]) == 1
    not_a_picture = tmp_path / "not_a_picture.png"  # there, so it passes validation; the run cannot read it
    not_a_picture.write_text("no image here")
    assert main(["run", str(good), "--set", f"src={not_a_picture}", "--output-dir", str(tmp_path / "o"), "--json", "-q"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "failed" and [e["node"] for e in data["errors"]] == ["load"]
    assert "not a readable image" in data["errors"][0]["message"]
    missing = tmp_path / "missing.png"  # a user mistake caught before the run: the usage code, like a misspelt param
    assert main(["run", str(good), "--set", f"src={missing}", "--output-dir", str(tmp_path / "o"), "--json", "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "node 'load', input 'path'" in err and "does not exist" in err
    assert main(["run", str(good), "--set", "sorce=x"]) == 2
    assert "no param named 'sorce'" in capsys.readouterr().err


def _write(tmp_path, doc) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(doc))
    return path
