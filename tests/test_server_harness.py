"""Shared harness of the server tests (no tests here): a real ``graphsd serve`` process on a free
loopback port with its own folders, plain HTTP through urllib, the websocket through
websocket-client (the library ComfyUI's own API examples use), and ComfyUI API prompts for
graphsd-tiny at tiny sizes."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import websocket
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
URL_RE = re.compile(r"graphsd serve: (http://\S+?)/?$")


class Served:
    """One server process with its own output, input, data and models folders under ``base``:
    forked past its imports by ``forks`` (conftest.py, forkserver.py) when given, else a fresh
    interpreter."""

    def __init__(self, base: Path, *args: str, token: str | None = None, env: dict[str, str] | None = None, data_limit: int | None = None,
                 forks: Any = None):
        self.base = base
        self.dirs = {name: base / name for name in ("output", "input", "data", "models")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.token = token or (env or {}).get("GRAPHSD_SERVER_TOKEN")
        self.extra_env = dict(env or {})
        self.data_limit = data_limit  # bytes (ulimit -d), so memory checks do not depend on the machine
        self.forks = forks
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: queue.Queue[str] = queue.Queue()

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "graphsd.cli",
            "serve",
            "--port",
            "0",
            "--output-dir",
            str(self.dirs["output"]),
            "--input-dir",
            str(self.dirs["input"]),
            "--data-dir",
            str(self.dirs["data"]),
            "--models-dir",
            str(self.dirs["models"]),
        ]
        if self.token and "GRAPHSD_SERVER_TOKEN" not in self.extra_env:
            cmd += ["--token", self.token]
        return cmd + self.args

    def start(self, timeout: float = 240) -> Served:
        threads = str(torch.get_num_threads())  # the test process's (conftest): the same arithmetic on both sides
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        env.pop("GRAPHSD_SERVER_TOKEN", None)
        env.update(self.extra_env)
        log = open(self.base / "server.log", "a")
        limit = self.data_limit

        def limit_memory() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

        if self.forks is not None:
            self.proc = self.forks.popen(self.command(), stdout=subprocess.PIPE, stderr=log, cwd=self.base, env=env, rlimit_data=limit)
        else:
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=log, text=True, cwd=self.base, env=env, preexec_fn=limit_memory
            )
        log.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}") from None
                continue
            m = URL_RE.search(line.strip())
            if m:
                self.url = m.group(1)
                return self
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.log()}")

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text() if path.exists() else ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    # ---- HTTP --------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None, auth: bool = True
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        if auth and self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data) if data else None

    def ws(self, client_id: str | None = None, **kw: Any) -> websocket.WebSocket:
        url = self.url.replace("http://", "ws://") + "/ws" + (f"?clientId={client_id}" if client_id else "")
        header = [f"Authorization: Bearer {self.token}"] if self.token else []
        return websocket.create_connection(url, timeout=120, header=header, **kw)

    def upload(self, filename: str, data: bytes, path: str = "/upload/image", **fields: str) -> tuple[int, Any]:
        """A multipart upload as the frontend sends it: the file as ``image``, plus ``fields``."""
        boundary = "graphsd-test-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        ]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, _, answer = self.request("POST", path, raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            return status, json.loads(answer)
        except ValueError:
            return status, answer

    def queue_prompt(self, prompt: dict[str, Any], client_id: str, **extra: Any) -> str:
        status, body = self.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id, **extra})
        assert status == 200, body
        return body["prompt_id"]

    def wait_idle(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = self.json("GET", "/prompt")
            if body["exec_info"]["queue_remaining"] == 0:
                return
            time.sleep(0.2)
        raise TimeoutError("the queue did not empty")


def receive(ws: websocket.WebSocket) -> dict[str, Any] | bytes:
    opcode, data = ws.recv_data()
    if opcode == websocket.ABNF.OPCODE_TEXT:
        return json.loads(data)
    return data


def events_until_done(ws: websocket.WebSocket, prompt_ids: set[str], timeout: float = 300) -> list[dict[str, Any]]:
    """Every text message until ``executing`` with node null arrived for all of ``prompt_ids``."""
    remaining, seen = set(prompt_ids), []
    deadline = time.monotonic() + timeout
    while remaining:
        assert time.monotonic() < deadline, f"no end of {remaining}"
        msg = receive(ws)
        if isinstance(msg, bytes):
            continue
        seen.append(msg)
        data = msg.get("data") or {}
        if msg["type"] == "executing" and data.get("node") is None:
            remaining.discard(data.get("prompt_id"))
    return seen


def txt2img(
    seed: int = 1,
    steps: int = 2,
    size: int = 64,
    text: str = "a red circle on a white background",
    prefix: str = "ComfyUI",
    cfg: float | None = None,
) -> dict[str, Any]:
    """workflows/comfy_txt2img.json at a tiny size and few steps (``cfg=1.0``: no unconditional
    pass, half the sampling work, for tests about the server rather than the image)."""
    prompt = json.loads((ROOT / "workflows" / "comfy_txt2img.json").read_text())
    prompt["3"]["inputs"].update(seed=seed, steps=steps)
    if cfg is not None:
        prompt["3"]["inputs"]["cfg"] = cfg
    prompt["5"]["inputs"].update(width=size, height=size)
    prompt["6"]["inputs"]["text"] = text
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    return prompt


def assert_same_png(ours: str | Path | bytes, reference: str | Path | bytes) -> None:
    """The same picture within one 8-bit level (PNG files or bytes): a server or a Ray worker is
    another process, whose kernels may split their sums over threads differently (OMP_NUM_THREADS,
    how busy the cores are), which moves float32 results by a few ulps; on a value that lies next
    to a rounding boundary of the 8-bit scale that flips the byte by one, never by more."""
    a, b = (np.asarray(Image.open(io.BytesIO(p) if isinstance(p, bytes) else p).convert("RGB"), dtype=np.int16) for p in (ours, reference))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert int(np.abs(a - b).max()) <= 1, f"the pictures differ by {int(np.abs(a - b).max())} levels"


def pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png"))


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".graphsd-*"))


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
