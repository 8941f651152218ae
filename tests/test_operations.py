"""
What operators see and use: Prometheus metrics, health and readiness, log
lines, and several Ollama servers (spreading, model routing, failover).
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg2
import psycopg2.extensions
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatterd import logs
from chatterd.metrics import route_of
from chatterd.web import ReadinessResource
from tests import pgcluster
from tests.harness import Chatterd, query
from tests.ollama_emulator import Behaviour, OllamaEmulator, closed_port, start_emulator
from tests.phone import read_as_phone
from tests.test_llmchat import APP, chat


async def until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    """
    Wait until ``condition()`` holds, failing after ``limit`` seconds (a
    bound for a hang, not a timing goal).
    """
    waited = 0.0
    while not condition():
        if waited > limit:
            raise AssertionError(f"still not so after {limit} s")
        await deferLater(reactor, 0.01)
        waited += 0.01


class OperationsTestCase(TestCase):
    app: dict[str, Any] = {}

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        self.server = await Chatterd(self, ollama=self.emulator.url, app=self.app).start()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def value(self, name: str, **labels: str) -> float:
        found = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def stream_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "outcome" in e and "frames" in e]


class MetricsTests(OperationsTestCase):
    async def test_requests_and_durations(self) -> None:
        """
        Requests are counted by route and status, and timed by route.
        """
        await self.server.get("/")
        await self.server.get("/getchatts/")
        await self.server.post("/postchatt", b"not json")
        await self.server.get("/random/path/123")
        self.assertEqual(self.value("chatterd_requests_total", route="/", status="200"), 1)
        self.assertEqual(self.value("chatterd_requests_total", route="/getchatts", status="200"), 1)
        self.assertEqual(self.value("chatterd_requests_total", route="/postchatt", status="422"), 1)
        self.assertEqual(self.value("chatterd_requests_total", route="other", status="404"), 1)
        self.assertEqual(self.value("chatterd_request_duration_seconds_count", route="/"), 1)

    async def test_streams(self) -> None:
        """
        Streams are counted by outcome, with frames relayed, time to first
        byte, and Ollama errors by kind.
        """
        await (await self.server.open("/llmchat", chat())).done
        await (await self.server.open("/llmchat", chat(model="nonesuch"))).done
        self.assertEqual(self.value("chatterd_streams_total", route="/llmchat", outcome="done"), 1)
        self.assertEqual(self.value("chatterd_streams_total", route="/llmchat", outcome="error"), 1)
        self.assertEqual(self.value("chatterd_frames_relayed_total"), 5)
        self.assertEqual(self.value("chatterd_ollama_first_byte_seconds_count"), 1)
        self.assertEqual(self.value("chatterd_ollama_errors_total", kind="status"), 1)

    async def test_gauges_and_disconnects(self) -> None:
        """
        Active streams and Ollama requests show while a stream runs; a client
        leaving is counted as a disconnect.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        s = await self.server.open("/llmchat", chat(model="stall"))
        record = await self.emulator.when_stalled()
        self.assertEqual(self.value("chatterd_active_streams"), 1)
        self.assertEqual(self.value("chatterd_ollama_in_flight"), 1)
        self.assertEqual(self.value("chatterd_database_pool_in_use"), 0)
        s.close()
        await record.ended()
        while self.server.streams.active:
            await deferLater(reactor, 0.01)
        self.assertEqual(self.value("chatterd_active_streams"), 0)
        self.assertEqual(self.value("chatterd_client_disconnects_total"), 1)

    async def test_database_errors(self) -> None:
        """
        Database failures are counted by kind.
        """
        await self.server.post("/postchatt", {"username": "u", "message": "m"})
        pgcluster.stop()
        try:
            response, _ = await self.server.post("/postchatt", {"username": "u", "message": "m"})
        finally:
            pgcluster.start()
        self.assertEqual(response.code, 503)
        self.assertEqual(self.value("chatterd_database_errors_total", kind="unavailable"), 1)
        self.flushLoggedErrors()

    async def test_exposition_over_http(self) -> None:
        """
        The metrics site serves Prometheus' text format at /metrics.
        """
        await self.server.get("/")
        port = reactor.listenTCP(0, self.server.metrics.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/metrics", persistent=False)
        text = (await treq.content(response)).decode()
        self.assertEqual(response.code, 200)
        self.assertIn('chatterd_requests_total{route="/",status="200"} 1.0', text)
        self.assertIn("# TYPE chatterd_request_duration_seconds histogram", text)

    def test_route_labels(self) -> None:
        """
        Routes are labelled without trailing slashes; other paths are "other".
        """
        self.assertEqual([route_of(p) for p in (b"/", b"/llmchat/", b"/x", b"/getchatts?x=1")],
                         ["/", "/llmchat", "other", "/getchatts"])


class HealthTests(OperationsTestCase):
    async def test_healthz(self) -> None:
        """
        /healthz answers as long as the process does.
        """
        response, body = await self.server.get("/healthz")
        self.assertEqual((response.code, json.loads(body)), (200, {"status": "ok"}))

    async def test_readyz_follows_ollama(self) -> None:
        """
        /readyz is 200 while the database and Ollama answer, 503 naming Ollama
        when it is gone, and nothing internal: no address, no error text.
        The details (for the --metrics listener) and the log say why.
        """
        response, body = await self.server.get("/readyz")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body), {"status": "ready", "database": "ok", "ollama": "ok"})
        await self.emulator.stop()
        response, body = await self.server.get("/readyz")
        self.assertEqual((response.code, json.loads(body)), (503, {"status": "not ready", "database": "ok", "ollama": "down"}))
        self.assertNotIn(b"127.0.0.1", body)
        ready, details = await self.server.app.readiness()
        self.assertFalse(ready)
        self.assertTrue(details["ollama"][self.emulator.url].startswith("down: "))
        [line] = [formatEvent(e) for e in self.events if "readiness: not ready" in formatEvent(e)]
        self.assertIn(self.emulator.url, line)

    async def test_the_metrics_listener_says_why(self) -> None:
        """
        The public /readyz names only what is down; the --metrics listener's
        /readyz (as ``chatterd.tap`` serves it, for operators only) says
        which Ollama server and why.
        """
        site = self.server.metrics.site({b"readyz": ReadinessResource(self.server.app)})
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        metrics = f"http://127.0.0.1:{port.getHost().port}/readyz"
        response = await treq.get(metrics, persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await treq.content(response)),
                         {"status": "ready", "database": "ok", "ollama": {self.emulator.url: "ok"}})
        await self.emulator.stop()
        response, public = await self.server.get("/readyz")
        self.assertEqual((response.code, json.loads(public)), (503, {"status": "not ready", "database": "ok", "ollama": "down"}))
        response = await treq.get(metrics, persistent=False)
        details = json.loads(await treq.content(response))
        self.assertEqual(response.code, 503)
        self.assertEqual((details["status"], details["database"], list(details["ollama"])),
                         ("not ready", "ok", [self.emulator.url]))
        why = details["ollama"][self.emulator.url]
        self.assertTrue(why.startswith("down: ") and len(why) > len("down: "), why)
        self.assertNotIn(why[len("down: "):].encode(), public)

    async def test_a_client_leaving_is_not_a_database_failure(self) -> None:
        """
        A /readyz whose client leaves while the database is being asked is
        cancelled, not reported (or logged) as the database being down.
        """
        dbname = psycopg2.extensions.parse_dsn(self.server.dsn)["dbname"]
        backends = [pid for (pid,) in query(
            pgcluster.admin_dsn(), "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))]
        self.assertTrue(backends)
        for pid in backends:  # the database hangs: every query waits
            os.kill(pid, signal.SIGSTOP)
        try:
            asking = Deferred.fromCoroutine(self.server.app.readiness())
            await deferLater(reactor, 0.3)
            asking.cancel()
            failure = self.failureResultOf(asking)
        finally:
            for pid in backends:
                os.kill(pid, signal.SIGCONT)
        failure.trap(CancelledError)
        self.assertFalse([e for e in self.events if "readiness" in formatEvent(e)])

    async def test_readyz_follows_the_database(self) -> None:
        """
        /readyz is 503 naming the database while PostgreSQL is down, and 200
        again once it is back.
        """
        pgcluster.stop()
        try:
            response, body = await self.server.get("/readyz")
        finally:
            pgcluster.start()
        ready = json.loads(body)
        self.assertEqual(response.code, 503)
        self.assertEqual(ready, {"status": "not ready", "database": "down", "ollama": "ok"})
        for _ in range(100):
            response, body = await self.server.get("/readyz")
            if response.code == 200:
                break
            await deferLater(reactor, 0.1)
        self.assertEqual(response.code, 200, body)
        self.flushLoggedErrors()


class LogTests(OperationsTestCase):
    async def test_stream_end_line(self) -> None:
        """
        Each stream ends with one line: appID, model, frames, bytes, duration
        and how it ended; no message contents.
        """
        await (await self.server.open("/llmchat", chat("secret prompt"))).done
        [event] = self.stream_events()
        self.assertEqual((event["appid"], event["model"], event["frames"], event["outcome"]), (APP, "llama3.2", 5, "done"))
        self.assertGreater(event["bytes"], 0)
        self.assertGreaterEqual(event["duration_ms"], 0)
        self.assertIsNone(event["error_kind"])
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertNotIn("secret", json.dumps([str(v) for v in event.values()]))

    async def test_error_kind_in_line(self) -> None:
        """
        A stream that failed says how.
        """
        self.emulator.models["cut"] = Behaviour(truncate_after=1)
        await (await self.server.open("/llmchat", chat(model="cut"))).done
        [event] = self.stream_events()
        self.assertEqual((event["outcome"], event["error_kind"]), ("error", "truncated"))

    def test_json_lines(self) -> None:
        """
        --log-format json writes one JSON object per line, with the fields.
        """
        out = io.StringIO()
        observer = logs.json_observer(out)
        from twisted.logger import Logger

        Logger(namespace="chatterd.web", observer=observer).info(
            "{method} {path} {status}", method="GET", path="/", status=200, extra=object()
        )
        record = json.loads(out.getvalue())
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual((record["message"], record["level"], record["namespace"]), ("GET / 200", "info", "chatterd.web"))
        self.assertEqual((record["method"], record["status"]), ("GET", 200))
        self.assertIsInstance(record["extra"], str)


    def test_preformatted_line(self) -> None:
        """
        A line formatted by chatterd reads as written, braces included (an
        appID may hold any text), and keeps its fields.
        """
        events: list[dict[str, object]] = []
        from twisted.logger import Logger, formatEvent

        logs.info_line(Logger(observer=events.append), "appID {0} {x} }{", appid="{0} {x} }{")
        [event] = events
        self.assertEqual(formatEvent(event), "appID {0} {x} }{")
        self.assertEqual(event["appid"], "{0} {x} }{")


class ContentLogTests(OperationsTestCase):
    app = {"log_content": True}

    async def test_log_content_shows_prompt_and_reply(self) -> None:
        """
        With --log-content the stream line holds the prompt and the reply.
        """
        await (await self.server.open("/llmchat", chat("debug me"))).done
        [event] = self.stream_events()
        self.assertIn("debug me", event["prompt"])
        self.assertEqual(event["reply"], "Hello, world!")


def chats(emulator: OllamaEmulator) -> int:
    """
    How many chat requests an emulator got (the balancer also asks /api/tags).
    """
    return sum(r.path == "/api/chat" for r in emulator.requests)


class SeveralOllamasTests(TestCase):
    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.a = await start_emulator(self)
        self.b = await start_emulator(self)

    async def test_failover_to_the_next_server(self) -> None:
        """
        When the first server refuses connections, the request goes to the
        next one and the phone sees no error; during its cooldown the failed
        server is tried last (here: not at all, as the other answers), and
        first again once the cooldown is over.
        """
        clock = Clock()
        dead = f"http://127.0.0.1:{closed_port()}"
        server = await Chatterd(self, ollama=[dead, self.b.url], balancer={"clock": clock, "cooldown": 10}).start()
        tried: list[str] = []
        for s in server.ollama.servers:
            s.client.post = partial(self._recorded, tried, s.url, s.client.post)  # type: ignore[method-assign]
        # the model-list refresh at start finds the dead one down (at time 0) and learns b's models
        await until(lambda: server.ollama.servers[0].failed_at == 0 and server.ollama.servers[1].models is not None)

        async def chat_and_see(text: str) -> list[str]:
            del tried[:]
            s = await server.open("/llmchat", chat(text))
            await s.done
            self.assertEqual(read_as_phone(s.body).errors, [])
            return list(tried)

        clock.advance(11)  # its cooldown is over: the dead one is tried first again
        self.assertEqual(await chat_and_see("one"), [dead, self.b.url])
        self.assertEqual(server.ollama.servers[0].failed_at, 11)
        clock.advance(9.5)  # still cooling
        self.assertEqual(await chat_and_see("two"), [self.b.url])
        clock.advance(0.5)  # 10 s after it failed
        self.assertEqual(await chat_and_see("three"), [dead, self.b.url])
        self.assertEqual(chats(self.b), 3)

    @staticmethod
    def _recorded(tried: list[str], url: str, post: Any, *args: Any) -> Any:
        tried.append(url)
        return post(*args)

    async def test_all_servers_down(self) -> None:
        """
        With every server down, the error frame says Ollama cannot be reached,
        naming none of them; the stream's log line names each.
        """
        urls = [f"http://127.0.0.1:{closed_port()}" for _ in range(2)]
        server = await Chatterd(self, ollama=urls).start()
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        s = await server.open("/llmchat", chat())
        await s.done
        [error] = read_as_phone(s.body).errors
        self.assertEqual(json.loads(error), {"error": "cannot reach Ollama (see chatterd's log)"})
        [event] = [e for e in events if "outcome" in e]
        for url in urls:
            self.assertIn(url, event["error"])
        self.assertEqual(server.metrics.registry.get_sample_value("chatterd_ollama_errors_total", {"kind": "unreachable"}), 1)

    async def test_fewest_streams_in_flight(self) -> None:
        """
        A second stream goes to the server that is not busy.
        """
        for emulator in (self.a, self.b):
            emulator.models["stall"] = Behaviour(stall_after=1)
        server = await Chatterd(self, ollama=[self.a.url, self.b.url]).start()
        await server.open("/llmchat", chat(appid="one", model="stall"))
        await server.open("/llmchat", chat(appid="two", model="stall"))
        while chats(self.a) + chats(self.b) < 2:
            await deferLater(reactor, 0.01)
        self.assertEqual((chats(self.a), chats(self.b)), (1, 1))
        self.a.release()
        self.b.release()

    async def test_models_are_learned(self) -> None:
        """
        Each model goes to a server that has it, as /api/tags says.
        """
        self.a.models = {"alpha": Behaviour(reply=["from a"])}
        self.b.models = {"beta": Behaviour(reply=["from b"])}
        server = await Chatterd(self, ollama=[self.a.url, self.b.url], balancer={"refresh": 60}).start()
        await server.ollama.refresh()
        self.assertEqual(server.ollama.servers[1].models, {"beta:latest"})
        for model, expected in (("beta", "from b"), ("alpha", "from a"), ("beta:latest", "from b")):
            s = await server.open("/llmchat", chat(appid=model, model=model))
            await s.done
            self.assertEqual(read_as_phone(s.body).bubble, expected)


class FormatTests(SynchronousTestCase):
    def test_plain_values_stay_json(self) -> None:
        """
        Lists and numbers stay JSON values in a JSON line; objects become strings.
        """
        line = logs.format_json({"log_time": 0, "log_format": "x", "n": [1, 2], "o": object()})
        record = json.loads(line)
        self.assertEqual(record["n"], [1, 2])
        self.assertIsInstance(record["o"], str)
