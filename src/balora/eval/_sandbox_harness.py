"""Child side of `balora.eval.sandbox`: started as `python -I _sandbox_harness.py CONFIG_JSON`. Do not import.

The process started by the sandbox is a small supervisor. It sets the resource limits, becomes a child subreaper, and
forks the process that runs the untrusted code, so that the code's parent (`os.getppid()`) is this disposable
supervisor and never the evaluation process. After the code ends (or, on SIGTERM from the sandbox's timeout, after
killing it), the supervisor kills whatever the code left behind, including processes that left its session (as a
subreaper, orphans are re-parented to it), and exits with the code's status. Under OS isolation this whole tree also
lives in its own PID namespace, which the kernel empties when the sandbox ends.

Two modes. "serve" (how benchmarks are scored): the code is a solution without its tests; after running it, the
process answers requests on a pipe (call this function with these arguments, get this attribute, ...) from the
checker (`_sandbox_checker.py`), a separate process that runs the tests and decides the verdict. Values cross as
plain data (`encode`/`decode`: numbers, strings, containers); anything else stays here and crosses as a handle.
"program" (a whole program, tests included): a random token is read from a pipe and written back as `PASS <token>`
on another pipe after the whole program returned; code that inspects this process can forge that (see docs/eval.md).

Only the standard library is used: this file runs under `python -I` with the sandbox's limits.
"""

import json
import operator
import os
import resource
import signal
import sys
import traceback
import types

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Events refused outright by the guard: new processes, native code, limits, sockets.
_BLOCKED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.startfile",
        "subprocess.Popen",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
        "ctypes.cdata",
        "ctypes.call_function",
        "resource.setrlimit",
        "resource.prlimit",
        "socket.bind",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "os.setuid",
    }
)
# Modules refused on a fresh import: `_posixsubprocess.fork_exec` starts processes without an audit event.
_BLOCKED_MODULES = ("_posixsubprocess",)
# Functions without an audit event, removed from their modules in the program process.
_REMOVED_FUNCTIONS = (
    ("signal", "pidfd_send_signal"),
    ("_signal", "pidfd_send_signal"),
    ("os", "mkfifo"),
    ("posix", "mkfifo"),
    ("os", "mknod"),
    ("posix", "mknod"),
)
# Events whose path arguments (by position; None = last argument is a dir_fd) must stay inside the sandbox dir.
_PATH_EVENTS: dict[str, tuple[int, ...]] = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.rename": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.chflags": (0,),
    "os.lchflags": (0,),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "os.mkdir": (0,),
    "os.utime": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copymode": (1,),
    "shutil.copystat": (1,),
    "shutil.chown": (0,),
    "sqlite3.connect": (0,),
}
# The dir_fd argument of events that take one (relative paths are then resolved against that directory).
_DIR_FD_ARG = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "shutil.rmtree": 1}


def _install_guard(root: str) -> None:
    """Refuse, via a PEP 578 audit hook, writes outside `root`, new processes, signals to others, ctypes, sockets.

    Audit hooks cannot be removed from Python code, but they are not a sandbox: native code, a C extension already
    imported, or a race between the check and the use can get around them. They stop the accidents and the simple
    hostile programs that generated code produces (deleting files, writing to /tmp, forking, killing the parent).
    """
    realpath = os.path.realpath
    readlink = os.readlink
    getpid = os.getpid
    root = realpath(root)

    def inside(path: object, dir_fd: object = None) -> bool:
        if path in (":memory:", b":memory:", ""):  # sqlite3's in-memory and temporary databases
            return True
        if isinstance(path, int):  # an already-open file descriptor: checked when it was opened
            return True
        text = os.fsdecode(path)  # type: ignore[arg-type]
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(text):
            text = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), text)
        resolved = realpath(text)
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(event: str, what: object) -> None:
        raise PermissionError(f"sandbox: {event} on {what!r} is not allowed (only inside {root})")

    own_proc = (f"/proc/{getpid()}/", "/proc/self/", "/proc/thread-self/")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if flags is not None and flags & _WRITE_FLAGS and not inside(path):
                refuse("writing", path)
            if isinstance(path, (str, bytes)):  # other processes' environment, memory, open files
                text = realpath(os.fsdecode(path))
                if text.startswith("/proc/") and text[6:7].isdigit() and not text.startswith(own_proc):
                    refuse("reading", path)
        elif event == "import" and args[0] in _BLOCKED_MODULES:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        elif event in _PATH_EVENTS:
            dir_fd = args[_DIR_FD_ARG[event]] if event in _DIR_FD_ARG else None
            for position in _PATH_EVENTS[event]:
                if not inside(args[position], dir_fd):
                    refuse(event, args[position])
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if not (event == "os.kill" and args[0] == getpid()):
                raise PermissionError(f"sandbox: {event}{args!r} is not allowed (a program may only signal itself)")
        elif event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")

    real_open = os.open

    def open_checking_dir_fd(path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001, ANN202 - os.open's signature
        # The audit "open" event does not carry dir_fd: check a write relative to a directory descriptor here.
        if dir_fd is not None and flags & _WRITE_FLAGS and not inside(path, dir_fd):
            refuse("writing", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    os.open = open_checking_dir_fd
    sys.modules["posix"].open = open_checking_dir_fd
    import _posixsubprocess  # stays imported, neutered; a fresh copy (after `del sys.modules[...]`) is refused

    def fork_exec(*args: object) -> None:
        raise PermissionError("sandbox: _posixsubprocess.fork_exec is not allowed")

    _posixsubprocess.fork_exec = fork_exec
    for module_name, attribute in _REMOVED_FUNCTIONS:  # no audit event: removed (native code can still reach them)
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            delattr(module, attribute)
    sys.addaudithook(hook)


def _set_limits(limits: dict) -> None:
    cpu, address_space, file_size = limits["cpu_s"], limits["address_space"], limits["file_size"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits["max_processes"] is not None:
        # RLIMIT_NPROC counts every task of the real user, so the budget is added to what the user runs now.
        # It does not bind root (CAP_SYS_RESOURCE); the process-group kill and the guard handle that case.
        nproc = _count_user_tasks(os.getuid()) + limits["max_processes"]
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _proc_stat(pid: str) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, session) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])


