"""Run untrusted generated Python (HumanEval, MBPP) under OS isolation, with the tests in a separate checker.

Two layers. First, Linux namespaces through bubblewrap (`balora.eval.isolation`): each sample runs in its own PID
namespace (every process it starts dies with it; it sees and can signal nothing else), network namespace (no
network), mount namespace (a read-only view of /usr and the interpreter only, its own /proc, one writable temporary
directory), as an unprivileged uid when the evaluator is root, with a cleared environment. Where namespaces are
unavailable, `isolation="auto"` falls back to the second layer alone with a loud warning, and "strict" refuses.
Second, today's in-process guards, kept under isolation too: a `python -I` process in a fresh temporary directory
that is deleted afterwards, a new session whose process group is killed at the end, a disposable supervisor
(`_sandbox_harness.py`) that is the program's parent and a child subreaper, limits on CPU time, address space, file
size and processes, stdin on /dev/null, output to a file capped by the file-size limit, and (`guard=True`) a PEP 578
audit hook that refuses writes outside the temporary directory, new processes, signals to others, ctypes, sockets,
and reading other processes' /proc files.

The verdict. A benchmark sample is a `TestedProgram`: the solution runs sandboxed and answers requests; the tests run
in a separate checker process (`_sandbox_checker.py`) that gets the solution's return values as plain data
(`_sandbox_wire.py`) and writes the verdict on a pipe only it holds. A plain string is run as one program (solution
and tests in one process) and passes when a per-run token comes back after the last statement: code that inspects
the harness's frames can forge that, so benchmarks are never scored that way. docs/eval.md has the threat model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from balora.eval import _sandbox_processes as processes
from balora.eval.isolation import (
    FALLBACK_WARNING,
    Isolation,
    IsolationUnavailable,
    Probe,
    bwrap_command,
    reserved_uid,
    resolve,
)

__all__ = [
    "FALLBACK_WARNING",
    "ExecResult",
    "Isolation",
    "IsolationUnavailable", "TestedProgram", "isolation_in_use", "run_many",
    "run_program",
]

Status = Literal["passed", "failed", "timeout", "killed", "error"]

_HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_CHECKER = Path(__file__).with_name("_sandbox_checker.py")
_WIRE = Path(__file__).with_name("_sandbox_wire.py")
_CLEANUP_GRACE_S = 2.0
_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded (SIGXCPU)",
    signal.SIGXFSZ: "file size limit exceeded (SIGXFSZ)",
    signal.SIGKILL: "killed by SIGKILL (CPU hard limit, the out-of-memory killer, or the program itself)",
}


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: `passed` is True only when every statement, tests included, ran to the end.

    status: "passed"; "failed" (an assertion failed, or the program exited before the end); "timeout" (wall clock);
    "killed" (ended by a signal: CPU, memory, file-size limit); "error" (any other exception, e.g. a syntax error,
    MemoryError, or an operation refused by the sandbox). `reason` says why in one line; `output_tail` is the end of
    the program's stdout and stderr, interleaved.
    """

    passed: bool
    status: Status
    reason: str
    output_tail: str
    duration_s: float
    isolated: bool = False  # ran in Linux namespaces (else with the in-process guards only)


def _check_limits(timeout: float, memory_mb: int, file_size_mb: int, max_processes: int | None) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (Python itself needs ~30 MB of address space), got {memory_mb!r}")
    if file_size_mb < 1:
        raise ValueError(f"file_size_mb must be >= 1, got {file_size_mb!r}")
    if max_processes is not None and max_processes < 1:
        raise ValueError(f"max_processes must be >= 1 or None, got {max_processes!r}")


