"""The built-in plugins: graphsd's own nodes, socket types and samplers, registered through the
same hooks as any third-party plugin.

Each module of :mod:`graphsd.nodes` is one built-in plugin with its own
``graphsd_register_nodes`` (so a problem in one of them is reported like a broken plugin and the
others keep working); this module registers the socket types and the samplers.
"""

from __future__ import annotations

import pkgutil
from typing import Any

import graphsd.nodes
from graphsd.hookspecs import hookimpl
from graphsd.types import BUILTIN_SOCKET_TYPES, Socket


def node_module_names() -> list[str]:
    return sorted(f"graphsd.nodes.{m.name}" for m in pkgutil.iter_modules(graphsd.nodes.__path__))


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return list(BUILTIN_SOCKET_TYPES)


@hookimpl
def graphsd_register_samplers() -> dict[str, Any]:
    from graphsd.sampling.schedulers import SAMPLERS

    return dict(SAMPLERS)
