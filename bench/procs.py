"""
Processes for the benchmark: CPU pinning, fd limits, children that die with
the bench, and per-process CPU and memory read from ``/proc``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- cores and limits --------------------------------------------------------


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """
    ``(server cores, load cores)``: the first half and the second half of the
    CPUs this process may use, or ``(None, None)`` with a single CPU.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def preexec(cpus: set[int] | None) -> Callable[[], None]:
    """A ``preexec_fn``: pin to ``cpus``, raise the fd limit, and die when the bench dies."""

    def run() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
        raise_nofile()

    return run


def pin(pids: Sequence[int], cpus: set[int] | None) -> None:
    """Pin running processes (e.g. PostgreSQL's) to ``cpus``; gone ones are skipped."""
    if not cpus:
        return
    for pid in pids:
        try:
            os.sched_setaffinity(pid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from ``/proc``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- /proc -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """
    CPU time (user + system) of every thread of ``pid``: nanosecond
    ``schedstat`` when available, else ``stat`` ticks.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


# --- child processes ---------------------------------------------------------


class Child:
    """
    A child process whose output goes to a file; stopped by :meth:`stop`
    (SIGTERM, then SIGKILL) and killed by the kernel if the bench dies.
    """

    def __init__(self, name: str, argv: list[str], log: Path, *, cpus: set[int] | None,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "ab")
        self._offset = self._out.tell()  # wait_for looks only at what this process writes
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, preexec_fn=preexec(cpus),
        )
        self.pid = self.proc.pid

    def wait_for(self, text: str, timeout: float) -> str:
        """Wait until ``text`` appears in the log; return the log so far."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                content = f.read().decode(errors="replace")
            if text in content:
                return content
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{content[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {text!r} after {timeout:g} s:\n{content[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()
        return self.proc.returncode


def run_json(argv: list[str], stdin: bytes, *, cpus: set[int] | None, timeout: float,
             env: dict[str, str] | None = None) -> bytes:
    """Run a child with ``stdin``, return its stdout; kill it after ``timeout``."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=preexec(cpus))
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"{argv[2] if len(argv) > 2 else argv[0]} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return out


def python_env(*paths: str) -> dict[str, str]:
    """This environment with ``paths`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([*paths, *([old] if old else [])])
    env.pop("PYTHONSTARTUP", None)
    return env


# --- a watchdog for the database --------------------------------------------


WATCHDOG = """
import os, shutil, signal, sys, time
parent, postmaster, base, lifetime = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
deadline = time.monotonic() + lifetime
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.5)
try:
    os.kill(postmaster, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    time.sleep(2)
except ProcessLookupError:
    pass
shutil.rmtree(base, ignore_errors=True)
"""


def start_watchdog(postmaster: int, base: Path, lifetime: float) -> subprocess.Popen[bytes]:
    """
    A process that stops PostgreSQL (SIGQUIT to its postmaster) and removes
    ``base`` if the bench dies without cleaning up, or after ``lifetime``
    seconds.  Terminate it after a normal cleanup.
    """
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(postmaster), str(base), str(lifetime)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
