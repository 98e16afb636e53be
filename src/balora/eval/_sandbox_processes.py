"""Process plumbing of `balora.eval.sandbox`: waiting, reading results, and killing whatever a sample left behind."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

RESULT_CAP = 64 * 1024


def _stray_pids(session: int) -> list[int]:
    """Live (non-zombie) processes in the given session or process group."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we listed /proc
        state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
        if state not in (b"Z", b"X") and session in (pgrp, sid):
            found.append(int(name))
    return found


def _kill_session(session: int) -> None:
    """SIGKILL the program's process group, then anything still in its session (a process may change group)."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group already ended
    for _ in range(200):
        pids = _stray_pids(session)
        if not pids:
            return
        _kill_each(pids)
    raise RuntimeError(f"sandbox: processes {pids} of session {session} survived 200 rounds of SIGKILL")


def _kill_each(pids: list[int]) -> None:
    """SIGKILL every pid (one that already ended is skipped), then give the kernel a moment to reap them."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.005)


def wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process to exit; return True if it timed out. Uses a pidfd to wake up at once when it exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel or not Linux): Popen's polling wait
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return True
        return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return not ready


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < RESULT_CAP:
        try:
            chunk = os.read(fd, RESULT_CAP - size)
        except BlockingIOError:  # nothing more now; a stray writer may still hold the pipe open
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def tail(path: Path, chars: int) -> str:
    if not path.is_file():  # an unguarded program may delete its own output file
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def remove_tree(path: Path) -> None:
    # A program may leave read-only directories behind (as a non-root user rmtree then fails): open them up, retry.
    def make_writable_and_retry(func, failed_path, exc_info):  # noqa: ANN001 - shutil's onerror signature
        if issubclass(exc_info[0], FileNotFoundError):  # an unguarded program may delete its own directory
            return
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path):
            os.chmod(failed_path, 0o700)
        func(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)


def stop(proc: subprocess.Popen, marker: str) -> None:
    """Kill a process's session, then any process still carrying `marker` (the sample's temporary directory) in its
    command line: a PID namespace dies with its first process, but the kernel empties it asynchronously."""
    _kill_session(proc.pid)
    proc.wait()
    needle = marker.encode()
    for _ in range(400):
        left = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if needle in f.read():
                        left.append(int(name))
            except (FileNotFoundError, ProcessLookupError):
                continue
        left = [pid for pid in left if pid != os.getpid() and pid in _live(left)]
        if not left:
            return
        _kill_each(left)
    raise RuntimeError(f"sandbox: processes {left} of {marker} survived 400 rounds of SIGKILL")


def _live(pids: list[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    live.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return live
