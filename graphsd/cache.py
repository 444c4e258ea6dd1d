"""Content-addressed output cache.

A node's key is the SHA-256 of a canonical JSON document (see :func:`key_document`): node type,
implementation version, its literal inputs, the node's extra fingerprint (file stats for
loaders) and, for every linked input, the key of the upstream node and the output name. It is
identical across processes (never Python's ``hash()``); a run keeps the document behind each
key (``RunResult.keys``) so a cache decision can be explained.

The store is an LRU bounded by a memory budget (tensor bytes of the cached values), so results
of earlier runs stay available, not only the last one. Every decision is an event.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphsd.types import Socket


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return repr(value)  # exact, and distinguishes 1.0 from 1
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return f"<{type(value).__name__}:{value!r}>"


def key_document(
    node_type: str, version: int, literals: dict[str, Any], fingerprint: str, upstream: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    return {
        "type": node_type,
        "version": version,
        "literals": _canonical(literals),
        "fingerprint": fingerprint,
        "upstream": {name: list(v) for name, v in sorted(upstream.items())},
    }


def make_key(doc: dict[str, Any]) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def value_nbytes(value: Any) -> int:
    if isinstance(value, Socket):
        return value.nbytes()
    if isinstance(value, (list, tuple)):
        return sum(value_nbytes(v) for v in value)
    return 0


@dataclass
class _Item:
    outputs: dict[str, Any]
    nbytes: int


class OutputCache:
    """LRU of node outputs under ``budget_bytes``; ``listener(action, key, nbytes)`` sees
    ``hit``, ``miss``, ``store`` and ``evict`` decisions."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self.listener: Callable[[str, str, int], None] | None = None

    def _tell(self, action: str, key: str, nbytes: int = 0) -> None:
        if self.listener is not None:
            self.listener(action, key, nbytes)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._items.values())

    def get(self, key: str) -> dict[str, Any] | None:
        item = self._items.get(key)
        if item is None:
            self._tell("miss", key)
            return None
        self._items.move_to_end(key)
        self._tell("hit", key, item.nbytes)
        return item.outputs

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        nbytes = sum(value_nbytes(v) for v in outputs.values())
        if nbytes > self.budget_bytes:
            return
        self._items[key] = _Item(outputs, nbytes)
        self._items.move_to_end(key)
        self._tell("store", key, nbytes)
        while self.nbytes > self.budget_bytes:
            old, item = self._items.popitem(last=False)
            self._tell("evict", old, item.nbytes)

    def clear(self) -> None:
        self._items.clear()
