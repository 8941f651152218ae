# -*- test-case-name: tests.test_clients,tests.test_edge -*-
"""
Fair shares per client address: no one address may hold more than its share
of chatterd's connections or streams.

A *client* is the peer's IP address.  Many phones can share one behind a
campus or carrier NAT, so the limits are generous and say clearly what
happened: a connection over ``--max-client-connections`` is closed at
accept, before its TLS handshake costs anything; a stream over
``--max-client-streams`` gets ``503`` with ``Retry-After``
(:class:`chatterd.streams.Streams` counts those).  ``0`` turns a limit off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.python.components import proxyForInterface

from chatterd.logs import Logger

log = Logger()

#: How often, at most, a refused address gets a log line of its own.
LOG_EVERY = 10.0


def client_of(address: IAddress | None) -> str | None:
    """
    The client an address stands for: its host, an IPv4 address mapped into
    IPv6 written as IPv4 (one phone, whichever socket family it came by);
    ``None`` for an address without a host (a UNIX socket).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class Counts:
    """
    How many of something each client holds, up to ``limit`` (0: no limit).
    Entries go when they reach zero, so the table holds only active clients.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def take(self, client: str | None) -> bool:
        """
        Count one more for ``client``; ``False`` (and nothing counted) if it
        holds its limit already.  A client of ``None`` is never limited.
        """
        if client is None:
            return True
        n = self._held.get(client, 0)
        if self.limit and n >= self.limit:
            return False
        self._held[client] = n + 1
        return True

    def give(self, client: str | None) -> None:
        if client is None:
            return
        n = self._held.get(client, 0) - 1
        if n > 0:
            self._held[client] = n
        else:
            self._held.pop(client, None)


class ConnectionLimit:
    """
    Connections per client across every listener: the listening ports ask
    :meth:`accept` for each new connection and tell :meth:`closed` when it
    ends (see :mod:`chatterd.eager`).

    :param on_refused: called for every connection refused (for metrics).
    """

    def __init__(self, limit: int, clock: IReactorTime, on_refused: Callable[[], object] = lambda: None) -> None:
        self.counts = Counts(limit)
        self._clock = clock
        self._on_refused = on_refused
        self._logged: dict[str, tuple[float, int]] = {}

    def accept(self, address: IAddress) -> bool:
        client = client_of(address)
        if self.counts.take(client):
            return True
        assert client is not None
        self._on_refused()
        self._log(client)
        return False

    def closed(self, address: IAddress) -> None:
        client = client_of(address)
        self.counts.give(client)
        if client is not None and not self.counts.held(client):
            self._logged.pop(client, None)

    def _log(self, client: str) -> None:
        """
        One line per refused client every ``LOG_EVERY`` seconds at most, with
        the number refused since the last one: a flood of connections must
        not become a flood of log lines.
        """
        now = self._clock.seconds()
        last, since = self._logged.get(client, (None, 0))
        if last is not None and now - last < LOG_EVERY:
            self._logged[client] = (last, since + 1)
            return
        self._logged[client] = (now, 0)
        log.warn(
            "refused a connection from {client}: it holds {n} (--max-client-connections){more}",
            client=client, n=self.counts.limit, more=f"; {since} more refused before" if since else "",
        )


class AdmittingFactory(proxyForInterface(IProtocolFactory, "_factory")):  # type: ignore[misc]
    """
    A listener's factory that refuses, by returning no protocol (the port
    then closes the socket at once), a connection its client has no room
    for.  The protocol it builds is the wrapped factory's own: nothing sits
    between the connection and its protocol.
    """

    def __init__(self, factory: Any, limit: ConnectionLimit) -> None:
        self._factory = factory
        self.limit = limit

    def buildProtocol(self, addr: IAddress) -> Any:
        if not self.limit.accept(addr):
            return None
        protocol = self._factory.buildProtocol(addr)
        if protocol is None:
            self.limit.closed(addr)
        return protocol

    def __getattr__(self, name: str) -> Any:  # noisy, logPrefix, ...
        return getattr(self._factory, name)
