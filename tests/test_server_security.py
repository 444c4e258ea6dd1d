"""graphsd serve refuses what it must: requests without the token (401), requests from other sites
or through another host name (403), names that leave their folder (/view, uploads, user data,
prompts), files that are not images, uploads over the limit, pickle checkpoints, listening on
another address without a token; and malformed prompts get ComfyUI-shaped errors without ever
taking the server down. One real server for the module, with a token from the environment and a
small upload limit."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import websocket
from PIL import Image
from test_server_harness import Served, events_until_done, quote, receive, txt2img

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, forks):
    base = tmp_path_factory.mktemp("secure")
    served = Served(base, "--max-upload-mb", "0.05", env={"GRAPHSD_SERVER_TOKEN": TOKEN}, data_limit=8 * 1024**3, forks=forks).start()
    yield served
    assert served.stop() == 0, served.log()
    assert "internal error" not in served.log(), served.log()  # nothing ever reached a 500


def png_bytes(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def ws_url(server: Served, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + query


def test_every_request_needs_the_token(server):
    for method, path in (
        ("GET", "/"),
        ("GET", "/api/object_info"),
        ("GET", "/view?filename=x.png"),
        ("POST", "/prompt"),
        ("GET", "/assets/does-not-matter.js"),
    ):
        assert server.request(method, path, auth=False)[0] == 401, path
        assert server.request(method, path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(ws_url(server), timeout=30)
    assert refused.value.status_code == 401
    assert server.request("GET", "/api/users")[0] == 200  # Authorization: Bearer
    # the browser logs in once with ?token=..., then the HttpOnly cookie carries it
    status, headers, _ = server.request("GET", f"/?token={TOKEN}", auth=False)
    assert status == 200 and "graphsd_token=" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    cookie = {"Cookie": f"graphsd_token={TOKEN}"}
    assert server.request("GET", "/api/settings", headers=cookie, auth=False)[0] == 200
    ws = websocket.create_connection(ws_url(server, "?clientId=cookie-client"), timeout=30, cookie=f"graphsd_token={TOKEN}")
    assert receive(ws)["data"]["sid"] == "cookie-client"
    ws.close()


def test_other_hosts_and_other_sites_are_refused(server):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    # DNS rebinding: a page of another domain that resolves to 127.0.0.1
    assert server.request("GET", "/api/users", headers={**bearer, "Host": f"evil.example:{server.port}"})[0] == 403
    assert server.request("GET", "/api/users", headers={**bearer, "Host": f"localhost:{server.port}"})[0] == 200
    # a page on another site, or on another port of this machine, may not change anything
    for origin in ("http://evil.example", f"http://127.0.0.1:{server.port + 1}", "null"):
        status, body = server.json("POST", "/prompt", {"prompt": txt2img()}, headers={"Origin": origin})
        assert status == 403 and "origin" in body["error"]["message"], origin
    status, body = server.json("POST", "/interrupt", {}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    assert (
        server.json("POST", "/interrupt", {}, headers={"Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"})[0]
        == 200
    )
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(ws_url(server), timeout=30, header=[f"Authorization: Bearer {TOKEN}"], origin="http://evil.example")
    assert refused.value.status_code == 403


def test_file_names_stay_inside_their_folders(server, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (server.dirs["output"] / "link.png").symlink_to(outside)
    (server.dirs["output"] / "sub").mkdir(exist_ok=True)
    (server.dirs["output"] / "sub" / "fine.png").write_bytes(png_bytes())
    assert server.request("GET", "/view?filename=fine.png&subfolder=sub&type=output")[0] == 200
    for query in (
        "filename=..%2Fserver.log",
        f"filename={quote(str(outside))}",
        "filename=fine.png&subfolder=..%2Foutput%2Fsub",
        "filename=link.png",
        "filename=passwd&subfolder=%2Fetc",
        "filename=x.png&subfolder=sub%2F..%2F..",
    ):
        status, body = server.json("GET", f"/view?{query}")
        assert status == 403, (query, body)
    assert server.json("GET", "/view?filename=fine.png&type=secrets")[0] == 400
    assert server.json("GET", "/view?filename=nothing.png")[0] == 404
    # user data
    assert server.request("GET", f"/api/userdata/{quote('../../queue.sqlite3')}")[0] == 403
    assert server.request("POST", f"/api/userdata/{quote('/tmp/x.json')}", raw=b"{}")[0] == 403
    # uploads: names, folders, content, size
    status, body = server.upload("../escape.png", png_bytes())
    assert status == 400 and "not allowed" in body["error"]["message"]
    assert server.upload("ok.png", png_bytes(), subfolder="../../x")[0] == 403
    assert server.upload("ok.png", png_bytes(), type="output")[0] == 400
    status, body = server.upload("page.png", b"<html><script>alert(1)</script></html>")
    assert status == 400 and "not an image" in body["error"]["message"]
    assert server.upload("big.png", os.urandom(80 * 1024))[0] == 413
    assert server.upload("ok.png", png_bytes(), subfolder="masks") == (200, {"name": "ok.png", "subfolder": "masks", "type": "input"})
    assert server.upload("ok.png", png_bytes(32), subfolder="masks")[1]["name"] == "ok_2.png"  # never replaced unless overwrite
    written = sorted(p.relative_to(server.base).as_posix() for p in server.base.rglob("*.png"))
    assert written == ["input/masks/ok.png", "input/masks/ok_2.png", "output/link.png", "output/sub/fine.png"]


def test_prompts_cannot_read_outside_the_served_folders_or_load_pickles(server):
    def node_error(prompt):
        status, body = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 400, body
        return {(n, e["extra_info"].get("input_name")) for n, v in body["node_errors"].items() for e in v["errors"]}

    prompt = txt2img()
    prompt["4"]["inputs"]["ckpt_name"] = "/etc/passwd"
    assert node_error(prompt) == {("4", "ckpt_name")}
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "../../server.log"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }
    assert node_error(prompt) == {("1", "image")}
    # graphsd's own LoadImage takes a path: the engine confines what it reads to the served folders
    outside = server.base / "outside.png"
    outside.write_bytes(png_bytes())
    prompt = {
        "1": {"class_type": "graphsd.LoadImage", "inputs": {"path": str(outside)}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "stolen"}},
    }
    checkpoints = server.dirs["models"] / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    (checkpoints / "evil.ckpt").write_bytes(b"\x80\x04not really a pickle")
    evil = txt2img()
    evil["4"]["inputs"]["ckpt_name"] = "evil.ckpt"
    escape = txt2img(prefix="../../escaped")
    ws = server.ws("reader")
    ids = {name: server.queue_prompt(p, "reader") for name, p in (("read", prompt), ("pickle", evil), ("escape", escape))}
    events = events_until_done(ws, set(ids.values()))
    ws.close()
    errors = {e["data"]["prompt_id"]: e["data"] for e in events if e["type"] == "execution_error"}
    assert errors[ids["read"]]["node_id"] == "1" and "outside the folders" in errors[ids["read"]]["exception_message"]
    assert errors[ids["pickle"]]["node_id"] == "4" and "--allow-pickle" in errors[ids["pickle"]]["exception_message"]
    assert errors[ids["escape"]]["node_id"] == "9" and "leaves the output directory" in errors[ids["escape"]]["exception_message"]
    assert not list(server.base.parent.glob("escaped*")) and not list(server.dirs["output"].rglob("stolen*"))


MALFORMED = [
    b"not json",
    b"[1, 2]",
    b'{"prompt": "txt2img"}',
    b'{"prompt": {}}',
    b'{"prompt": {"1": "KSampler"}}',
    b'{"prompt": {"1": {"class_type": ["KSampler"], "inputs": {}}}}',
    b'{"prompt": {"1": {"class_type": "KSampler", "inputs": [1, 2]}}}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", "0"]}}, "2": {"class_type": "LoadImage", "inputs": {}}}}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {"images": ["2", true]}}}}',
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": {"1": {"class_type": "KSampler", "inputs": {"cfg": NaN}}}}',
    b'{"prompt": {"1": {"class_type": "\\u0000"}}}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}, "number": NaN}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}, "number": 1e400}',
    b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}, "partial_execution_targets": [1]}',
]


def _mutated(**changes):
    prompt = txt2img()
    for path, value in changes.items():
        node, name = path.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


MALFORMED_PROMPTS = [
    _mutated(**{"5__width": 10**9}),
    _mutated(**{"5__batch_size": 10**12}),
    _mutated(**{"3__steps": 10**9}),
    _mutated(**{"3__seed": -1}),
    _mutated(**{"3__seed": 2**70}),
    _mutated(**{"3__cfg": "high"}),
    _mutated(**{"3__sampler_name": "dpm_adaptive"}),
    _mutated(**{"3__latent_image": ["8", 0]}),  # a cycle: decode → sampler → decode
    _mutated(**{"6__clip": ["4", 7]}),
    _mutated(**{"6__clip": {"__value__": [1, 2]}}),
    {**txt2img(), "10": {"class_type": "UNetDenoiseLoop", "inputs": {"steps": 5}}},
]


def test_malformed_prompts_get_comfyui_errors_and_never_crash_the_server(server):
    for raw in MALFORMED:
        status, _, body = server.request("POST", "/prompt", raw=raw, headers={"Content-Type": "application/json"})
        assert 400 <= status < 500, (raw[:80], body[:300])
        assert "error" in json.loads(body), raw[:80]
    for prompt in MALFORMED_PROMPTS:
        status, body = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 400, body
        assert body["node_errors"] and all(e["errors"] and "class_type" in e for e in body["node_errors"].values()), body
    # huge, but valid: refused by the memory check when it runs, as an execution error
    huge = _mutated(**{"5__width": 16384, "5__height": 16384, "5__batch_size": 64})
    ws = server.ws("huge")
    prompt_id = server.queue_prompt(huge, "huge")
    events = events_until_done(ws, {prompt_id})
    [error] = [e["data"] for e in events if e["type"] == "execution_error"]
    assert error["node_id"] == "5" and "needs at least" in error["exception_message"] and "available" in error["exception_message"]
    # and the server still runs prompts
    prompt_id = server.queue_prompt(txt2img(seed=77), "huge")
    events = events_until_done(ws, {prompt_id})
    ws.close()
    assert "execution_success" in [e["type"] for e in events]


def test_listening_on_another_address_needs_a_token(tmp_path, forks):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GRAPHSD_SERVER_TOKEN", None)
    result = forks.run(  # the command in a process forked past its imports (forkserver.py)
        [sys.executable, "-m", "graphsd.cli", "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)],
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without a token" in result.stderr and "--token" in result.stderr
    assert "Traceback" not in result.stderr
