"""
Promises of docs/api.md that no other test holds chatterd to, end to end
over HTTP: /readyz against a database that hangs, Retry-After on the 503s
of a draining chatterd, another process's appID lock, /llmprep waiting for
a running stream, and the error frame for an Ollama line over 4 MiB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from chatterd import store as store_module
from tests.harness import Chatterd
from tests.ollama_emulator import Behaviour, OllamaEmulator, start_emulator
from tests.phone import read_as_phone
from tests.test_llmchat import APP, chat

#: Seconds after which a test gives up on something that should have
#: happened long before (a bound for a hang, never a timing goal).
HUNG = 30.0


async def until(condition: Callable[[], bool]) -> None:
    """
    Wait until ``condition()`` holds (failing, not hanging, after ``HUNG`` s).
    """
    for _ in range(int(HUNG / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("the condition never held")


class ContractTestCase(TestCase):
    streams: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        self.server = await Chatterd(self, ollama=self.emulator.url, streams=self.streams).start()

    def json_503(self, response: Any, body: bytes, error: str, retry_after: bytes) -> None:
        self.assertEqual(response.code, 503, body)
        self.assertEqual(json.loads(body), {"error": error})
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [retry_after])


class ReadinessTests(ContractTestCase):
    async def test_a_database_that_hangs_is_down_after_the_timeout(self) -> None:
        """
        A database that takes no query (here: one whose ping never answers)
        makes /readyz answer 503 "database": "down" once ``ready_timeout``
        (2 s) has passed on chatterd's clock, not hang the probe.
        """
        pings: list[Deferred[None]] = []
        self.server.store.ping = lambda: pings.append(Deferred()) or pings[-1]  # type: ignore[method-assign]
        self.server.app.clock = clock = Clock()
        answer = Deferred.fromCoroutine(self.server.get("/readyz"))
        answer.addTimeout(HUNG, reactor)
        await until(lambda: bool(pings))
        clock.advance(1.9)
        self.assertNoResult(answer)
        clock.advance(0.1)
        response, body = await answer
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body), {"status": "not ready", "database": "down", "ollama": "ok"})
        self.assertTrue(pings[0].called)  # the hanging query was given up (cancelled)


class RestartingTests(ContractTestCase):
    async def test_restarting_503s_carry_retry_after_5(self) -> None:
        """
        While chatterd drains, a new stream on an open connection gets
        ``503 chatterd is restarting`` with ``Retry-After: 5``, on every
        streaming route, and nothing is stored.
        """
        await self.server.streams.stopService()
        for path, body in (("/llmchat", chat()), ("/llmprep", chat()), ("/llmprompt", {"model": "llama3.2", "prompt": "x"})):
            response, raw = await self.server.post(path, body)
            self.json_503(response, raw, "chatterd is restarting, try again shortly", b"5")
        self.assertEqual(self.server.rows(APP), [])
        self.assertEqual(self.emulator.requests, [])


class AnotherProcessHoldsTheTurnTests(ContractTestCase):
    streams = {"lock_wait": 0.3}

    async def test_lock_timeout_is_503_with_retry_after(self) -> None:
        """
        While another process holds the appID's lock in the database (a
        session advisory lock, as another chatterd's stream takes it),
        /llmchat and /llmprep get 503 with ``Retry-After: 5`` after
        --lock-wait, nothing is stored or replaced and Ollama is not asked;
        other appIDs are served; once it lets go, the appID is served.
        """
        holder = psycopg2.connect(self.server.dsn)
        self.addCleanup(holder.close)
        holder.autocommit = True
        key = {"class": store_module._LOCK_CLASS, "appid": APP}
        holder.cursor().execute("SELECT pg_advisory_lock(%(class)s, hashtext(%(appid)s))", key)
        response, body = await self.server.post("/llmprep", chat("be brief", appid="other"))
        self.assertEqual(response.code, 200, body)  # (the lock is the appID's, not others')
        for path in ("/llmchat", "/llmprep"):
            response, raw = await self.server.post(path, chat("waits", appid=APP))
            self.json_503(response, raw, "another chatterd is still streaming for this appID", b"5")
        self.assertEqual(self.server.rows(APP), [])
        self.assertEqual(self.emulator.requests, [])
        holder.cursor().execute("SELECT pg_advisory_unlock(%(class)s, hashtext(%(appid)s))", key)
        s = await self.server.open("/llmchat", chat("now"))
        await s.done
        self.assertEqual(read_as_phone(s.body).errors, [])
        self.assertEqual(self.server.rows(APP), [("user", "now", APP), ("assistant", "Hello, world!", APP)])


class PrepWaitsTests(ContractTestCase):
    async def test_llmprep_waits_for_a_running_stream_then_replaces(self) -> None:
        """
        /llmprep for an appID whose stream is running waits for that stream
        to end (its reply stored), then replaces the whole history.
        """
        self.emulator.models["stall"] = Behaviour(reply=["Half", " way"], stall_after=1)
        s = await self.server.open("/llmchat", chat("one", model="stall"))
        await self.emulator.when_stalled()
        prep = Deferred.fromCoroutine(self.server.post("/llmprep", chat("be brief", appid=APP)))
        prep.addTimeout(HUNG, reactor)
        await until(lambda: self.server.streams.active == 2 or prep.called)  # admitted, waiting for its turn
        self.assertNoResult(prep)
        self.assertEqual(self.server.rows(APP), [("user", "one", APP)])
        self.emulator.release()
        await s.done
        self.assertEqual(read_as_phone(s.body).errors, [])
        response, body = await prep
        self.assertEqual((response.code, body), (200, b"{}"))
        self.assertEqual(self.server.rows(APP), [("user", "be brief", APP)])


class LongLineTests(ContractTestCase):
    async def test_an_ollama_line_over_4_mib_ends_the_stream(self) -> None:
        """
        A line from Ollama longer than 4 MiB ends the stream with the error
        frame docs/api.md names, after the frames before it; what came is
        stored and the connection to Ollama is closed (Ollama, here stalled
        after that line, is not waited for).
        """
        self.emulator.models["huge"] = Behaviour(reply=["Hi", "x" * (4 * 1024 * 1024), "!"], stall_after=2)
        s = await self.server.open("/llmchat", chat(model="huge"))
        await s.done
        view = read_as_phone(s.body)
        self.assertEqual([c["message"]["content"] for c in view.chunks], ["Hi"])
        self.assertEqual([json.loads(e) for e in view.errors], [{"error": "Ollama sent a line longer than 4194304 bytes"}])
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP), ("assistant", "Hi", APP)])
        self.assertEqual(await self.emulator.requests[-1].ended().addTimeout(HUNG, reactor), "client_left")
