"""Signals on the real command: SIGTERM is handled like Ctrl-C; a second Ctrl-C aborts at once
even inside a long torch operation and deletes the temporary file of the write in progress;
Ctrl-C during start-up (inside ``import torch``) exits quietly. Start-up needs a fresh
interpreter; the other two run the command in a process forked from one that has imported
graphsd already (forkserver.py), which is the same command past its imports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parent / "workflows"
SLOW_PLUGINS = HERE / "fixtures" / "slow_plugins"


def start(*args: str, forks=None):
    """``graphsd ARGS`` in a process of its own: forked by ``forks`` (conftest.py), else a fresh interpreter."""
    cmd, env = [sys.executable, "-m", "graphsd.cli", *args], {**os.environ, "HF_HUB_OFFLINE": "1"}
    if forks is not None:
        return forks.popen(cmd, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until_torch_is_loading(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once the command has begun importing torch (its library is mapped into the
    process): past the interpreter's own start-up, so the signal reaches graphsd's handler
    rather than Python's default one, on a fast machine or a loaded one."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if "libtorch" in maps.read_text(errors="replace"):
            return
        time.sleep(0.005)
    raise AssertionError("the command never started importing torch")


def wait_for(stream, text: str) -> None:
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"the process ended before printing {text!r}")


def test_sigterm_stops_between_steps_and_leaves_no_file(tmp_path, forks):
    out = tmp_path / "out"
    proc = start("run", str(WORKFLOWS / "txt2img.yaml"), "--set", "steps=400", "--output-dir", str(out), forks=forks)
    wait_for(proc.stderr, "(UNetDenoiseLoop) run")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == "" and (not out.exists() or list(out.rglob("*")) == [])


def test_second_ctrl_c_aborts_a_long_torch_operation_and_removes_its_temporary(tmp_path, forks):
    out = tmp_path / "out"
    workflow = tmp_path / "slow.yaml"
    workflow.write_text("version: 1\nnodes:\n  w: {type: SlowWrite, inputs: {size: 6000}}\n")  # minutes in one call
    proc = start("run", str(workflow), "--plugins-dir", str(SLOW_PLUGINS), "--output-dir", str(out), forks=forks)
    wait_for(proc.stdout, "writing")
    assert [p.name for p in out.iterdir() if p.name.startswith(".graphsd-")], "the write should be in progress"
    proc.send_signal(signal.SIGINT)
    wait_for(proc.stderr, "Ctrl-C again to abort")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)  # long before the operation could end
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == [], "no output and no temporary may remain"


def test_ctrl_c_during_start_up_exits_quietly(tmp_path):
    out = tmp_path / "out"
    proc = start("run", str(WORKFLOWS / "txt2img.yaml"), "--output-dir", str(out))
    wait_until_torch_is_loading(proc)  # inside the imports of torch and diffusers, however busy the machine is
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # not -6 (SIGABRT)
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert not out.exists() or list(out.rglob("*")) == []
