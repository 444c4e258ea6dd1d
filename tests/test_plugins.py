"""Plugin discovery: entry points, plugins directories, broken plugins, duplicate node names."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from graphsd import Engine, Settings
from graphsd.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_builtin_nodes_register_through_hooks():
    engine = Engine(Settings(device="cpu", load_entry_points=False))
    assert {"LoadImage", "SaveImage"} <= set(engine.nodes)
    sources = {p.name: p.source for p in engine.registry.plugins}
    assert sources["graphsd.std.nodes.image_io"] == "builtin"
    assert engine.warnings == []


def test_plugins_dir_and_env_variable(monkeypatch):
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(FIXTURES / "plugins")]))
    assert "Add" in engine.nodes and engine.registry.node_plugin["Add"] == "toy_nodes"
    monkeypatch.setenv("GRAPHSD_PLUGINS_DIR", str(FIXTURES / "plugins"))
    assert "Add" in Engine(Settings(device="cpu", load_entry_points=False)).nodes


def test_broken_plugin_and_duplicate_name_warn_and_engine_keeps_working():
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(FIXTURES / "broken_plugins")]))
    text = "\n".join(engine.warnings)
    assert "plugin 'broken_import'" in text and "broken on purpose" in text
    assert "plugin 'clashing'" in text and "'SaveImage'" in text and "already registered" in text
    assert engine.nodes["SaveImage"].__module__ == "graphsd.std.nodes.image_io"  # the first one wins
    assert "ExtraFromClashing" in engine.nodes  # the clashing plugin's other node still loads
    assert "LoadImage" in engine.nodes


MISSPELT = """
from pydantic import Field

from graphsd import Node, NodeIO, hookimpl

CALLED = []


class Hello(Node):
    type = "Hello"

    class Inputs(NodeIO):
        name: str = Field("x")

    class Outputs(NodeIO):
        text: str

    def run(self, inputs, ctx):
        return self.Outputs(text=inputs.name)


@hookimpl
def graphsd_register_node():  # misspelt: the hook is graphsd_register_nodes
    return [Hello]


def graphsd_event(event):  # not marked with @hookimpl
    CALLED.append(event)
"""


def test_misspelt_and_unmarked_hooks_are_named_in_warnings(tmp_path):
    (tmp_path / "typo_plugin.py").write_text(MISSPELT)
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(tmp_path)]))
    text = "\n".join(engine.warnings)
    assert "plugin 'typo_plugin': graphsd_register_node is not a graphsd hook (did you mean graphsd_register_nodes?)" in text
    assert "plugin 'typo_plugin': graphsd_event is not decorated with @hookimpl" in text
    assert "Hello" not in engine.nodes  # pluggy calls neither of them
    doc = {"version": 1, "nodes": {"e": {"type": "EmptyLatent", "inputs": {"width": 8, "height": 8}}}}
    result = engine.run(doc, outputs=["e"])
    assert result.ok and result.events  # events were emitted, and the unmarked observer saw none
    assert sys.modules["graphsd_plugin_typo_plugin"].CALLED == []


SOCKETS = """
from dataclasses import dataclass

from graphsd import Node, NodeIO, hookimpl
from graphsd.types import Socket


@dataclass
class Palette(Socket):
    colours: tuple = ()


class MakePalette(Node):
    type = "MakePalette"

    class Inputs(NodeIO):
        pass

    class Outputs(NodeIO):
        palette: Palette

    def run(self, inputs, ctx):
        return self.Outputs(palette=Palette(("red",)))


@hookimpl
def graphsd_register_nodes():
    return [MakePalette]
"""


@pytest.mark.parametrize("registers", [False, True])
def test_a_socket_type_no_plugin_registers_is_named(tmp_path, registers):
    source = SOCKETS + ("\n@hookimpl\ndef graphsd_register_types():\n    return [Palette]\n" if registers else "")
    (tmp_path / "palettes.py").write_text(source)
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(tmp_path)]))
    warned = [w for w in engine.warnings if "'Palette'" in w]
    assert "MakePalette" in engine.nodes
    if registers:
        assert warned == [] and engine.registry.types["Palette"].__module__ == "graphsd_plugin_palettes"
    else:
        assert warned == [
            "plugin 'palettes': node 'MakePalette' uses the socket type 'Palette', which no plugin registers "
            "(return it from graphsd_register_types)"
        ]


def test_missing_plugins_dir_is_a_warning(tmp_path):
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(tmp_path / "nope")]))
    assert any("does not exist" in w for w in engine.warnings)


@pytest.mark.slow
def test_entry_point_discovery(tmp_path, forks):
    """A distribution on sys.path that declares the `graphsd` entry-point group is loaded."""
    site = tmp_path / "site"
    (site / "ep_plugin").mkdir(parents=True)
    (site / "ep_plugin" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from graphsd import Node, NodeIO, hookimpl

            class Hello(Node):
                type = "HelloFromEntryPoint"
                description = "test node"
                class Inputs(NodeIO):
                    pass
                class Outputs(NodeIO):
                    text: str
                def run(self, inputs, ctx):
                    return self.Outputs(text="hello")

            @hookimpl
            def graphsd_register_nodes():
                return [Hello]
            """
        )
    )
    dist = site / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graphsd]\nhello = ep_plugin\n")
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = forks.run([sys.executable, "-m", "graphsd.cli", "plugins"], env=env, check=True)  # forked past graphsd's imports
    assert "hello  (entry point of ep-plugin)  1 nodes" in out.stdout
    assert "HelloFromEntryPoint" in out.stdout


def test_cli_nodes_json_lists_schemas(capsys):
    assert main(["nodes", "--json"]) == 0
    schemas = {s["type"]: s for s in json.loads(capsys.readouterr().out)}
    save = schemas["SaveImage"]
    assert save["inputs"]["image"]["link_only"] and save["inputs"]["prefix"]["default"] == "graphsd"
    assert save["output_node"] is True
    assert all(s["description"] for s in schemas.values()), "every built-in node is documented"
    for s in schemas.values():
        for name, f in s["inputs"].items():
            assert f["description"], f"{s['type']}.{name} has no description"


def test_readme_plugin_example_works_as_written(tmp_path):
    """The 'Writing a node plugin' section of README.md, followed literally."""
    import re

    import numpy as np
    from PIL import Image as PILImage

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Writing a node plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    plugin_dir = tmp_path / "that_folder"
    plugin_dir.mkdir()
    (plugin_dir / "my_plugin.py").write_text(textwrap.dedent(code))
    src = tmp_path / "in.png"
    PILImage.fromarray(np.full((8, 8, 3), 40, dtype=np.uint8)).save(src)
    workflow = {
        "version": 1,
        "nodes": {
            "load": {"type": "LoadImage", "inputs": {"path": str(src)}},
            "inv": {"type": "InvertImage", "inputs": {"image": "@load.image", "amount": 1.0}},
            "save": {"type": "SaveImage", "inputs": {"image": "@inv.image", "prefix": "inverted"}},
        },
    }
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(plugin_dir)], output_dir=str(tmp_path / "out")))
    assert engine.warnings == [] and "InvertImage" in engine.nodes
    res = engine.run(workflow)
    assert res.ok, [str(e) for e in res.errors]
    assert np.all(np.asarray(PILImage.open(res.files[0]).convert("RGB")) == 255 - 40)
