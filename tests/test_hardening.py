"""
chatterd under faults, load and hostile clients: overlapping conversations,
overload, Ollama timeouts, slow readers, slow senders, database outages and
shutdown.  Each test fails without the mechanism it names.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatterd import store
from chatterd.relay import RelayConfig
from chatterd.streams import Slot, Streams
from tests import pgcluster
from tests.harness import Chatterd, Stream
from tests.ollama_emulator import Behaviour, OllamaEmulator, start_emulator
from tests.phone import read_as_phone
from tests.test_llmchat import APP, chat, data_lines


class HardeningTestCase(TestCase):
    relay = RelayConfig()
    streams: dict[str, Any] = {}
    site: dict[str, Any] = {}

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        self.server = await self.chatterd()

    async def chatterd(self, dsn: str | None = None) -> Chatterd:
        return await Chatterd(
            self, ollama=self.emulator.url, dsn=dsn, relay=self.relay, streams=self.streams, site=self.site
        ).start()

    async def until(self, predicate: Any, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await deferLater(reactor, 0.02)

    async def stopped_while_waiting(self, waiting: Deferred[tuple[Any, bytes]]) -> None:
        """
        Stop the server's streams while the request ``waiting`` waits for its
        appID's turn: it gets 503 "restarting" once the grace is over, not
        after --lock-wait.
        """
        started = time.monotonic()
        await self.server.streams.stopService()
        response, body = await waiting
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(response.code, 503)
        self.assertIn("restarting", json.loads(body)["error"])

    def lock_attempts(self, server: Chatterd) -> list[None]:
        """
        Grows by one each time ``server``'s store tries for an appID's lock.
        """
        attempts: list[None] = []
        run = server.store._run

        def counting(method: str, sql: str, *args: Any, **kwargs: Any) -> Any:
            if sql == store._BEGIN_TURN:
                attempts.append(None)
            return run(method, sql, *args, **kwargs)

        self.patch(server.store, "_run", counting)
        return attempts

    def error_of(self, s: Stream) -> str:
        view = read_as_phone(s.body)
        self.assertEqual(len(view.errors), 1, s.body)
        return str(json.loads(view.errors[0])["error"])


class OneConversationAtATimeTests(HardeningTestCase):
    async def test_overlapping_requests_take_turns(self) -> None:
        """
        A second request for an appID waits for the first stream to end, and
        its history holds the first prompt and its complete reply, in order.
        """
        self.emulator.models["stall"] = Behaviour(reply=["first", " reply"], stall_after=1)
        first = await self.server.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        second = Deferred.fromCoroutine(self.server.open("/llmchat", chat("two")))
        await self.until(lambda: any(slot.waiting for slot in self.server.streams._slots),
                         "the second request to wait for its turn")
        self.assertEqual(len(self.emulator.requests), 1, "the second request did not wait")
        self.assertEqual(self.server.rows(APP), [("user", "one", APP)])
        self.emulator.release()
        await first.done
        s = await second
        await s.done
        self.assertEqual(self.emulator.requests[1].json["messages"], [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first reply"},
            {"role": "user", "content": "two"},
        ])
        self.assertEqual(self.server.streams.waiting_appids, 0)

    async def test_other_appids_do_not_wait(self) -> None:
        """
        Turns are per appID: another app streams while one is stalled.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        await self.server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        s = await self.server.open("/llmchat", chat(appid="other.app"))
        await s.done
        self.assertEqual(read_as_phone(s.body).bubble, "Hello, world!")
        self.emulator.release()

    async def test_turns_hold_across_processes(self) -> None:
        """
        Two chatterds on one database take turns too (an advisory lock).
        """
        other = await self.chatterd(self.server.dsn)
        self.emulator.models["stall"] = Behaviour(reply=["first"], stall_after=0)
        first = await self.server.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        attempts = self.lock_attempts(other)
        second = Deferred.fromCoroutine(other.open("/llmchat", chat("two")))
        await self.until(lambda: len(attempts) >= 2, "the other process to try for the lock twice")
        self.assertEqual(len(self.emulator.requests), 1, "the other process did not wait")
        self.emulator.release()
        await first.done
        await (await second).done
        self.assertEqual([m["content"] for m in self.emulator.requests[1].json["messages"]], ["one", "first", "two"])
        s = await self.server.open("/llmchat", chat("three"))
        await s.done
        self.assertEqual(len(self.emulator.requests), 3)

    async def test_waiting_too_long_is_503(self) -> None:
        """
        A request that waits longer than lock_wait for its turn gets 503 with
        Retry-After, and nothing of it is stored.
        """
        self.server.streams.lock_wait = 0.3
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        await self.server.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        response, body = await self.server.post("/llmchat", chat("two"))
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"10"])
        self.assertIn("still streaming", json.loads(body)["error"])
        self.assertEqual(self.server.rows(APP), [("user", "one", APP)])
        self.emulator.release()


