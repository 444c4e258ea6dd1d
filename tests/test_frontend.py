"""The real ComfyUI frontend, served by ``graphsd serve``, driven in headless Chromium: it starts,
opens ComfyUI's text-to-image workflow file, queues it with the Run button and shows the image
graphsd made; a graph of graphsd-native nodes built through the frontend's graph API (LiteGraph)
runs too. One real server process and one browser for the module (tests/test_server_harness.py).

Needs Chromium (Debian's ``chromium`` package, or the binary named by ``GRAPHSD_CHROMIUM``) and the
``playwright`` Python package (in the dev extra; ``playwright install`` is never needed). A screenshot
of the page after each test, passed or failed, is kept under pytest's temporary folder and its path
printed (``pytest -s`` shows it); docs/images/frontend.png is the native-graph screenshot of one run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_server_harness import ROOT, Served

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("GRAPHSD_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GRAPHSD_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")

# Headless and offline: names other than the loopback server resolve to nothing, so the frontend's
# own calls to the internet (update checks) fail at once instead of waiting on the network.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
APP_LOAD_S = 60  # the frontend fetches its ~100 scripts and /object_info, then builds the canvas
RUN_S = 90  # one tiny prompt: a few seconds warm, ~15 s with the first model load on 2 busy cores

# The first loaded <img> on the page whose source is the server's /view of an output file named
# prefix*, with its pixels as the browser decoded them (RGBA, row-major); null while there is none.
# One call finds and reads it, so a notification that closes in between cannot be missed.
SHOWN_IMAGE = """(prefix) => {
    const img = [...document.querySelectorAll('img')].find(i => {
        const u = new URL(i.src, location.href);
        return u.pathname === '/api/view' && u.searchParams.get('type') === 'output'
            && (u.searchParams.get('filename') || '').startsWith(prefix) && i.complete && i.naturalWidth > 0;
    });
    if (!img) return null;
    const u = new URL(img.src, location.href);
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    return {
        filename: u.searchParams.get('filename'), subfolder: u.searchParams.get('subfolder') || '',
        width: c.width, height: c.height, rgba: Array.from(ctx.getImageData(0, 0, c.width, c.height).data),
    };
}"""

# Sets widgets by name on the graph's nodes: {node id: {widget: value}}; throws on a missing one
SET_WIDGETS = """(values) => {
    for (const [id, widgets] of Object.entries(values)) {
        const node = window.app.graph.getNodeById(Number(id));
        if (!node) throw new Error('no node ' + id);
        for (const [name, value] of Object.entries(widgets)) {
            const w = (node.widgets || []).find(w => w.name === name);
            if (!w) throw new Error(node.type + ' has no widget ' + name);
            w.value = value;
        }
    }
    window.app.canvas.setDirty(true, true);
}"""

# Builds text-to-image from graphsd-native nodes and a plugin node with LiteGraph, as a frontend
# extension or a user's script does; returns the SaveImage node's id
BUILD_NATIVE = """() => {
    const g = window.app.graph, LG = window.LiteGraph;
    const add = (type, pos, values) => {
        const node = LG.createNode(type);
        if (!node) throw new Error('the frontend does not know ' + type);
        node.pos = pos;
        g.add(node);
        for (const [name, value] of Object.entries(values)) {
            const w = node.widgets.find(w => w.name === name);
            if (!w) throw new Error(type + ' has no widget ' + name);
            w.value = value;
        }
        return node;
    };
    const link = (from, slot, to, input) => {
        if (!from.connect(slot, to, input)) throw new Error('cannot link ' + from.type + ' to ' + to.type + '.' + input);
    };
    const ckpt = add('graphsd.CheckpointLoader', [0, 0], {path: 'graphsd-tiny'});
    const text = add('TextEncode', [0, 170], {text: 'a red circle on a white background'});
    const noise = add('LatentNoise', [0, 440], {seed: 3, control_after_generate: 'fixed', width: 64, height: 64, batch_size: 4});
    const loop = add('UNetDenoiseLoop', [450, 0], {steps: 2, cfg: 1.0});
    const decode = add('graphsd.VAEDecode', [450, 440], {});
    const sheet = add('ContactSheet', [820, 0], {columns: 2, gap: 4, background: 1.0});
    const save = add('graphsd.SaveImage', [820, 200], {prefix: 'frontend/native', embed_workflow: false});
    save.size = [320, 440];
    link(ckpt, 0, loop, 'unet'); link(ckpt, 1, text, 'clip'); link(ckpt, 2, decode, 'vae');
    link(text, 0, loop, 'positive'); link(noise, 0, loop, 'noise'); link(loop, 0, decode, 'latent');
    link(decode, 0, sheet, 'images'); link(sheet, 0, save, 'image');
    window.app.canvas.setDirty(true, true);
    return save.id;
}"""


class Browser:
    """One headless Chromium page on the served frontend, with what went wrong in it recorded."""

    def __init__(self, page: Any, served: Served, shots: Path):
        self.page = page
        self.served = served
        self.shots = shots
        self.problems: list[str] = []  # uncaught page errors, console errors, 5xx answers
        self.prompts: list[dict[str, Any]] = []  # the bodies the frontend POSTed to /api/prompt
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on("console", self._console)
        page.on("response", self._response)
        page.on("request", self._request)

    def _console(self, msg: Any) -> None:
        # resources that are optional or outside the loopback server fail to load by design
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.problems.append(f"console error: {msg.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 500:
            self.problems.append(f"{response.status} from {response.request.method} {response.url}")

    def _request(self, request: Any) -> None:
        if request.method == "POST" and request.url == self.served.url + "/api/prompt":
            self.prompts.append(json.loads(request.post_data or "null"))

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path

    def run_events(self) -> list[list[Any]]:
        """The run events the frontend's API client has received since :meth:`listen`."""
        return self.page.evaluate("() => window.__graphsdEvents")

    def listen(self) -> None:
        """Record run events from now on (the listeners are added once per page)."""
        self.page.evaluate(
            """() => {
                window.__graphsdEvents = [];
                if (window.__graphsdListening) return;
                window.__graphsdListening = true;
                for (const type of ['executed', 'execution_success', 'execution_error', 'execution_interrupted'])
                    window.app.api.addEventListener(type, e => window.__graphsdEvents.push([type, e.detail]));
            }"""
        )

    def wait_run_end(self) -> list[list[Any]]:
        self.page.wait_for_function("() => window.__graphsdEvents.some(e => e[0] !== 'executed')", timeout=RUN_S * 1000, polling=100)
        return self.run_events()

    def fit_view(self) -> None:
        """Zoom the canvas so the whole graph shows (the frontend's "Fit view" command)."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(600)  # the fit is animated


@pytest.fixture(scope="module")
def served(tmp_path_factory, forks):
    server = Served(tmp_path_factory.mktemp("frontend"), forks=forks).start(timeout=120)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def browser(served, tmp_path_factory):
    shots = tmp_path_factory.mktemp("frontend-screenshots")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(30_000)
        page = context.pages[0] if context.pages else context.new_page()
        b = Browser(page, served, shots)
        try:
            started = time.monotonic()
            page.goto(served.url + "/")
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph && window.app.canvas", timeout=APP_LOAD_S * 1000
            )
            # a fresh user gets the template browser (graphsd ships no templates): close it as a user would
            page.locator("[data-testid=dialog-overlay]").wait_for(state="visible", timeout=20_000)
            page.keyboard.press("Escape")
            page.locator("[data-testid=dialog-overlay]").wait_for(state="detached", timeout=10_000)
            print(f"the frontend started in {time.monotonic() - started:.1f} s")
            # the minimap would cover the output node in the screenshots
            page.evaluate("async () => await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
        except BaseException:
            b.screenshot("startup")
            raise
        try:
            yield b
        finally:
            context.close()


@pytest.fixture
def frontend(browser, request):
    """The module's browser page; a screenshot of it is kept after each test, passed or failed."""
    try:
        yield browser
    finally:
        browser.screenshot(request.node.name)


