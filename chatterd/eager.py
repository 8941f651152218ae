# -*- test-case-name: tests.test_eager -*-
"""
TCP connections that send at once: chatterd's listeners, and its
connections to Ollama servers given by IP address.

Twisted's TCP transport never sends from ``write``: it queues the bytes,
registers the socket for writability (an ``epoll_ctl``) and sends on the
reactor's next turn, then unregisters (another ``epoll_ctl``).  A relayed
token is one small write per stream every few milliseconds, so that is two
system calls and a whole reactor turn per frame: at a 15 ms cadence it was a
quarter of chatterd's CPU and most of each frame's latency.

:class:`EagerServer` sends straight from ``write`` when nothing is queued
before it, and falls back to Twisted's queue for whatever the kernel does not
take (or for any error, which ``doWrite`` then meets and reports as usual), so
order, flow control (``pauseProducing`` once the queue is full) and
``loseConnection`` behave exactly as before.  TLS rides on top unchanged:
``TLSMemoryBIOProtocol`` writes its records to this transport.

:func:`eager_reactor` hands such transports to Twisted's own ``tcp:`` and
``ssl:`` server endpoints and TCP client endpoints.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorSocket, IReactorSSL, IReactorTCP
from twisted.internet.posixbase import PosixReactorBase
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from chatterd.clients import AdmittingFactory, ConnectionLimit


class _EagerWrites:
    """
    ``write`` for a TCP transport: straight to the socket when the queue is
    empty, else (and for what the kernel does not take) Twisted's queue.

    Twisted's queue also takes every write it treats specially: after
    ``loseConnection`` or ``abortConnection`` (an aborted connection drops
    what is queued), and while a pull producer is registered (only
    ``doWrite`` asks it for more).
    """

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError("Data must be bytes")  # as Twisted's own write says
        if (self.dataBuffer or self._tempDataBuffer or not data  # type: ignore[attr-defined]
                or not self.connected or self.disconnecting or self._aborting  # type: ignore[attr-defined]
                or self._writeDisconnected  # type: ignore[attr-defined]
                or (self.producer is not None and not self.streamingProducer)):  # type: ignore[attr-defined]
            super().write(data)  # type: ignore[misc]
            return
        sent = self.writeSomeData(data)  # type: ignore[attr-defined]
        if isinstance(sent, Exception):
            super().write(data)  # type: ignore[misc]  # doWrite meets the error again and closes as usual
        elif sent < len(data):
            super().write(data[sent:])  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        if not all(isinstance(data, bytes) for data in iovec):
            raise TypeError("Data must be bytes")
        self.write(b"".join(iovec))


class EagerServer(_EagerWrites, tcp.Server):
    """
    A server-side TCP transport that writes to the socket at once when its
    queue is empty, and gives its client's place back when it closes.
    """

    def connectionLost(self, reason: Any) -> None:
        limit = getattr(self.server, "limit", None)
        if limit is not None:
            limit.closed(self.getPeer())
        super().connectionLost(reason)


class EagerClient(_EagerWrites, tcp.Client):
    """
    A client-side TCP transport that writes to the socket at once when its
    queue is empty.
    """


class EagerConnector(tcp.Connector):
    """
    Connects with an :class:`EagerClient`.
    """

    def _makeTransport(self) -> EagerClient:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


class EagerPort(tcp.Port):
    """
    A TCP port whose connections are :class:`EagerServer`\\ s, and which
    refuses at accept those that ``limit`` has no room for (if given).
    """

    transport = EagerServer
    #: Whether other processes accept on the same socket (then one connection per wake-up).
    shared = False

    def __init__(self, port: int, factory: Any, backlog: int, interface: str, reactor: Any,
                 limit: ConnectionLimit | None = None) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self._admit(limit)

    def _admit(self, limit: ConnectionLimit | None) -> None:
        """
        Refuse at accept the connections that ``limit`` has no room for.
        """
        self.limit = limit
        if limit is not None:
            self.factory = AdmittingFactory(self.factory, limit)

    @classmethod
    def adopt(cls, reactor: Any, fd: int, family: int, factory: Any,
              limit: ConnectionLimit | None = None) -> EagerPort:
        """
        A port on a listening socket that this process inherited (a worker's,
        see :mod:`chatterd.workers`), as Twisted's ``adoptStreamPort`` makes
        one, and listening.  It accepts one connection per wake-up, so that
        a busy worker leaves the others more of them to take.
        """
        p = cls._fromListeningDescriptor(reactor, fd, family, factory)
        p._admit(limit)
        p.shared = True
        p.startListening()
        return p

    def doRead(self) -> None:
        if self.shared:
            self.numberAccepts = 1  # Twisted raises it by 20 after each full batch
        super().doRead()


@implementer(IReactorTCP, IReactorSSL, IReactorSocket)
class _EagerReactor:
    """
    Just enough of a reactor for Twisted's ``tcp:`` and ``ssl:`` server
    endpoints to listen with :class:`EagerPort`, and for its TCP client
    endpoints to connect with :class:`EagerConnector`.
    """

    def __init__(self, reactor: Any, limit: ConnectionLimit | None = None) -> None:
        self._reactor = reactor
        self._limit = limit

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> EagerPort:
        p = EagerPort(port, factory, backlog, interface, self._reactor, self._limit)
        p.startListening()
        return p

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> EagerPort:
        p = self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface)
        p._type = "TLS"  # as the reactor's own listenSSL names it in logs
        return p

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> EagerPort:
        return EagerPort.adopt(self._reactor, fileDescriptor, addressFamily, factory, self._limit)

    def adoptStreamConnection(self, *args: Any) -> None:
        self._reactor.adoptStreamConnection(*args)

    def adoptDatagramPort(self, *args: Any) -> Any:
        return self._reactor.adoptDatagramPort(*args)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30.0, bindAddress: Any = None
    ) -> EagerConnector:
        c = EagerConnector(host, port, factory, timeout, bindAddress, self._reactor)
        c.connect()
        return c

    def connectSSL(self, *args: Any, **kwargs: Any) -> Any:
        return self._reactor.connectSSL(*args, **kwargs)


def eager_reactor(reactor: Any, limit: ConnectionLimit | None = None) -> Any:
    """
    What to give Twisted's ``tcp:``/``ssl:`` server endpoints and its
    ``TCP4ClientEndpoint``/``TCP6ClientEndpoint`` so that their connections
    send at once: on one of Twisted's reactors of file descriptors (epoll,
    poll, select, asyncio), a thin front for ``reactor``; on any other (IOCP,
    or a test's fake), ``reactor`` itself.

    :param limit: connections per client for the ports it listens on (the
        TLS handshake comes after the check: a refused connection costs none).
    """
    if isinstance(reactor, PosixReactorBase):
        return _EagerReactor(reactor, limit)
    return reactor
