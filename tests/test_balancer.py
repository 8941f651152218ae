"""
The Balancer: which server takes a request (models, cooldown after a
failure, fewest streams in flight) and the periodic model-list refresh, on a
task.Clock with fake clients; and its GETs to Ollama (the readiness check and the model-list
refresh) against the emulator over real TCP: each whole exchange is bounded,
so a server that sends its headers and then stalls cannot hang them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from chatterd.balancer import Balancer
from chatterd.ollama import OllamaClient, OllamaUnreachable, http_client
from tests.ollama_emulator import Behaviour, OllamaEmulator, start_emulator

#: Seconds each GET may take here.
TIMEOUT = 0.3
#: Seconds after which a test gives up on a GET that should have ended long before.
HUNG = 10.0


class BoundedGetTests(TestCase):
    async def setUp(self) -> None:
        self.emu: OllamaEmulator = await start_emulator(self)
        pool = HTTPConnectionPool(reactor, persistent=True)  # as chatterd's own
        self.addCleanup(pool.closeCachedConnections)
        http = http_client(reactor, pool, 5.0)
        self.balancer = Balancer([OllamaClient(http, self.emu.url)], clock=reactor, timeout=TIMEOUT)

    async def bounded(self, d: Deferred[object]) -> object:
        """
        ``d``'s result, failing the test (not hanging it) if it takes far too long.
        """
        return await d.addTimeout(HUNG, reactor)

    async def test_readiness_check_answers(self) -> None:
        """
        A server that answers is "ok".
        """
        self.assertEqual(await self.bounded(ensureDeferred(self.balancer.check())), {self.emu.url: "ok"})

    async def test_readiness_check_of_a_server_that_stalls_after_its_headers(self) -> None:
        """
        /api/version answered with headers and then nothing makes the server
        "down" after the timeout, and the connection to it is closed.
        """
        self.emu.stalled_gets.add("/api/version")
        result = await self.bounded(ensureDeferred(self.balancer.check()))
        self.assertEqual(list(result), [self.emu.url])  # type: ignore[call-overload]
        self.assertIn(f"did not answer within {TIMEOUT:g} s", result[self.emu.url])  # type: ignore[index]
        self.assertEqual(await self.bounded(self.emu.requests[-1].ended()), "client_left")
        await self.bounded(self.emu.wait_for_idle())

    async def test_tags_refresh_of_a_server_that_stalls_after_its_headers(self) -> None:
        """
        A refresh whose /api/tags stalls after its headers ends after the
        timeout, keeps the previous list and closes the connection; the next
        refresh, answered, learns the models.
        """
        self.emu.models["qwen3:8b"] = Behaviour()
        server = self.balancer.servers[0]
        self.emu.stalled_gets.add("/api/tags")
        await self.bounded(self.balancer.refresh())
        self.assertIsNone(server.models)
        self.assertIsNotNone(server.failed_at)
        self.assertEqual(await self.bounded(self.emu.requests[-1].ended()), "client_left")
        self.emu.stalled_gets.clear()
        await self.bounded(self.balancer.refresh())
        self.assertEqual(server.models, {"llama3.2:latest", "qwen3:8b"})


class FakeClient:
    """
    An OllamaClient stand-in: ``tried`` records every POST (by url), in
    order; ``down`` makes POSTs fail as a refused connection; ``tags`` is
    what ``/api/tags`` answers (``None``: no answer).
    """

    def __init__(self, url: str, tried: list[str], tags: list[str] | None = None) -> None:
        self.url = url
        self.tried = tried
        self.tags = tags
        self.down = False
        self.gets: list[str] = []

    def post(self, path: str, body: bytes) -> Deferred[object]:
        self.tried.append(self.url)
        return fail(OllamaUnreachable(f"{self.url} refused")) if self.down else succeed(object())

    def get_json(self, path: str, timeout: float, clock: Any) -> Deferred[object]:
        self.gets.append(path)
        if self.tags is None:
            return fail(OllamaUnreachable(f"{self.url} refused"))
        return succeed({"models": [{"name": n} for n in self.tags]})


class BalancerTests(SynchronousTestCase):
    def balancer(self, *tags: list[str] | None, **kwargs: Any) -> Balancer:
        self.clock = Clock()
        self.tried: list[str] = []
        self.clients = [FakeClient(f"http://{n}", self.tried, t) for n, t in zip("abcd", tags)]
        return Balancer(self.clients, clock=self.clock, **kwargs)  # type: ignore[arg-type]

    def chat(self, balancer: Balancer, model: str | None = "m") -> list[str]:
        """
        One request's POST: the servers tried, in order; its lease released.
        """
        del self.tried[:]
        lease = balancer.lease(model)
        self.successResultOf(ensureDeferred(lease.post("/api/chat", b"{}")))
        lease.release()
        return list(self.tried)

    def test_a_failed_server_is_tried_last_during_its_cooldown(self) -> None:
        """
        A server that refused is tried after the others for ``cooldown``
        seconds from its failure, then in its place again; a success ends
        its cooldown.
        """
        b = self.balancer(None, None, None, cooldown=10)
        self.clients[0].down = True
        self.assertEqual(self.chat(b), ["http://a", "http://b"])
        self.assertEqual(b.servers[0].failed_at, 0)
        self.clock.advance(9.9)
        self.assertEqual(self.chat(b), ["http://b"])
        for s in b.servers[1:]:
            s.in_flight = 5  # busier than a, yet still before it
        self.clients[1].down = self.clients[2].down = True
        del self.tried[:]
        self.assertRaises(OllamaUnreachable, self.failureResultOf(
            ensureDeferred(b.lease("m").post("/api/chat", b"{}"))).raiseException)
        self.assertEqual(self.tried, ["http://b", "http://c", "http://a"])
        self.assertEqual([s.failed_at for s in b.servers], [9.9, 9.9, 9.9])  # a failed again
        self.clients[0].down = self.clients[1].down = self.clients[2].down = False
        self.clock.advance(9.9)  # all cooling: by streams in flight
        self.assertEqual(self.chat(b), ["http://a"])
        self.assertIsNone(b.servers[0].failed_at)  # a success ends its cooldown
        b.servers[0].in_flight = 9
        self.assertEqual(self.chat(b), ["http://a"])  # b and c still cooling, a is not
        self.assertEqual([s.failed_at for s in b.servers], [None, 9.9, 9.9])
        self.clock.advance(0.1)  # 10 s after they failed: b and c are back in their places
        self.assertEqual(self.chat(b), ["http://b"])
        b.servers[1].in_flight = 6
        self.assertEqual(self.chat(b), ["http://c"])

    def test_a_server_whose_model_list_is_unknown_has_every_model(self) -> None:
        """
        A server whose /api/tags was never read is a candidate for any model,
        ranked with those that have it, before a server known to lack it.
        """
        b = self.balancer(None, ["m", "other:7b"])
        self.successResultOf(b.refresh())
        self.assertEqual([s.models for s in b.servers], [None, {"m:latest", "other:7b"}])
        b.servers[0].failed_at = None  # (the refresh that failed counts as a failure)
        self.clients[0].tags = None
        b.servers[0].in_flight = 1  # busier, yet first for a model only it may have
        self.assertEqual(self.chat(b, "unknown"), ["http://a"])
        self.assertEqual(self.chat(b, "m"), ["http://b"])  # both may have it: the idler one
        b.servers[0].in_flight = 0
        self.clients[0].down = True
        self.assertEqual(self.chat(b, "unknown"), ["http://a", "http://b"])  # b only as a last resort

    def test_model_lists_are_refreshed_every_tags_refresh_seconds(self) -> None:
        """
        With several servers, each /api/tags is read at start and then every
        ``refresh`` seconds, a new list replacing the old; a server that does
        not answer keeps its list; stopping ends the refresh.
        """
        b = self.balancer(["m"], ["m"], refresh=60)
        b.startService()
        self.assertEqual([c.gets for c in self.clients], [["/api/tags"]] * 2)
        self.clock.advance(59.9)
        self.assertEqual([len(c.gets) for c in self.clients], [1, 1])
        self.clients[0].tags = ["n"]
        self.clients[1].tags = None
        self.clock.advance(0.1)
        self.assertEqual([len(c.gets) for c in self.clients], [2, 2])
        self.assertEqual([s.models for s in b.servers], [{"n:latest"}, {"m:latest"}])
        self.clock.advance(60)
        self.assertEqual([len(c.gets) for c in self.clients], [3, 3])
        b.stopService()
        self.clock.advance(600)
        self.assertEqual([len(c.gets) for c in self.clients], [3, 3])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_server_is_never_refreshed(self) -> None:
        """
        With one server there is nothing to choose: no /api/tags at all.
        """
        b = self.balancer(["m"], refresh=60)
        b.startService()
        self.clock.advance(600)
        b.stopService()
        self.assertEqual(self.clients[0].gets, [])
