"""A hook implemented by a function of another name (pluggy's ``specname``) registers like any
other: graphsd passes over a plugin module's other attributes quickly, but not marked ones."""

from __future__ import annotations

import sys

from graphsd import Engine, Settings

RENAMED = """
from pydantic import Field

from graphsd import Node, NodeIO, hookimpl

SEEN = []
helper_value = 3  # a plain attribute: not a hook


class Shout(Node):
    type = "Shout"

    class Inputs(NodeIO):
        text: str = Field("hi")

    class Outputs(NodeIO):
        text: str

    def run(self, inputs, ctx):
        return self.Outputs(text=inputs.text.upper())


@hookimpl(specname="graphsd_register_nodes")
def my_nodes():
    return [Shout]


@hookimpl(specname="graphsd_event")
def watch(event):
    SEEN.append(event.kind)
"""


def test_hooks_implemented_under_other_names_register_and_are_called(tmp_path):
    (tmp_path / "renamed_hooks.py").write_text(RENAMED)
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(tmp_path)]))
    assert engine.warnings == []
    assert engine.registry.node_plugin.get("Shout") == "renamed_hooks"
    result = engine.run({"version": 1, "nodes": {"s": {"type": "Shout", "inputs": {"text": "abc"}}}}, outputs=["s"])
    assert result.ok and result.outputs["s"]["text"] == "ABC"
    seen = sys.modules["graphsd_plugin_renamed_hooks"].SEEN
    assert "node_start" in seen and "node_done" in seen
