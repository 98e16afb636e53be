"""Child side of `balora.eval.sandbox`: started as `python -I _sandbox_harness.py CONFIG_JSON`. Do not import.

The process started by the sandbox is a small supervisor. It sets the resource limits, becomes a child subreaper, and
forks the process that runs the untrusted program, so that the program's parent (`os.getppid()`) is this disposable
supervisor and never the evaluation process. After the program ends (or, on SIGTERM from the sandbox's timeout, after
killing it), the supervisor kills whatever the program left behind, including processes that left its session (as a
subreaper, orphans are re-parented to it), and exits with the program's status.

The program process reads a random token from a pipe, closes that pipe, optionally installs the audit-hook guard,
runs the program, and writes `PASS <token>` on a second pipe only after the whole program (tests included) returned.
Exiting early (`sys.exit(0)`, `os._exit(0)`, a signal) therefore never produces the token, so it is not a pass.

Only the standard library is used: this file runs under `python -I` with the sandbox's limits.
"""

import json
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
        if isinstance(path, int):  # an already-open file descriptor: checked when it was opened
            return True
        text = os.fsdecode(path)  # type: ignore[arg-type]
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(text):
            text = os.path.join(readlink(f"/proc/self/fd/{dir_fd}"), text)
        resolved = realpath(text)
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(event: str, what: object) -> None:
        raise PermissionError(f"sandbox: {event} on {what!r} is not allowed (only inside {root})")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if flags is not None and flags & _WRITE_FLAGS and not inside(path):
                refuse("writing", path)
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


def _run_program(config: dict) -> None:
    """Runs in the forked program process; never returns."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    write, exit_now = os.write, os._exit  # kept before the program can monkeypatch os
    result_fd = config["result_fd"]
    token = os.read(config["token_fd"], 256)
    os.close(config["token_fd"])
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
    try:
        exec(compile(source, "program.py", "exec"), main.__dict__)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:  # every way the program can stop is reported to the sandbox, then exit 1
        record = {"type": type(exc).__name__, "message": str(exc)[:1000]}
        if isinstance(exc, SystemExit):
            record["message"] = repr(exc.code)[:1000]
        write(result_fd, b"ERROR " + json.dumps(record).encode() + b"\n")
        try:
            traceback.print_exception(exc, file=sys.__stderr__)
            sys.__stderr__.flush()
        except OSError:
            pass  # the output file may be at its size limit; the record above already carries the reason
        exit_now(1)
    write(result_fd, b"PASS " + token + b"\n")
    exit_now(0)


def main() -> None:
    config = json.loads(sys.argv[1])
    _set_limits(config["limits"])
    _become_subreaper()
    program_pid = 0

    def on_terminate(signum: int, frame: object) -> None:  # the sandbox's timeout: end the program, then clean up
        if program_pid:
            os.kill(program_pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_terminate)
    pid = program_pid = os.fork()
    if pid == 0:
        _run_program(config)
    os.close(config["token_fd"])
    os.close(config["result_fd"])
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
