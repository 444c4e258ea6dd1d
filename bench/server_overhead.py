"""What ``graphsd serve`` adds to a prompt: the same tiny prompts (graphsd-tiny txt2img, 64x64,
2 steps, a new seed each) through a real server process and through ``Engine.run`` in this
process, measured in the same run, with the same number of torch threads.

    python bench/server_overhead.py [--prompts 50] [--threads 1]

Prints the wall time per prompt (measured in alternating rounds) of the bare engine; of the server with every prompt queued at
once (throughput: the queue never runs dry); of the server one prompt at a time (latency: POST
/prompt, then wait on the websocket for its end); and the ratios to the bare engine. The
difference is the server's dispatch overhead: HTTP, translating and validating the prompt,
the SQLite queue, event mapping, websocket messages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prompt(seed: int) -> dict[str, Any]:
    p = json.loads((ROOT / "workflows" / "comfy_txt2img.json").read_text())
    p["3"]["inputs"].update(seed=seed, steps=2)
    p["5"]["inputs"].update(width=64, height=64)
    return p


class Server:
    def __init__(self, base: Path, threads: int):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "graphsd.cli", "serve", "--port", "0"]
        for name in ("output", "input", "data", "models"):
            cmd += [f"--{name}-dir", str(base / name)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(base / "server.log", "w"), text=True, cwd=base, env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"graphsd serve: (http://\S+?)/?$", line.strip())
            if m:
                self.url = m.group(1)
                return
        raise RuntimeError((base / "server.log").read_text())

    def queue(self, p: dict[str, Any], client_id: str) -> str:
        data = json.dumps({"prompt": p, "client_id": client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())["prompt_id"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def wait_done(ws: Any, ids: set[str]) -> None:
    import websocket

    while ids:
        opcode, data = ws.recv_data()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            msg = json.loads(data)
            if msg["type"] == "executing" and msg["data"]["node"] is None:
                ids.discard(msg["data"]["prompt_id"])


def measure(base: Path, n: int, threads: int, rounds: int) -> tuple[float, float, float]:
    """(s per prompt of the bare engine, of the server with a round's prompts queued at once, of
    the server one prompt at a time). The three alternate in ``rounds`` rounds, so that load from
    elsewhere on the machine falls on all three alike."""
    import torch
    import websocket

    from graphsd import Engine, Settings

    torch.set_num_threads(threads)
    (base / "server").mkdir()
    server = Server(base / "server", threads)
    try:
        ws = websocket.create_connection(server.url.replace("http://", "ws://") + "/ws?clientId=bench", timeout=300)
        wait_done(ws, {server.queue(prompt(0), "bench")})  # loads the model
        engine = Engine(Settings(device="cpu", output_dir=str(base / "engine")))
        engine.run(prompt(0))
        totals = [0.0, 0.0, 0.0]
        seeds = iter(range(1000, 1_000_000))
        per_round = max(n // rounds, 1)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(per_round):
                engine.run(prompt(next(seeds)))
            t1 = time.perf_counter()
            wait_done(ws, {server.queue(prompt(next(seeds)), "bench") for _ in range(per_round)})
            t2 = time.perf_counter()
            for _ in range(per_round):
                wait_done(ws, {server.queue(prompt(next(seeds)), "bench")})
            t3 = time.perf_counter()
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                totals[k] += dt
        ws.close()
        count = per_round * rounds
        return totals[0] / count, totals[1] / count, totals[2] / count
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in both (default 1, as the tests run)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the measurements alternate in (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare, batch, single = measure(Path(tmp), args.prompts, args.threads, args.rounds)
    print(f"{args.prompts} prompts (graphsd-tiny txt2img 64x64, 2 steps), {args.threads} torch thread(s)")
    print(f"  bare Engine.run:                {bare * 1000:7.1f} ms/prompt")
    print(f"  server, all queued at once:     {batch * 1000:7.1f} ms/prompt  ({batch / bare:.2f}x)")
    print(f"  server, one prompt at a time:   {single * 1000:7.1f} ms/prompt  ({single / bare:.2f}x)")
    print(f"  overhead per prompt: {(batch - bare) * 1000:+.1f} ms queued, {(single - bare) * 1000:+.1f} ms one at a time")


if __name__ == "__main__":
    main()
