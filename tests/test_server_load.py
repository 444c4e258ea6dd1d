"""graphsd serve under load and faults: 8 concurrent websocket clients × 25 prompts each complete
exactly once with their events in order and only to their own client, memory stays bounded; a
server killed with ``kill -9`` in the middle of a prompt, with more queued, comes back and
finishes all of them exactly once, re-running the interrupted one from the start without leaving
the files of its first attempt. The two tests share one server with test_server.py and
test_server_preview.py (tests/conftest.py: its model loaded once); the kill test, the last to use
it, replaces it with the restarted one. Each test clears the history first and writes its images
into its own output subfolder, so neither depends on the other having run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_server_harness import Served, events_until_done, pngs, receive, temporaries, txt2img

pytestmark = pytest.mark.slow

CLIENTS, PROMPTS = 8, 25


def fresh_history(server: Served) -> None:
    assert server.request("POST", "/history", {"clear": True})[0] == 200
    assert server.json("GET", "/history") == (200, {})


def small(seed: int, prefix: str = "ComfyUI") -> dict:
    """The cheapest prompt that still samples 2 steps and saves an image (32 px, no unconditional
    pass): what these tests load is the server, not the model."""
    return txt2img(seed=seed, size=32, cfg=1.0, prefix=prefix)


RUN_EVENTS = {
    "execution_start",
    "execution_cached",
    "executing",
    "progress_state",
    "progress",
    "executed",
    "execution_success",
    "execution_error",
    "execution_interrupted",
}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def check_prompt_events(events: list[dict], prompt_id: str) -> None:
    """One prompt's run events: start, node events, one image, success, the final executing."""
    kinds = [e["type"] for e in events]
    assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"], kinds
    assert events[-1]["data"]["node"] is None
    assert kinds.count("execution_start") == kinds.count("execution_success") == kinds.count("executed") == 1, kinds
    steps = [e["data"]["value"] for e in events if e["type"] == "progress"]
    assert steps == [1, 2], steps
    assert kinds.index("executed") > max(i for i, k in enumerate(kinds) if k == "progress")


def test_eight_clients_with_25_prompts_each_complete_exactly_once_in_order(shared_server):
    server = shared_server["server"]
    fresh_history(server)
    out = server.dirs["output"] / "load"
    log_start = len(server.log())
    ws = server.ws("warm-up")
    events_until_done(ws, {server.queue_prompt(small(0, "load/warm-up"), "warm-up")})  # loads the model (when not yet loaded)
    ws.close()
    rss_warm = rss_bytes(server.pid)
    results: dict[int, tuple[list[str], list[dict]]] = {}
    failures: list[BaseException] = []

    def client(i: int) -> None:
        try:
            ws = server.ws(f"client-{i}")
            assert receive(ws)["type"] == "status"
            ids = [server.queue_prompt(small(1000 * (i + 1) + j, "load/ComfyUI"), f"client-{i}") for j in range(PROMPTS)]
            results[i] = (ids, events_until_done(ws, set(ids), timeout=900))
            ws.close()
        except BaseException as exc:
            failures.append(exc)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    elapsed = time.monotonic() - t0
    all_ids = [pid for ids, _ in results.values() for pid in ids]
    assert len(set(all_ids)) == CLIENTS * PROMPTS
    for ids, events in results.values():
        run = [e for e in events if e["type"] in RUN_EVENTS]
        assert {e["data"]["prompt_id"] for e in run} == set(ids)  # nothing of another client's prompts
        order = [e["data"]["prompt_id"] for e in run]
        blocks = [pid for k, pid in enumerate(order) if k == 0 or order[k - 1] != pid]
        assert sorted(blocks) == sorted(ids)  # each prompt's events arrive together, once
        assert blocks == ids  # and the prompts of one client run in the order they were queued
        for prompt_id in ids:
            check_prompt_events([e for e in run if e["data"]["prompt_id"] == prompt_id], prompt_id)
    status, history = server.json("GET", "/history")
    assert set(all_ids) <= set(history) and all(history[p]["status"]["status_str"] == "success" for p in all_ids)
    status, jobs = server.json("GET", "/api/jobs?status=completed&limit=1000")
    assert jobs["pagination"]["total"] == CLIENTS * PROMPTS + 1
    images = [history[p]["outputs"]["9"]["images"][0]["filename"] for p in all_ids]
    assert len(set(images)) == CLIENTS * PROMPTS
    assert len(pngs(out)) == CLIENTS * PROMPTS + 1 and not temporaries(server.dirs["output"])
    growth = rss_bytes(server.pid) - rss_warm
    assert growth < 300 * 1024**2, f"the server grew by {growth / 1024**2:.0f} MB over {CLIENTS * PROMPTS} prompts"
    log = server.log()[log_start:]
    assert log.count(": success in ") == CLIENTS * PROMPTS + 1, log[-2000:]
    print(f"{CLIENTS * PROMPTS} prompts in {elapsed:.1f} s, memory growth {growth / 1024**2:.0f} MB")


