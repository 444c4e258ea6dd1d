"""The server's SQLite queue on its own (fast): run order with ``front``, exactly one history entry
per prompt, recovery of what a crashed server left running (and giving up after MAX_ATTEMPTS),
a bounded history, a second connection seeing what the first committed; and the confinement of
request file names."""

from __future__ import annotations

import os
import time

import pytest

from graphsd.server.security import Refused, confined
from graphsd.server.store import MAX_ATTEMPTS, Job, Store


def job(prompt_id: str) -> Job:
    return Job(
        prompt_id=prompt_id,
        number=0,
        status="pending",
        client_id="c",
        prompt={"1": {}},
        extra_data={},
        workflow={"version": 1, "nodes": {}},
        origins={},
        targets=None,
        output_nodes=["9"],
        created=time.time(),
    )


def test_prompts_run_in_queue_order_and_front_goes_first(tmp_path):
    store = Store(tmp_path / "q.sqlite3")
    for name in ("a", "b"):
        store.add(job(name))
    store.add(job("urgent"), front=True)
    order = []
    while (claimed := store.claim_next()) is not None:
        order.append(claimed.prompt_id)
        store.finish(claimed.prompt_id, "completed", {"9": {"images": []}}, None, [])
    assert order == ["urgent", "a", "b"]
    assert [j.prompt_id for j in store.history()] == ["urgent", "a", "b"]
    assert store.queue_remaining() == 0


def test_a_crashed_run_goes_back_to_the_queue_with_its_files_then_fails_after_max_attempts(tmp_path):
    path = tmp_path / "q.sqlite3"
    store = Store(path)
    store.add(job("p"))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        running = store.claim_next()
        assert running is not None and running.attempts == attempt
        store.add_files("p", [f"/out/{attempt}.png"])
        store.close()  # the process dies here: nothing else is written
        store = Store(path)
        [recovered] = store.recover()
        assert recovered.files == [f"/out/{attempt}.png"]
        status = store.get("p").status
        assert status == ("failed" if attempt == MAX_ATTEMPTS else "pending")
    assert "stopped 3 times" in store.get("p").error["exception_message"]
    assert store.claim_next() is None and [j.prompt_id for j in store.history()] == ["p"]


def test_finished_is_final_and_the_history_is_bounded(tmp_path):
    store = Store(tmp_path / "q.sqlite3", max_history=3)
    for k in range(5):
        store.add(job(f"p{k}"))
        store.finish(store.claim_next().prompt_id, "completed", {}, None, [])
        store.finish(f"p{k}", "failed", {}, {"exception_message": "late"}, [])  # a second finish changes nothing
    assert [j.prompt_id for j in store.history()] == ["p2", "p3", "p4"]
    assert {j.status for j in store.history()} == {"completed"}
    store.add(job("q1"))
    store.add(job("q2"))
    assert store.cancel_pending(["q2", "p4", "nope"]) == ["q2"]
    assert store.get("q2").status == "cancelled" and store.get("q1").status == "pending"
    other = Store(tmp_path / "q.sqlite3")  # another connection (a restarted server) sees it all
    assert other.get("q2").status == "cancelled" and other.queue_remaining() == 1


def test_request_file_names_stay_inside_their_folder(tmp_path):
    root = tmp_path / "output"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    os.symlink(tmp_path, root / "up")
    assert confined(root, "sub/a.png") == root.resolve() / "sub" / "a.png"
    for name in ("../x", "sub/../../x", "/etc/passwd", "up/secret", "sub\\a.png", "C:/x", "a\0b"):
        with pytest.raises(Refused) as refused:
            confined(root, name)
        assert refused.value.status == 403, name
