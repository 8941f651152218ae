# -*- test-case-name: tests.test_store_connect,tests.test_store -*-
"""
Connections to PostgreSQL: :class:`ConnectionPool`, a fixed set of txpostgres
connections that heal themselves, and how each one connects without blocking
the reactor (names resolved by Twisted, a timeout per attempt, TCP keepalives
sized from ``--db-wait``).

It knows nothing of chatts: :mod:`chatterd.store` runs its SQL on these
connections and turns these errors (:class:`PoolTimeout`, :class:`PoolClosed`,
a lost connection by :func:`connection_lost`) into ``StoreError``\ s.

It is also the only module that reaches into txpostgres's private parts
(``Connection._connection``, ``_PollingMixin.doRead``): txpostgres offers no
way to bound a connect attempt or to drop a connection that never answered.
Checked against txpostgres 1.7; ``setup.py`` pins it below 2.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, gatherResults, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres
from zope.interface import implementer

T = TypeVar("T")


def with_keepalives(dsn: str, seconds: float, connect: float = 0.0, libpq_version: int | None = None) -> str:
    """
    ``dsn`` with TCP keepalives and ``tcp_user_timeout`` sized so that the
    kernel declares a database host that stopped answering dead after about
    ``seconds`` (``--db-wait``), not after its own TCP timeouts (two hours
    idle, some 15 minutes with data unacknowledged).  Then the socket
    fails, libpq reports the connection lost and it is reopened.  Each
    option the DSN sets itself is kept.  (libpq ignores them for unix
    sockets; ``tcp_user_timeout`` needs libpq 12.)

    Idle: first probe after half of ``seconds``, then three probes a sixth
    apart (libpq takes whole seconds, at least 1).  Data sent and not
    acknowledged: ``seconds``, but no less than ``connect``, a connection
    attempt's own timeout (the kernel applies it to a SYN's retries too).
    """
    version = psycopg2.extensions.libpq_version() if libpq_version is None else libpq_version
    try:
        given = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return dsn  # libpq will say what is wrong with it
    wanted = {
        "keepalives": "1",
        "keepalives_idle": str(max(1, round(seconds / 2))),
        "keepalives_interval": str(max(1, round(seconds / 6))),
        "keepalives_count": "3",
    }
    if version >= 120000:
        wanted["tcp_user_timeout"] = str(max(1, round(max(seconds, connect) * 1000)))
    extra = {k: v for k, v in wanted.items() if k not in given}
    return psycopg2.extensions.make_dsn(dsn, **extra) if extra else dsn


def dsn_connect_timeout(dsn: str) -> float | None:
    """
    The DSN's ``connect_timeout`` in seconds (libpq: at least 2), if it sets one.
    """
    try:
        value = int(psycopg2.extensions.parse_dsn(dsn).get("connect_timeout", "0"))
    except (ValueError, psycopg2.Error):
        return None
    return max(value, 2) if value > 0 else None


# --- the connection pool ---------------------------------------------------------


#: Server errors after which the session is over (its locks with it).
_SESSION_ENDED = frozenset(["57P01", "57P02", "57P03"])  # admin/crash shutdown, cannot connect now


def connection_lost(error: BaseException) -> bool:
    """
    Whether an error means the connection is gone: a client-side error, a
    connection exception (class 08) or the server ending the session.  An
    error of one statement on a live connection (a deadlock, a full disk, a
    cancelled query) is not: txpostgres would otherwise reconnect, dropping
    the advisory locks of every appID on that connection mid-stream.
    """
    if isinstance(error, (psycopg2.InterfaceError, txpostgres.RollbackFailed)):
        return True
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode
        return code is None or code.startswith("08") or code in _SESSION_ENDED
    return False


class _Detector(reconnection.DeadConnectionDetector):
    """
    A dead-connection detector whose reconnection loop can be stopped, retrying
    every 0.5 to 2 seconds so that a restarted database is back in use quickly.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__(
            deathChecker=lambda f: connection_lost(f.value),
            reconnectionIterator=lambda: retrying.simpleBackoffIterator(
                initialDelay=0.5, maxDelay=2.0, factor=1.5, maxRetries=0, now=True
            ),
            reactor=reactor,
        )
        self._retry: Deferred[Any] | None = None
        self.stopped = False

    def startReconnecting(self, f: Failure) -> None:
        if self.stopped:
            return
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retry = call.start(self.reconnectionIterator())
        self._retry.addCallbacks(lambda _: self.connectionRecovered(), lambda f: None)

    def stop(self) -> None:
        self.stopped = True
        if self._retry is not None and not self._retry.called:
            try:
                self._retry.cancel()
            except Exception:
                # cancelling an attempt under way: psycopg2 refuses ("asynchronous
                # connection attempt underway"), or txpostgres raises its
                # _CancelInProgress mid-poll; closing the connection, which the
                # pool does next, ends it anyway
                pass


class ConnectTimeout(psycopg2.OperationalError):
    """
    A connection attempt took longer than its timeout and was abandoned.
    (An ``OperationalError`` with no SQLSTATE, as libpq's own failures to
    connect are: the connection's detector then keeps retrying.)
    """


