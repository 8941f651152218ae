# -*- test-case-name: tests.test_eager -*-
"""
TCP listeners whose connections send at once.

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

:func:`listening_reactor` hands such ports to Twisted's own ``tcp:`` and
``ssl:`` endpoints.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorSSL, IReactorTCP
from twisted.internet.posixbase import PosixReactorBase
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


class EagerServer(tcp.Server):
    """
    A server-side TCP transport that writes to the socket at once when its
    queue is empty.
    """

    def write(self, data: bytes) -> None:
        if (self.dataBuffer or self._tempDataBuffer or not data or not self.connected
                or self.disconnecting or self._writeDisconnected):
            super().write(data)  # behind what is queued, or nothing to send: as Twisted does
            return
        sent = self.writeSomeData(data)
        if isinstance(sent, Exception):
            super().write(data)  # doWrite meets the error again and closes as usual
        elif sent < len(data):
            super().write(data[sent:])

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))


class EagerPort(tcp.Port):
    """
    A TCP port whose connections are :class:`EagerServer`\\ s.
    """

    transport = EagerServer


@implementer(IReactorTCP, IReactorSSL)
class _EagerListening:
    """
    Just enough of a reactor for Twisted's ``tcp:`` and ``ssl:`` server
    endpoints to listen with :class:`EagerPort`.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> EagerPort:
        p = EagerPort(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> EagerPort:
        p = self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface)
        p._type = "TLS"  # as the reactor's own listenSSL names it in logs
        return p

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        return self._reactor.connectTCP(*args, **kwargs)

    def connectSSL(self, *args: Any, **kwargs: Any) -> Any:
        return self._reactor.connectSSL(*args, **kwargs)


def listening_reactor(reactor: Any) -> Any:
    """
    What to give Twisted's ``tcp:``/``ssl:`` server endpoints so that they
    listen with :class:`EagerPort`: on one of Twisted's reactors of file
    descriptors (epoll, poll, select, asyncio), a thin front for ``reactor``;
    on any other (IOCP, or a test's fake), ``reactor`` itself.
    """
    if isinstance(reactor, PosixReactorBase):
        return _EagerListening(reactor)
    return reactor
