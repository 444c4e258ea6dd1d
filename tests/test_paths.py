"""Writing outputs: nothing existing is deleted or replaced unless asked for that exact target,
names stay inside the output directory, files get the umask's permissions, and concurrent
writers never take the same name."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from graphsd.errors import NodeError
from graphsd.paths import safe_output_path, write_atomic, write_folder_atomic, write_numbered

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@pytest.mark.parametrize("name", [".", "sub/.", "./", "sub/.."])
def test_a_name_must_name_something_inside_the_output_directory(tmp_path, name):
    with pytest.raises(NodeError):
        safe_output_path(tmp_path, name, field="name")


def test_files_are_not_replaced_unless_overwrite(tmp_path):
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"earlier")
    assert write_atomic(target, lambda tmp: tmp.write_bytes(b"new")) == tmp_path / "a_2.safetensors"
    assert target.read_bytes() == b"earlier"
    assert write_atomic(target, lambda tmp: tmp.write_bytes(b"newer"), overwrite=True) == target
    assert target.read_bytes() == b"newer"
    (tmp_path / "folder.bin").mkdir()
    with pytest.raises(NodeError, match="is a folder"):
        write_atomic(tmp_path / "folder.bin", lambda tmp: tmp.write_bytes(b"x"), overwrite=True)


def test_a_failed_write_leaves_nothing(tmp_path):
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    def fail_in_folder(tmp: Path) -> None:
        (tmp / "x").write_bytes(b"half")
        fail(tmp / "y")

    with pytest.raises(RuntimeError):
        write_numbered(tmp_path, "img", ".png", fail)
    with pytest.raises(RuntimeError):
        write_folder_atomic(tmp_path / "m", fail_in_folder)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_share_a_name(tmp_path):
    written: list[Path] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(5):
            path = write_numbered(tmp_path, "img", ".png", lambda tmp: tmp.write_bytes(f"{k}-{i}".encode()))
            with lock:
                written.append(path)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(written)) == 40
    assert sorted(p.read_bytes() for p in written) == sorted(f"{k}-{i}".encode() for k in range(8) for i in range(5))


@pytest.mark.slow
def test_two_processes_save_into_one_folder(tmp_path, forks):
    """Two graphsd processes saving into one folder at the same moment: two files, neither
    replacing the other (a copy workflow, so both reach SaveImage right after starting)."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    workflow = tmp_path / "copy.yaml"
    workflow.write_text(
        "version: 1\nnodes:\n  load: {type: LoadImage, inputs: {path: in.png}}\n"
        "  save: {type: SaveImage, inputs: {image: '@load.image', prefix: copy}}\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "graphsd.cli", "run", str(workflow), "--output-dir", str(out), "-q"]
    procs = [forks.popen(cmd, cwd=tmp_path, env=env) for _ in range(2)]  # two processes forked past their imports
    printed = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        printed.append(stdout.strip())
    assert sorted(printed) == sorted(str(p) for p in out.iterdir()) and len(set(printed)) == 2


@pytest.mark.slow
def test_outputs_get_the_umasks_permissions(tmp_path):
    """A fresh interpreter: graphsd reads the umask when graphsd.paths is imported."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    workflow = tmp_path / "copy.yaml"
    workflow.write_text(
        "version: 1\nnodes:\n  load: {type: LoadImage, inputs: {path: in.png}}\n"
        "  save: {type: SaveImage, inputs: {image: '@load.image', prefix: copy}}\n"
    )
    proc = subprocess.run([sys.executable, "-m", "graphsd.cli", "run", str(workflow), "--output-dir", "out", "-q"],
                          cwd=tmp_path, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027),
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    [written] = (tmp_path / "out").iterdir()
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