class NoAnswer(psycopg2.OperationalError):
    """
    A statement had no answer in time; its connection is taken for lost.
    (An ``OperationalError`` with no SQLSTATE, as libpq's own "server closed
    the connection unexpectedly": the death checker reopens the connection.)
    """


class NameNotResolved(psycopg2.OperationalError):
    """
    No host name of the DSN resolved to an address.
    """


# --- connecting without blocking -------------------------------------------------


def _is_address(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


def _names(dsn: str, environ: Mapping[str, str]) -> list[str]:
    """
    The host names that libpq would resolve itself (with a blocking
    ``getaddrinfo``) to connect with ``dsn``: none if addresses are given
    (``hostaddr``), or for unix sockets and IP addresses.
    """
    params = psycopg2.extensions.parse_dsn(dsn)
    if params.get("hostaddr") or environ.get("PGHOSTADDR"):
        return []
    hosts = (params.get("host") or environ.get("PGHOST") or "").split(",")
    return [h for h in dict.fromkeys(hosts) if h and not h.startswith(("/", "@")) and not _is_address(h)]


def with_addresses(dsn: str, addresses: Mapping[str, Sequence[str]], environ: Mapping[str, str]) -> str:
    """
    ``dsn`` with its host names' ``addresses`` given as ``hostaddr``, so that
    libpq connects without resolving anything.  ``host`` keeps the names
    (libpq checks a server certificate, and looks up passwords, by them): a
    name with several addresses is repeated once per address, which libpq
    then tries in order, as it would have.  Unix sockets and IP addresses
    are kept as they are (an empty ``hostaddr`` entry).

    :param addresses: every name of :func:`_names` and what it resolved to.
    :raises NameNotResolved: if nothing is left to connect to.
    """
    params = psycopg2.extensions.parse_dsn(dsn)
    hosts = (params.get("host") or environ.get("PGHOST") or "").split(",")
    ports = (params.get("port") or environ.get("PGPORT") or "").split(",")
    per_host = len(ports) == len(hosts) > 1
    new_hosts: list[str] = []
    new_addrs: list[str] = []
    new_ports: list[str] = []
    for i, host in enumerate(hosts):
        found = addresses[host] if host in addresses else [host if _is_address(host) else ""]
        for address in found:
            new_hosts.append(host)
            new_addrs.append(address)
            new_ports.append(ports[i] if per_host else "")
    if not new_hosts:
        raise NameNotResolved(f"no address for {', '.join(addresses)}")
    extra = {"host": ",".join(new_hosts), "hostaddr": ",".join(new_addrs)}
    if per_host:
        extra["port"] = ",".join(new_ports)
    return psycopg2.extensions.make_dsn(dsn, **extra)


def resolve(resolver: IHostnameResolver, name: str) -> Deferred[list[str]]:
    """
    The addresses of ``name`` (for TCP, without duplicates), through
    ``resolver`` (Twisted's runs ``getaddrinfo`` in a thread, off the reactor).
    """
    done: Deferred[list[str]] = Deferred()
    found: dict[str, None] = {}

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution: IHostResolution) -> None:
            pass

        def addressResolved(self, address: IAddress) -> None:
            found[address.host] = None  # type: ignore[attr-defined]

        def resolutionComplete(self) -> None:
            done.callback(list(found))

    resolver.resolveHostName(Receiver(), name, 0, transportSemantics="TCP")
    return done


def _within(d: Deferred[T], seconds: float, reactor: IReactorTime, error: Exception) -> Deferred[T]:
    """
    A Deferred that mirrors ``d`` but fails with ``error`` after ``seconds``
    (cancelling it fails it at once); either way ``d`` is left to end
    unobserved (its result, or failure, is dropped).
    """
    mirror: Deferred[T] = Deferred(lambda m: timer.cancel() if timer.active() else None)
    timer = reactor.callLater(max(seconds, 0), lambda: mirror.called or mirror.errback(error))

    def done(result: Any) -> None:
        if not mirror.called:
            timer.cancel()
            mirror.callback(result)

    d.addBoth(done)
    return mirror


