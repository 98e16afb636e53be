"""The checker's wire format: plain data round-trips as exact built-in types; everything else stays a handle."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction

import pytest

from balora.eval import _sandbox_wire as wire


def round_trip(value: object) -> tuple[object, list]:
    handles: list = []

    def to_ref(obj: object) -> list:
        handles.append(obj)
        return ["ref", len(handles) - 1]

    tree = json.loads(json.dumps(wire.encode(value, to_ref)))  # through JSON, as on the pipe
    return wire.decode(tree, lambda n: ("handle", handles[n])), handles


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -(10**5000), 2.5, -0.0, math.inf, 1 + 2j, "", "héllo", b"\x00\xff", bytearray(b"ab"),
     [1, [2, (3, {4})]], (), {"a": [1], (1, 2): frozenset({3})}, range(2, 10, 3), Fraction(1, 3), Decimal("1.10"),
     int, str, len, sorted],
    ids=lambda value: type(value).__name__,  # str() of a 5,000-digit int raises
)  # fmt: skip
def test_plain_values_round_trip_exactly(value: object):
    back, handles = round_trip(value)
    assert back == value and type(back) is type(value) and not handles


def test_nan_round_trips():
    back, _ = round_trip(float("nan"))
    assert math.isnan(back)


def test_subclasses_cross_as_their_built_in_base():
    class Always(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    class Listy(list):
        def __iter__(self):  # noqa: ANN204 - a lying iterator is ignored: list.__iter__ reads the real items
            return iter([99])

    back, _ = round_trip([Always(3), Listy([1, 2])])
    assert back == [3, [1, 2]] and type(back[0]) is int and type(back[1]) is list
    assert back[0] != 4  # the built-in int's __eq__


def test_other_objects_and_deep_nesting_become_handles():
    class Pair:
        pass

    pair, generator, function = Pair(), (i for i in range(3)), lambda: None
    back, handles = round_trip([pair, generator, function, eval])
    assert back == [("handle", pair), ("handle", generator), ("handle", function), ("handle", eval)]
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    back, handles = round_trip(deep)
    assert len(handles) == 1  # cut at MAX_DEPTH, not a RecursionError


@pytest.mark.parametrize(
    "tree",
    [["eval", "1+1"], ["int", "zz"], ["dict", [[["list", []], ["none"]]]], "str", [], ["builtin", "__import__"],
     ["builtin", "copyright"], ["builtin", "eval"], ["builtin", "nope"], ["ref", "0"]],
)  # fmt: skip
def test_decode_refuses_anything_else(tree: object):
    with pytest.raises(wire.WireError):
        wire.decode(tree, lambda n: None)
