"""ComfyUI UI-format workflows (the editor's saved files: ``nodes`` + ``links``) read by graphsd.

The reference is the real ComfyUI frontend: tests/fixtures/comfy_ui/ holds, for each graph, the file
the frontend 1.58.1 saves (``<name>.json``, ``app.graph.serialize()``) and the API prompt it sends
for it (``<name>.api.json``, ``app.graphToPrompt()``), both written by the frontend in Chromium
(make_fixtures.py, run by hand); ``group_node.json`` is an older editor's group node, which the
frontend opened. graphsd's conversion of each file must equal the frontend's prompt (for the group
node, whose inner nodes the frontend renumbers, the same graph under other ids), and the files run
on graphsd-tiny."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from graphsd import Engine, Settings, WorkflowError
from graphsd.cli import main
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "comfy_ui"
NAMES = sorted(p.name.removesuffix(".api.json") for p in FIXTURES.glob("*.api.json"))
SAME_IDS = [name for name in NAMES if not name.startswith("group_node")]  # the frontend renumbers a group node's inside


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def frontend_prompt(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.api.json").read_text())


def without_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def shape(prompt: dict[str, Any]) -> list[str]:
    """A prompt without its ids: each node as its class, its values and, for each link, the shape
    of the node it comes from (prompts are acyclic), sorted."""
    memo: dict[str, str] = {}

    def describe(nid: str) -> str:
        if nid not in memo:
            node = prompt[nid]
            inputs = {k: [describe(str(v[0])), v[1]] if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt else v
                      for k, v in node["inputs"].items()}
            memo[nid] = json.dumps({"class_type": node["class_type"], "inputs": inputs}, sort_keys=True)
        return memo[nid]

    return sorted(describe(nid) for nid in prompt)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine whose input folder holds the example.png the img2img fixture's LoadImage names
    (validation checks that named files exist)."""
    inputs = tmp_path_factory.mktemp("input")
    PILImage.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(inputs / "example.png")
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out")), input_dir=str(inputs)))


@pytest.fixture(scope="module")
def classes(engine):
    return class_definitions(engine.nodes)


def test_the_fixtures_cover_what_the_frontend_resolves():
    """The fixtures hold the cases the conversion must get right (a guard against a regenerated set
    that silently lost one)."""
    assert {"txt2img", "img2img", "lora", "muted", "bypassed", "reroute_primitive", "native", "mixed"} <= set(NAMES)
    assert {"subgraph", "subgraph_nested", "subgraph_modes", "group_node"} <= set(NAMES)
    modes = {name: {(n["type"], n.get("mode", 0)) for n in load(name)["nodes"]} for name in NAMES}
    assert {("SaveImage", 0), ("SaveImage", 2)} <= modes["muted"]
    assert ("LoraLoader", 4) in modes["bypassed"]
    assert {("Reroute", 0), ("PrimitiveNode", 0), ("Note", 0), ("MarkdownNote", 0)} <= modes["reroute_primitive"]
    subgraphs = {name: {s["id"]: s for s in (load(name).get("definitions") or {}).get("subgraphs") or []} for name in NAMES}
    # two instances of one definition; an instance inside a definition inside a definition; a PrimitiveNode on an instance
    instances = [n["type"] for n in load("subgraph_nested")["nodes"] if n["type"] in subgraphs["subgraph_nested"]]
    assert len(instances) == 2 and len(set(instances)) == 2
    nested = [n for s in subgraphs["subgraph_nested"].values() for n in s["nodes"] if n["type"] in subgraphs["subgraph_nested"]]
    assert any(n["type"] in {m["type"] for s in subgraphs["subgraph_nested"].values() for m in s["nodes"]} for n in nested)
    assert {(subgraphs["subgraph_modes"].get(t) is not None, mode) for t, mode in modes["subgraph_modes"]} >= {(True, 2), (True, 4)}
    assert ("workflow>Sample and decode", 0) in modes["group_node"] and "groupNodes" in load("group_node")["extra"]
    [group] = load("group_node_reroute")["extra"]["groupNodes"].values()
    assert {"PrimitiveNode", "Reroute", "KSampler"} <= {n["type"] for n in group["nodes"]}


@pytest.mark.parametrize("name", SAME_IDS)
def test_a_ui_file_converts_to_the_prompt_the_frontend_sends(name, classes):
    assert without_meta(ui_to_prompt(load(name), classes)) == without_meta(frontend_prompt(name))


