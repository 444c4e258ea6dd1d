"""The shared shape of the loaders' validation-time file checks (:meth:`Node.check_context
<graphsd.node.Node.check_context>`): a literal file name that the loader's own lookup does not
find is refused before anything runs, with the message the run would give. Whether the workflow
may read the file it finds (``Settings.read_roots``) is left to the run, which checks it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Issues = list[tuple[str, str, str | None]]


def missing_file(
    literals: dict[str, Any], field: str, find: Callable[[str], Any], problem: Callable[[str], str], hint: str | None
) -> Issues:
    """``[(field, problem(name), hint)]`` when ``literals[field]`` is a name ``find`` (the
    loader's lookup, returning None when nothing is there) does not find; nothing when the name
    comes through a link (no literal) or is found."""
    name = literals.get(field)
    if not isinstance(name, str) or find(name) is not None:
        return []
    return [(field, problem(name), hint)]


def first_file(candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` that is a file, or None."""
    return next((p for p in candidates if p.is_file()), None)
