"""
chatterd as its users run it: ``twistd -n chatterd`` (the plugin) and
``twistd -ny chatterd.tac`` in a child process, serving TLS with the generated
certificate, checked with real HTTPS clients that verify it, over HTTP/2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import treq
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests import pgcluster, tlsclient
from tests.harness import query
from tests.ollama_emulator import Behaviour, start_emulator
from tests.phone import read_as_phone

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """
    A chatterd child process, its output collected in a file.
    """

    def __init__(self, case: TestCase, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.dir = Path(case.mktemp())
        self.dir.mkdir(parents=True)
        self.log = self.dir / "output.log"
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                TWISTD + ["--nodaemon", "--pidfile=", *argv],
                cwd=self.dir, env=environ, stdout=out, stderr=subprocess.STDOUT,
            )
        case.addCleanup(self.stop)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """
        Wait for chatterd's "listening on" line, logged once every service started.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"chatterd exited with {self.process.returncode}:\n{self.output()}")
            if "listening on" in self.output():
                return
            time.sleep(0.05)
        raise AssertionError(f"chatterd did not start serving:\n{self.output()}")

    def stop(self) -> int:
        """
        SIGTERM, as systemd stops it; returns the exit status, 0 for a clean
        stop (twistd re-raises the signal to exit, which systemd counts as clean).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return 0 if self.process.returncode == -signal.SIGTERM else self.process.returncode


class ServiceTests(TestCase):
    timeout = 180

    async def start(self, *extra: str, tac: bool = False, env: dict[str, str] | None = None) -> Daemon:
        self.emulator = await start_emulator(self)
        self.port = free_port()
        self.certs = Path(self.mktemp()).resolve()
        listen = f"ssl:{self.port}:interface=127.0.0.1"
        if tac:
            env = {"CHATTERD_LISTEN": listen, "CHATTERD_CERTS": str(self.certs),
                   "CHATTERD_OLLAMA": self.emulator.url, **(env or {})}
            argv = ["--python", str(ROOT / "chatterd.tac")]
        else:
            argv = ["chatterd", "--listen", listen, "--certs", str(self.certs), "--ollama", self.emulator.url, *extra]
        daemon = Daemon(self, argv, env)
        await deferToThread(daemon.wait_until_serving)
        self.cafile = str(self.certs / "chatterd.crt")
        return daemon

    async def h2(self, path: str, **kwargs: object) -> tlsclient.Reply:
        return await deferToThread(tlsclient.h2_request, "127.0.0.1", self.port, path, self.cafile, **kwargs)

    async def test_plugin_serves_http2_with_its_certificate(self) -> None:
        """
        ``twistd chatterd`` generates its certificate, logs its fingerprint,
        and serves the Chatter and LLM APIs over verified HTTP/2 with no
        deprecation warnings.
        """
        daemon = await self.start("--database", pgcluster.fresh_database())
        reply = await self.h2("/")
        self.assertEqual((reply.alpn, reply.status), ("h2", 200))
        self.assertEqual(json.loads(reply.body), "EECS Reactive chatterd")

        body = json.dumps({"username": "ann", "message": "over h2"}).encode()
        reply = await self.h2("/postchatt", method="POST", body=body, headers={"content-type": "application/json"})
        self.assertEqual((reply.status, json.loads(reply.body)), (200, {}))
        reply = await self.h2("/getchatts")
        self.assertEqual([c[:2] for c in json.loads(reply.body)], [["ann", "over h2"]])

        self.emulator.models["paced"] = Behaviour(delay=0.05)
        chat = {"appID": "app", "model": "paced", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        reply = await self.h2("/llmchat", method="POST", body=json.dumps(chat).encode())
        self.assertEqual(reply.status, 200)
        self.assertNotIn("connection", reply.headers)
        self.assertEqual(read_as_phone(reply.body).bubble, "Hello, world!")
        self.assertGreaterEqual(len(reply.chunks), 5)  # a DATA frame per line as it came, not one lump

        reply = await deferToThread(tlsclient.https_request, "127.0.0.1", self.port, "/", self.cafile)
        self.assertEqual(reply.status, 200)
        self.assertEqual(daemon.stop(), 0)
        output = daemon.output()
        self.assertIn("SHA-256", output)
        self.assertIn(str(self.certs / "chatterd.crt"), output)
        self.assertIn("GET / 200", output)
        self.assertNotIn("DeprecationWarning", output)
        self.assertNotIn("Traceback", output)

    async def test_sigterm_drains_streams_and_loses_nothing(self) -> None:
        """
        SIGTERM while a stream runs: chatterd waits the grace period, ends it
        with an error frame, stores the partial reply, and exits cleanly.
        """
        dsn = pgcluster.fresh_database()
        daemon = await self.start("--database", dsn, "--grace", "1")
        self.emulator.models["stall"] = Behaviour(reply=["Part", "ial"], stall_after=1)
        chat = {"appID": "app", "model": "stall", "messages": [{"role": "user", "content": "Hi"}]}
        reply = Deferred.fromCoroutine(self.h2("/llmchat", method="POST", body=json.dumps(chat).encode()))
        await self.emulator.when_stalled()
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        reply = await reply
        self.assertGreaterEqual(time.monotonic() - started, 0.9)  # the grace period was given
        view = read_as_phone(reply.body)
        self.assertEqual(view.bubble.split("\n")[0], "Part")
        self.assertEqual(len(view.errors), 1, daemon.output())
        self.assertIn("shutting down", view.errors[0])
        self.assertEqual(await deferToThread(daemon.process.wait, 30), -signal.SIGTERM)
        self.assertEqual(query(dsn, "SELECT username, message FROM chatts ORDER BY seq"),
                         [("user", "Hi"), ("assistant", "Part")])
        self.assertEqual(await self.emulator.requests[-1].ended(), "client_left")

    async def test_embedded_database(self) -> None:
        """
        Without --database, chatterd runs its own PostgreSQL under --data-dir,
        keeps the data across restarts, and stops the server when it stops.
        """
        data = pgcluster.scratch_dir("chd")
        data.chmod(0o755)  # as root, the server's own account must reach its directory
        self.addCleanup(lambda: __import__("shutil").rmtree(data, ignore_errors=True))
        daemon = await self.start("--data-dir", str(data))
        body = json.dumps({"username": "u", "message": "kept"}).encode()
        reply = await self.h2("/postchatt", method="POST", body=body)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(daemon.stop(), 0, daemon.output())
        self.assertFalse((data / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL still runs")

        daemon = await self.start("--data-dir", str(data))
        reply = await self.h2("/getchatts")
        self.assertEqual([c[1] for c in json.loads(reply.body)], ["kept"])
        self.assertEqual(daemon.stop(), 0, daemon.output())

    async def test_json_logs_and_metrics(self) -> None:
        """
        --log-format json makes every log line a JSON object; --metrics serves
        Prometheus metrics on a listener of its own.
        """
        metrics = free_port()
        daemon = await self.start("--database", pgcluster.fresh_database(), "--log-format", "json",
                                  "--metrics", f"tcp:{metrics}:interface=127.0.0.1")
        await self.h2("/")
        response = await treq.get(f"http://127.0.0.1:{metrics}/metrics", persistent=False)
        text = (await treq.content(response)).decode()
        self.assertIn('chatterd_requests_total{route="/",status="200"} 1.0', text)
        self.assertEqual(daemon.stop(), 0)
        records = [json.loads(line) for line in daemon.output().splitlines()]
        access = [r for r in records if r.get("path") == "/"]
        self.assertEqual([(r["method"], r["status"]) for r in access], [("GET", 200)])
        self.assertTrue(all({"time", "level", "namespace", "message"} <= set(r) for r in records))

    async def test_tac(self) -> None:
        """
        ``twistd -ny chatterd.tac`` takes the same settings from the environment.
        """
        daemon = await self.start(tac=True, env={"CHATTERD_DATABASE": pgcluster.fresh_database()})
        reply = await self.h2("/")
        self.assertEqual((reply.alpn, reply.status), ("h2", 200))
        self.assertEqual(daemon.stop(), 0)

    async def test_bad_option_exits(self) -> None:
        """
        A bad option makes twistd print the problem and exit non-zero.
        """
        daemon = Daemon(self, ["chatterd", "--heartbeat", "soon"])
        status = await deferToThread(daemon.process.wait, 60)
        self.assertNotEqual(status, 0)
        self.assertIn("--heartbeat: not a number", daemon.output())