class OverloadTests(HardeningTestCase):
    streams = {"max_streams": 2}

    async def test_streams_past_the_limit_get_503(self) -> None:
        """
        Past max_streams, /llmchat and /llmprompt get 503 with Retry-After
        before anything is stored; once a stream ends, new ones are taken.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        held = [await self.server.open("/llmchat", chat(appid=f"app{i}", model="stall")) for i in range(2)]
        await self.until(lambda: len(self.emulator.requests) == 2, "two streams")
        for path, body in (("/llmchat", chat(appid="late")), ("/llmprompt", {"model": "llama3.2", "prompt": "x"})):
            response, raw = await self.server.post(path, body)
            self.assertEqual(response.code, 503, path)
            self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"2"])
            self.assertIn("limit of 2 streams", json.loads(raw)["error"])
        self.assertEqual(self.server.rows("late"), [])
        self.emulator.release()
        for s in held:
            await s.done
        s = await self.server.open("/llmchat", chat(appid="late"))
        await s.done
        self.assertEqual(s.response.code, 200)
        self.assertEqual(self.server.streams.active, 0)


class PrepAdmissionTests(HardeningTestCase):
    streams = {"max_streams": 1, "grace": 0.3}

    async def test_llmprep_counts_against_the_stream_limit(self) -> None:
        """
        /llmprep may wait as long as a stream for its turn, so it takes a
        stream's place: past max_streams it gets 503, nothing replaced.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        held = await self.server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        response, body = await self.server.post("/llmprep", chat("be brief", appid="other"))
        self.assertEqual(response.code, 503, body)
        self.assertEqual(self.server.rows("other"), [])
        self.emulator.release()
        await held.done
        response, _ = await self.server.post("/llmprep", chat("be brief", appid="other"))
        self.assertEqual(response.code, 200)

    async def test_shutdown_ends_a_wait_for_another_process(self) -> None:
        """
        A request waiting for another chatterd's turn of its appID (the
        store's lock, not this process's) is ended by shutdown after the
        grace period with 503, not after --lock-wait.
        """
        other = await self.chatterd(self.server.dsn)
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        first = await other.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        waiting = Deferred.fromCoroutine(self.server.post("/llmchat", chat("two")))
        await self.until(lambda: self.server.streams.active == 1, "the second request to wait")
        await self.stopped_while_waiting(waiting)
        self.emulator.release()
        await first.done
        self.assertEqual([m for _, m, _ in self.server.rows(APP)], ["one", "Hello, world!"])


