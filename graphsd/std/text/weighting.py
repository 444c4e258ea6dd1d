r"""Prompt weighting syntax of AUTOMATIC1111's web UI.

==============================  ==================================================
``(text)``                      weight × 1.1
``[text]``                      weight ÷ 1.1
``(text:1.3)``                  weight × 1.3 (any number ``[+-]digits.digits``)
``((text))``, ``([text]:1.5)``  nesting multiplies: × 1.21, × 1.5 / 1.1
``\(`` ``\)`` ``\[`` ``\]``     a literal bracket; ``\\`` a literal backslash
``BREAK``                       (upper case, a whole word) ends the current 75-token chunk
==============================  ==================================================

Unbalanced brackets are handled as A1111's ``parse_prompt_attention`` does: a ``)`` or ``]``
with no opener, and ``:1.3)`` outside round brackets, are kept as literal text; a ``(`` or ``[``
never closed weights everything after it to the end of the prompt (× 1.1 or ÷ 1.1); a ``:``
not followed by a number and ``)`` is literal text. Where A1111 fails or loses text we keep it:
``(a:1.2.3)`` is the text ``a:1.2.3`` weighted × 1.1 (A1111 raises an error), and a backslash
that escapes nothing stays a backslash (A1111 drops it). ComfyUI reads ``( )`` and
``(text:w)`` the same way but treats ``[ ]`` as plain characters and has no ``BREAK``.

:func:`parse_prompt` returns the prompt as consecutive ``(text, weight)`` segments, neighbours
of equal weight merged, with :data:`BREAK` where the keyword stood.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple


class Segment(NamedTuple):
    """A piece of prompt text and the weight its tokens get."""

    text: str
    weight: float


#: Marks a ``BREAK`` keyword (a weight no prompt can write: the syntax has no infinities).
BREAK = Segment("BREAK", float("-inf"))

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# One lexical item per match, tried in order: escapes, a lone backslash, openers, an explicit
# weight closing a round bracket, closers, plain text, and a ':' that starts no weight.
_LEXER = re.compile(
    r"""
    \\[()\[\]\\]                          # escaped bracket or backslash
  | \\                                    # lone backslash: literal
  | [(\[]                                 # openers
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ':1.3)' closes a round bracket with that weight
  | [)\]]                                 # closers
  | [^\\()\[\]:]+                         # plain text
  | :                                     # a colon that is just text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(text: str, use_break: bool = True) -> list[Segment]:
    """Split ``text`` into weighted segments (see the module docstring for the syntax).

    >>> [(s.text, round(s.weight, 3)) for s in parse_prompt("a (red:1.5) [cat]")]
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.909)]

    A closing bracket multiplies the weight of every piece since its opener; those ranges are
    recorded and the products formed in one sweep at the end (:func:`_weights`), so the time
    is O(n log n) in the prompt's length, however deeply the brackets nest.
    """
    pieces: list[str | None] = []  # texts; None = BREAK
    ranges: list[tuple[int, int, float]] = []  # (first piece, end piece, factor), in closing order
    round_open: list[int] = []
    square_open: list[int] = []

    def close(start: int, factor: float) -> None:
        ranges.append((start, len(pieces), factor))

    for match in _LEXER.finditer(text):
        item, weight = match.group(0), match.group("weight")
        if item == "(":
            round_open.append(len(pieces))
        elif item == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            if _is_number(weight):
                close(round_open.pop(), float(weight))
            else:  # '(a:1.2.3)': the colon part is text, the bracket closes as a plain ')'
                _append_text(pieces, item[:-1], use_break)
                close(round_open.pop(), ROUND_FACTOR)
        elif item == ")" and round_open:
            close(round_open.pop(), ROUND_FACTOR)
        elif item == "]" and square_open:
            close(square_open.pop(), SQUARE_FACTOR)
        elif len(item) == 2 and item[0] == "\\":
            pieces.append(item[1])
        else:
            _append_text(pieces, item, use_break)

    for start in round_open:
        close(start, ROUND_FACTOR)
    for start in square_open:
        close(start, SQUARE_FACTOR)
    return _merge(pieces, _weights(len(pieces), ranges))