def output_image(served: Served, found: dict[str, str]) -> np.ndarray:
    path = served.dirs["output"] / found["subfolder"] / found["filename"]
    assert path.is_file(), f"the page shows {found} but {path} does not exist"
    return np.asarray(Image.open(path).convert("RGBA"))


def shown_image(b: Browser, prefix: str) -> tuple[dict[str, str], np.ndarray]:
    """Wait until the page shows an output image named prefix*: its /view reference and pixels."""
    shown = b.page.wait_for_function(SHOWN_IMAGE, arg=prefix, timeout=10_000, polling=100).json_value()
    pixels = np.asarray(shown["rgba"], dtype=np.uint8).reshape(shown["height"], shown["width"], 4)
    return {"filename": shown["filename"], "subfolder": shown["subfolder"]}, pixels


def test_the_frontend_opens_comfyuis_txt2img_workflow_runs_it_and_shows_the_image(served, frontend):
    page = frontend.page
    # the same path as dropping workflows/comfy_txt2img.json (an API-format prompt) on the window
    text = (ROOT / "workflows" / "comfy_txt2img.json").read_text()
    page.evaluate(
        "async (text) => { await window.app.handleFile(new File([text], 'comfy_txt2img.json', {type: 'application/json'})); }", text
    )
    types = page.evaluate("() => Object.fromEntries(window.app.graph.nodes.map(n => [String(n.id), n.type]))")
    assert types == {k: v["class_type"] for k, v in json.loads(text).items()}
    page.evaluate(
        SET_WIDGETS,
        {
            "3": {"seed": 7, "control_after_generate": "fixed", "steps": 2},
            "5": {"width": 64, "height": 64},
            "9": {"filename_prefix": "frontend/txt2img"},
        },
    )
    frontend.listen()
    page.locator("[data-testid=queue-button]").click()
    events = frontend.wait_run_end()
    assert [e[0] for e in events] == ["executed", "execution_success"], events
    # the frontend built the prompt from the graph, with the widget values set above
    [sent] = frontend.prompts
    assert sent["prompt"]["4"]["inputs"]["ckpt_name"] == "graphsd-tiny"
    assert sent["prompt"]["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert sent["prompt"]["3"]["inputs"]["steps"] == 2 and sent["prompt"]["3"]["inputs"]["seed"] == 7
    # the page shows the output image through /api/view: the browser's pixels are the file's
    found, pixels = shown_image(frontend, "txt2img_")
    assert found["subfolder"] == "frontend"
    on_disk = output_image(served, found)
    assert on_disk.shape == (64, 64, 4)
    assert np.array_equal(pixels, on_disk)  # PNG is lossless: the file's bytes decode to the same pixels
    frontend.fit_view()
    assert frontend.problems == []


def test_a_graph_of_graphsd_nodes_built_with_the_frontends_graph_api_runs(served, frontend):
    page = frontend.page
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => window.app.graph.nodes.length === 0", timeout=10_000)
    save_id = page.evaluate(BUILD_NATIVE)
    frontend.listen()
    assert page.evaluate("async () => await window.app.queuePrompt(0, 1)") is True
    events = frontend.wait_run_end()
    assert [e[0] for e in events] == ["executed", "execution_success"], events
    executed = events[0][1]
    assert executed["node"] == str(save_id)
    [image] = executed["output"]["images"]
    assert image["subfolder"] == "frontend" and image["type"] == "output"
    sent = frontend.prompts[-1]["prompt"]
    assert sorted(v["class_type"] for v in sent.values()) == sorted(
        ["graphsd.CheckpointLoader", "TextEncode", "LatentNoise", "UNetDenoiseLoop", "graphsd.VAEDecode", "ContactSheet", "graphsd.SaveImage"]
    )
    # ContactSheet lays 4 images of 64 px in 2 columns with a 4 px gap around and between them
    on_disk = output_image(served, image)
    assert on_disk.shape == (2 * 64 + 3 * 4, 2 * 64 + 3 * 4, 4)
    assert (on_disk[:4, :, :3] == 255).all()  # background 1.0: a white border
    found, pixels = shown_image(frontend, "native_")
    assert found == {"filename": image["filename"], "subfolder": image["subfolder"]}
    assert np.array_equal(pixels, on_disk)
    frontend.fit_view()
    assert frontend.problems == []
