"""
A running chatterd for tests: the real store on a fresh database of the test
cluster (or, with ``memory=True``, the in-memory fake, for tests that are not
about SQL), the real Ollama client pointed at the emulator, the real site on a
real TCP port of 127.0.0.1, and a treq client to call it.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from chatterd.balancer import Balancer
from chatterd.metrics import Metrics
from chatterd.ollama import BodyStream, OllamaClient, http_client
from chatterd.relay import RelayConfig
from chatterd.site import ChatterSite
from chatterd.store import PostgresChattStore
from chatterd.streams import Streams
from chatterd.testing import MemoryChattStore
from chatterd.web import ChatterApp
from tests import pgcluster


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """
    Run one statement on its own connection and return its rows (blocking).
    """
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


class Stream:
    """
    A streaming response being read: ``chunks`` grows as bytes arrive,
    ``done`` fires at its end, and :meth:`close` hangs up like a phone that
    leaves.
    """

    def __init__(self, response: IResponse) -> None:
        self.response = response
        self.chunks: list[bytes] = []
        self._waiters: list[tuple[bytes, Deferred[None]]] = []
        self._reader = BodyStream(self._received)
        self.done = self._reader.done
        response.deliverBody(self._reader)

    def _received(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self._waiters:
            return
        body = self.body
        for waiter in list(self._waiters):
            if waiter[0] in body:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def received(self, data: bytes) -> Deferred[None]:
        """
        Fires once ``data`` has arrived (at once if it has).
        """
        d: Deferred[None] = Deferred()
        if data in self.body:
            d.callback(None)
        else:
            self._waiters.append((data, d))
        return d

    def pause(self) -> None:
        """
        Stop reading, like a phone whose app is not consuming the stream.
        """
        self._reader.transport.pauseProducing()

    def resume(self) -> None:
        self._reader.transport.resumeProducing()

    def close(self) -> None:
        """
        Hang up: close the connection to chatterd.  (``done`` then fires with None.)
        """
        self.done.addErrback(lambda f: f.trap(CancelledError))
        self.done.cancel()


class Chatterd:
    """
    chatterd serving on ``url``, backed by database ``dsn`` (``None`` with
    ``memory=True``: a :class:`MemoryChattStore` on the reactor).
    """

    def __init__(
        self,
        case: Any,
        *,
        ollama: str | list[str],
        dsn: str | None = None,
        relay: RelayConfig = RelayConfig(),
        streams: dict[str, Any] | None = None,
        site: dict[str, Any] | None = None,
        app: dict[str, Any] | None = None,
        balancer: dict[str, Any] | None = None,  # may hold its own "clock"
        pool_size: int = 3,
        connect_timeout: float | None = None,
        memory: bool = False,
    ) -> None:
        self.case = case
        self.metrics = Metrics()
        self.store: PostgresChattStore | MemoryChattStore
        if memory:
            self.dsn = None
            self.store = MemoryChattStore(reactor=reactor, on_error=self.metrics.database_error)
        else:
            self.dsn = dsn or pgcluster.fresh_database()
            self.store = PostgresChattStore(
                self.dsn, reactor=reactor, pool_size=pool_size, on_error=self.metrics.database_error
            )
        self.streams = Streams(clock=reactor, **(streams or {}))
        upstream = http_client(reactor, HTTPConnectionPool(reactor, persistent=False), connect_timeout or 30.0)
        urls = [ollama] if isinstance(ollama, str) else ollama
        self.ollama = Balancer(
            [OllamaClient(upstream, url) for url in urls], **{"clock": reactor, **(balancer or {})}
        )
        self.metrics.watch(streams=self.streams, store=self.store, ollama=self.ollama)
        self.app = ChatterApp(
            store=self.store, ollama=self.ollama, streams=self.streams, clock=reactor, relay=relay,
            metrics=self.metrics, **(app or {}),
        )
        self.site = ChatterSite(
            self.app.resource(), clock=reactor, metrics=self.metrics, **{"max_body": 1024 * 1024, **(site or {})}
        )
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self._pool))

    async def start(self) -> Chatterd:
        self.store.startService()
        self.case.addCleanup(self.store.stopService)
        self.streams.startService()
        self.case.addCleanup(self.streams.stopService)
        self.ollama.startService()
        self.case.addCleanup(self.ollama.stopService)
        await self.store.started
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.case.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    # --- calling it ---

    async def get(self, path: str) -> tuple[IResponse, bytes]:
        response = await self.http.get(self.url + path)
        return response, await treq.content(response)

    async def post(self, path: str, body: Any, **kwargs: Any) -> tuple[IResponse, bytes]:
        """
        POST ``body`` (bytes as they are, anything else as JSON) and read the answer.
        """
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.http.post(self.url + path, data=data, **kwargs)
        return response, await treq.content(response)

    async def open(self, path: str, body: Any) -> Stream:
        """
        POST ``body`` and return as soon as the headers arrive; the body keeps
        arriving into the stream's ``chunks``.
        """
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.http.post(self.url + path, data=data, unbuffered=True)
        return Stream(response)

    # --- looking at the table ---

    def rows(self, appid: str | None = ...) -> list[tuple[Any, ...]]:  # type: ignore[assignment]
        """
        ``(username, message, appid)`` of every row (or one appID's), in insertion order.
        """
        if isinstance(self.store, MemoryChattStore):
            return [r for r in self.store.rows if appid is ... or r[2] == appid]
        assert self.dsn is not None
        if appid is ...:
            return query(self.dsn, "SELECT username, message, appid FROM chatts ORDER BY seq")
        return query(self.dsn, "SELECT username, message, appid FROM chatts WHERE appid = %s ORDER BY seq", (appid,))


@implementer(IBodyProducer)
class ChunkedBody:
    """
    A request body of unknown length, which the client sends chunked.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for part in self.parts:
            consumer.write(part)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
