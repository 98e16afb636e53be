"""Hostile generated code against the sandbox: OS isolation (namespaces), the guards, and a verdict made outside.

Each attack runs as a scored sample (a TestedProgram: the attack runs when the solution is loaded, its test is one
assert it fails), under Linux namespaces with and without the in-process guard, and with the guard alone
(isolation="off"). For each: the sample fails, this process (the evaluator) is alive, no process the sample started
is alive afterwards, and nothing appears outside the sandbox's temporary directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from balora.eval.isolation import probe
from balora.eval.sandbox import TestedProgram, run_program

NAMESPACES = probe().available
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"no Linux namespaces here: {probe().detail}")
MODES = [
    pytest.param("strict", True, marks=needs_namespaces, id="namespaces+guard"),
    pytest.param("strict", False, marks=needs_namespaces, id="namespaces-only"),
    pytest.param("off", True, id="guard-only"),
]


def live_processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains `marker`."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X") and int(name) != os.getpid():
            found.append(int(name))
    return found


def attack(code: str, isolation: str, guard: bool, **limits: float) -> tuple[object, str]:
    """Run `code` as the top of a solution whose test fails unless the verdict is forged; return (result, marker)."""
    marker = "balora-attack-" + secrets.token_hex(6)
    solution = code.replace("MARKER", marker) + "\n\ndef f(x):\n    return x\n"
    result = run_program(TestedProgram(solution, "assert f(1) == 2\n"), isolation=isolation, guard=guard, **limits)
    return result, marker


ESCAPE = """
import os, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(30)", "MARKER"]
try:
    import _posixsubprocess  # starts a process without an audit event; with a new session it leaves the group
    r, w = os.pipe()
    _posixsubprocess.fork_exec(
        sleeper, [os.fsencode(sys.executable)], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, True,
        -1, None, None, None, -1, None, False)
except Exception as exc:
    print("fork_exec:", type(exc).__name__, exc)
    try:
        import subprocess
        subprocess.Popen(sleeper, start_new_session=True)
    except Exception as exc:
        print("Popen:", type(exc).__name__, exc)
"""


@pytest.mark.parametrize(("isolation", "guard"), MODES)
def test_fork_exec_escape_does_not_outlive_the_sample(isolation: str, guard: bool):
    result, marker = attack(ESCAPE, isolation, guard)
    assert not result.passed
    assert not live_processes_with(marker)
    if guard:  # the guard refuses both routes
        assert "fork_exec: PermissionError sandbox: _posixsubprocess.fork_exec is not allowed" in result.output_tail
        assert "Popen: PermissionError sandbox: subprocess.Popen is not allowed" in result.output_tail


KILL_OTHERS = """
import os, signal
targets = [os.getppid(), EVALUATOR]
for name in os.listdir("/proc"):  # anything that looks like the evaluator
    try:
        if name.isdigit() and b"pytest" in open(f"/proc/{name}/cmdline", "rb").read():
            targets.append(int(name))
    except OSError:
        pass
for pid in targets:
    try:
        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)
        print("killed", pid)
    except Exception as exc:
        print("refused", pid, type(exc).__name__, exc)
"""


@pytest.mark.parametrize(("isolation", "guard"), MODES)
def test_pidfd_signals_reach_neither_the_evaluator_nor_pass(isolation: str, guard: bool):
    result, _ = attack(KILL_OTHERS.replace("EVALUATOR", str(os.getpid())), isolation, guard)
    assert not result.passed
    os.kill(os.getpid(), 0)  # still alive: the sandbox runs in this very process
    if guard:
        assert "refused" in result.output_tail and "killed" not in result.output_tail
    elif isolation == "strict":  # in its own PID namespace only the supervisor (its parent) can be killed
        killed = [line.split()[1] for line in result.output_tail.splitlines() if line.startswith("killed")]
        assert str(os.getpid()) not in killed


WRITES = """
import os, sqlite3
for target in TARGETS:
    for name, action in [
        ("dir_fd", lambda d: os.close(os.open("dirfd.txt", os.O_WRONLY | os.O_CREAT, dir_fd=os.open(d, os.O_RDONLY)))),
        ("mkfifo", lambda d: os.mkfifo(os.path.join(d, "fifo"))),
        ("sqlite", lambda d: sqlite3.connect(os.path.join(d, "db.sqlite")).execute("create table t (x)")),
    ]:
        try:
            action(target)
            print("wrote", name, target)
        except Exception as exc:
            print("refused", name, type(exc).__name__)
"""


@pytest.mark.parametrize(("isolation", "guard"), MODES)
def test_dir_fd_mkfifo_and_sqlite_cannot_write_outside(isolation: str, guard: bool, tmp_path: Path):
    outside = [tmp_path / "cwd", Path("/tmp") / f"balora-attack-{secrets.token_hex(4)}"]
    for d in outside:
        d.mkdir()
        os.chmod(d, 0o777)  # writable by anyone: only the sandbox stands in the way
    try:
        result, _ = attack(WRITES.replace("TARGETS", repr([str(d) for d in outside])), isolation, guard)
        assert not result.passed
        assert "wrote" not in result.output_tail and result.output_tail.count("refused") == 6
        assert [sorted(os.listdir(d)) for d in outside] == [[], []]
    finally:
        for d in outside:
            for child in d.iterdir():
                child.unlink()
            d.rmdir()


READS = """
import os
for name in os.listdir("/proc"):
    if name.isdigit() and int(name) != os.getpid():
        try:
            print(open(f"/proc/{name}/environ", "rb").read())
        except Exception as exc:
            print("refused", name, type(exc).__name__)
