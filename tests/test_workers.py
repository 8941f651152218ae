"""
``twistd -n chatterd --workers 2`` for real, over TLS: both workers serve,
a killed worker is replaced, SIGTERM drains every worker, SIGHUP reloads
under load refusing nothing and cutting no stream, metrics add up, and an
appID's turns are ordered across workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from chatterd import workers
from tests import pgcluster, tlsclient
from tests.harness import query
from tests.ollama_emulator import Behaviour, start_emulator
from tests.phone import read_as_phone
from tests.test_service import Daemon, free_port

SERVING = re.compile(r"worker (\d+) \(pid (\d+), generation (\d+)\) serving")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """
    Poll ``condition`` (in a thread: it may block) until it holds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sockets_to(port: int) -> set[int]:
    """
    The inodes of this machine's established TCP connections to ``port``.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes


def holds_connection_to(pid: int, port: int) -> bool:
    """
    Whether process ``pid`` has an established TCP connection to ``port``.
    """
    wanted = sockets_to(port)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in wanted:
            return True
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def leave_after_first_frame(port: int, cafile: str, body: bytes) -> None:
    """
    POST a stream over HTTP/1.1 and TLS, read until its first frame, hang up.
    """
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with tlsclient.context(cafile).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"POST /llmchat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            while b"data:" not in seen:
                chunk = sock.recv(4096)
                if not chunk:
                    raise AssertionError(f"the stream ended before its first frame: {seen!r}")
                seen += chunk


def chat(appid: str, model: str, content: str = "Hi") -> bytes:
    return json.dumps({"appID": appid, "model": model, "messages": [{"role": "user", "content": content}]}).encode()


class WorkerTests(TestCase):
    timeout = 240

    async def start(self, *extra: str) -> Daemon:
        self.emulator = await start_emulator(self)
        self.port = free_port()
        self.certs = Path(self.mktemp()).resolve()
        self.dsn = pgcluster.fresh_database()
        listen = f"ssl:{self.port}:interface=127.0.0.1"
        daemon = Daemon(self, ["chatterd", "--listen", listen, "--certs", str(self.certs), "--database", self.dsn,
                               "--ollama", self.emulator.url, "--workers", "2", *extra])
        self.cafile = str(self.certs / "chatterd.crt")
        await deferToThread(wait_for, lambda: len(self.serving(daemon)) >= 2 or daemon.process.poll() is not None,
                            "two workers serving")
        self.assertEqual(sorted(self.serving(daemon)), [1, 2], daemon.output())
        return daemon

    @staticmethod
    def serving(daemon: Daemon, generation: int = 1) -> dict[int, int]:
        """
        Worker number -> pid, of the workers of ``generation`` that said they serve.
        """
        return {int(n): int(pid) for n, pid, g in SERVING.findall(daemon.output()) if int(g) == generation}

    def h2(self, path: str, **kwargs: Any) -> Deferred[tlsclient.Reply]:
        return deferToThread(tlsclient.h2_request, "127.0.0.1", self.port, path, self.cafile, **kwargs)

    def served_by(self, daemon: Daemon, route: str) -> set[int]:
        """
        The workers whose access log shows ``route`` answered 200.
        """
        return {int(n) for n in re.findall(rf"\[worker (\d+) chatterd\.site#info\] \S+ {re.escape(route)} 200",
                                          daemon.output())}

    async def test_both_workers_serve_and_metrics_add_up(self) -> None:
        """
        Connections spread over both workers; the parent's metrics page adds
        up what each counted; every log line names its worker.
        """
        metrics = free_port()
        daemon = await self.start("--metrics", f"tcp:{metrics}:interface=127.0.0.1")
        self.emulator.models["paced"] = Behaviour(delay=0.05)
        sent = 0
        for _ in range(5):  # the kernel decides who accepts: another batch if one worker took them all
            replies = await gatherResults([self.h2("/llmchat", method="POST", body=chat(f"app{sent + i}", "paced"))
                                           for i in range(16)])
            sent += 16
            self.assertEqual([r.status for r in replies], [200] * 16)
            self.assertEqual({read_as_phone(r.body).bubble for r in replies}, {"Hello, world!"})
            if self.served_by(daemon, "/llmchat") == {1, 2}:
                break
        self.assertEqual(self.served_by(daemon, "/llmchat"), {1, 2}, daemon.output())

        # gauges are read every second in a worker: wait for the streams' end to show
        async def page() -> str:
            response = await treq.get(f"http://127.0.0.1:{metrics}/metrics", persistent=False)
            return (await treq.content(response)).decode()

        text = await page()
        self.assertIn(f'chatterd_requests_total{{route="/llmchat",status="200"}} {float(sent)}', text)
        self.assertIn(f"chatterd_frames_relayed_total {float(sent * 5)}", text)  # 4 chunks + done each
        await deferToThread(time.sleep, 1.5)
        self.assertIn("chatterd_active_streams 0.0", await page())
        for line in daemon.output().splitlines():
            if "chatterd.site#info" in line:
                self.assertRegex(line, r"\[worker [12] chatterd\.site#info\]")

    async def test_a_killed_worker_is_replaced_while_the_other_streams(self) -> None:
        """
        SIGKILL one worker while the other streams: the stream carries on to
        its end, and the parent starts another worker in the dead one's place.
        """
        daemon = await self.start()
        pids = self.serving(daemon)
        self.emulator.models["slow"] = Behaviour(reply=[f"{i} " for i in range(12)], delay=0.15)
        reply = self.h2("/llmchat", method="POST", body=chat("app", "slow"))
        emulator_port = int(self.emulator.url.rsplit(":", 1)[1])
        await deferToThread(wait_for, lambda: any(holds_connection_to(p, emulator_port) for p in pids.values()),
                            "a worker streaming")
        streaming = next(n for n, p in pids.items() if holds_connection_to(p, emulator_port))
        other = 3 - streaming
        os.kill(pids[other], signal.SIGKILL)
        reply = await reply
        view = read_as_phone(reply.body)
        self.assertEqual((reply.status, view.errors), (200, []))
        self.assertEqual(view.bubble, "".join(f"{i} " for i in range(12)))
        await deferToThread(wait_for, lambda: f"worker {other} (pid" in daemon.output().split("starting another")[-1],
                            "a new worker")
        output = daemon.output()
        self.assertIn(f"worker {other} (pid {pids[other]}) was killed by signal 9 (SIGKILL)", output)
        replacement = [int(p) for n, p, g in SERVING.findall(output) if int(n) == other][-1]
        self.assertNotEqual(replacement, pids[other])
        self.assertTrue(alive(pids[streaming]))
        self.assertEqual((await self.h2("/healthz")).status, 200)

    async def test_workers_of_a_killed_parent_stop(self) -> None:
        """
        SIGKILL to the parent (nothing supervises the workers any more): each
        worker notices within seconds, stops as at shutdown, and exits.
        """
        daemon = await self.start()
        pids = self.serving(daemon)
        daemon.process.kill()
        await deferToThread(daemon.process.wait, 30)
        await deferToThread(wait_for, lambda: not [p for p in pids.values() if alive(p)], "the orphans to exit", 30)
        self.assertEqual(daemon.output().count("the parent process has gone; stopping"), 2)

    async def test_sigterm_drains_every_worker(self) -> None:
        """
        SIGTERM to the parent: each worker gives its running streams their
        grace; they end normally, their replies are stored, and all exit.
        """
        daemon = await self.start()
        pids = self.serving(daemon)
        self.emulator.models["slow"] = Behaviour(reply=[f"{i} " for i in range(8)], delay=0.15)
        emulator_port = int(self.emulator.url.rsplit(":", 1)[1])
        replies = []
        for i in range(16):  # until both workers hold streams (the kernel decides who accepts)
            replies.append(self.h2("/llmchat", method="POST", body=chat(f"app{i}", "slow")))
            await deferToThread(wait_for, lambda: len(self.emulator.requests) == len(replies), "the stream")
            busy = {n for n, p in pids.items() if holds_connection_to(p, emulator_port)}
            if len(replies) >= 4 and busy == {1, 2}:
                break
        self.assertEqual(busy, {1, 2}, "the streams did not spread over both workers")
        daemon.process.send_signal(signal.SIGTERM)
        for reply in await gatherResults(replies):
            view = read_as_phone(reply.body)
            self.assertEqual((reply.status, view.errors), (200, []))
            self.assertEqual(view.bubble, "".join(f"{i} " for i in range(8)))
        self.assertEqual(await deferToThread(daemon.process.wait, 60), -signal.SIGTERM, daemon.output())
        for i in range(len(replies)):
            self.assertEqual(query(self.dsn, "SELECT username FROM chatts WHERE appid = %s ORDER BY seq", (f"app{i}",)),
                             [("user",), ("assistant",)])
        self.assertFalse([p for p in pids.values() if alive(p)])

    async def test_sighup_under_load_refuses_nothing_and_cuts_no_stream(self) -> None:
        """
        SIGHUP while streams run and new requests keep coming: a new
        generation takes over, the old one finishes its streams and exits;
        no request fails, no connection is refused, no stream is cut.
        """
        daemon = await self.start()
        old = self.serving(daemon)
        self.emulator.models["long"] = Behaviour(reply=[f"{i} " for i in range(40)], delay=0.1)
        streams = [self.h2("/llmchat", method="POST", body=chat(f"long{i}", "long")) for i in range(6)]
        await deferToThread(wait_for, lambda: len(self.emulator.requests) == 6, "six streams")

        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def load(kind: str) -> None:
            while not stop.is_set():
                try:
                    if kind == "h2":
                        reply = tlsclient.h2_request("127.0.0.1", self.port, "/getchatts", self.cafile)
                    else:
                        reply = tlsclient.https_request("127.0.0.1", self.port, "/postchatt", self.cafile,
                                                        method="POST", body=json.dumps({"username": "u", "message": "m"}))
                    if reply.status != 200:
                        failures.append(f"{kind}: {reply.status} {reply.body[:200]!r}")
                    answered[0] += 1
                except Exception as e:  # a refused or cut connection
                    failures.append(f"{kind}: {e!r}")

        threads = [threading.Thread(target=load, args=(kind,)) for kind in ("h2", "h2", "http/1.1", "http/1.1")]
        for t in threads:
            t.start()
        try:
            await deferToThread(time.sleep, 0.5)
            daemon.process.send_signal(signal.SIGHUP)
            await deferToThread(wait_for, lambda: len(self.serving(daemon, 2)) == 2, "the new generation")
            await deferToThread(time.sleep, 0.5)
            before = answered[0]
            await deferToThread(time.sleep, 0.5)
            self.assertGreater(answered[0], before, "nothing answered after the reload")
        finally:
            stop.set()
            for t in threads:
                await deferToThread(t.join, 30)
        self.assertEqual(failures, [])
        for reply in await gatherResults(streams):
            view = read_as_phone(reply.body)
            self.assertEqual((reply.status, view.errors), (200, []))
            self.assertEqual(view.bubble, "".join(f"{i} " for i in range(40)))
        await deferToThread(wait_for, lambda: not [p for p in old.values() if alive(p)], "the old workers to exit")
        output = daemon.output()
        waited = [int(n) for n in re.findall(r"retiring: no new connections; waiting up to \S+ s for (\d+)", output)]
        self.assertEqual(len(waited), 2, output)
        self.assertGreaterEqual(sum(waited), 6, "the streams had ended before the old workers retired")
        self.assertEqual(output.count("of generation 1"), 2, output)
        self.assertNotIn("still open after the reload grace", output)
        new = self.serving(daemon, 2)
        self.assertFalse(set(new.values()) & set(old.values()))
        self.assertEqual(query(self.dsn, "SELECT count(*) FROM chatts WHERE username = 'u'"),
                         [(sum(1 for line in output.splitlines() if "POST /postchatt 200" in line),)])

    async def test_limits_heartbeats_and_leaving_hold_in_workers(self) -> None:
        """
        What one process does, each worker does: ``--max-streams`` (a total,
        split between the workers) gives 503 with Retry-After past it; a
        silent model gets heartbeats; a client that leaves closes Ollama's
        request and its partial reply is stored.
        """
        await self.start("--max-streams", "2", "--heartbeat", "0.2")
        self.emulator.models["held"] = Behaviour(reply=["Part", "ial"], stall_after=1)
        replies = [self.h2("/llmchat", method="POST", body=chat(f"busy{i}", "held")) for i in range(3)]
        # each is held (it reached Ollama) or refused, wherever the kernel put it
        await deferToThread(wait_for, lambda: len(self.emulator.requests) + sum(r.called for r in replies) >= 3,
                            "each stream held or refused")
        self.emulator.release()
        done = await gatherResults(replies)
        refused = [r for r in done if r.status == 503]
        self.assertTrue(refused, "two workers of one stream each held three streams")
        self.assertEqual(len(refused) + sum(r.status == 200 for r in done), 3)
        self.assertEqual(refused[0].headers.get("retry-after"), "2")
        self.assertIn("limit", json.loads(refused[0].body)["error"])

        self.emulator.models["loading"] = Behaviour(first_byte_delay=0.7)
        reply = await self.h2("/llmchat", method="POST", body=chat("beats", "loading"))
        self.assertIn(b": ping", reply.body)
        self.assertEqual(read_as_phone(reply.body).bubble, "Hello, world!")

        self.emulator.models["endless"] = Behaviour(reply=[f"{i} " for i in range(200)], delay=0.05)
        leaving = deferToThread(leave_after_first_frame, self.port, self.cafile, chat("gone", "endless"))
        await leaving
        self.assertEqual(await self.emulator.requests[-1].ended(), "client_left")
        await deferToThread(wait_for, lambda: len(query(self.dsn, "SELECT 1 FROM chatts WHERE appid = 'gone'")) == 2,
                            "the partial reply stored", 10)
        [(reply_text,)] = query(self.dsn, "SELECT message FROM chatts WHERE appid = 'gone' AND username = 'assistant'")
        self.assertTrue(reply_text.startswith("0 "), reply_text)

    async def test_an_appids_turns_are_ordered_across_workers(self) -> None:
        """
        Overlapping requests of one appID, spread over both workers, take
        turns: each sees the whole conversation before it, replies included.
        """
        daemon = await self.start()
        self.emulator.models["paced"] = Behaviour(delay=0.05)
        turns = 0
        for _ in range(5):  # another batch if one worker took them all
            replies = await gatherResults([self.h2("/llmchat", method="POST", body=chat("shared", "paced", f"q{i}"))
                                           for i in range(8)])
            turns += 8
            self.assertEqual([r.status for r in replies], [200] * 8)
            if self.served_by(daemon, "/llmchat") == {1, 2}:
                break
        self.assertEqual(self.served_by(daemon, "/llmchat"), {1, 2}, daemon.output())
        rows = query(self.dsn, "SELECT username, message FROM chatts WHERE appid = 'shared' ORDER BY seq")
        self.assertEqual([r[0] for r in rows], ["user", "assistant"] * turns)
        sent = sorted((r.json["messages"] for r in self.emulator.requests), key=len)
        self.assertEqual([len(m) for m in sent], list(range(1, 2 * turns, 2)))
        for earlier, later in zip(sent, sent[1:]):
            self.assertEqual(later[: len(earlier)], earlier)  # the history grows, never reorders
            self.assertEqual(later[len(earlier)]["role"], "assistant")


class WorkerOptionTests(TestCase):
    """
    What each worker is told.
    """

    def test_max_streams_is_split_and_the_client_share_follows(self) -> None:
        from chatterd.tap import Options

        options = Options()
        options.parseOptions(["--workers", "3", "--max-streams", "1000", "--metrics", "tcp:9100"])
        mine = workers.worker_options(options)
        self.assertEqual((mine["workers"], mine["max-streams"], mine["max-client-streams"], mine["metrics"]),
                         (1, 334, 83, None))
        options = Options()
        options.parseOptions(["--workers", "2", "--max-client-streams", "7"])
        self.assertEqual(workers.worker_options(options)["max-client-streams"], 7)

    def test_auto_is_one_per_cpu(self) -> None:
        from chatterd.tap import Options

        options = Options()
        options.parseOptions(["--workers", "auto"])
        self.assertEqual(options["workers"], os.cpu_count())


class SingleProcessTests(TestCase):
    timeout = 120

    async def test_sighup_is_ignored_without_workers(self) -> None:
        """
        One process cannot reload without dropping streams: SIGHUP (by
        default the end of a process) is logged and changes nothing.
        """
        emulator = await start_emulator(self)
        port = free_port()
        daemon = Daemon(self, ["chatterd", "--listen", f"tcp:{port}:interface=127.0.0.1",
                               "--database", pgcluster.fresh_database(), "--ollama", emulator.url])
        await deferToThread(daemon.wait_until_serving)
        daemon.process.send_signal(signal.SIGHUP)
        await deferToThread(wait_for, lambda: "SIGHUP ignored" in daemon.output(), "the SIGHUP line")
        response = await treq.get(f"http://127.0.0.1:{port}/healthz", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertIsNone(daemon.process.poll())
        self.assertEqual(daemon.stop(), 0)

    async def test_the_tac_runs_workers(self) -> None:
        """
        ``chatterd.tac`` takes ``CHATTERD_WORKERS`` as ``--workers``.
        """
        emulator = await start_emulator(self)
        port = free_port()
        daemon = Daemon(self, ["--python", str(Path(__file__).resolve().parent.parent / "chatterd.tac")], {
            "CHATTERD_LISTEN": f"tcp:{port}:interface=127.0.0.1", "CHATTERD_WORKERS": "2",
            "CHATTERD_DATABASE": pgcluster.fresh_database(), "CHATTERD_OLLAMA": emulator.url,
        })
        await deferToThread(wait_for, lambda: len(WorkerTests.serving(daemon)) == 2, "two workers")
        response = await treq.get(f"http://127.0.0.1:{port}/healthz", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(daemon.stop(), 0)


class RetireTests(TestCase):
    """
    A retiring worker's connections go once what they are doing is done
    (``ChatterSite.retire``), on an in-memory transport.
    """

    def http11(self) -> tuple[Any, Any, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from chatterd.site import ChatterSite
        from tests.test_http2 import Hello

        site = ChatterSite(Hello(), clock=Clock(), max_body=1000)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        protocol.makeConnection(transport)
        return site, protocol, transport

    def test_http11_idle_connection_goes_at_once(self) -> None:
        """
        HTTP/1.1 between requests: closed at once.
        """
        site, protocol, transport = self.http11()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"hello", transport.value())
        self.assertFalse(transport.disconnecting)
        site.retire()
        self.assertTrue(transport.disconnecting)

    def test_http11_client_that_never_answers_the_close_is_cut_off(self) -> None:
        """
        TLS waits for the client's close_notify, and an idle pooled client
        never reads: a retiring connection is cut off shortly, not after
        the idle timeout (which would hold the old worker that long).
        """
        from chatterd.http2 import CLOSE_GRACE

        site, protocol, transport = self.http11()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        site.retire()
        site.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(aborted, [])
        site.clock.advance(0.1)
        self.assertEqual(aborted, [True])

    def test_http11_request_in_progress_is_answered_then_closed(self) -> None:
        """
        HTTP/1.1 with a request arriving: it is answered in full (as the
        last one: ``Connection: close``), then the connection closes.
        """
        site, protocol, transport = self.http11()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        site.retire()
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"{}")
        self.assertIn(b'{"got": 2}', transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_http11_fresh_connection_gets_its_first_answer(self) -> None:
        """
        A connection accepted just before the listeners closed has its
        first request on the way: it is answered, then the connection closes.
        """
        site, protocol, transport = self.http11()
        site.retire()
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"hello", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_http2_goes_once_no_stream_is_open(self) -> None:
        """
        HTTP/2 with a stream open: no GOAWAY yet, and a stream opened
        meanwhile is served; once the last ends, GOAWAY(NO_ERROR) and close.
        """
        import h2.events
        from h2.errors import ErrorCodes

        from tests.test_http2 import Client

        c = Client(self)
        slow = c.request(b"POST", body=b"{", end=False)
        c.site.retire()
        self.assertEqual(c.of(h2.events.ConnectionTerminated), [])
        quick = c.request()
        self.assertEqual((c.status(quick), c.body(quick)), (200, b"hello"))
        self.assertFalse(c.transport.disconnecting)
        c.h2.send_data(slow, b"}", end_stream=True)
        c.send()
        self.assertEqual((c.status(slow), c.body(slow)), (200, b'{"got": 2}'))
        [goaway] = c.of(h2.events.ConnectionTerminated)
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (ErrorCodes.NO_ERROR, quick))
        self.assertTrue(c.transport.disconnecting)

    def test_http2_fresh_connection_gets_its_first_stream(self) -> None:
        """
        HTTP/2 before its first request: the request is served, then GOAWAY.
        """
        import h2.events

        from tests.test_http2 import Client

        c = Client(self)
        c.site.retire()
        self.assertFalse(c.transport.disconnecting)
        sid = c.request()
        self.assertEqual(c.status(sid), 200)
        self.assertEqual(len(c.of(h2.events.ConnectionTerminated)), 1)
        self.assertTrue(c.transport.disconnecting)

    def test_a_closed_connection_is_forgotten(self) -> None:
        """
        The site counts open connections (a retiring worker waits for none).
        """
        site, protocol, transport = self.http11()
        self.assertEqual(len(site.connections), 1)
        protocol.connectionLost(None)
        self.assertEqual(len(site.connections), 0)


class _FakeProcess:
    pids = iter(range(50000, 60000))

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.signals: list[int] = []

    def signalProcess(self, number: int) -> None:
        self.signals.append(number)


class _SpawningClock:
    """
    A ``task.Clock`` that also "spawns" processes: each is a ``_FakeProcess``.
    """

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.callLater = self.clock.callLater
        self.seconds = self.clock.seconds
        self.spawned: list[tuple[Any, _FakeProcess]] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> _FakeProcess:
        process = _FakeProcess()
        self.spawned.append((protocol, process))
        return process

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class SupervisorTests(TestCase):
    """
    The parent's bookkeeping of reloads, on a fake reactor: which worker is
    told what, and which is started again.
    """

    def setUp(self) -> None:
        from twisted.python.failure import Failure

        self.Failure = Failure
        self.reactor = _SpawningClock()
        self.supervisor = workers.Supervisor(
            count=2, options={}, dsn="dbname=x", listen=["tcp:0:interface=127.0.0.1"], reactor=self.reactor,
            grace=1.0, reload_grace=5.0,
        )
        self.supervisor.startService()
        self.addCleanup(lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        self.addCleanup(self.supervisor._close)
        for w in self.supervisor.workers.values():
            self.ready(w)

    def ready(self, w: Any) -> None:
        w.childDataReceived(workers.READY_FD, b"ready\n")

    def end(self, w: Any) -> None:
        from twisted.internet.error import ProcessTerminated

        w.processEnded(self.Failure(ProcessTerminated(exitCode=1)))

    def test_a_sighup_during_a_reload_reloads_again(self) -> None:
        self.supervisor.reload()
        first = dict(self.supervisor.workers)
        self.assertIsNone(self.supervisor.reload())  # during the reload: queued
        second = [p for p, _ in self.reactor.spawned[-2:]]
        for w in second:
            self.ready(w)
        self.assertEqual(self.supervisor.generation, 3)  # and the queued one began at once
        self.assertNotIn(first[1], self.supervisor.workers.values())

    def test_a_new_worker_that_dies_after_ready_is_replaced(self) -> None:
        self.supervisor.reload()
        new = [p for p, _ in self.reactor.spawned[-2:]]
        self.ready(new[0])
        self.end(new[0])
        self.ready(new[1])
        self.assertFalse(self.supervisor.workers[new[0].number].ended.called)
        self.assertIsNot(self.supervisor.workers[new[0].number], new[0])

    def test_a_failed_reload_lets_the_new_workers_finish_what_they_took(self) -> None:
        old = dict(self.supervisor.workers)
        self.supervisor.reload()
        new = [p for p, _ in self.reactor.spawned[-2:]]
        self.ready(new[0])
        self.end(new[1])  # before it said ready: the reload fails
        self.assertEqual(new[0].process.signals, [signal.SIGUSR2])  # retired, not killed
        self.assertEqual(self.supervisor.workers, old)
        self.flushLoggedErrors()

    def test_a_failed_reload_while_stopping_starts_nothing(self) -> None:
        self.supervisor.reload()
        new = [p for p, _ in self.reactor.spawned[-2:]]
        stopped = self.supervisor.stopService()
        spawned = len(self.reactor.spawned)
        for w in list(self.supervisor.workers.values()):
            self.end(w)
        self.end(new[0])
        self.end(new[1])
        self.assertEqual(len(self.reactor.spawned), spawned)
        self.successResultOf(stopped)
        self.flushLoggedErrors()

    def test_a_new_worker_that_never_says_ready_fails_the_reload(self) -> None:
        from twisted.logger import capturedLogs

        old = dict(self.supervisor.workers)
        self.supervisor.reload()
        new = [p for p, _ in self.reactor.spawned[-2:]]
        self.ready(new[0])
        with capturedLogs() as events:
            self.reactor.clock.advance(workers.START_TIMEOUT)
        self.assertIn(f"did not say it serves within {workers.START_TIMEOUT:g} s",
                      " ".join(str(e.get("why", "")) for e in events))
        self.assertEqual([w.process.signals for w in new], [[signal.SIGUSR2], [signal.SIGUSR2]])
        self.assertEqual(self.supervisor.workers, old)