def test_a_group_node_unpacks_into_the_graph_the_frontend_sends(classes):
    """The frontend unpacks an older editor's group node into a subgraph of its own numbering;
    graphsd numbers the inner nodes <instance>:<index>, as the older editors did: the same graph."""
    ours, theirs = ui_to_prompt(load("group_node"), classes), frontend_prompt("group_node")
    assert shape(ours) == shape(theirs)
    assert set(ours) == {"4", "5", "6", "7", "9", "10:0", "10:1"}
    assert shape(ours) == shape(frontend_prompt("txt2img"))  # the graph it was packed from


def test_a_group_node_with_a_primitive_and_reroutes_inside_is_the_graph_it_was_packed_from(classes):
    """The seed from a PrimitiveNode and the VAE through two Reroutes, all inside the group: the
    prompt is the frontend's for the unpacked graph. (The frontend 1.58, unpacking the group into
    a subgraph, loses the link coming into the group's first Reroute, so its prompt lacks the
    decoder's vae; graphsd keeps it.)"""
    ours = ui_to_prompt(load("group_node_reroute"), classes)
    assert shape(ours) == shape(frontend_prompt("reroute_primitive"))
    [decode] = [n for n in ours.values() if n["class_type"] == "VAEDecode"]
    without_vae = copy.deepcopy(ours)
    for node in without_vae.values():
        node["inputs"].pop("vae", None)
    assert shape(without_vae) == shape(frontend_prompt("group_node_reroute")) and decode["inputs"]["vae"] == ["1", 2]


@pytest.mark.parametrize("name", SAME_IDS)
def test_a_ui_file_reads_as_the_same_graphsd_workflow_as_the_frontends_prompt(name, engine):
    ui, api = engine.load(load(name)), engine.load(frontend_prompt(name))
    assert {nid: (n.cls.type, n.literals, n.links) for nid, n in ui.nodes.items()} == {
        nid: (n.cls.type, n.literals, n.links) for nid, n in api.nodes.items()
    }


