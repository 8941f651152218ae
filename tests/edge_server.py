"""
chatterd as a real ``twistd`` child process for the edge tests, started once
per configuration and shared by the tests that use it (starting one costs a
few seconds; trial has no ``setUpClass``).  Each configuration is started on
first use and stopped at interpreter exit, like :mod:`tests.pgcluster`.

Every server is pointed at one Ollama port, :func:`ollama_port`: a test that
needs Ollama starts the emulator there (:func:`start_emulator`), in the test
process, and it is stopped in that test's cleanup, as trial requires.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests import pgcluster
from tests.h2attack import rss, served
from tests.ollama_emulator import OllamaEmulator

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: glibc settings for the servers: memory freed is given back to the system
#: (large blocks are mapped apart, the heap is trimmed), so that the resident
#: memory an earlier test's flood left behind cannot hide a later test's growth.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "262144"}

_ollama_port: list[int] = []


def ollama_port() -> int:
    """Where every edge server expects Ollama (chosen on first use)."""
    if not _ollama_port:
        _ollama_port.append(free_port())
    return _ollama_port[0]


async def start_emulator(case: Any) -> OllamaEmulator:
    """
    The emulator on :func:`ollama_port`, stopped in ``case``'s cleanup.
    """
    emulator = OllamaEmulator(port=ollama_port())
    await emulator.start()
    case.addCleanup(emulator.stop)
    return emulator


class EdgeServer:
    """
    ``twistd -n --pidfile= chatterd --listen ssl:PORT:interface=127.0.0.1``
    with its own certificate directory, a fresh database and ``options``.
    """

    def __init__(self, options: list[str], *, metrics: bool = False) -> None:
        self.options = options
        self.dir = Path(tempfile.mkdtemp(prefix="chedge"))
        self.log = self.dir / "output.log"
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.cafile = str(self.dir / "certs" / "chatterd.crt")
        self.dsn = pgcluster.fresh_database("edge")
        argv = [
            "chatterd", "--listen", f"ssl:{self.port}:interface=127.0.0.1", "--certs", str(self.dir / "certs"),
            "--database", self.dsn, "--ollama", f"http://127.0.0.1:{ollama_port()}", *options,
        ]
        if self.metrics_port:
            argv += ["--metrics", f"tcp:{self.metrics_port}:interface=127.0.0.1"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                TWISTD + ["--nodaemon", "--pidfile=", *argv], cwd=self.dir,
                env={**os.environ, "PYTHONPATH": str(ROOT), **MALLOC}, stdout=out, stderr=subprocess.STDOUT,
            )
        self.error: str | None = None
        self.baseline = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.output()
                last = output.strip().splitlines()[-1:] or [""]
                self.error = (f"chatterd {' '.join(self.options)} exited with {self.process.returncode}: "
                              f"{last[0]}\n{output}")
                raise AssertionError(self.error)
            if "listening on" in self.output():
                self._warm_up()
                return
            time.sleep(0.05)
        self.error = f"chatterd did not start serving:\n{self.output()}"
        raise AssertionError(self.error)

    def _warm_up(self) -> None:
        """
        A first request, so that lazy imports and first-use caches are in
        :attr:`baseline`, the resident memory the server starts tests from.
        """
        served("127.0.0.1", self.port, self.cafile, timeout=30)
        self.baseline = rss(self.pid)

    def inflated(self) -> bool:
        """
        Whether an earlier test left the server holding much more memory than
        it started with: freed memory that stays resident would hide a later
        test's growth, so such a server is replaced.
        """
        return rss(self.pid) > self.baseline + INFLATED

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"chatterd died ({self.process.returncode}):\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def metrics(self) -> str:
        """The Prometheus text (blocking)."""
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


#: How much more resident memory than at its start makes a server unfit for memory tests.
INFLATED = 16 << 20

_lock = threading.Lock()
_servers: dict[str, EdgeServer] = {}


def server(name: str, options: list[str], *, metrics: bool = False) -> EdgeServer:
    """
    The shared server called ``name``, started (blocking: call it in a
    thread) on first use.  A configuration that failed to start fails every
    later call with the same error, without retrying.
    """
    with _lock:
        found = _servers.get(name)
        if found is not None and found.error is None and found.process.poll() is None and found.inflated():
            found.stop()  # a flood an earlier test sent left it bloated
            found = None
        if found is None:
            found = _servers[name] = EdgeServer(options, metrics=metrics)
            try:
                found.wait_until_serving()
            except AssertionError:
                found.stop()
                raise
        elif found.error is not None:
            raise AssertionError(found.error)
        found.check_alive()
        return found


@atexit.register
def stop_all() -> None:
    """Stop every server (at exit, or when a runner ends the module)."""
    with _lock:
        for s in _servers.values():
            s.stop()
        _servers.clear()
