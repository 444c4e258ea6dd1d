"""Errors that are the user's to fix carry where and what and how; they never need a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem found in a workflow: where (node id, field), what, and how to fix it."""

    message: str
    node: str | None = None
    field: str | None = None
    hint: str | None = None
    code: str = "invalid"

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            where = f"node '{self.node}'"
            if self.field is not None:
                where += f", input '{self.field}'"
            where += ": "
        text = where + self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class GraphsdError(Exception):
    """Base of graphsd's user-facing errors. Raised from a node's ``run()`` (a NodeError, or a
    library error such as a model file that cannot be read), it fails the node with its message
    and its ``field`` when it has one; no traceback is shown."""


class WorkflowError(GraphsdError):
    """The workflow cannot run as written. ``issues`` lists every problem found."""

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class NodeError(GraphsdError):
    """A node was given something it cannot work with (bad file, wrong model family, ...).

    Raise it from ``run()`` with a message that says what to do; the executor adds the node id
    and type, and no traceback is shown."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class RunInterrupted(GraphsdError):
    """The run was interrupted (Ctrl-C or ``Engine.interrupt()``)."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id
        super().__init__(f"interrupted{' in node ' + repr(node_id) if node_id else ''}")
