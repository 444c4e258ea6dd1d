"""The built-in plugin: registers graphsd's own nodes, socket types and samplers through the
same hooks as any third-party plugin.

Every module of :mod:`graphsd.nodes` that defines ``NODES = [...]`` contributes its nodes.
"""

from __future__ import annotations

import importlib
import pkgutil

import graphsd.nodes
from graphsd.plugins import hookimpl
from graphsd.types import BUILTIN_SOCKET_TYPES


def _node_modules():
    for info in sorted(pkgutil.iter_modules(graphsd.nodes.__path__), key=lambda m: m.name):
        yield importlib.import_module(f"graphsd.nodes.{info.name}")


@hookimpl
def graphsd_register_nodes():
    nodes = []
    for module in _node_modules():
        nodes.extend(getattr(module, "NODES", []))
    return nodes


@hookimpl
def graphsd_register_types():
    return list(BUILTIN_SOCKET_TYPES)


@hookimpl
def graphsd_register_samplers():
    try:
        from graphsd.sampling.schedulers import SAMPLERS
    except ImportError:
        return {}
    return dict(SAMPLERS)