def test_widgets_map_by_the_class_widget_order_skipping_control_after_generate(classes):
    """KSampler's values are [seed, control_after_generate, steps, cfg, sampler, scheduler, denoise]."""
    ui = load("img2img")
    [sampler] = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert sampler["widgets_values"][1] == "randomize"
    inputs = ui_to_prompt(ui, classes)[str(sampler["id"])]["inputs"]
    assert {k: inputs[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": 11,
        "steps": 3,
        "cfg": 7.5,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 0.6,
    }


@pytest.mark.parametrize("control", [True, False])
def test_an_older_editors_boolean_control_after_generate_is_skipped_too(classes, control):
    """Older editors (and ComfyUI's default graph in its templates) saved the seed's control widget
    as a boolean: [seed, true, steps, ...] must read as the frontend's [seed, "randomize", steps, ...]."""
    ui = load("img2img")
    [sampler] = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    sampler["widgets_values"][1] = control
    assert without_meta(ui_to_prompt(ui, classes)) == without_meta(frontend_prompt("img2img"))


def test_a_file_of_an_older_frontend_without_widget_input_slots_converts_the_same(classes):
    """Frontends before 1.16 saved only the link inputs (and converted widgets) in ``inputs``."""
    for name in ("reroute_primitive", "native", "img2img"):
        ui = load(name)
        for node in ui["nodes"]:
            node["inputs"] = [i for i in node.get("inputs", []) if not i.get("widget") or i.get("link") is not None]
        assert without_meta(ui_to_prompt(ui, classes)) == without_meta(frontend_prompt(name)), name


def test_a_short_widgets_values_list_takes_the_defaults(classes):
    ui = load("txt2img")
    [latent] = [n for n in ui["nodes"] if n["type"] == "EmptyLatentImage"]
    latent["widgets_values"] = [64]
    assert ui_to_prompt(ui, classes)[str(latent["id"])]["inputs"] == {"width": 64, "height": 512, "batch_size": 1}


def error_text(excinfo: pytest.ExceptionInfo[WorkflowError]) -> str:
    return "\n".join(str(i) for i in excinfo.value.issues)


def test_an_unknown_class_is_named_with_its_node_id_and_title(engine):
    ui = load("txt2img")
    ui["nodes"].append({"id": 42, "type": "SUPIR_Upscale", "title": "my upscaler", "mode": 0, "widgets_values": ["x.pth"]})
    with pytest.raises(WorkflowError) as excinfo:
        engine.load(ui)
    text = error_text(excinfo)
    assert "ComfyUI UI-format workflow" in text
    assert "node 42" in text and "'my upscaler'" in text and "'SUPIR_Upscale', which graphsd lacks" in text
    assert "KSampler" in text  # the hint lists what graphsd reads
    # muted and bypassed nodes never reach the prompt: an unknown class there is no problem
    ui["nodes"][-1]["mode"] = 4
    engine.load(ui)


def test_an_unknown_class_inside_subgraphs_is_named_with_each_flattened_id(engine):
    """Inside subgraphs a node is named as the prompt would name it (instance:inner, nested too),
    with the subgraphs it sits in."""
    ui = load("subgraph_nested")
    [prompts] = [s for s in ui["definitions"]["subgraphs"] if any(n["type"] == "CLIPTextEncode" for n in s["nodes"])]
    renamed = prompts["nodes"][0]
    renamed["type"] = "FancyTextEncode"
    expected = [nid for nid, n in frontend_prompt("subgraph_nested").items() if nid.endswith(f":{renamed['id']}")]
    assert len(expected) == 2 and any(nid.count(":") == 2 for nid in expected)  # two instances, one nested
    with pytest.raises(WorkflowError) as excinfo:
        engine.load(ui)
    text = error_text(excinfo)
    for nid in expected:
        assert f"node {nid} in subgraph '{prompts['name']}'{' in subgraph ' if nid.count(':') == 2 else ' is'}" in text
    assert "'FancyTextEncode', which graphsd lacks" in text


def test_a_subgraph_that_contains_itself_and_an_undefined_group_node_are_explained(classes):
    ui = load("subgraph")
    [definition] = ui["definitions"]["subgraphs"]
    definition["nodes"].append({"id": 99, "type": definition["id"], "mode": 0})
    ui["nodes"].append({"id": 98, "type": "workflow>Nowhere", "mode": 0})
    ui["extra"]["groupNodes"] = {"Elsewhere": {"nodes": []}}
    with pytest.raises(WorkflowError) as excinfo:
        ui_to_prompt(ui, classes)
    text = error_text(excinfo)
    assert f"subgraph '{definition['name']}' contains itself" in text
    assert "node 98 is an instance of group node 'Nowhere', which the file does not define" in text
    # without any extra.groupNodes, and inside a subgraph
    ui = load("subgraph")
    [definition] = ui["definitions"]["subgraphs"]
    definition["nodes"].append({"id": 97, "type": "workflow/Gone", "mode": 0})
    with pytest.raises(WorkflowError, match=f"node 97 of subgraph '{definition['name']}' is an instance of group node 'Gone'"):
        ui_to_prompt(ui, classes)


def test_a_group_nodes_widgets_map_onto_its_inner_nodes(classes):
    """The instance's values (the KSampler's seed, control_after_generate, steps, ...) go to the
    inner nodes by the group's widget order, whatever the inner nodes saved."""
    ui = load("group_node")
    [instance] = [n for n in ui["nodes"] if n["type"].startswith("workflow>")]
    instance["widgets_values"][0] = 1234
    instance["widgets_values"][2] = 3
    [sampler] = [n for n in ui["extra"]["groupNodes"]["Sample and decode"]["nodes"] if n["type"] == "KSampler"]
    sampler["widgets_values"][0] = 1  # the inner node's own value gives way to the instance's
    inputs = ui_to_prompt(ui, classes)[f"{instance['id']}:0"]["inputs"]
    assert (inputs["seed"], inputs["steps"], inputs["cfg"]) == (1234, 3, 7.5)


def test_a_malformed_ui_file_says_what_it_is_and_what_is_wrong(engine):
    ui = load("txt2img")
    ui["nodes"].append("not a node")
    ui["links"].append(7)
    with pytest.raises(WorkflowError) as excinfo:
        engine.load(ui)
    text = error_text(excinfo)
    assert text.count("ComfyUI UI-format workflow") == 2
    assert "a node is not an object with an 'id' and a 'type': 'not a node'" in text and "a link is not [id, " in text


def test_a_file_with_every_node_muted_has_nothing_to_run(engine):
    ui = load("txt2img")
    for node in ui["nodes"]:
        node["mode"] = 2
    with pytest.raises(WorkflowError, match="ComfyUI UI-format workflow.*nothing to run"):
        engine.load(ui)


def test_a_bypassed_node_without_an_input_of_the_wanted_type_leaves_the_input_unlinked(engine, classes):
    """The frontend drops such a link (the input then has no value): graphsd says which input is missing."""
    ui = load("txt2img")
    [decode] = [n for n in ui["nodes"] if n["type"] == "VAEDecode"]
    decode["mode"] = 4  # its IMAGE output has no IMAGE input to pass through
    [save] = [nid for nid, n in ui_to_prompt(ui, classes).items() if n["class_type"] == "SaveImage"]
    assert "images" not in ui_to_prompt(ui, classes)[save]["inputs"]
    with pytest.raises(WorkflowError, match=f"node '{save}', input 'images': missing"):
        engine.load(ui)


# ---- PNG files ----------------------------------------------------------------------------------
def png_with(path: Path, **chunks: dict[str, Any]) -> Path:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, json.dumps(value))
    PILImage.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_png_with_only_the_workflow_chunk_is_converted(engine, tmp_path):
    png = png_with(tmp_path / "ui.png", workflow=load("lora"))
    from_png, from_file = engine.load(png), engine.load(load("lora"))
    assert {k: (n.cls.type, n.literals) for k, n in from_png.nodes.items()} == {
        k: (n.cls.type, n.literals) for k, n in from_file.nodes.items()
    }


