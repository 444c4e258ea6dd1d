"""graphsd: Stable-Diffusion-style generation and training as graphs of typed nodes.

Public API: :class:`Node` and :class:`NodeIO` to write nodes, :data:`hookimpl` to register
them from a plugin, :class:`Engine` / :func:`run_workflow` to run workflows, and the socket
types in :mod:`graphsd.types`.
"""

from graphsd.context import Context, Settings
from graphsd.engine import Engine, run_workflow
from graphsd.errors import Issue, NodeError, RunInterrupted, WorkflowError
from graphsd.executor import RunResult
from graphsd.node import Node, NodeIO
from graphsd.plugins import hookimpl
from graphsd import types

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
