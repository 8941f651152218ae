"""
Fair shares per client address: connections refused at accept past
``--max-client-connections``, streams answered ``503`` past
``--max-client-streams``; other addresses are served all the while.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from chatterd import tls
from chatterd.clients import AdmittingFactory, ConnectionLimit, Counts, client_of
from tests.harness import Chatterd
from tests.ollama_emulator import Behaviour, OllamaEmulator, start_emulator
from tests.test_llmchat import chat


def address(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class CountsTests(SynchronousTestCase):
    def test_up_to_the_limit_per_client(self) -> None:
        """
        Each client gets its own count up to the limit; giving back makes room;
        a client at zero leaves the table.
        """
        counts = Counts(2)
        self.assertEqual([counts.take("a"), counts.take("a"), counts.take("a")], [True, True, False])
        self.assertTrue(counts.take("b"))
        counts.give("a")
        self.assertTrue(counts.take("a"))
        for _ in range(2):
            counts.give("a")
        counts.give("b")
        self.assertEqual(len(counts), 0)

    def test_zero_is_no_limit(self) -> None:
        """
        A limit of 0 refuses nothing (the counts are still kept).
        """
        counts = Counts(0)
        self.assertTrue(all(counts.take("a") for _ in range(10000)))
        self.assertEqual(counts.held("a"), 10000)

    def test_what_a_client_is(self) -> None:
        """
        A client is its IP address; IPv4 mapped into IPv6 is the IPv4 one; a
        UNIX socket has none (and is never limited).
        """
        self.assertEqual(client_of(address("192.0.2.1")), "192.0.2.1")
        self.assertEqual(client_of(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(client_of(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1")
        self.assertIsNone(client_of(UNIXAddress(b"/run/x.sock")))
        self.assertTrue(Counts(1).take(None) and Counts(1).take(None))


class Factory:
    def __init__(self) -> None:
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> object:
        self.built.append(addr)
        return object()

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.refused: list[None] = []
        self.limit = ConnectionLimit(2, self.clock, on_refused=lambda: self.refused.append(None))
        self.factory = Factory()
        self.admitting = AdmittingFactory(self.factory, self.limit)
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def test_refused_before_any_protocol(self) -> None:
        """
        Past the limit no protocol is built (the port closes the socket at
        once: no TLS handshake), the refusal is counted, and another address
        is accepted.
        """
        a = address("192.0.2.1")
        self.assertIsNotNone(self.admitting.buildProtocol(a))
        self.assertIsNotNone(self.admitting.buildProtocol(a))
        self.assertIsNone(self.admitting.buildProtocol(a))
        self.assertEqual(len(self.factory.built), 2)
        self.assertEqual(len(self.refused), 1)
        self.assertIsNotNone(self.admitting.buildProtocol(address("192.0.2.2")))
        self.limit.closed(a)
        self.assertIsNotNone(self.admitting.buildProtocol(a))

    def test_refusals_are_logged_once_in_a_while(self) -> None:
        """
        A flood of refused connections is one log line per address every ten
        seconds, with the count of those refused in between.
        """
        a = address("192.0.2.1")
        for _ in range(2):
            self.admitting.buildProtocol(a)
        for _ in range(100):
            self.admitting.buildProtocol(a)
        self.clock.advance(11)
        self.admitting.buildProtocol(a)
        lines = [formatEvent(e) for e in self.events if "refused a connection" in formatEvent(e)]
        self.assertEqual(len(lines), 2)
        self.assertIn("99 more refused before", lines[1])
        self.assertEqual(len(self.refused), 101)


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"


class ListenerTests(TestCase):
    async def test_a_listener_closes_connections_past_the_limit_at_accept(self) -> None:
        """
        A real TLS listener: the third connection from one address is closed
        before its handshake; one from another address is served; a closed
        connection gives its place back.
        """
        cert, key, _ = tls.ensure_certificate(self.mktemp())
        limit = ConnectionLimit(2, reactor)
        endpoint = tls.server_endpoint(reactor, "ssl:0:interface=127.0.0.1", cert, key, limit)
        port = await endpoint.listen(server.Site(Hello()))
        self.addCleanup(port.stopListening)
        number = port.getHost().port

        def connect(source: str) -> socket.socket:
            return socket.create_connection(("127.0.0.1", number), timeout=5, source_address=(source, 0))

        def handshake(sock: socket.socket) -> str:
            import ssl

            ctx = ssl.create_default_context(cafile=str(cert))
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as s:
                return str(s.version())

        held = [await deferToThread(connect, "127.0.0.1") for _ in range(2)]
        await self.until(lambda: limit.counts.held("127.0.0.1") == 2)
        third = await deferToThread(connect, "127.0.0.1")
        self.assertEqual(await deferToThread(third.recv, 1), b"")  # closed at once, not a byte of TLS
        third.close()
        self.assertTrue((await deferToThread(handshake, await deferToThread(connect, "127.0.0.2"))).startswith("TLS"))
        held.pop().close()
        await self.until(lambda: limit.counts.held("127.0.0.1") == 1)
        self.assertTrue((await deferToThread(handshake, await deferToThread(connect, "127.0.0.1"))).startswith("TLS"))
        held.pop().close()

    async def until(self, predicate: Any) -> None:
        for _ in range(250):
            if predicate():
                return
            await deferLater(reactor, 0.02)
        self.fail("timed out")


class StreamLimitTests(TestCase):
    """
    ``/llmchat`` and ``/llmprompt`` streams per address, through the real app.
    """

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        self.server = await Chatterd(self, ollama=self.emulator.url, streams={"max_client_streams": 2}).start()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def post_from(self, source: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """
        A blocking POST from ``source`` (run it in a thread).
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port.getHost().port, timeout=10,
                                          source_address=(source, 0))
        try:
            conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    async def test_streams_past_the_share_get_503(self) -> None:
        """
        The third stream of one address gets 503 with Retry-After and a JSON
        error, stores nothing, and is counted and noted in the access log;
        another address is served at once; an ended stream makes room.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        held = [await self.server.open("/llmchat", chat(appid=f"app{i}", model="stall")) for i in range(2)]
        for _ in range(2):
            await self.emulator.when_stalled()
        status, headers, body = await deferToThread(self.post_from, "127.0.0.1", "/llmchat", chat(appid="third"))
        self.assertEqual((status, headers.get("retry-after")), (503, "5"))
        self.assertIn("the most one client may hold", json.loads(body)["error"])
        self.assertEqual(self.server.rows("third"), [])
        status, _, _ = await deferToThread(self.post_from, "127.0.0.1", "/llmprompt", {"model": "llama3.2", "prompt": "x"})
        self.assertEqual(status, 503)
        self.assertEqual(
            self.server.metrics.registry.get_sample_value("chatterd_client_limit_refusals_total", {"limit": "streams"}), 2
        )
        lines = [formatEvent(e) for e in self.events if "POST /llmchat 503" in formatEvent(e)]
        self.assertIn("(per-client streams limit)", lines[0])
        status, _, body = await deferToThread(self.post_from, "127.0.0.2", "/llmchat", chat(appid="other"))
        self.assertEqual(status, 200, body)
        self.emulator.release()
        for s in held:
            await s.done
        status, _, _ = await deferToThread(self.post_from, "127.0.0.1", "/llmchat", chat(appid="third"))
        self.assertEqual(status, 200)
        self.assertEqual(self.server.streams.per_client.held("127.0.0.1"), 0)