class _Connection(txpostgres.Connection):
    """
    A txpostgres connection, with its own reconnecting detector, whose
    every attempt to connect (the first and each reconnection):

    - resolves the DSN's host names through ``resolver`` and hands libpq
      addresses (``hostaddr``), so that libpq never blocks the reactor in
      ``getaddrinfo``;
    - is abandoned after ``timeout`` seconds (socket closed, a
      :class:`ConnectTimeout` for the detector, which tries again later):
      libpq's asynchronous connect ignores ``connect_timeout``, and a host
      that drops packets, or accepts and stays silent, would hold it for
      minutes or for ever.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        timeout: float,
        resolver: IHostnameResolver | None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__(reactor, detector=_Detector(reactor))
        self._timeout = timeout
        self._resolver = resolver
        self._environ = environ
        self._attempt: Deferred[Any] | None = None

    def connect(self, dsn: str) -> Deferred[Any]:  # type: ignore[override]
        self.detector.setReconnectable(self, dsn)  # a reconnection resolves the names again
        if self._connection is not None and not self._connection.closed:
            return fail(txpostgres.AlreadyConnected())
        self._attempt = ensureDeferred(self._connect(dsn))
        return self._attempt

    async def _connect(self, dsn: str) -> _Connection:
        deadline = self.reactor.seconds() + self._timeout
        late = ConnectTimeout(f"no connection to the database within {self._timeout:g} s")
        names = _names(dsn, self._environ)
        if names:
            if self._resolver is None:
                raise NameNotResolved("no resolver for host names")
            found = gatherResults([resolve(self._resolver, name) for name in names], consumeErrors=True)
            addresses = await _within(found, deadline - self.reactor.seconds(), self.reactor, late)
            dsn = with_addresses(dsn, dict(zip(names, addresses)), self._environ)
        self._connection = self.connectionFactory(dsn, **{"async": True})
        try:
            await _within(self.poll(), deadline - self.reactor.seconds(), self.reactor, late)
        except BaseException:
            self._abandon()
            raise
        self.reactor.addReader(self)  # as txpostgres does: NOTIFY and a closed socket are seen at once
        return self

    def doRead(self) -> None:
        if self._attempt is not None and not self._attempt.called:
            # connecting: only move the attempt on (txpostgres would also
            # watch the socket again, whose number is -1 once libpq failed)
            txpostgres._PollingMixin.doRead(self)
        else:
            super().doRead()

    def _abandon(self) -> None:
        """
        Give up the attempt under way: nothing watches or polls it any more,
        and its socket is closed.
        """
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self._pollingD = None  # its poll never fires now; the next attempt polls anew
        if self._connection is not None and not self._connection.closed:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass

    def stop_connecting(self) -> None:
        """
        Abandon the attempt under way, if any.
        """
        if self._attempt is not None and not self._attempt.called:
            self._attempt.cancel()


class PoolTimeout(Exception):
    """
    No connection became free in time.
    """


class PoolClosed(Exception):
    """
    The pool was closed (the store stopped): no connection any more.
    """


class ConnectionPool:
    """
    A fixed set of txpostgres connections that heal themselves.

    Unlike txpostgres' own pool it survives a database that is down at start
    or restarts later (each connection has its own reconnecting detector),
    prefers live connections, and bounds how long a caller waits for one.
    """

    def __init__(
        self,
        dsn: str,
        size: int,
        reactor: IReactorTime,
        acquire_timeout: float = 10.0,
        *,
        connect_timeout: float = 10.0,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._timeout = acquire_timeout
        self._all = [
            _Connection(reactor, timeout=connect_timeout, resolver=resolver) for _ in range(size)
        ]
        self._idle = list(self._all)
        self._waiting: deque[Deferred[txpostgres.Connection]] = deque()
        self._closed = False

    @property
    def in_use(self) -> int:
        return len(self._all) - len(self._idle)

    def start(self) -> Deferred[int]:
        """
        Connect every connection, all at once; fires with the number that
        connected.  Those that failed keep retrying in the background.
        """

        async def connect(c: _Connection) -> bool:
            try:
                await c.connect(self._dsn)
                return True
            except Exception:
                c.detector.checkForDeadConnection(Failure())
                return False

        connecting = gatherResults([ensureDeferred(connect(c)) for c in self._all])
        return connecting.addCallback(sum)

    def _live(self, c: txpostgres.Connection) -> bool:
        return not c.detector.connectionIsDead

    def acquire(self) -> Deferred[txpostgres.Connection]:
        """
        A free connection, live ones first.

        :raises PoolTimeout: if none frees up within ``acquire_timeout``.
        """
        if self._closed:
            return fail(PoolClosed("the pool is closed"))
        if self._idle:
            live = [c for c in self._idle if self._live(c)]
            c = (live or self._idle)[-1]
            self._idle.remove(c)
            return succeed(c)
        d: Deferred[txpostgres.Connection] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        timer = self._reactor.callLater(self._timeout, d.cancel)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and result.check(CancelledError):
                return Failure(PoolTimeout(f"no database connection free after {self._timeout:g} s"))
            return result

        return d.addBoth(stop_timer)

    def release(self, c: txpostgres.Connection) -> None:
        """
        Give a connection back, handing it to the longest waiter if any.
        """
        if self._waiting:
            self._waiting.popleft().callback(c)
        else:
            self._idle.append(c)

    async def run(self, fn: Callable[[txpostgres.Connection], Awaitable[T]]) -> T:
        """
        Run ``fn`` with a connection of its own.
        """
        c = await self.acquire()
        try:
            return await fn(c)
        finally:
            self.release(c)

    def close(self) -> None:
        """
        Stop reconnecting, close every connection and fail the waiters.
        """
        self._closed = True
        for c in self._all:
            c.detector.stop()
            c.stop_connecting()
            if c._connection is not None:
                try:
                    c.close()
                except psycopg2.Error:
                    c.reactor.removeReader(c)  # whatever state it was in, it is gone
                    c.reactor.removeWriter(c)
        while self._waiting:
            self._waiting.popleft().errback(PoolClosed("the pool is closed"))
