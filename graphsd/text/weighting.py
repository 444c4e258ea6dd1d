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
    """
    pieces: list[list] = []  # [text, weight] pairs, mutable while brackets close; None = BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _LEXER.finditer(text):
        item, weight = match.group(0), match.group("weight")
        if item == "(":
            round_open.append(len(pieces))
        elif item == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            if _is_number(weight):
                scale_from(round_open.pop(), float(weight))
            else:  # '(a:1.2.3)': the colon part is text, the bracket closes as a plain ')'
                _append_text(pieces, item[:-1], use_break)
                scale_from(round_open.pop(), ROUND_FACTOR)
        elif item == ")" and round_open:
            scale_from(round_open.pop(), ROUND_FACTOR)
        elif item == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_FACTOR)
        elif len(item) == 2 and item[0] == "\\":
            pieces.append([item[1], 1.0])
        else:
            _append_text(pieces, item, use_break)

    for start in round_open:
        scale_from(start, ROUND_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_FACTOR)
    return _merge(pieces)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _append_text(pieces: list[list], item: str, use_break: bool) -> None:
    parts = _BREAK_WORD.split(item) if use_break else [item]
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append([BREAK.text, None])
        if part:
            pieces.append([part, 1.0])


def _merge(pieces: list[list]) -> list[Segment]:
    """Join neighbours of equal weight (never across a BREAK); an empty prompt is ``[("", 1.0)]``."""
    merged: list[Segment] = []
    for text, weight in pieces:
        if weight is None:
            merged.append(BREAK)
        elif merged and merged[-1].weight == weight:
            merged[-1] = Segment(merged[-1].text + text, weight)
        else:
            merged.append(Segment(text, weight))
    return merged or [Segment("", 1.0)]
