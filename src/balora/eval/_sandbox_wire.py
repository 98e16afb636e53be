"""Plain-data wire format between the sandboxed solution and the checker that runs its tests. Standard library only.

A value crosses by value only if it is (an instance of) None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, dict, set, frozenset, range, Fraction or Decimal, recursively, or a built-in type or function (`int`, `len`);
it is rebuilt on the other side as the exact built-in type, read through the built-in type's own methods
(`int.__index__`, `list.__iter__`, `dict.items`, ...), so a subclass's `__eq__`, `__iter__` or `__hash__` never runs
on the checker's side and never reaches its asserts. Anything else (a function, a class, a generator, an object of
the solution's own class) stays where it is and crosses as `["ref", n]`, a handle that the other side can only use
through further requests. Decoding builds no object but these (no pickle, no eval).
"""

import builtins
import json
import os
import types

MAX_MESSAGE = 64 * 1024 * 1024  # bytes of one message; a longer answer is refused, not read into memory
MAX_DEPTH = 100  # nesting deeper than this crosses as a handle
# Built-in functions that may cross as values (a key function, say); not eval, exec, open, __import__, ...
SAFE_BUILTIN_FUNCTIONS = frozenset(
    "abs all any ascii bin callable chr divmod format hash hex isinstance issubclass iter len max min next oct ord "
    "pow print repr round sorted sum".split()
)


class WireError(Exception):
    """A message that is not valid wire data (too long, not JSON, an unknown tag)."""


def encode(value: object, to_ref, depth: int = 0) -> list:  # noqa: ANN001 - to_ref(value) -> ["ref", n]
    """A JSON-able tagged tree for `value`; values that do not cross by value become `to_ref(value)`."""
    if depth > MAX_DEPTH:
        return to_ref(value)
    if value is None:
        return ["none"]
    if value is True or value is False:
        return ["bool", value]
    if isinstance(value, int):
        return ["int", hex(int.__index__(value))]  # hex: no 4,300-digit limit on str(int)
    if isinstance(value, float):
        return ["float", float.hex(float.__float__(value))]
    if isinstance(value, complex):
        return ["complex", float.hex(complex.real.__get__(value)), float.hex(complex.imag.__get__(value))]
    if isinstance(value, str):
        return ["str", str.__str__(value)]
    if isinstance(value, bytes):
        return ["bytes", bytes.hex(value)]
    if isinstance(value, bytearray):
        return ["bytearray", bytearray.hex(value)]
    if isinstance(value, (list, tuple, set, frozenset)):
        kind = next(t for t in (list, tuple, set, frozenset) if isinstance(value, t))
        items = [encode(item, to_ref, depth + 1) for item in kind.__iter__(value)]
        return [kind.__name__, items]
    if isinstance(value, dict):
        return ["dict", [[encode(k, to_ref, depth + 1), encode(v, to_ref, depth + 1)] for k, v in dict.items(value)]]
    if isinstance(value, (type, types.BuiltinFunctionType)) and getattr(builtins, value.__name__, None) is value:
        if isinstance(value, type) or value.__name__ in SAFE_BUILTIN_FUNCTIONS:
            return ["builtin", value.__name__]  # int, str, len, sorted, ... (a test may pass a type or a key function)
    if type(value) is range:
        return ["range", value.start, value.stop, value.step]
    module = type(value).__module__
    if module == "fractions" and type(value).__qualname__ == "Fraction":
        return ["fraction", encode(value.numerator, to_ref, depth + 1), encode(value.denominator, to_ref, depth + 1)]
    if module == "decimal" and type(value).__qualname__ == "Decimal":
        return ["decimal", encode(str(value), to_ref, depth + 1)]
    return to_ref(value)


def decode(tree: object, from_ref):  # noqa: ANN001, ANN201 - from_ref(n) -> the object behind handle n
    """The value of a tagged tree built by `encode`; raises WireError for anything else."""
    if not isinstance(tree, list) or not tree or not isinstance(tree[0], str):
        raise WireError(f"not a wire value: {str(tree)[:80]}")
    tag, args = tree[0], tree[1:]
    try:
        if tag == "none":
            return None
        if tag == "bool":
            return bool(args[0] is True)
        if tag == "int":
            return int(args[0], 16)
        if tag == "float":
            return float.fromhex(args[0])
        if tag == "complex":
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "str" and isinstance(args[0], str):
            return args[0]
        if tag in ("bytes", "bytearray"):
            return (bytes if tag == "bytes" else bytearray).fromhex(args[0])
        if tag in ("list", "tuple", "set", "frozenset"):
            kind = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag]
            return kind(decode(item, from_ref) for item in args[0])
        if tag == "dict":
            return {decode(k, from_ref): decode(v, from_ref) for k, v in args[0]}
        if tag == "range":
            return range(int(args[0]), int(args[1]), int(args[2]))
        if tag == "fraction":
            from fractions import Fraction

            return Fraction(decode(args[0], from_ref), decode(args[1], from_ref))
        if tag == "decimal":
            from decimal import Decimal

            return Decimal(decode(args[0], from_ref))
        if tag == "builtin" and isinstance(args[0], str):
            value = getattr(builtins, args[0])
            if (isinstance(value, type) and not args[0].startswith("_")) or args[0] in SAFE_BUILTIN_FUNCTIONS:
                return value
        if tag == "ref" and type(args[0]) is int:
            return from_ref(args[0])
    except WireError:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise WireError(f"bad {tag!r} value: {type(exc).__name__}: {exc}"[:200]) from None
    raise WireError(f"unknown wire tag {tag!r}"[:80])


def send(fd: int, message: object) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """Reads newline-terminated JSON messages from a pipe, refusing any longer than MAX_MESSAGE bytes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, bytearray()

    def recv(self) -> object | None:
        """The next message, or None at end of file."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_MESSAGE:
                raise WireError(f"message longer than {MAX_MESSAGE} bytes")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        end = self.buffer.index(b"\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        try:
            return json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise WireError(f"message is not JSON: {type(exc).__name__}") from None