SLOW_STEPS = 60  # the kill lands at the first of them: the rest is the margin for the signal to arrive


def two_branch_prompt() -> dict:
    """A quick branch that saves an image (nodes 5-7), then a longer one that starts from that
    image (10, 8, 9, 99), so it samples only once the first image is saved: the test kills the
    server while node 8 samples, between the two saves."""
    prompt = txt2img(seed=4, steps=2, prefix="kill/quick")
    prompt = {
        "1": prompt["4"],
        "2": prompt["6"],
        "3": prompt["7"],
        "4": prompt["5"],
        "5": {
            "class_type": "KSampler",
            "inputs": {**prompt["3"]["inputs"], "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]},
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "kill/quick"}},
    }
    prompt["2"]["inputs"]["clip"] = prompt["3"]["inputs"]["clip"] = ["1", 1]
    prompt["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["1", 2]}}
    prompt["8"] = {"class_type": "KSampler", "inputs": {**prompt["5"]["inputs"], "steps": SLOW_STEPS, "latent_image": ["10", 0]}}
    prompt["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}}
    prompt["99"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "kill/slow"}}
    return prompt


def test_kill_9_with_prompts_queued_then_restart_finishes_each_exactly_once(shared_server):
    server = shared_server["server"]
    fresh_history(server)
    out = server.dirs["output"] / "kill"
    ws = server.ws("survivor")
    first = server.queue_prompt(two_branch_prompt(), "survivor")
    others = [server.queue_prompt(small(500 + k, prefix=f"kill/after{k}"), "survivor") for k in range(4)]
    saved = False
    while True:  # the first image of the first prompt is written and its second branch samples: kill the server
        msg = receive(ws)
        if not isinstance(msg, dict) or msg["data"].get("prompt_id") != first:
            continue
        saved = saved or msg["type"] == "executed"
        if msg["type"] == "progress" and msg["data"]["node"] == "8":
            assert saved and msg["data"]["value"] < SLOW_STEPS, msg
            break
    server.kill9()
    ws.close()
    assert [p.name for p in pngs(out)] == ["quick_00001_.png"]

    server = shared_server["server"] = Served(server.base, forks=server.forks).start()
    server.wait_idle(timeout=600)
    status, history = server.json("GET", "/history")
    assert sorted(history) == sorted([first, *others])
    assert all(entry["status"]["status_str"] == "success" for entry in history.values())
    assert sorted(history[first]["outputs"]) == ["7", "99"]
    status, jobs = server.json("GET", "/api/jobs")
    assert jobs["pagination"]["total"] == 5 and {j["status"] for j in jobs["jobs"]} == {"completed"}
    # the interrupted attempt's image was deleted and written again: one image per SaveImage, nothing half-written
    names = sorted(p.name for p in pngs(out))
    assert names == [
        "after0_00001_.png",
        "after1_00001_.png",
        "after2_00001_.png",
        "after3_00001_.png",
        "quick_00001_.png",
        "slow_00001_.png",
    ]
    assert not temporaries(server.dirs["output"])
    assert "runs again from the start (1 file(s) of the interrupted attempt deleted)" in server.log()
    assert server.stop() == 0