def _count_user_tasks(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return count


def _become_subreaper() -> None:
    import ctypes  # imported by the supervisor only; the program's guard refuses ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _kill_descendants() -> None:
    """Kill and reap every remaining descendant; as a subreaper, orphans of killed processes come back to us."""
    me = os.getpid()
    for _ in range(1000):
        children = [pid for pid in os.listdir("/proc") if pid.isdigit() and (_proc_stat(pid) or ("", 0))[1] == me]
        if not children:
            return
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited between the listing and the kill
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def _prepare(config: dict) -> tuple[str, dict]:
    """In the forked process: read the code, make a fresh __main__, install the guard. Returns (source, globals)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    sys.dont_write_bytecode = True
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    if config["guard"]:
        # The supervisor imported ctypes before forking; drop it so that a new `import ctypes` hits the guard.
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[name]
        _install_guard(config["root"])
    return source, main.__dict__


def _error_record(exc: BaseException) -> dict:
    record = {"type": type(exc).__name__, "message": str(exc)[:1000]}
    if isinstance(exc, SystemExit):
        record["message"] = repr(exc.code)[:1000]
    return record


def _print_traceback(exc: BaseException) -> None:
    try:
        traceback.print_exception(exc, file=sys.__stderr__)
        sys.__stderr__.flush()
    except OSError:
        pass  # the output file may be at its size limit; the report already carries the reason


def _run_program(config: dict) -> None:
    """Mode "program": runs the whole program in the forked process; never returns."""
    write, exit_now = os.write, os._exit  # kept before the program can monkeypatch os
    result_fd = config["result_fd"]
    token = os.read(config["token_fd"], 256)
    os.close(config["token_fd"])
    source, namespace = _prepare(config)
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:  # every way the program can stop is reported to the sandbox, then exit 1
        write(result_fd, b"ERROR " + json.dumps(_error_record(exc)).encode() + b"\n")
        _print_traceback(exc)
        exit_now(1)
    write(result_fd, b"PASS " + token + b"\n")
    exit_now(0)


_OPERATIONS = {
    "getattr": getattr,
    "setattr": setattr,
    "getitem": lambda obj, key: obj[key],
    "iter": lambda obj: list(obj),
    "next": next,
    "len": len,
    "bool": bool,
    "repr": repr,
    "str": str,
    "contains": lambda obj, item: item in obj,
    "operator": lambda obj, op, other: getattr(operator, op)(obj, other),  # eq, lt, add, ... with the handle first
}


def _serve(config: dict) -> None:
    """Mode "serve": run the solution, then answer the checker's requests until it closes the pipe; never returns."""
    wire = _load_wire(config["wire"])
    send, exit_now, response_fd = wire.send, os._exit, config["response_fd"]
    reader = wire.Reader(config["request_fd"])
    source, namespace = _prepare(config)
    handles: list = []

    def to_ref(value: object) -> list:
        handles.append(value)
        return ["ref", len(handles) - 1]

    def from_ref(n: int) -> object:
        return handles[n]

    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as exc:
        send(response_fd, ["raise", _error_record(exc)])
        _print_traceback(exc)
        exit_now(1)
    names = {}
    for name, value in list(namespace.items()):
        if not name.startswith("__"):
            names[name] = f"module:{value.__name__}" if isinstance(value, types.ModuleType) else "object"
    send(response_fd, ["ready", names])
    while True:
        request = reader.recv()
        if request is None:  # the checker is done
            sys.stdout.flush()
            exit_now(0)
        try:
            op, target, *args = request
            obj = namespace[target[1]] if target[0] == "name" else handles[target[1]]
            if op == "call":  # ["call", target, encoded tuple of arguments, [[keyword, encoded value], ...]]
                keywords = {str(k): wire.decode(v, from_ref) for k, v in args[1]}
                result = obj(*wire.decode(args[0], from_ref), **keywords)
            else:  # names and operator names are strings; values are wire trees
                result = _OPERATIONS[op](obj, *[a if isinstance(a, str) else wire.decode(a, from_ref) for a in args])
            reply = ["ok", wire.encode(result, to_ref)]
        except BaseException as exc:  # the solution's exceptions (SystemExit included) are the checker's to judge
            reply = ["raise", _error_record(exc)]
        send(response_fd, reply)


def _load_wire(path: str) -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sandbox_wire", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    config = json.loads(sys.argv[1])
    _set_limits(config["limits"])
    _become_subreaper()
    program_pid = 0

    def on_terminate(signum: int, frame: object) -> None:  # the sandbox's timeout: end the program, then clean up
        if program_pid:
            os.kill(program_pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_terminate)
    if config["mode"] == "serve":
        _load_wire(config["wire"])  # before the limits bite and the guard is on: fail here, not in the program
    pid = program_pid = os.fork()
    if pid == 0:
        _serve(config) if config["mode"] == "serve" else _run_program(config)
    for key in ("token_fd", "result_fd", "request_fd", "response_fd"):  # the program process holds its own copies
        if key in config:
            os.close(config[key])
    _, status = os.waitpid(pid, 0)
    _kill_descendants()
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # mirror a death by signal so that the sandbox sees it
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # only reached for a signal whose default action does not terminate
    os._exit(code)


if __name__ == "__main__":
    main()
