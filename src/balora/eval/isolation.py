"""OS isolation for the code sandbox: Linux namespaces through bubblewrap (`bwrap`), no home-made container.

Each sandboxed program runs under `bwrap` in new PID, network, IPC, UTS and cgroup namespaces and a mount namespace
whose root is an empty read-only tmpfs holding only read-only binds of what Python needs (`/usr`, the interpreter's
prefixes and the virtual environment), `/etc/ld.so.cache`, a fresh `/proc` of its own PID
namespace, a minimal `/dev`, and one writable directory: the sample's own temporary directory. The environment is
cleared (`--clearenv`); `--die-with-parent` ends the namespace (and so every process in it) when the evaluator's
process goes away. As root, `bwrap` runs without a user namespace and `setpriv` drops to an unprivileged uid (one
per concurrent sandbox, so RLIMIT_NPROC binds each alone) with no capabilities and `no_new_privs`; as another user,
a user namespace is used and the program keeps that user's (unprivileged) uid outside.

`probe()` says whether this works here (bwrap installed, namespaces allowed); `scripts/setup.sh` installs bubblewrap
with apt where it is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "strict", "off"]
ISOLATION_CHOICES: tuple[str, ...] = ("auto", "strict", "off")

# uids handed to concurrent sandboxes when the evaluator is root: far above ordinary users, with no passwd entry; a
# block of 4,096 per evaluator process (by pid), so that two evaluators (pytest-xdist workers) do not share one.
_UID_BASE = 2_000_000_000
_UID_COUNT = 4096
_uids_lock = threading.Lock()
_uids_free: list[int] = []
_uids_pid = 0

FALLBACK_WARNING = (
    "code sandbox: Linux namespaces are unavailable ({reason}); generated code runs with the in-process guards only "
    "(audit hook, rlimits, process-group kill), which are not a security boundary. Install bubblewrap "
    "(`apt-get install bubblewrap`), or pass --isolation strict to refuse running without it."
)


class IsolationUnavailable(RuntimeError):
    """Namespaces were required (`isolation="strict"`) but cannot be used here; the message says why and the fix."""


@dataclass(frozen=True)
class Probe:
    available: bool
    detail: str  # "bubblewrap 0.8.0" or why not


@functools.cache
def probe() -> Probe:
    """Whether bubblewrap can start a program in the namespaces used here (run once per process, ~50 ms)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Probe(False, "bwrap (bubblewrap) is not installed")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() or "bubblewrap"
    with reserved_uid() as uid:
        command = bwrap_command(bwrap, uid, writable=None) + ["/bin/true"]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return Probe(False, f"bwrap failed: {done.stderr.strip()[-300:] or f'exit status {done.returncode}'}")
    return Probe(True, version)


def resolve(isolation: Isolation) -> Probe:
    """The isolation to use: raises IsolationUnavailable for "strict" when namespaces do not work here."""
    if isolation not in ISOLATION_CHOICES:
        raise ValueError(f"isolation must be one of {ISOLATION_CHOICES}, got {isolation!r}")
    if isolation == "off":
        return Probe(False, "turned off (isolation='off')")
    found = probe()
    if isolation == "strict" and not found.available:
        raise IsolationUnavailable(
            f"--isolation strict: Linux namespaces are unavailable ({found.detail}); install bubblewrap "
            "(`apt-get install bubblewrap`, or run scripts/setup.sh) or use --isolation auto to run with the "
            "in-process guards only"
        )
    return found


@contextmanager
def reserved_uid() -> Iterator[int | None]:
    """An unprivileged uid for one sandbox when the evaluator is root (None otherwise), returned to the pool after."""
    if os.geteuid() != 0:
        yield None
        return
    global _uids_pid
    with _uids_lock:
        if _uids_pid != os.getpid():  # first use in this process (or after a fork): this process's block
            first = _UID_BASE + (os.getpid() % 262_144) * _UID_COUNT
            _uids_free[:] = range(first + _UID_COUNT - 1, first - 1, -1)
            _uids_pid = os.getpid()
        if not _uids_free:
            raise RuntimeError(f"more than {_UID_COUNT} concurrent sandboxes")
        uid = _uids_free.pop()
    try:
        yield uid
    finally:
        with _uids_lock:
            _uids_free.append(uid)


def _readable_roots() -> list[str]:
    """Directories the interpreter needs, as real paths, deduplicated and without nested duplicates."""
    # The prefixes hold the standard library and site-packages; nothing else of the host (no /home, /root, /etc).
    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)}
    paths = set()
    for path in wanted:
        paths.add(os.path.abspath(path))  # the path as Python sees it (a venv's bin/python symlink) ...
        paths.add(os.path.realpath(path))  # ... and where it points
    paths = {p for p in paths if os.path.isdir(p) and p != "/"}
    roots = sorted(p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths))
    return [p for p in roots if not (p == "/usr" or p.startswith("/usr/"))]


def _ancestors(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        parts = Path(path).parts[1:-1]
        for i in range(1, len(parts) + 1):
            ancestor = "/" + "/".join(parts[:i])
            if ancestor not in out:
                out.append(ancestor)
    return out


def bwrap_command(
    bwrap: str,
    uid: int | None,
    *,
    writable: str | None,
    readable: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> list[str]:
    """The `bwrap ... [setpriv ...]` prefix of a sandboxed command; `writable` is bound read-write at its own path.

    The environment is cleared, then set to `env`."""
    command = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    command += ["--die-with-parent", "--new-session", "--clearenv"]
    if uid is None:  # not root: an unprivileged user namespace; the program keeps this (unprivileged) user's uid
        command += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    command += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged /usr: symlinks; else real directories
        path = f"/{name}"
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):  # the dynamic linker's index of /usr/lib; nothing else of /etc
        command += ["--perms", "0755", "--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    roots = _readable_roots()

    def under_root(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in roots)

    extra = [p for p in readable if p and not under_root(p)]
    for ancestor in _ancestors(roots + extra + ([writable] if writable else [])):
        # World-traversable parents whatever the host's modes (/root is 0700 here); /usr is bound above.
        if ancestor != "/usr" and not ancestor.startswith("/usr/") and not under_root(ancestor):
            command += ["--perms", "0755", "--dir", ancestor]
    for path in roots + extra:
        command += ["--ro-bind", path, path]
    command += ["--proc", "/proc", "--dev", "/dev"]
    if writable:
        command += ["--bind", writable, writable, "--chdir", writable]
    for key, value in (env or {}).items():
        command += ["--setenv", key, value]
    command += ["--remount-ro", "/", "--"]
    if uid is not None:  # root: become an unprivileged user with no capabilities before anything untrusted runs
        command += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        command += ["--bounding-set=-all", "--no-new-privs"]
    return command
