"""
The Balancer's GETs to Ollama (the readiness check and the model-list
refresh) against the emulator over real TCP: each whole exchange is bounded,
so a server that sends its headers and then stalls cannot hang them.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from chatterd.balancer import Balancer
from chatterd.ollama import OllamaClient, http_client
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
