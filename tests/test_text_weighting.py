"""Prompt weighting syntax (A1111's rules; expected weights worked out by hand)."""

from __future__ import annotations

import pytest

from graphsd.std.text.weighting import BREAK, Segment, parse_prompt

UP, DOWN = 1.1, 1 / 1.1

CASES = [
    # plain text is one segment of weight 1; the empty prompt too
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    # the three forms
    ("a (cat)", [("a ", 1.0), ("cat", UP)]),
    ("a [cat]", [("a ", 1.0), ("cat", DOWN)]),
    ("a (cat:1.3) b", [("a ", 1.0), ("cat", 1.3), (" b", 1.0)]),
    ("(cat: 0.5 )", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    # nesting multiplies
    ("((cat))", [("cat", UP * UP)]),
    ("[[cat]]", [("cat", DOWN * DOWN)]),
    ("([cat])", [("cat", UP * DOWN)]),
    ("(a (b:1.5):2)", [("a ", 2.0), ("b", 3.0)]),
    ("((a:1.2) b)", [("a", 1.2 * UP), (" b", UP)]),
    # neighbours of equal weight merge; (x:1) changes nothing
    ("a (b:1) c", [("a b c", 1.0)]),
    ("(a)(b)", [("ab", UP)]),
    # escapes are literal characters
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\] \\ x", [("[cat] \\ x", 1.0)]),
    (r"(a \(b\))", [("a (b)", UP)]),
    (r"a \ b", [("a \\ b", 1.0)]),
    # colons that start no weight are text
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("(a:b)", [("a:b", UP)]),
    # unbalanced: stray closers are text, unclosed openers weight to the end
    ("a) b] c", [("a) b] c", 1.0)]),
    ("x :1.3) y", [("x :1.3) y", 1.0)]),
    ("a (b c", [("a ", 1.0), ("b c", UP)]),
    ("a [b (c", [("a ", 1.0), ("b ", DOWN), ("c", DOWN * UP)]),
    ("(a:1.2.3)", [("a:1.2.3", UP)]),  # not a number: text, and the bracket closes plainly
]


@pytest.mark.parametrize(("prompt", "expected"), CASES)
def test_parse(prompt, expected):
    got = parse_prompt(prompt)
    assert [s.text for s in got] == [t for t, _ in expected]
    # a weight is a product of at most three factors, each product rounded once (relative
    # error ≤ 2**-53 each), so the two sides agree to well within 1e-15 relative
    assert [s.weight for s in got] == pytest.approx([w for _, w in expected], rel=1e-15)


def test_break_keyword():
    assert parse_prompt("a cat BREAK a dog") == [Segment("a cat", 1.0), BREAK, Segment("a dog", 1.0)]
    assert parse_prompt("(a BREAK b:-1)") == [Segment("a", -1.0), BREAK, Segment("b", -1.0)]
    # only the upper-case whole word
    assert parse_prompt("a break b BREAKFAST") == [Segment("a break b BREAKFAST", 1.0)]
    assert parse_prompt("a BREAK b", use_break=False) == [Segment("a BREAK b", 1.0)]


def test_segments_are_text_weight_pairs():
    (text, weight), = parse_prompt("(cat:1.5)")
    assert (text, weight) == ("cat", 1.5)
