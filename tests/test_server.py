"""graphsd serve speaks ComfyUI's API: the routes the ComfyUI frontend needs to start, /object_info
from the node schemas, a prompt's websocket events in ComfyUI's order, the image it made through
/history and /view, validation errors in ComfyUI's node_errors shape, graphsd-native nodes in a
prompt, interruption and cancelling, uploads read by LoadImage. One real server process
(tests/test_server_harness.py), shared with the other server test files (tests/conftest.py)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from PIL import Image
from test_server_harness import ROOT, assert_same_png, events_until_done, pngs, quote, receive, txt2img

from graphsd import Engine, Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(shared_server):
    """The server process these tests share with test_server_preview.py and test_server_load.py
    (tests/conftest.py); they run first, on a fresh one."""
    return shared_server["server"]


def test_the_frontend_startup_routes_answer_with_and_without_the_api_prefix(server):
    status, _, body = server.request("GET", "/")
    assert status == 200 and b"<html" in body  # the frontend package's index.html
    for prefix in ("", "/api"):
        assert server.json("GET", prefix + "/users") == (200, {"storage": "server", "migrated": True})
        assert server.json("GET", prefix + "/extensions") == (200, [])
        status, stats = server.json("GET", prefix + "/system_stats")
        assert status == 200 and isinstance(stats["system"]["argv"], list) and stats["devices"][0]["type"] == "cpu"
        status, jobs = server.json("GET", prefix + "/jobs?status=in_progress,pending&limit=200&offset=0")
        assert status == 200 and set(jobs["pagination"]) == {"offset", "limit", "total", "has_more"}
        assert server.json("GET", prefix + "/prompt")[1]["exec_info"]["queue_remaining"] >= 0
        assert server.json("GET", prefix + "/features")[0] == 200
        assert server.json("GET", prefix + "/i18n") == (200, {})
    # settings: the frontend posts single values and merged dicts
    assert server.request("POST", "/api/settings/Comfy.InstalledVersion", "1.58.1")[0] == 200
    assert server.request("POST", "/api/settings", {"Comfy.TutorialCompleted": True})[0] == 200
    assert server.json("GET", "/api/settings")[1] == {"Comfy.InstalledVersion": "1.58.1", "Comfy.TutorialCompleted": True}
    assert server.json("GET", "/api/settings/Comfy.InstalledVersion") == (200, "1.58.1")
    # user data: no workflows yet is a 404; names arrive %2F-encoded in one path segment
    assert server.request("GET", "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")[0] == 404
    workflow = json.dumps({"nodes": [], "links": [], "version": 0.4}).encode()
    status, saved = server.json("POST", f"/api/userdata/{quote('workflows/a b.json')}?overwrite=true&full_info=true", raw=workflow)
    assert status == 200 and saved["path"] == "workflows/a b.json" and saved["size"] == len(workflow)
    assert server.request("POST", f"/api/userdata/{quote('workflows/a b.json')}?overwrite=false", raw=b"{}")[0] == 409
    status, listing = server.json("GET", "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
    assert status == 200 and [e["path"] for e in listing] == ["a b.json"]
    assert server.request("GET", f"/api/userdata/{quote('workflows/a b.json')}")[2] == workflow
    move = f"/api/userdata/{quote('workflows/a b.json')}/move/{quote('workflows/c.json')}"
    assert server.request("POST", move)[0] == 200
    assert server.request("GET", f"/api/userdata/{quote('workflows/c.json')}")[2] == workflow
    assert server.request("DELETE", f"/api/userdata/{quote('workflows/c.json')}")[0] == 204
    assert server.request("GET", f"/api/userdata/{quote('workflows/c.json')}")[0] == 404


def test_object_info_describes_every_node_from_its_schema_and_the_comfyui_classes(server):
    status, info = server.json("GET", "/api/object_info")
    assert status == 200
    for name, entry in info.items():  # what the frontend needs of every entry, or it does not start
        assert isinstance(entry["python_module"], str) and entry["category"] and entry["name"] == name, name
    for comfy in (
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "VAEEncode",
        "LoadImage",
        "SaveImage",
        "LoraLoader",
    ):
        assert info[comfy]["python_module"] == "nodes", comfy
    assert info["KSampler"]["input"]["required"]["model"] == ["MODEL"] and info["KSampler"]["output"] == ["LATENT"]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["graphsd-tiny"]
    assert info["SaveImage"]["output_node"] is True
    engine = Engine(Settings(device="cpu"))
    comfy_classes = {name for name, entry in info.items() if entry["python_module"] == "nodes"}
    assert {"SaveImage", "LoadImage", "VAEDecode", "VAEEncode", "LoraLoader", "PreviewImage"} <= comfy_classes
    for node_type, cls in engine.nodes.items():
        name = f"graphsd.{node_type}" if node_type in comfy_classes else node_type  # a graphsd node named like a ComfyUI class
        entry, schema = info[name], cls.schema()
        assert entry["output_node"] == schema["output_node"] and entry["category"] == f"graphsd/{schema['category']}"
        assert entry["output_name"] == list(schema["outputs"])
        spec = {**entry["input"]["required"], **entry["input"]["optional"]}
        assert sorted(spec) == sorted(schema["inputs"]), name
        for field, f in schema["inputs"].items():
            kind, opts = spec[field][0], spec[field][1]
            if f["link_only"]:
                assert "default" not in opts
                continue
            for key in ("min", "max", "default"):
                if key in f:
                    assert opts[key] == f[key], (name, field, key)
            if "choices" in f:
                assert kind == f["choices"]
    assert info["UNetDenoiseLoop"]["input"]["required"]["unet"][0] == "MODEL"  # the same type name as KSampler's model
    assert info["UNetDenoiseLoop"]["input"]["optional"]["negative"][0] == "CONDITIONING"
    assert info["LatentNoise"]["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert info["graphsd.SaveImage"]["output_node"] is True
    assert server.json("GET", "/object_info/KSampler")[1] == {"KSampler": info["KSampler"]}


def test_a_prompt_sends_comfyui_events_in_order_and_its_image_is_in_the_history(server, tmp_path):
    ws = server.ws("events-client")
    first = receive(ws)
    assert first["type"] == "status" and first["data"]["sid"] == "events-client"
    ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    prompt = txt2img(seed=11, steps=3)
    prompt_id = server.queue_prompt(prompt, "events-client")
    # the same prompt run by the Python API (an independent path through graphsd), while the server runs it
    result = Engine(Settings(device="cpu", output_dir=str(tmp_path))).run(prompt)
    events = [e for e in events_until_done(ws, {prompt_id}) if e["type"] != "status"]
    ws.close()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "feature_flags" and kinds[1] == "execution_start"
    assert kinds[-3:] == ["executed", "execution_success", "executing"] and events[-1]["data"]["node"] is None
    assert all(e["data"]["prompt_id"] == prompt_id for e in events[1:])
    executing = [e["data"]["node"] for e in events if e["type"] == "executing"][:-1]
    assert set(executing) == set(prompt) and executing.index("4") < executing.index("6") < executing.index("8") < executing.index("9")
    assert [e["data"]["value"] for e in events if e["type"] == "progress"] == [1, 2, 3]
    final_state = [e for e in events if e["type"] == "progress_state"][-1]["data"]["nodes"]
    assert {n: s["state"] for n, s in final_state.items()} == {n: "finished" for n in prompt}
    [image] = events[-3]["data"]["output"]["images"]
    assert events[-3]["data"]["node"] == "9" and image["type"] == "output" and image["filename"].startswith("ComfyUI_")
    status, history = server.json("GET", f"/history/{prompt_id}")
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["9"]["images"] == [image]
    assert entry["prompt"][1] == prompt_id and entry["prompt"][2] == prompt and entry["prompt"][4] == ["9"]
    status, headers, png = server.request("GET", "/view?" + "&".join(f"{k}={quote(v)}" for k, v in image.items()))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert png == (server.dirs["output"] / image["filename"]).read_bytes()
    # the Python API's run of the same prompt gave the same picture
    [reference] = result.files
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert_same_png(png, reference)
    # the same prompt again: everything comes from the cache, and the image is shown again
    ws = server.ws("events-client")
    again = server.queue_prompt(prompt, "events-client")
    events = [e for e in events_until_done(ws, {again}) if e["type"] != "status"]
    ws.close()
    assert [e["type"] for e in events] == ["execution_start", "execution_cached", "executed", "execution_success", "executing"]
    assert sorted(events[1]["data"]["nodes"]) == sorted(prompt) and events[2]["data"]["output"]["images"] == [image]
    status, history = server.json("GET", f"/history/{again}")
    assert history[again]["outputs"]["9"]["images"] == [image]
    cached = [m for kind, m in history[again]["status"]["messages"] if kind == "execution_cached"]
    assert sorted(cached[0]["nodes"]) == sorted(prompt)


def test_validation_errors_come_back_in_comfyui_node_errors_shape(server):
    def refused(prompt):
        status, body = server.json("POST", "/prompt", {"prompt": prompt, "client_id": "v"})
        assert status == 400, body
        return body

    bad = txt2img()
    bad["3"]["inputs"]["steps"] = 0
    body = refused(bad)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [err] = body["node_errors"]["3"]["errors"]
    assert err["extra_info"]["input_name"] == "steps" and "smaller than min" in err["message"]
    assert body["node_errors"]["3"]["class_type"] == "KSampler" and body["node_errors"]["3"]["dependent_outputs"] == ["9"]

    bad = txt2img()
    bad["5"]["inputs"]["width"] = 100  # within ComfyUI's range, but graphsd's latent needs a multiple of 8
    err = refused(bad)["node_errors"]["5"]["errors"][0]
    assert err["extra_info"]["input_name"] == "width" and "multiple of 8" in err["message"]

    bad = txt2img()
    del bad["3"]["inputs"]["model"]
    err = refused(bad)["node_errors"]["3"]["errors"][0]
    assert err["type"] == "required_input_missing" and err["extra_info"]["input_name"] == "model"

    bad = txt2img()
    bad["3"]["inputs"]["positive"] = ["4", 2]  # the VAE into a conditioning input
    err = refused(bad)["node_errors"]["3"]["errors"][0]
    assert err["extra_info"]["input_name"] == "positive" and "Vae" in err["message"] and "Conditioning" in err["message"]

    bad = txt2img()
    bad["7"]["class_type"] = "CLIPTextEncodeFlux"
    body = refused(bad)
    assert body["node_errors"]["7"]["errors"][0]["type"] == "invalid_prompt"
    assert "CLIPTextEncodeFlux does not exist" in body["node_errors"]["7"]["errors"][0]["message"]

    bad = txt2img()
    bad["9"]["inputs"]["images"] = ["42", 0]
    assert "42" in refused(bad)["node_errors"]["9"]["errors"][0]["message"]

    bad = txt2img()
    del bad["9"]
    body = refused(bad)
    assert body["error"]["type"] == "prompt_no_outputs" and body["node_errors"] == {}

    native = {"1": {"class_type": "LatentNoise", "inputs": {"seed": "abc", "width": 64, "height": 64}}}
    native["2"] = {"class_type": "graphsd.SaveImage", "inputs": {"image": ["1", 0]}}
    body = refused(native)
    errors = {e["extra_info"].get("input_name"): e for e in body["node_errors"]["1"]["errors"] + body["node_errors"]["2"]["errors"]}
    assert set(errors) == {"seed", "image"}  # a bad literal, and a Noise output into an Image input


def test_a_prompt_of_graphsd_nodes_mixed_with_comfyui_classes_runs(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "2": {"class_type": "TextEncode", "inputs": {"clip": ["1", 1], "text": "a blue square on a black background"}},
        "3": {"class_type": "LatentNoise", "inputs": {"seed": 5, "width": 64, "height": 64}},
        "4": {
            "class_type": "UNetDenoiseLoop",
            "inputs": {
                "unet": ["1", 0],
                "positive": ["2", 0],
                "noise": ["3", 0],
                "steps": 2,
                "cfg": 1.0,
                "sampler": "euler",
                "schedule": "normal",
            },
        },
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "graphsd.SaveImage", "inputs": {"image": ["5", 0], "prefix": "native/mixed", "embed_workflow": False}},
    }
    ws = server.ws("native")
    prompt_id = server.queue_prompt(prompt, "native")
    events = events_until_done(ws, {prompt_id})
    ws.close()
    assert [e["type"] for e in events if e["type"] != "status"][-2:] == ["execution_success", "executing"]
    [executed] = [e["data"] for e in events if e["type"] == "executed"]
    assert executed["node"] == "6" and executed["output"]["images"][0]["subfolder"] == "native"
    assert (server.dirs["output"] / "native" / executed["output"]["images"][0]["filename"]).is_file()


def test_interrupt_and_cancel_end_in_the_history(server):
    ws = server.ws("stopper")
    long_id = server.queue_prompt(txt2img(seed=101, steps=400), "stopper")
    pending_id = server.queue_prompt(txt2img(seed=102, steps=2), "stopper")
    while True:  # wait until the long one is sampling
        msg = receive(ws)
        if isinstance(msg, dict) and msg["type"] == "progress" and msg["data"]["prompt_id"] == long_id:
            break
    status, queue = server.json("GET", "/queue")
    assert [e[1] for e in queue["queue_running"]] == [long_id] and [e[1] for e in queue["queue_pending"]] == [pending_id]
    assert server.json("POST", "/api/jobs/cancel", {"job_ids": [pending_id]}) == (200, {"cancelled": True})
    assert server.request("POST", "/interrupt", {"prompt_id": long_id})[0] == 200
    events = events_until_done(ws, {long_id})
    ws.close()
    assert [e["type"] for e in events if e["type"] != "status"][-2:] == ["execution_interrupted", "executing"]
    assert next(e for e in events if e["type"] == "execution_interrupted")["data"]["node_id"] == "3"
    for prompt_id in (long_id, pending_id):
        status, job = server.json("GET", f"/api/jobs/{prompt_id}")
        assert job["status"] == "cancelled", job
    assert server.json("GET", f"/api/jobs/{uuid.uuid4()}")[0] == 404


def test_object_info_lists_the_model_files_a_native_loader_can_name(server):
    """A graphsd node's file-name input (Node.input_choices) is a list of the files that are
    there now, as ComfyUI lists its models; a file added later appears on the next request."""
    vae_dir, lora_dir = server.dirs["models"] / "vae", server.dirs["models"] / "loras"
    vae_dir.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    (vae_dir / "first.safetensors").write_bytes(b"")
    first = server.json("GET", "/object_info/VAELoader")[1]["VAELoader"]["input"]["required"]["vae_name"][0]
    (vae_dir / "second.safetensors").write_bytes(b"")
    (lora_dir / "style.safetensors").write_bytes(b"")
    info = server.json("GET", "/api/object_info")[1]
    assert first == ["first.safetensors"]
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["first.safetensors", "second.safetensors"]
    assert "style.safetensors" in info["graphsd.LoraLoader"]["input"]["required"]["lora"][0]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []  # no U-Net files: an empty list, still a choice


def test_an_uploaded_image_is_read_by_loadimage_and_listed(server):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    status, answer = server.upload("red.png", buffer.getvalue(), overwrite="true")
    assert status == 200 and answer == {"name": "red.png", "subfolder": "", "type": "input"}
    assert server.json("GET", "/internal/files/input")[1] == ["red.png"]
    assert server.json("GET", "/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"][0] == ["red.png"]
    assert server.request("GET", "/view?filename=red.png&type=input")[2] == buffer.getvalue()
    prompt = txt2img(seed=3, steps=2, prefix="img2img")
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "red.png"}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    del prompt["5"]
    ws = server.ws("img2img")
    prompt_id = server.queue_prompt(prompt, "img2img")
    events = events_until_done(ws, {prompt_id})
    ws.close()
    assert "execution_success" in [e["type"] for e in events], events[-3:]
    assert any(p.name.startswith("img2img_") for p in pngs(server.dirs["output"]))


def test_a_client_written_like_comfyuis_websocket_api_example_works(server):
    """The way ComfyUI's websocket API example talks to ComfyUI, unchanged but for the address and
    the checkpoint: urllib POST /prompt (form-encoded content type, JSON body) with a client_id,
    websocket-client on /ws?clientId=, read until ``executing`` with node null for the prompt,
    then /history/{id} and /view of each image."""
    import urllib.parse
    import urllib.request

    import websocket

    address = server.url.removeprefix("http://")
    client_id = str(uuid.uuid4())

    def queue_prompt(prompt):
        data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
        return json.loads(urllib.request.urlopen(urllib.request.Request(f"http://{address}/prompt", data=data)).read())

    def get_image(filename, subfolder, folder_type):
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        with urllib.request.urlopen(f"http://{address}/view?{query}") as response:
            return response.read()

    def get_history(prompt_id):
        with urllib.request.urlopen(f"http://{address}/history/{prompt_id}") as response:
            return json.loads(response.read())

    def get_images(ws, prompt):
        prompt_id = queue_prompt(prompt)["prompt_id"]
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing" and message["data"]["node"] is None and message["data"]["prompt_id"] == prompt_id:
                    break
        history = get_history(prompt_id)[prompt_id]
        return {
            node_id: [get_image(image["filename"], image["subfolder"], image["type"]) for image in output.get("images", [])]
            for node_id, output in history["outputs"].items()
        }

    prompt = json.loads((ROOT / "workflows" / "comfy_txt2img.json").read_text())
    prompt["6"]["inputs"]["text"] = "a green triangle on a gray background"
    prompt["3"]["inputs"].update(seed=5, steps=3)
    prompt["5"]["inputs"].update(width=64, height=64)
    ws = websocket.WebSocket()
    ws.connect(f"ws://{address}/ws?clientId={client_id}")
    images = get_images(ws, prompt)
    ws.close()
    [png] = images["9"]
    assert Image.open(io.BytesIO(png)).size == (64, 64)
