"""The checker of `balora.eval.sandbox`: runs a benchmark's tests against a sandboxed solution and decides the verdict.

Started as `python -I _sandbox_checker.py CONFIG_JSON`, outside the solution's namespaces and (as root) as another
user, so the solution can neither see, signal nor trace it. It runs only trusted code: the benchmark's setup and
tests. Every name the solution defines is bound here to a `Remote` proxy; calling it sends the arguments over a pipe
to the sandboxed process (`_sandbox_harness.py`, mode "serve"), which runs the solution's function and answers with
plain data (`_sandbox_wire.py`). So the asserts compare built-in values with built-in `==`, and the verdict is written
on a pipe that only this process holds: the solution cannot forge it. Standard library only.
"""

import builtins
import importlib
import importlib.util
import json
import os
import resource
import sys
import traceback


class ProgramGone(Exception):
    """The solution's process ended (exit, crash, a limit) before the tests finished."""


class RemoteError(Exception):
    """An exception raised by the solution's code, re-raised here with its type name and message."""

    def __init__(self, record: dict) -> None:
        self.record = record
        super().__init__(f"{record.get('type')}: {record.get('message')}")


class Channel:
    def __init__(self, wire, request_fd: int, response_fd: int) -> None:  # noqa: ANN001 - the wire module
        self.wire, self.request_fd, self.reader = wire, request_fd, wire.Reader(response_fd)
        self.refs: dict[int, Remote] = {}

    def from_ref(self, n: int) -> "Remote":
        if n not in self.refs:
            self.refs[n] = Remote(self, ["ref", n])
        return self.refs[n]

    def to_ref(self, value: object) -> list:
        if isinstance(value, Remote):
            return object.__getattribute__(value, "_target")
        raise TypeError(f"a test passed a {type(value).__name__} to the solution; only plain data can cross")

    def receive(self) -> object:
        try:
            message = self.reader.recv()
        except OSError:
            message = None
        if message is None:
            raise ProgramGone("the solution's process ended before the tests finished")
        return message

    def request(self, *message: object) -> object:
        try:
            self.wire.send(self.request_fd, list(message))
        except (BrokenPipeError, OSError):
            raise ProgramGone("the solution's process ended before the tests finished") from None
        reply = self.receive()
        if not isinstance(reply, list) or len(reply) != 2:
            raise self.wire.WireError("malformed reply")
        if reply[0] == "raise":
            raise RemoteError(reply[1] if isinstance(reply[1], dict) else {"type": "?", "message": ""})
        if reply[0] != "ok":
            raise self.wire.WireError("malformed reply")
        return self.wire.decode(reply[1], self.from_ref)

    def encode(self, value: object) -> list:
        return self.wire.encode(value, self.to_ref)


class Remote:
    """A name or an object of the solution, living in the sandboxed process; every use is a request."""

    __slots__ = ("_channel", "_target")

    def __init__(self, channel: Channel, target: list) -> None:
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_target", target)

    def _ask(self, op: str, *args: object) -> object:
        channel = object.__getattribute__(self, "_channel")
        return channel.request(op, object.__getattribute__(self, "_target"), *args)

    def _value(self, value: object) -> list:
        return object.__getattribute__(self, "_channel").encode(value)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._ask("call", self._value(args), [[k, self._value(v)] for k, v in kwargs.items()])

    def __getattr__(self, name: str) -> object:
        return self._ask("getattr", name)

    def __setattr__(self, name: str, value: object) -> None:
        self._ask("setattr", name, self._value(value))

    def __getitem__(self, key: object) -> object:
        return self._ask("getitem", self._value(key))

    def __iter__(self):  # noqa: ANN204
        return iter(self._ask("iter"))

    def __next__(self) -> object:
        return self._ask("next")

    def __len__(self) -> int:
        return self._ask("len")

    def __bool__(self) -> bool:
        return self._ask("bool")

    def __repr__(self) -> str:
        return self._ask("repr")

    def __str__(self) -> str:
        return self._ask("str")

    def __contains__(self, item: object) -> bool:
        return self._ask("contains", self._value(item))

    def __hash__(self) -> int:
        return hash(tuple(object.__getattribute__(self, "_target")))


    def __eq__(self, other: object) -> bool:
        # Two objects of the solution: its own __eq__ decides. Against the test's plain data: never equal, as a
        # custom object with no __eq__ would be; so an always-equal object cannot pass an assert.
        if isinstance(other, Remote):
            return bool(self._ask("operator", "eq", self._value(other)))
        return False

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)


def _bind(names: dict, channel: Channel, namespace: dict) -> None:
    """Stdlib modules the solution imported are imported here (trusted copies); every other name is a Remote."""
    for name, kind in names.items():
        module = kind[len("module:") :] if kind.startswith("module:") else None
        if module is not None and module.split(".")[0] in sys.stdlib_module_names:
            namespace[name] = importlib.import_module(module)
        else:
            namespace[name] = Remote(channel, ["name", name])


def _verdict(exc: BaseException | None) -> dict:
    if exc is None:
        return {"status": "passed", "reason": "all tests passed"}
    if isinstance(exc, AssertionError):
        return {"status": "failed", "reason": f"test failed: AssertionError{': ' + str(exc) if str(exc) else ''}"}
    if isinstance(exc, ProgramGone):
        return {"status": "gone", "reason": str(exc)}
    if isinstance(exc, RemoteError):
        kind, message = str(exc.record.get("type")), str(exc.record.get("message"))
        if kind == "SystemExit":
            return {"status": "failed", "reason": f"program exited (SystemExit({message})) before the tests finished"}
        return {"status": "error", "reason": f"{kind}: {message}"[:1000]}
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:1000]}


def main() -> None:
    config = json.loads(sys.argv[1])
    cpu, address_space = config["limits"]["cpu_s"], config["limits"]["address_space"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    spec = importlib.util.spec_from_file_location("_sandbox_wire", config["wire"])
    wire = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wire)
    channel = Channel(wire, config["request_fd"], config["response_fd"])
    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    error: BaseException | None = None
    try:
        ready = channel.receive()
        if isinstance(ready, list) and ready[:1] == ["raise"]:  # the solution itself raised (or has a syntax error)
            raise RemoteError(ready[1] if isinstance(ready[1], dict) else {})
        if not (isinstance(ready, list) and ready[:1] == ["ready"] and isinstance(ready[1], dict)):
            raise wire.WireError("malformed ready message")
        exec(compile(config["setup"], "setup.py", "exec"), namespace)  # first, as in the one-program layout
        _bind({str(k): str(v) for k, v in ready[1].items() if k not in namespace}, channel, namespace)
        for name in config["replace"]:  # e.g. HumanEval's entry point: the prompt's stub is replaced by the solution
            namespace[name] = Remote(channel, ["name", name])
        exec(compile(config["tests"], "tests.py", "exec"), namespace)
    except BaseException as exc:  # every outcome becomes a verdict; the checker itself never crashes the run
        error = exc
        if not isinstance(exc, (RemoteError, ProgramGone)):
            traceback.print_exception(exc, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(config["result_fd"], json.dumps(_verdict(error)).encode() + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
