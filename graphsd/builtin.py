"""The built-in plugins: graphsd's own nodes, socket types and samplers, registered through the
same hooks as any third-party plugin.

Each module of :mod:`graphsd.nodes` that defines ``NODES = [...]`` is one built-in plugin (so a
problem in one of them is reported like a broken plugin and the others keep working); this
module registers the socket types and the samplers.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import graphsd.nodes
from graphsd.plugins import hookimpl
from graphsd.types import BUILTIN_SOCKET_TYPES


class NodeModulePlugin:
    """Adapts a module with a ``NODES`` list to the ``graphsd_register_nodes`` hook."""

    def __init__(self, module: ModuleType):
        self.module = module

    @hookimpl
    def graphsd_register_nodes(self):
        return list(getattr(self.module, "NODES", []))


def node_module_names() -> list[str]:
    return sorted(f"graphsd.nodes.{m.name}" for m in pkgutil.iter_modules(graphsd.nodes.__path__))


def load_node_module(name: str) -> NodeModulePlugin:
    return NodeModulePlugin(importlib.import_module(name))


@hookimpl
def graphsd_register_types():
    return list(BUILTIN_SOCKET_TYPES)


@hookimpl
def graphsd_register_samplers():
    from graphsd.sampling.schedulers import SAMPLERS

    return dict(SAMPLERS)
