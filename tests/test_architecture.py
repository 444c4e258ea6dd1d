"""The package's import graph has no cycles: reading the module-level imports of every module
of graphsd/ (those that run when a module is imported; imports under ``if TYPE_CHECKING:`` and
inside functions run later or never) gives a directed acyclic graph."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "graphsd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for statement in ast.parse(path.read_text()).body:
            if isinstance(statement, ast.Import):
                targets = [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                targets = [statement.module] + [f"{statement.module}.{alias.name}" for alias in statement.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


@pytest.mark.slow
def test_module_level_imports_form_no_cycle():
    graph = import_graph()
    assert graph.number_of_nodes() > 30 and graph.number_of_edges() > 60  # it really read the package
    assert list(nx.simple_cycles(graph)) == []


CORE = ["workflow", "graph", "executor", "cache", "events", "plugins", "engine", "cli", "context", "node", "memory"]


def imports_anywhere(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    found = set()
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.Import):
            found.update(alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
            found.add(statement.module)
    return found


def test_the_engine_core_imports_nothing_from_the_sd_stack():
    """graphsd.std is a plugin: the core loads it by name (plugins.BUILTIN_PLUGINS) and never
    imports it, even lazily, so the core runs workflows of any plugin's nodes without it."""
    for name in CORE:
        imported = imports_anywhere(PACKAGE / f"{name}.py")
        assert "graphsd" in " ".join(imported) or name == "events"  # it really read the file
        assert sorted(m for m in imported if m.startswith("graphsd.std")) == [], name


def test_graphsd_imports_none_of_the_plugin_packages():
    """The plugins in plugins/ (training among them) build on graphsd, never the reverse: no
    module of graphsd/ imports one, even lazily, so graphsd installs and runs without them."""
    plugins = {p.parent.name for p in (PACKAGE.parent / "plugins").glob("*/*/__init__.py")}
    assert {"graphsd_train", "graphsd_contact_sheet"} <= plugins
    for path in PACKAGE.rglob("*.py"):
        imported = {m.split(".")[0] for m in imports_anywhere(path)}
        assert not imported & plugins, path


@pytest.mark.slow  # a fresh interpreter imports torch
def test_loading_every_plugin_imports_neither_diffusers_nor_scipy():
    """Registering the nodes of graphsd and of every installed plugin stays cheap: diffusers and
    scipy (seconds of imports each) load only when a node that needs them runs, so a workflow
    without a diffusion model (LoadImage → SaveImage, say) and commands like ``graphsd nodes``
    start in the time torch takes to import."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from graphsd import Engine, Settings\n"
        "engine = Engine(Settings(device='cpu'))\n"
        "assert len(engine.registry.nodes) > 90 and 'SaveImage' in engine.registry.nodes\n"
        "print(sorted(m for m in ('diffusers', 'scipy', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
