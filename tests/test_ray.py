"""Ray scale-out on a local Ray cluster (CPU, graphsd-tiny at 32x32, one step): a 60-row batch
completes exactly once on two workers; a worker killed while it runs a row costs that row one
more attempt and nothing else (every row done once, one image each, nothing left behind);
routing keeps the model loads of a mixed stream of two checkpoints within models + workers
(counted from the workers' ModelEvents); ``graphsd serve --ray`` runs ComfyUI prompts sent by
the websocket client on the cluster's workers.

One cluster and one pool of two workers for the module (starting them costs most of the time)."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from test_server_harness import ROOT, Served, assert_same_png, events_until_done, pngs, receive, txt2img

from graphsd import Engine, Settings
from graphsd.batch import MANIFEST, BatchOptions, run_batch
from graphsd.server.runner import STAGING

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')

pytestmark = pytest.mark.slow

WORKFLOW = str(ROOT / "workflows" / "txt2img.yaml")
TINY = ROOT / "graphsd" / "std" / "models" / "builtin" / "graphsd-tiny"
COMMON = {"width": 32, "height": 32, "steps": 1, "cfg": 1.0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from graphsd.distributed.ray_pool import RayPool

    base = tmp_path_factory.mktemp("ray")
    models = base / "models"
    shutil.copytree(TINY, models / "tiny-copy")  # a second checkpoint (its own files, so its own loads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    session = Path("/tmp") / f"graphsd-ray-{os.getpid()}"  # Ray's socket paths must stay short
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(session), logging_level="WARNING", log_to_driver=False)
    settings = Settings(device="cpu", output_dir=str(base / "output"), models_dir=str(models))
    engine = Engine(settings)
    pool = RayPool(settings, workers=2)
    pool.wait_ready(timeout=300)
    yield {"base": base, "engine": engine, "pool": pool, "settings": settings, "address": ray.get_runtime_context().gcs_address}
    pool.shutdown()
    ray.shutdown()
    shutil.rmtree(session, ignore_errors=True)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def batch(cluster, name: str, rows: list[dict], on_event=None):
    output = cluster["base"] / name
    settings = Settings(device="cpu", output_dir=str(output), models_dir=cluster["settings"].models_dir)
    params = write_rows(cluster["base"] / f"{name}.jsonl", rows)
    options = BatchOptions(WORKFLOW, params, settings, dict(COMMON), ray_address="", progress=False)
    result, code = run_batch(options, engine=cluster["engine"], pool=cluster["pool"], on_event=on_event)
    return output, result, code


def assert_exactly_once(output: Path, names: list[str], status: str = "done") -> None:
    """Each row's folder holds one image, no other folder or file is there but the manifest,
    and the manifest gives every row once, with ``status`` and that file."""
    assert sorted(p.name for p in output.iterdir()) == sorted([*names, MANIFEST])
    for name in names:
        assert [p.name for p in (output / name).iterdir()] == ["txt2img_00001.png"], name
    manifest = json.loads((output / MANIFEST).read_text())
    assert [r["name"] for r in manifest["rows"]] == names
    assert all(r["status"] == status and r["files"] == [f"{r['name']}/txt2img_00001.png"] for r in manifest["rows"])
    assert not (output / STAGING).exists()


def test_a_60_row_batch_completes_exactly_once_and_a_second_run_skips_it(cluster):
    rows = [{"seed": i, "prompt": f"a {c} circle on a white background"} for i, c in enumerate(["red", "blue", "green"] * 20)]
    output, result, code = batch(cluster, "sixty", rows)
    names = [f"row-{i:05d}" for i in range(1, 61)]
    assert code == 0 and [r.status for r in result] == ["done"] * 60
    assert_exactly_once(output, names)
    assert {r.worker for r in result} == {0, 1}  # both workers took rows
    # the same image as one process makes for that row
    local = Engine(Settings(device="cpu", output_dir=str(cluster["base"] / "local"))).run(WORKFLOW, {**COMMON, **rows[7]})
    assert_same_png(output / names[7] / "txt2img_00001.png", Path(local.files[0]))
    _, again, code = batch(cluster, "sixty", rows)
    assert code == 0 and [r.status for r in again] == ["skipped"] * 60
    assert_exactly_once(output, names, "skipped")


def test_a_worker_killed_while_it_runs_a_row_costs_one_retry_and_nothing_is_lost_or_duplicated(cluster):
    pool = cluster["pool"]
    deaths, retries = pool.stats.deaths, pool.stats.retries
    killed = threading.Event()

    def kill_on_denoise(row, event):  # the 5th row's worker dies as that row starts sampling
        if row.index == 5 and event.get("kind") == "node_start" and event.get("node_id") == "denoise" and not killed.is_set():
            killed.set()
            pool.kill(row.worker)

    rows = [{"seed": 100 + i} for i in range(12)]
    output, result, code = batch(cluster, "killed", rows, on_event=kill_on_denoise)
    assert killed.is_set()
    assert code == 0 and [r.status for r in result] == ["done"] * 12
    assert_exactly_once(output, [f"row-{i:05d}" for i in range(1, 13)])
    assert (pool.stats.deaths - deaths, pool.stats.retries - retries) == (1, 1)


def test_routing_keeps_model_loads_of_a_mixed_stream_within_models_plus_workers(cluster):
    pool = cluster["pool"]
    pool.free(unload_models=True, free_memory=True)  # start cold: nobody holds a model
    rng = random.Random(3)
    rows = [{"seed": i, "model": rng.choice(["graphsd-tiny", "tiny-copy"])} for i in range(40)]
    loads: dict[str, set[str]] = {}

    def count(row, event):
        if event.get("kind") == "model" and event.get("action") == "load":
            loads.setdefault(row.name, set()).add(row.params["model"])

    output, result, code = batch(cluster, "routing", rows, on_event=count)
    assert code == 0 and [r.status for r in result] == ["done"] * 40
    model_loads = sum(len(m) for m in loads.values())  # jobs that loaded their checkpoint
    assert {m for ms in loads.values() for m in ms} == {"graphsd-tiny", "tiny-copy"}  # each was loaded (counting works)
    assert model_loads <= 2 + pool.size, loads


def test_serve_ray_runs_comfyui_prompts_from_the_websocket_client_on_the_workers(cluster, tmp_path, forks):
    served = Served(tmp_path, "--ray", cluster["address"], "--workers", "2", forks=forks).start(timeout=300)
    try:
        ws = served.ws("ray-client")
        assert receive(ws)["type"] == "status"
        ids = [served.queue_prompt(txt2img(seed=s, steps=1, size=32, prefix=f"ray{s}"), "ray-client") for s in (1, 2, 3)]
        events = events_until_done(ws, set(ids))
        for pid in ids:
            kinds = [e["type"] for e in events if (e.get("data") or {}).get("prompt_id") == pid]
            assert kinds[0] == "execution_start" and "execution_success" in kinds, kinds
            assert "executed" in kinds and "progress" in kinds
            status, history = served.json("GET", f"/history/{pid}")
            assert history[pid]["status"]["status_str"] == "success"
            image = next(iter(history[pid]["outputs"].values()))["images"][0]
            status, _, body = served.request("GET", f"/view?filename={image['filename']}&type=output")
            assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(pngs(served.dirs["output"])) == 3
        log = served.log()
        assert "2 Ray workers ready" in log
    finally:
        assert served.stop() == 0, served.log()
