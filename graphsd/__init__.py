"""graphsd: Stable-Diffusion-style generation and training as graphs of typed nodes.

Public API: :class:`Node` and :class:`NodeIO` to write nodes, :data:`hookimpl` to register
them from a plugin, :class:`Engine` / :func:`run_workflow` to run workflows, and the socket
types in :mod:`graphsd.types`.
"""

import importlib
from typing import Any

#: Where each public name lives; imported on first use, so ``import graphsd`` (and the command
#: line's start-up) does not pay for torch before it needs it.
_EXPORTS = {
    "Context": "graphsd.context",
    "Settings": "graphsd.context",
    "Engine": "graphsd.engine",
    "run_workflow": "graphsd.engine",
    "Issue": "graphsd.errors",
    "NodeError": "graphsd.errors",
    "RunInterrupted": "graphsd.errors",
    "WorkflowError": "graphsd.errors",
    "RunResult": "graphsd.executor",
    "Node": "graphsd.node",
    "NodeIO": "graphsd.node",
    "hookimpl": "graphsd.hookspecs",
    "types": "graphsd.types",
}

__version__ = "0.1.0"

__all__ = [
    "Context",
    "Engine",
    "Issue",
    "Node",
    "NodeError",
    "NodeIO",
    "RunInterrupted",
    "RunResult",
    "Settings",
    "WorkflowError",
    "hookimpl",
    "run_workflow",
    "types",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphsd' has no attribute {name!r}")
    value = importlib.import_module(module)
    return value if name == "types" else getattr(value, name)
