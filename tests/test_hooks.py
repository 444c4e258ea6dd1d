"""Every hook in graphsd.hookspecs is exercised and documented."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

from graphsd import Engine, Settings, hookspecs

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = Path(__file__).parents[1] / "docs" / "plugins.md"


def hook_names():
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("graphsd_")]


def test_observer_hooks_see_runs(tmp_path):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    shutil.copy(FIXTURES / "observer_plugin.py", plugin_dir)
    engine = Engine(Settings(device="cpu", load_entry_points=False, plugins_dirs=[str(plugin_dir), str(FIXTURES / "plugins")]))
    doc = {"version": 1, "nodes": {"n": {"type": "Number", "inputs": {"value": 3}}, "s": {"type": "Sink", "inputs": {"value": "@n.value"}}}}
    engine.run(doc)
    import sys

    seen = sys.modules["graphsd_plugin_observer_plugin"].SEEN
    assert ("before", "n", "Number", {"value": 3}) in seen
    assert ("after", "s", "Sink", {"value": 3}, True) in seen
    kinds = [s[1] for s in seen if s[0] == "event"]
    assert kinds[0] == "run_start" and kinds[-1] == "run_done" and "node_done" in kinds
    seen.clear()
    engine.run(doc)  # cached: no before/after calls, but events still flow
    assert not [s for s in seen if s[0] in ("before", "after")] and ("event", "node_cached") in seen


def test_registration_hooks():
    engine = Engine(Settings(device="cpu", load_entry_points=False))
    assert {"Latent", "Image", "Conditioning", "UNet", "Clip", "Vae"} <= set(engine.registry.types)
    assert "euler" in engine.registry.samplers


def test_every_hook_is_documented_with_a_docstring():
    text = DOCS.read_text()
    for name in hook_names():
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert f"`{name}" in text, f"{name} is missing from docs/plugins.md"


def test_node_reference_is_up_to_date(capsys):
    """docs/nodes.md is generated from the node schemas: regenerate it with
    `graphsd nodes --builtin --markdown > docs/nodes.md` when a node changes."""
    from graphsd.cli import main

    assert main(["nodes", "--builtin", "--markdown"]) == 0
    assert capsys.readouterr().out == (DOCS.parent / "nodes.md").read_text()