for pid in (EVALUATOR, os.getppid()):
    try:
        print(open(f"/proc/{pid}/environ", "rb").read())
    except Exception as exc:
        print("refused", pid, type(exc).__name__)
print("environment", sorted(os.environ))
print("passwd", os.path.exists("/etc/passwd"), "host file", os.path.exists(HOST_FILE))
"""


@pytest.mark.parametrize(("isolation", "guard"), MODES)
def test_the_evaluators_environment_cannot_be_read(
    isolation: str, guard: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    secret = "planted-" + secrets.token_hex(8)
    monkeypatch.setenv("BALORA_TEST_SECRET", secret)
    host_file = tmp_path / "host.txt"
    host_file.write_text("x")
    code = READS.replace("EVALUATOR", str(os.getpid())).replace("HOST_FILE", repr(str(host_file)))
    result, _ = attack(code, isolation, guard, output_chars=100_000)
    assert not result.passed
    assert secret not in result.output_tail and "BALORA_TEST_SECRET" not in result.output_tail
    assert "environment ['HOME', 'LANG', 'LC_ALL'," in result.output_tail  # the minimal environment only
    if isolation == "strict":  # the host's files are not there at all
        assert "passwd False host file False" in result.output_tail


@needs_namespaces
def test_an_isolated_program_runs_unprivileged_alone_and_offline():
    code = (
        "import os, socket\n"
        "procs = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print('uid', os.getuid(), 'pid', os.getpid(), 'procs', len(procs))\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "    print('network up')\n"
        "except OSError as exc:\n"
        "    print('network down', exc.errno)\n"
        "try:\n"
        "    open('/usr/balora-escape', 'w')\n"
        "except OSError as exc:\n"
        "    print('read-only', exc.errno)\n"
    )
    result = run_program(code, isolation="strict", guard=False)
    assert result.passed and result.isolated
    uid, pid, procs = (int(x) for x in result.output_tail.split()[1:6:2])
    assert uid != 0 and (os.getuid() != 0 or uid >= 2_000_000_000)  # as root: a uid of its own, unprivileged
    assert pid < 10 and procs <= 4  # its own PID namespace: bwrap's init, the supervisor, the program
    assert "network down" in result.output_tail and "read-only" in result.output_tail
    assert not Path("/usr/balora-escape").exists()


# ------------------------------------------------------------------------------------------------ the verdict
STEAL_TOKEN = """
import os, sys
frame = sys._getframe()
while frame is not None and "token" not in frame.f_locals:
    frame = frame.f_back
if frame is not None:  # the whole-program harness: write its pass token, then leave before the tests
    frame.f_locals["write"](frame.f_locals["result_fd"], b"PASS " + frame.f_locals["token"] + b"\\n")
    os._exit(0)
for fd in range(3, 256):  # the checker's layout: no token here; forge a verdict on every descriptor instead
    for line in (b'{"status": "passed", "reason": "forged"}\\n', b'["ok", ["bool", true]]\\n'):
        try:
            os.write(fd, line)
        except OSError:
            pass
os._exit(0)
"""


@pytest.mark.parametrize(("isolation", "guard"), MODES)
def test_a_stolen_token_or_forged_report_does_not_pass(isolation: str, guard: bool):
    result, _ = attack(STEAL_TOKEN, isolation, guard)
    assert not result.passed and result.status in ("failed", "error")


def test_the_whole_program_layout_can_be_forged_by_frame_walking():
    """The documented limit of run_program(str): the program can reach the harness's pass token (docs/eval.md)."""
    result = run_program(STEAL_TOKEN + "\nassert False\n")
    assert result.passed  # forged: which is why benchmarks are scored as TestedProgram


ALWAYS_EQUAL = {
    "object": "class Answer:\n    def __eq__(self, other):\n        return True\n",
    "int subclass": "class Answer(int):\n    def __eq__(self, other):\n        return True\n",
    "str subclass": "class Answer(str):\n    __hash__ = str.__hash__\n    __eq__ = lambda self, other: True\n",
    "list subclass": "class Answer(list):\n    def __eq__(self, other):\n        return True\n",
}


@pytest.mark.parametrize("definition", ALWAYS_EQUAL.values(), ids=ALWAYS_EQUAL.keys())
def test_always_equal_objects_do_not_pass(definition: str):
    solution = definition + "\ndef f(x):\n    return Answer()\n"
    tests = "assert f(1) == 2\nassert f('a') == 'b'\nassert f([]) == [3]\n"
    assert not run_program(TestedProgram(solution, tests)).passed
    assert run_program(solution + tests).passed  # in one process the object's own __eq__ decides (documented)