class PrepPerClientTests(HardeningTestCase):
    streams = {"max_streams": 10, "max_client_streams": 1}

    async def test_llmprep_counts_against_the_per_client_limit(self) -> None:
        """
        /llmprep takes a stream's place of its client address too: past
        --max-client-streams it gets 503 (Retry-After: 5), nothing replaced,
        and the refusal is counted; once the address's stream ends, it is taken.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        held = await self.server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        response, body = await self.server.post("/llmprep", chat("be brief", appid="other"))
        self.assertEqual(response.code, 503, body)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertIn("this address already has 1 streams open", json.loads(body)["error"])
        self.assertEqual(self.server.rows("other"), [])
        refusals = self.server.metrics.registry.get_sample_value(
            "chatterd_client_limit_refusals_total", {"limit": "streams"})
        self.assertEqual(refusals, 1)
        self.emulator.release()
        await held.done
        response, _ = await self.server.post("/llmprep", chat("be brief", appid="other"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.server.rows("other"), [("user", "be brief", "other")])


class PrepShutdownTests(HardeningTestCase):
    streams = {"grace": 0.3}

    async def test_shutdown_ends_a_prep_waiting_for_its_turn(self) -> None:
        """
        A /llmprep waiting for its appID's turn behind a stream of this
        process is ended by shutdown after the grace period with 503,
        nothing replaced, not after --lock-wait.
        """
        self.emulator.models["stall"] = Behaviour(reply=["Half"], stall_after=1)
        first = await self.server.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        waiting = Deferred.fromCoroutine(self.server.post("/llmprep", chat("be brief")))
        await self.until(lambda: self.server.streams.active == 2, "/llmprep to wait")
        await self.stopped_while_waiting(waiting)
        await first.done
        self.assertIn("shutting down", self.error_of(first))
        self.assertEqual([m for _, m, _ in self.server.rows(APP)], ["one", "Half"])

    async def test_shutdown_ends_a_prep_waiting_for_another_process(self) -> None:
        """
        A /llmprep waiting for another chatterd's turn of its appID (the
        store's lock) is ended by shutdown after the grace period with 503,
        and gives up its wait: once the other process is done, nothing of
        it is stored.
        """
        other = await self.chatterd(self.server.dsn)
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        first = await other.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        attempts = self.lock_attempts(self.server)
        waiting = Deferred.fromCoroutine(self.server.post("/llmprep", chat("be brief")))
        await self.until(lambda: len(attempts) >= 2, "/llmprep to try for the store's lock twice")
        await self.stopped_while_waiting(waiting)
        self.emulator.release()
        await first.done
        await deferLater(reactor, 1.0)  # what a wait left running would do by now
        self.assertEqual([m for _, m, _ in self.server.rows(APP)], ["one", "Hello, world!"])


class _Stuck:
    """
    A stream that an abort does not end (stuck storing its reply, say).
    """

    def __init__(self) -> None:
        self.aborted: list[BaseException] = []

    def abort(self, reason: BaseException) -> None:
        self.aborted.append(reason)


class DrainBoundTests(SynchronousTestCase):
    """
    Shutdown waits for aborted streams for ``abort_wait`` at most.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.streams = Streams(clock=self.clock, grace=30.0, abort_wait=5.0)
        self.streams.startService()

    def hold(self, stream: _Stuck, until: Deferred[None]) -> Slot:
        """
        Admit a request and run ``stream`` in its slot until ``until`` fires.
        """
        slots: list[Slot] = []

        async def run() -> None:
            async with self.streams.admitted() as slot:
                slot.stream = stream
                slots.append(slot)
                await until

        Deferred.fromCoroutine(run())
        return slots[0]

    def test_a_stream_that_does_not_end_when_aborted(self) -> None:
        """
        A stream still running ``abort_wait`` seconds after it was aborted
        no longer holds shutdown; the log says what was left.
        """
        stuck = _Stuck()
        self.hold(stuck, Deferred())
        with capturedLogs() as events:
            stopping = self.streams.stopService()
            self.clock.advance(30.0)
            self.assertEqual(len(stuck.aborted), 1)
            self.clock.advance(4.9)
            self.assertNoResult(stopping)
            self.clock.advance(0.1)
            self.clock.advance(0.1)  # the moment given to the last frames
            self.successResultOf(stopping)
        [error] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertIn("1 requests", error)
        self.assertIn("a request (ending its stream)", error)

    def test_a_stream_that_ends_when_aborted(self) -> None:
        """
        A stream that ends soon after its abort: shutdown ends then, with
        nothing logged as left.
        """
        stuck, ending = _Stuck(), Deferred[None]()
        self.hold(stuck, ending)
        with capturedLogs() as events:
            stopping = self.streams.stopService()
            self.clock.advance(30.0)
            self.clock.advance(1.0)
            ending.callback(None)
            self.clock.advance(0.1)
            self.successResultOf(stopping)
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.error], [])