def test_a_comfyui_png_with_both_chunks_runs_its_prompt(engine, tmp_path):
    """ComfyUI writes both the API prompt and the editor's graph: the prompt is what ran."""
    png = png_with(tmp_path / "both.png", prompt=frontend_prompt("txt2img"), workflow=load("lora"))
    assert "LoraLoader" not in {n.cls.type for n in engine.load(png).nodes.values()}


# ---- running ------------------------------------------------------------------------------------
def images(result) -> list[np.ndarray]:
    assert result.ok, [str(e) for e in result.errors]
    return [np.asarray(PILImage.open(p)) for p in result.files]


@pytest.fixture(scope="module")
def ran(engine, tmp_path_factory):
    """Every fixture file run on graphsd-tiny (64 px, 2-3 steps), LoadImage's example.png in the input
    folder (./input, as ComfyUI's). Each saves under its own prefix, so a graph equal to one run
    before still writes its file."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "input").mkdir()
    PILImage.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "input" / "example.png")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for name in NAMES:
            if name != "txt2img_example":
                ui = load(name)
                for node in ui["nodes"]:
                    if node["type"].endswith("SaveImage"):
                        node["widgets_values"][0] = name
                results[name] = images(engine.run(ui))
    return results


@pytest.mark.slow
def test_every_fixture_runs_and_writes_its_image(ran):
    assert set(ran) == set(NAMES) - {"txt2img_example"}
    for name, written in ran.items():
        assert [i.shape for i in written] == [(64, 64, 3)] * (2 if name == "subgraph_nested" else 1), name


@pytest.mark.slow
def test_muted_and_bypassed_nodes_change_nothing_and_a_lora_does(ran):
    """ "muted" and "bypassed" are the same text-to-image (seed 5) plus a muted branch, resp. a
    bypassed LoRA: they make the same pixels; "lora" (the LoRA applied) does not. So does
    "subgraph_modes", where the muted branch and the bypassed LoRA are subgraphs."""
    assert np.array_equal(ran["muted"][0], ran["bypassed"][0])
    assert not np.array_equal(ran["lora"][0], ran["bypassed"][0])
    assert np.array_equal(ran["subgraph_modes"][0], ran["bypassed"][0])


@pytest.mark.slow
def test_packing_nodes_into_subgraphs_and_group_nodes_changes_no_pixel(ran):
    """The group node is the txt2img file with its sampler and decoder packed; the nested file's
    first branch is the "subgraph" file's graph (same texts, seed 5) inside two more levels, its
    second branch another text and seed."""
    assert np.array_equal(ran["group_node"][0], ran["txt2img"][0])
    assert np.array_equal(ran["group_node_reroute"][0], ran["reroute_primitive"][0])
    first, second = ran["subgraph_nested"]
    assert any(np.array_equal(image, ran["subgraph"][0]) for image in (first, second))
    assert not np.array_equal(first, second)


@pytest.mark.slow
def test_the_example_ui_workflow_makes_the_image_of_the_api_example(tmp_path):
    """workflows/comfy_ui_txt2img.json is the frontend's file for workflows/comfy_txt2img.json
    (two engines, so the second run is not answered from the first one's cache)."""
    ui, api = (
        images(Engine(Settings(device="cpu", output_dir=str(tmp_path / name))).run(ROOT / "workflows" / name))
        for name in ("comfy_ui_txt2img.json", "comfy_txt2img.json")
    )
    assert len(ui) == 1 and ui[0].shape == (128, 128, 3)
    assert np.array_equal(ui[0], api[0])


def cli(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """The graphsd command run in this process (``graphsd.cli.main``, what ``graphsd`` calls) in
    the folder ``cwd``: its exit code and what it printed. A separate process is not what these
    tests are about, and one would pay seconds of imports."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the command sets it for itself
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["graphsd", *args], code, out, err)


@pytest.mark.slow
def test_graphsd_run_takes_a_ui_file(tmp_path, monkeypatch, capsys):
    ui = tmp_path / "ui_file.json"
    ui.write_text((FIXTURES / "mixed.json").read_text())
    done = cli("run", str(ui), "--output-dir", str(tmp_path / "out"), "--json", "-q", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 0, done.stderr
    [written] = json.loads(done.stdout)["files"]
    assert Path(written).is_file() and Path(written).parent == tmp_path / "out"


@pytest.mark.slow
def test_graphsd_validate_names_the_unknown_class_of_a_ui_file_without_a_traceback(tmp_path, monkeypatch, capsys):
    ui = load("txt2img")
    ui["nodes"].append({"id": 42, "type": "SUPIR_Upscale", "mode": 0})
    (tmp_path / "ui.json").write_text(json.dumps(ui))
    done = cli("validate", "ui.json", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert done.returncode == 2
    assert "ComfyUI UI-format workflow" in done.stderr and "'SUPIR_Upscale', which graphsd lacks" in done.stderr
    assert "Traceback" not in done.stderr


def test_converting_does_not_modify_the_file_read(classes):
    ui = load("reroute_primitive")
    before = copy.deepcopy(ui)
    ui_to_prompt(ui, classes)
    assert ui == before


WRONG_VALUES = [None, 7, "x", [], {}, [None], {"a": 1}, -1, True]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["subgraph_nested", "group_node_reroute"])
def test_wrongly_typed_subgraph_and_group_node_fields_give_a_workflow_error_never_a_crash(name, classes):
    """As below, inside subgraph definitions (their fields, nodes and links), group node
    definitions (their fields and inner nodes) and the instances."""
    base = load(name)
    text = json.dumps(base)  # each variant is a fresh copy: json.loads of the file's text (many times faster than deepcopy)
    node_keys = ("id", "type", "mode", "index", "inputs", "outputs", "widgets_values", "widgets_values_named")
    places: list[tuple[Any, ...]] = []
    for d, definition in enumerate((base.get("definitions") or {}).get("subgraphs") or []):
        places += [("subgraph", d, key) for key in ("id", "name", "nodes", "links", "inputs", "outputs")]
        places += [("subgraph node", d, n, key) for n in range(len(definition["nodes"])) for key in node_keys]
        places += [("subgraph link", d, k, key) for k, link in enumerate(definition["links"]) for key in link]
    for group, definition in ((base.get("extra") or {}).get("groupNodes") or {}).items():
        places += [("group", group, key) for key in ("nodes", "links", "external", "config")]
        places += [("group node", group, n, key) for n in range(len(definition["nodes"])) for key in node_keys]
    places += [("node", n, key) for n in range(len(base["nodes"])) for key in node_keys]
    for place in places:
        for value in WRONG_VALUES:
            ui = json.loads(text)
            kind, *path = place
            if kind.startswith("subgraph"):
                target = ui["definitions"]["subgraphs"][path[0]]
                target = target if kind == "subgraph" else target["nodes" if kind == "subgraph node" else "links"][path[1]]
            elif kind.startswith("group"):
                target = ui["extra"]["groupNodes"][path[0]]
                target = target if kind == "group" else target["nodes"][path[1]]
            else:
                target = ui["nodes"][path[0]]
            target[path[-1]] = value
            try:
                ui_to_prompt(ui, classes)
            except WorkflowError:
                pass


def test_a_ui_file_with_wrongly_typed_fields_gives_a_workflow_error_never_a_crash(classes):
    """Every field of the file, at each level, replaced by values of the wrong type: the
    conversion returns a prompt or raises WorkflowError (what graphsd run reports cleanly)."""
    base = load("reroute_primitive")
    text = json.dumps(base)
    variants = [("", key, value) for key in [*base, "definitions", "extra"] for value in WRONG_VALUES]
    for index, node in enumerate(base["nodes"]):
        for key in {*node, "inputs", "outputs", "mode", "widgets_values"}:
            variants += [(index, key, value) for value in WRONG_VALUES]
    variants += [("link", position, value) for position in range(6) for value in WRONG_VALUES]
    for where, key, value in variants:
        ui = json.loads(text)
        if where == "":
            ui[key] = value
        elif where == "link":
            ui["links"][0][key] = value
        else:
            ui["nodes"][where][key] = value
        try:
            ui_to_prompt(ui, classes)
        except WorkflowError:
            pass