def _minimal_env(root: Path) -> dict[str, str]:
    home = str(root)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "TMP": home,
        "TEMP": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _classify(
    timed_out: bool, returncode: int, records: list[bytes], token: bytes, timeout: float
) -> tuple[Status, str]:
    if timed_out:
        return "timeout", f"wall-clock timeout after {timeout:g} s"
    if returncode == 0 and b"PASS " + token in records:
        return "passed", "all tests passed"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return "killed", _SIGNAL_REASONS.get(sig, f"killed by {sig.name}")
    errors = [r for r in records if r.startswith(b"ERROR ")]
    if errors:
        try:
            error = json.loads(errors[-1][len(b"ERROR ") :])
            kind, message = str(error["type"]), str(error["message"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):  # the program wrote on the pipe
            return "error", "unreadable report on the sandbox's result pipe (written by the program?)"
        if kind == "AssertionError":
            return "failed", f"test failed: AssertionError{': ' + message if message else ''}"
        if kind == "SystemExit":
            return "failed", f"program exited (SystemExit({message})) before the tests finished"
        return "error", f"{kind}: {message}"
    if returncode == 0:
        return "failed", "process exited with status 0 before the tests finished (no completion token)"
    return "error", f"process exited with status {returncode} without a report"


@dataclass(frozen=True)
class TestedProgram:
    """A solution and its tests, run in separate processes: the tests in the checker, which decides the verdict.

    setup: trusted code run in the checker first (HumanEval's prompt, MBPP's test_setup_code); then the names the
    solution defines and setup does not are bound to proxies of the solution's objects, and so are the names in
    `replace` (HumanEval's entry point, whose prompt stub setup defines); then the tests run.
    """

    __test__ = False  # not a pytest test class

    solution: str
    tests: str
    setup: str = ""
    replace: tuple[str, ...] = ()


def isolation_in_use(isolation: Isolation = "auto") -> Probe:
    """What `run_program(..., isolation=isolation)` will use here; warns (once) when "auto" falls back to guards."""
    found = resolve(isolation)
    if isolation == "auto" and not found.available:
        _warn_fallback(found.detail)
    return found


@functools.cache
def _warn_fallback(detail: str) -> None:
    message = FALLBACK_WARNING.format(reason=detail)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _spawn(command: list[str], root: Path, output: int, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=root, env=_minimal_env(root), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        pass_fds=pass_fds, start_new_session=True,
    )  # fmt: skip


def run_program(
    program: str | TestedProgram,
    *,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    file_size_mb: int = 16,
    max_processes: int | None = 64,
    guard: bool = True,
    output_chars: int = 2000,
    isolation: Isolation = "auto",
) -> ExecResult:
    """Run `program` in the sandbox described in the module docstring.

    program: a whole program (solution and tests in one process; its verdict can be forged from inside, see
    docs/eval.md), or a TestedProgram (tests in the checker; the verdict cannot be forged).
    timeout: wall-clock seconds before everything is killed (the CPU limit is the same, rounded up).
    memory_mb: address-space limit (RLIMIT_AS). file_size_mb: largest file the program may write, its output
    included (RLIMIT_FSIZE). max_processes: extra processes allowed (RLIMIT_NPROC; binds root only under isolation).
    guard: install the audit hook (writes outside the temporary directory, new processes, signals, ...).
    isolation: "auto" (namespaces where available, else the guards with a warning), "strict" (raise
    IsolationUnavailable without namespaces), "off" (the guards only).
    Never raises because of what the program does; raises ValueError for bad limits.
    """
    _check_limits(timeout, memory_mb, file_size_mb, max_processes)
    isolated = isolation_in_use(isolation).available
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="balora-sandbox-"))
    fds: list[int] = []
    procs: list[subprocess.Popen] = []
    uid_context = reserved_uid() if isolated else contextlib.nullcontext(None)
    try:
        with uid_context as uid:
            root = tmp / "work"
            root.mkdir()
            if uid is not None:
                os.chown(root, uid, uid)
            tested = isinstance(program, TestedProgram)
            (tmp / "program.py").write_text(program.solution if tested else program, encoding="utf-8")
            config: dict = {
                "mode": "serve" if tested else "program",
                "program": str(tmp / "program.py"),
                "root": str(root),
                "guard": guard,
                "wire": str(_WIRE),
                "limits": {
                    "cpu_s": int(timeout) + 1,
                    "address_space": memory_mb * 1024 * 1024,
                    "file_size": file_size_mb * 1024 * 1024,
                    "max_processes": max_processes,
                },
            }
            prefix = []
            if isolated:
                readable = (str(tmp / "program.py"), str(_HARNESS.parent))
                bwrap = shutil.which("bwrap") or "bwrap"
                prefix = bwrap_command(bwrap, uid, writable=str(root), readable=readable, env=_minimal_env(root))

            def pipe() -> tuple[int, int]:
                r, w = os.pipe()
                fds.extend((r, w))
                return r, w

            def close(*ends: int) -> None:
                for fd in ends:
                    os.close(fd)
                    fds.remove(fd)

            result_r, result_w = pipe()
            output = os.open(tmp / "output", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fds.append(output)
            if tested:
                request_r, request_w = pipe()
                response_r, response_w = pipe()
                config |= {"request_fd": request_r, "response_fd": response_w}
                command = prefix + [sys.executable, "-I", str(_HARNESS), json.dumps(config)]
                procs.append(_spawn(command, root, output, (request_r, response_w)))
                checker_config = {
                    "request_fd": request_w, "response_fd": response_r, "result_fd": result_w, "wire": str(_WIRE),
                    "setup": program.setup, "tests": program.tests, "replace": list(program.replace),
                    "limits": config["limits"],
                }  # fmt: skip
                command = [sys.executable, "-I", str(_CHECKER), json.dumps(checker_config)]
                procs.append(_spawn(command, tmp, output, (request_w, response_r, result_w)))
                close(request_r, request_w, response_r, response_w, result_w, output)
            else:
                token_r, token_w = pipe()
                os.write(token_w, token := secrets.token_hex(16).encode())
                config |= {"token_fd": token_r, "result_fd": result_w}
                command = prefix + [sys.executable, "-I", str(_HARNESS), json.dumps(config)]
                procs.append(_spawn(command, root, output, (token_r, result_w)))
                close(token_r, token_w, result_w, output)
            try:
                timed_out = processes.wait(procs[-1], timeout)  # the checker, or the whole program
                if timed_out and not tested:  # the supervisor kills the program and all its descendants, then exits
                    procs[-1].terminate()
                    processes.wait(procs[-1], _CLEANUP_GRACE_S)
                if tested and not timed_out:  # the checker is done: the solution's process ends at end of file
                    processes.wait(procs[0], _CLEANUP_GRACE_S)
            finally:
                for proc in reversed(procs):  # also on KeyboardInterrupt, or if the program killed the supervisor
                    processes.stop(proc, str(tmp))
            records = processes.read_available(result_r).split(b"\n")
            returncode = procs[0].returncode
            if isolated and returncode > 128:  # bwrap reports a death by signal N as 128 + N
                returncode = 128 - returncode
            if tested:
                status, reason = _classify_tested(timed_out, returncode, records, timeout)
            else:
                status, reason = _classify(timed_out, returncode, records, token, timeout)
            tail = processes.tail(tmp / "output", output_chars)
    finally:
        for fd in fds:
            os.close(fd)
        processes.remove_tree(tmp)
    return ExecResult(status == "passed", status, reason, tail, time.monotonic() - start, isolated)


def _classify_tested(timed_out: bool, returncode: int, records: list[bytes], timeout: float) -> tuple[Status, str]:
    if timed_out:
        return "timeout", f"wall-clock timeout after {timeout:g} s"
    try:
        verdict = json.loads(records[0])
        status, reason = str(verdict["status"]), str(verdict["reason"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        return "error", "the checker ended without a verdict (killed by its own limits?)"
    if status in ("passed", "failed", "error"):
        return status, reason  # type: ignore[return-value]
    # "gone": the solution's process ended while the tests were running
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return "killed", _SIGNAL_REASONS.get(sig, f"killed by {sig.name}")
    if returncode == 0:
        return "failed", "process exited with status 0 before the tests finished"
    return "error", f"process exited with status {returncode} before the tests finished"


def run_many(
    programs: Sequence[str | TestedProgram],
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "executing",
    **limits: float | int | bool | None,
) -> list[ExecResult]:
    """Run programs in parallel (a pool of `workers` threads, each waiting on one sandboxed process); results in order.

    workers defaults to the number of CPUs. `limits` are passed to `run_program` (timeout, memory_mb, isolation, ...).
    A sandbox that fails to start or to clean up (an OS error) is that program's failed result, never an exception
    here; bad limits and isolation="strict" without namespaces raise before anything runs.
    """
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    defaults = {"timeout": 10.0, "memory_mb": 2048, "file_size_mb": 16, "max_processes": 64}
    checked = defaults | {k: v for k, v in limits.items() if k in defaults}
    _check_limits(**checked)  # type: ignore[arg-type]
    isolation_in_use(limits.get("isolation", "auto"))  # type: ignore[arg-type]
    results: list[ExecResult | None] = [None] * len(programs)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(programs), desc=desc, disable=not progress, unit="prog") as bar,
    ):
        futures = {pool.submit(_run_safely, code, limits): i for i, code in enumerate(programs)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [r for r in results if r is not None]


def _run_safely(program: str | TestedProgram, limits: dict) -> ExecResult:
    try:
        return run_program(program, **limits)
    except Exception as exc:  # noqa: BLE001 - a crashed sandbox is a failed sample, not a crashed evaluation
        return ExecResult(False, "error", f"sandbox failure: {type(exc).__name__}: {exc}"[:1000], "", 0.0)
