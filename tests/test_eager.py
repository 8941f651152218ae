"""
Connections that send from ``write`` (chatterd.eager), on chatterd's
listeners and to Ollama: bytes reach the kernel at once, and order,
backpressure and closing behave as Twisted's own transport does.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from chatterd import eager, tls


class _Server(Protocol):
    def __init__(self, made: Deferred[_Server]) -> None:
        self.made = made
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


class EagerServerTests(TestCase):
    async def _connect(self) -> tuple[_Server, socket.socket]:
        made: Deferred[_Server] = Deferred()
        port = eager.eager_reactor(reactor).listenTCP(0, Factory.forProtocol(lambda: _Server(made)),
                                                          interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, eager.EagerPort)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = await made
        self.assertIsInstance(server.transport, eager.EagerServer)
        return server, client

    async def test_sends_at_once(self) -> None:
        """
        What is written is in the kernel when ``write`` returns, without a
        turn of the reactor (Twisted's transport would still hold it).
        """
        server, client = await self._connect()
        server.transport.write(b"data: 1\n\n")
        server.transport.writeSequence([b"data: ", b"2\n\n"])
        client.setblocking(False)
        self.assertEqual(client.recv(100), b"data: 1\n\ndata: 2\n\n")
        self.assertFalse(server.transport.dataBuffer or server.transport._tempDataBuffer)

    async def test_order_and_backpressure(self) -> None:
        """
        Past what the kernel takes, bytes queue in order behind each other,
        a streaming producer is paused once the queue is full and resumed once
        it drains, and ``loseConnection`` closes after the last byte.
        """
        server, client = await self._connect()
        producer = _Producer()
        server.transport.registerProducer(producer, True)
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = [bytes([65 + i % 26]) * (1000 + i) for i in range(3000)]  # ~7.5 MB
        for chunk in sent:
            server.transport.write(chunk)
        self.assertTrue(server.transport._tempDataBuffer)  # the kernel took only part of it
        self.assertGreaterEqual(producer.paused, 1)
        server.transport.write(b"last")
        server.transport.unregisterProducer()
        server.transport.loseConnection()
        received = await deferToThread(_read_all, client)
        self.assertEqual(received, b"".join(sent) + b"last")
        await server.lost

    async def test_resumes_producer(self) -> None:
        """
        A producer paused by a full queue is resumed when the reader catches up.
        """
        server, client = await self._connect()
        producer = _Producer()
        server.transport.registerProducer(producer, True)
        while not producer.paused:
            server.transport.write(b"x" * 65536)
        self.assertEqual(producer.resumed, 0)
        client.settimeout(20)
        while not producer.resumed:  # a recv that times out fails the test
            await deferToThread(client.recv, 1 << 20)
        server.transport.unregisterProducer()
        server.transport.abortConnection()
        await server.lost

    async def test_nothing_after_abort(self) -> None:
        """
        After ``abortConnection`` nothing more is sent (Twisted drops what is
        queued; an aborted /getchatts must not end with a last chunk).
        """
        server, client = await self._connect()
        server.transport.write(b"before")
        server.transport.abortConnection()
        server.transport.write(b"after")
        await server.lost
        client.settimeout(20)
        received = b""
        try:
            while chunk := client.recv(100):
                received += chunk
        except ConnectionResetError:
            pass
        self.assertEqual(received, b"before")

    async def test_pull_producer(self) -> None:
        """
        A pull producer is asked for more after each write, as with Twisted's
        transport (only ``doWrite`` asks, so its writes are queued).
        """
        server, client = await self._connect()

        @implementer(IPullProducer)
        class Pull:
            n = 0

            def resumeProducing(self) -> None:
                self.n += 1
                if self.n <= 5:
                    server.transport.write(b"chunk%d " % self.n)
                else:
                    server.transport.unregisterProducer()
                    server.transport.loseConnection()

            def stopProducing(self) -> None:
                pass

        server.transport.registerProducer(Pull(), False)
        received = await deferToThread(_read_all, client)
        self.assertEqual(received, b"chunk1 chunk2 chunk3 chunk4 chunk5 ")

    async def test_only_bytes(self) -> None:
        """
        Like Twisted's own transport, only bytes are accepted, before anything is sent.
        """
        server, client = await self._connect()
        for data in (bytearray(b"x"), memoryview(b"x"), "x"):
            self.assertRaises(TypeError, server.transport.write, data)
            self.assertRaises(TypeError, server.transport.writeSequence, [b"ok", data])
        server.transport.loseConnection()
        self.assertEqual(await deferToThread(_read_all, client), b"")

    async def test_write_after_peer_left(self) -> None:
        """
        Writing to a connection the peer closed raises nothing; the loss is
        reported through ``connectionLost`` as usual.
        """
        server, client = await self._connect()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # RST
        await deferLater(reactor, 0.05)
        for _ in range(3):
            server.transport.write(b"nobody reads this")
        await server.lost


class EagerClientTests(TestCase):
    async def test_client_sends_at_once(self) -> None:
        """
        A TCP client endpoint on the eager reactor connects with an
        EagerClient, whose writes are in the kernel when ``write`` returns.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        endpoint = TCP4ClientEndpoint(eager.eager_reactor(reactor), "127.0.0.1", listener.getsockname()[1])
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(client.transport.abortConnection)
        self.assertIsInstance(client.transport, eager.EagerClient)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        client.transport.write(b"POST /api/chat HTTP/1.1\r\n")
        peer.setblocking(False)
        self.assertEqual(peer.recv(100), b"POST /api/chat HTTP/1.1\r\n")


class EndpointTests(TestCase):
    async def test_tcp_and_ssl_listen_eagerly(self) -> None:
        """
        ``--listen tcp:...`` and ``ssl:...`` get eager ports with a long
        accept queue unless told otherwise; other kinds of endpoint are
        Twisted's own.
        """
        certs = Path(self.mktemp())
        cert, key, _ = tls.ensure_certificate(certs)
        for description, backlog in [("tcp:0:interface=127.0.0.1", tls.DEFAULT_BACKLOG),
                                     ("ssl:0:interface=127.0.0.1", tls.DEFAULT_BACKLOG),
                                     ("tcp:0:interface=127.0.0.1:backlog=7", 7),
                                     ("ssl:0:interface=127.0.0.1:backlog=7", 7)]:
            endpoint = tls.server_endpoint(reactor, description, cert, key)
            port = await endpoint.listen(Factory.forProtocol(Protocol))
            self.addCleanup(port.stopListening)
            self.assertIsInstance(port, eager.EagerPort, description)
            self.assertEqual(port.backlog, backlog, description)  # not Twisted's 50: bursts of phones
        unix = tls.server_endpoint(reactor, f"unix:{certs / 's'}", cert, key)
        self.assertIs(unix._reactor, reactor)
        for other in (object(), MemoryReactorClock()):  # a test's fake reactor binds nothing for real
            self.assertIs(eager.eager_reactor(other), other)