class OllamaTimeoutTests(HardeningTestCase):
    relay = RelayConfig(heartbeat=0.1, first_byte_timeout=0.6, stall_timeout=0.4)

    async def test_ollama_never_answers(self) -> None:
        """
        No first byte within first_byte_timeout: heartbeats meanwhile, then
        one error frame, and the upstream connection closed.
        """
        self.emulator.models["mute"] = Behaviour(never_answer=True)
        s = await self.server.open("/llmchat", chat(model="mute"))
        record = await self.emulator.next_request() if not self.emulator.requests else self.emulator.requests[0]
        await s.done
        self.assertIn("did not answer for 0.6 s", self.error_of(s))
        self.assertGreaterEqual(read_as_phone(s.body).comments, 3)
        self.assertEqual(await record.ended(), "client_left")
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])

    async def test_ollama_stalls_mid_stream(self) -> None:
        """
        Silence longer than stall_timeout mid-stream: one error frame, the
        partial reply stored, the upstream connection closed.
        """
        self.emulator.models["stall"] = Behaviour(reply=["Half", " way"], stall_after=1)
        s = await self.server.open("/llmchat", chat(model="stall"))
        await s.done
        self.assertIn("stopped sending for 0.4 s", self.error_of(s))
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "Half", APP))
        self.assertEqual(await self.emulator.requests[0].ended(), "client_left")

    async def test_connect_timeout(self) -> None:
        """
        An Ollama whose port takes no new connections (its accept queue is
        full) is given up after the connect timeout: one error frame.
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port))  # fills the queue of one
        self.addCleanup(filler.close)
        server = await Chatterd(self, ollama=f"http://127.0.0.1:{port}", connect_timeout=0.3).start()
        started = time.monotonic()
        s = await server.open("/llmchat", chat())
        await s.done
        self.assertEqual(self.error_of(s), "cannot reach Ollama (see chatterd's log)")
        self.assertEqual(server.metrics.registry.get_sample_value("chatterd_ollama_errors_total", {"kind": "unreachable"}), 1)
        self.assertLess(time.monotonic() - started, 5)

    async def test_llmprompt_timeout_before_answering(self) -> None:
        """
        /llmprompt gets a 504 JSON error when Ollama does not answer in time.
        """
        self.emulator.models["mute"] = Behaviour(never_answer=True)
        response, body = await self.server.post("/llmprompt", {"model": "mute", "prompt": "x"})
        self.assertEqual(response.code, 504)
        self.assertIn("did not answer", json.loads(body)["error"])


class BackpressureTests(HardeningTestCase):
    relay = RelayConfig(max_reply=32 * 1024 * 1024)

    async def test_a_client_that_stops_reading_pauses_ollama(self) -> None:
        """
        When the phone stops reading, chatterd stops reading from Ollama
        instead of buffering: its frames stall far below the stream's size,
        and every frame still arrives once the phone reads again.
        """
        chunk = "x" * 4000
        count = 6000  # 24 MB of content
        self.emulator.models["flood"] = Behaviour(reply=[chunk] * count)
        s = await self.server.open("/llmchat", chat(model="flood"))
        await s.received(b"data: ")
        s.pause()
        [relay] = self.server.streams.streams
        relayed: list[int] = []
        while len(relayed) < 10 or relayed[-1] != relayed[-10]:  # until it stops moving
            await deferLater(reactor, 0.05)
            relayed.append(relay.frames)  # type: ignore[attr-defined]
        # what sits in socket buffers and one transport buffer, not 24 MB
        self.assertLess(relayed[-1] * len(chunk), 8 * 1024 * 1024, "Ollama was read without pause")
        s.resume()
        await s.done
        self.assertEqual(len(data_lines(s.body)), count + 1)
        self.assertEqual(len(self.server.rows(APP)[-1][1]), count * len(chunk))


class SlowClientTests(HardeningTestCase):
    site = {"request_timeout": 0.5, "idle_timeout": 1.0, "max_body": 1000}

    def raw(self, send: list[bytes], pause: float = 0.0, read: bool = True) -> bytes:
        """
        Talk raw HTTP/1.1: send each piece with ``pause`` between, return what came back.
        """
        with socket.create_connection(("127.0.0.1", self.server.port.getHost().port), timeout=10) as sock:
            try:
                for piece in send:
                    sock.sendall(piece)
                    time.sleep(pause)
            except OSError:
                pass
            answer = b""
            while read:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            return answer

    async def test_slowloris_headers_are_cut_off(self) -> None:
        """
        Headers trickled a byte at a time get 408 after request_timeout, even
        though each byte arrives well within the idle timeout.
        """
        trickle = [bytes([b]) for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40]
        answer = await deferToThread(self.raw, trickle, 0.05)  # 2 s of trickle: past the deadline
        self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer)
        self.assertIn(b'"error"', answer)

    async def test_slow_body_is_cut_off(self) -> None:
        """
        A body trickled slowly is cut off after request_timeout too.
        """
        head = b"POST /postchatt HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        answer = await deferToThread(self.raw, [head] + [b"x"] * 40, 0.05)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408"), answer)
        self.assertEqual(self.server.rows(), [])

    async def test_idle_connection_is_closed(self) -> None:
        """
        A connection that sends nothing is closed after idle_timeout.
        """
        started = time.monotonic()
        answer = await deferToThread(self.raw, [])
        self.assertEqual(answer, b"")
        self.assertLess(time.monotonic() - started, 5)

    async def test_declared_oversized_body_is_refused_at_once(self) -> None:
        """
        A Content-Length over the limit gets 413 before any body is sent.
        """
        head = b"POST /postchatt HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        answer = await deferToThread(self.raw, [head])
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer)
        self.assertIn(b"larger than 1000 bytes", answer)

    async def test_too_many_headers(self) -> None:
        """
        More than 100 headers is a 400.
        """
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n"
        answer = await deferToThread(self.raw, [head])
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)

    async def test_normal_requests_still_work(self) -> None:
        """
        Keep-alive requests made promptly are unaffected by the limits.
        """
        body = b'{"username": "u", "message": "m"}'
        request = b"POST /postchatt HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        answer = await deferToThread(self.raw, [request, request + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
        self.assertEqual(answer.count(b"HTTP/1.1 200"), 3)
        self.assertEqual(len(self.server.rows()), 2)


class DatabaseOutageTests(HardeningTestCase):
    def tearDown(self) -> None:
        pgcluster.start()

    async def test_outage_during_a_stream(self) -> None:
        """
        With PostgreSQL stopped mid-stream, the reply insert fails into an SSE
        error frame and new requests get 503; once it is back, chatterd
        serves normally without a restart.
        """
        self.emulator.models["stall"] = Behaviour(reply=["lost", " reply"], stall_after=1)
        s = await self.server.open("/llmchat", chat("before", model="stall"))
        await self.emulator.when_stalled()
        await deferToThread(pgcluster.stop)
        response, body = await self.server.post("/llmchat", chat("during", appid="other"))
        self.assertEqual(response.code, 503)
        response, body = await self.server.post("/postchatt", {"username": "u", "message": "during"})
        self.assertEqual(response.code, 503)
        self.emulator.release()
        await s.done
        self.assertIn("could not be stored", self.error_of(s))
        await deferToThread(pgcluster.start)
        deadline = time.monotonic() + 10
        for path, body in (("/postchatt", {"username": "u", "message": "after"}), ("/llmchat", chat("after"))):
            while True:
                response, raw = await self.server.post(path, body)
                if response.code == 200:
                    break
                self.assertEqual(response.code, 503, raw)
                self.assertLess(time.monotonic(), deadline, "chatterd did not recover")
                await deferLater(reactor, 0.2)
        self.assertEqual(read_as_phone(raw).errors, [])
        self.assertEqual(self.server.rows(APP)[-2:], [("user", "after", APP), ("assistant", "Hello, world!", APP)])
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)


class ShutdownTests(HardeningTestCase):
    streams = {"grace": 0.5}

    async def test_shutdown_drains_then_ends_streams(self) -> None:
        """
        At shutdown new streams get 503; a stream that ends within the grace
        period ends normally; one still running after it gets an error frame,
        its partial reply is stored and its upstream connection closed.
        """
        self.emulator.models["quick"] = Behaviour(reply=["fast"], delay=0.2)
        self.emulator.models["stall"] = Behaviour(reply=["Half", " way"], stall_after=1)
        quick = await self.server.open("/llmchat", chat("q", appid="quick", model="quick"))
        slow = await self.server.open("/llmchat", chat("s", appid="slow", model="stall"))
        await self.emulator.when_stalled()
        stopping = self.server.streams.stopService()
        response, body = await self.server.post("/llmchat", chat(appid="new"))
        self.assertEqual(response.code, 503)
        self.assertIn("restarting", json.loads(body)["error"])
        await stopping
        await quick.done
        await slow.done
        self.assertEqual(read_as_phone(quick.body).errors, [])
        self.assertIn("shutting down", self.error_of(slow))
        self.assertEqual(self.server.rows("slow")[-1], ("assistant", "Half", "slow"))
        self.assertEqual(self.server.rows("quick")[-1], ("assistant", "fast", "quick"))
        self.assertEqual(self.server.rows("new"), [])
        self.assertEqual(await self.emulator.requests[1].ended(), "client_left")


class SlowModelLoadingTests(HardeningTestCase):
    relay = RelayConfig(heartbeat=0.1, first_byte_timeout=30)

    async def test_slow_model_loading_within_the_limit_is_fine(self) -> None:
        """
        A first byte that comes late but in time is no error: every frame
        is relayed, the last one done, and the whole reply stored.  (The
        limit is far off: the exact bound is tested on a Clock,
        ``tests.test_llmchat.RelayTimingTests``.)
        """
        self.emulator.models["loading"] = Behaviour(first_byte_delay=0.3)
        s = await self.server.open("/llmchat", chat(model="loading"))
        await s.done
        view = read_as_phone(s.body)
        self.assertEqual(view.errors, [])
        self.assertEqual([c["message"]["content"] for c in view.chunks], ["Hello", ",", " world", "!", ""])
        self.assertEqual([c["done"] for c in view.chunks], [False] * 4 + [True])
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP), ("assistant", "Hello, world!", APP)])


class RequestDeadlineClockTests(SynchronousTestCase):
    """
    The HTTP/1.1 request deadline and idle timeout on a ``task.Clock``:
    the exact bounds, with no real time passing.
    """

    def connect(self) -> tuple[Clock, Any, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from chatterd.site import ChatterSite
        from tests.test_http2 import Hello

        clock = Clock()
        site = ChatterSite(Hello(), clock=clock, max_body=1000, request_timeout=30, idle_timeout=60)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        protocol.makeConnection(transport)
        return clock, protocol, transport

    def test_trickled_headers_get_408_at_the_deadline(self) -> None:
        """
        A byte of headers a second keeps the idle timer going, but the whole
        request must arrive within request_timeout of its first byte.
        """
        clock, protocol, transport = self.connect()
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(29):
            protocol.dataReceived(head[i:i + 1])
            clock.advance(1)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(head[29:30])
        clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_a_trickled_body_gets_408_at_the_deadline(self) -> None:
        clock, protocol, transport = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")
        for _ in range(29):
            protocol.dataReceived(b"x")
            clock.advance(1)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"), transport.value())

    def test_a_prompt_request_is_answered_and_the_deadline_forgotten(self) -> None:
        clock, protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"hello", transport.value())
        clock.advance(45)  # past the request deadline, within the idle timeout
        self.assertFalse(transport.disconnecting)

    def test_an_idle_connection_closes_after_idle_timeout(self) -> None:
        clock, protocol, transport = self.connect()
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