def _weights(n: int, ranges: list[tuple[int, int, float]]) -> list[float]:
    """Weight of each of ``n`` pieces: the product of the factors of the ranges that cover it.
    A sweep over the pieces switches each range's factor on at its first piece and off at its
    end in a product tree over the ranges (leaves 1.0 when off), so each piece reads the
    product at the root."""
    size = 1
    while size < len(ranges):
        size *= 2
    tree = [1.0] * (2 * size)
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for k, (first, end, _) in enumerate(ranges):
        starts.setdefault(first, []).append(k)
        ends.setdefault(end, []).append(k)

    def put(k: int, value: float) -> None:
        i = size + k
        tree[i] = value
        i //= 2
        while i:
            tree[i] = tree[2 * i] * tree[2 * i + 1]
            i //= 2

    weights = []
    for i in range(n):
        for k in ends.get(i, ()):
            put(k, 1.0)
        for k in starts.get(i, ()):
            if ranges[k][1] > i:
                put(k, ranges[k][2])
        weights.append(tree[1] if ranges else 1.0)
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _append_text(pieces: list[str | None], item: str, use_break: bool) -> None:
    parts = _BREAK_WORD.split(item) if use_break else [item]
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append(None)
        if part:
            pieces.append(part)


def _merge(pieces: list[str | None], weights: list[float]) -> list[Segment]:
    """Join neighbours of equal weight (never across a BREAK); an empty prompt is ``[("", 1.0)]``."""
    runs: list[tuple[list[str], float] | None] = []
    for text, weight in zip(pieces, weights, strict=True):
        if text is None:
            runs.append(None)
        elif runs and runs[-1] is not None and runs[-1][1] == weight:
            runs[-1][0].append(text)
        else:
            runs.append(([text], weight))
    merged = [BREAK if run is None else Segment("".join(run[0]), run[1]) for run in runs]
    return merged or [Segment("", 1.0)]


#: ComfyUI's prompt syntax for a textual-inversion embedding: ``embedding:NAME`` at the start of
#: a word (after a space, a comma or a bracket), NAME running to the next space or comma.
EMBEDDING_PREFIX = "embedding:"
_EXPLICIT_EMBEDDING = r"(?<![^\s,])embedding:(?P<explicit>[^\s,]+)"


class EmbeddingRef(NamedTuple):
    """A textual-inversion embedding named in a prompt: ``name`` as written after
    ``embedding:`` (``explicit``), or the embedding name a bare word matched."""

    name: str
    explicit: bool


def split_embeddings(text: str, bare_names: Iterable[str] = ()) -> list[str | EmbeddingRef]:
    """Split a segment's text into plain text and embedding references.

    ``embedding:NAME`` (ComfyUI) is always a reference. A word equal to one of ``bare_names``
    (AUTOMATIC1111: the embedding files' names), compared without regard to case as A1111's
    token matching does, is a reference too; a word is delimited by anything but letters,
    digits, ``_``, ``-``, ``/`` and a ``.`` inside it, so ``EasyNegative,`` and
    ``(easynegative:1.2)`` match ``EasyNegative`` but ``EasyNegative2`` and ``my-easynegative``
    do not.

    >>> split_embeddings("a cat, embedding:bad-hands-5, EasyNegative", ["EasyNegative"])
    ['a cat, ', EmbeddingRef(name='bad-hands-5', explicit=True), ', ', EmbeddingRef(name='EasyNegative', explicit=False)]
    """
    canonical: dict[str, str] = {}
    for name in sorted(bare_names):
        canonical.setdefault(name.lower(), name)
    patterns = [_EXPLICIT_EMBEDDING]
    if canonical:
        words = "|".join(re.escape(n) for n in sorted(canonical, key=len, reverse=True))
        patterns.append(rf"(?<![\w\-./:\\])(?i:(?P<bare>{words}))(?![\w\-/\\]|\.\w)")
    pieces: list[str | EmbeddingRef] = []
    last = 0
    for match in re.finditer("|".join(patterns), text):
        if match.start() > last:
            pieces.append(text[last : match.start()])
        if match.group("explicit") is not None:
            pieces.append(EmbeddingRef(match.group("explicit"), explicit=True))
        else:
            pieces.append(EmbeddingRef(canonical[match.group("bare").lower()], explicit=False))
        last = match.end()
    if last < len(text) or not pieces:
        pieces.append(text[last:])
    return pieces


def embedding_references(text: str, bare_names: Iterable[str] = ()) -> list[EmbeddingRef]:
    """Every embedding reference of a prompt (see :func:`split_embeddings`), in order."""
    names = list(bare_names)
    return [p for s in parse_prompt(text) if s != BREAK for p in split_embeddings(s.text, names) if isinstance(p, EmbeddingRef)]
