"""
``GET /getchatts`` over HTTP on course-shaped tables: every row is served
(a NULL ``time`` as ``null``), and an array that breaks off half-way is cut
so that no client can take it for the whole table (on HTTP/2 a stream reset);
and its pages come at the pace the client reads.
"""

from __future__ import annotations

import json
from typing import Any

import treq
import h2.events
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from chatterd import web
from chatterd.site import ChatterSite
from chatterd.store import Chatt, StoreUnavailable
from chatterd.streams import Streams
from chatterd.web import ChatterApp
from tests import pgcluster
from tests.harness import Chatterd, query
from tests.ollama_emulator import closed_port
from tests.test_http2 import Client as H2Client

#: The course's own table: no NOT NULL anywhere, no primary key.
COURSE_TABLE = """
CREATE TABLE chatts (username varchar(255), message text, id uuid,
                     time timestamptz DEFAULT CURRENT_TIMESTAMP);
INSERT INTO chatts (username, message, id, time) VALUES
    ('ann', 'first', '00000000-0000-0000-0000-000000000001', '2026-01-01T10:00:00Z'),
    ('bob', 'no time', '00000000-0000-0000-0000-000000000002', NULL),
    ('cat', 'second', '00000000-0000-0000-0000-000000000003', '2026-01-02T10:00:00Z');
"""


class _BreaksAfterFirstPage:
    """
    A store whose pages after the first fail with ``error`` (by default an
    error no one expects).
    """

    def __init__(self, store: Any, error: Exception | None = None) -> None:
        self._store = store
        self._error = error or RuntimeError("not a StoreError")

    def chatts_page(self, after: int, limit: int) -> Deferred[list[Chatt]]:
        if after:
            return fail(self._error)
        return self._store.chatts_page(after, limit)  # type: ignore[no-any-return]


class GetChattsTests(TestCase):
    async def start(self, dsn: str) -> Chatterd:
        return await Chatterd(self, ollama=f"http://127.0.0.1:{closed_port()}", dsn=dsn).start()

    async def test_a_null_time_is_served_as_null(self) -> None:
        """
        A course table with a NULL in ``time`` is served whole: that row's
        time is ``null``, and the rows after it follow.
        """
        dsn = pgcluster.fresh_database()
        query(dsn, COURSE_TABLE)
        chatterd = await self.start(dsn)
        response, body = await chatterd.post("/postchatt", {"username": "dan", "message": "new"})
        self.assertEqual(response.code, 200)
        response, body = await chatterd.get("/getchatts")
        self.assertEqual(response.code, 200)
        rows = json.loads(body)
        # existing rows are numbered in time order (a NULL sorts last), new ones follow
        self.assertEqual([r[:3] for r in rows], [
            ["ann", "first", "00000000-0000-0000-0000-000000000001"],
            ["cat", "second", "00000000-0000-0000-0000-000000000003"],
            ["bob", "no time", "00000000-0000-0000-0000-000000000002"],
            ["dan", "new", rows[3][2]],
        ])
        self.assertEqual([r[3] is None for r in rows], [False, False, True, False])
        self.assertTrue(rows[0][3].startswith("2026-01-01T10:00:00"))

    async def test_an_unexpected_failure_cuts_the_array(self) -> None:
        """
        A failure other than the database's while the array is being sent
        (here on its second page) cuts the response: the client sees it
        broken off, not a clean end after a part of the table.
        """
        self.patch(web, "PAGE_ROWS", 2)
        dsn = pgcluster.fresh_database()
        query(dsn, COURSE_TABLE)
        chatterd = await self.start(dsn)
        chatterd.app.store = _BreaksAfterFirstPage(chatterd.store)  # type: ignore[assignment]

        async def fetch() -> bytes:
            response = await chatterd.http.get(chatterd.url + "/getchatts")
            return await treq.content(response)  # type: ignore[no-any-return]

        # (cut before or after the client has read the headers)
        await self.assertFailure(ensureDeferred(fetch()), ResponseFailed, ResponseNeverReceived)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_database_failure_part_way_cuts_the_array(self) -> None:
        """
        The database failing after the first page has been sent (a
        StoreError) cuts the response too, and is logged as an error, not a
        traceback; the first page alone answers a whole, clean array.
        """
        self.patch(web, "PAGE_ROWS", 2)
        dsn = pgcluster.fresh_database()
        query(dsn, COURSE_TABLE)
        chatterd = await self.start(dsn)
        chatterd.app.store = _BreaksAfterFirstPage(  # type: ignore[assignment]
            chatterd.store, StoreUnavailable("the database is unavailable, try again shortly"))

        async def fetch() -> bytes:
            response = await chatterd.http.get(chatterd.url + "/getchatts")
            return await treq.content(response)  # type: ignore[no-any-return]

        await self.assertFailure(ensureDeferred(fetch()), ResponseFailed, ResponseNeverReceived)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.patch(web, "PAGE_ROWS", 5)  # everything in the first page: no second is read
        self.assertEqual(len(json.loads(await fetch())), 3)


class _PagedStore:
    """
    ``n`` chatts in memory, served page by page at once; every call is
    counted in ``calls`` (its ``after``), and pages after the first fail
    with ``error`` if one is given.
    """

    def __init__(self, n: int, error: Exception | None = None) -> None:
        self.chatts = [Chatt("u", f"m{i}", f"id-{i}", None, i + 1) for i in range(n)]
        self.error = error
        self.calls: list[int] = []

    def chatts_page(self, after: int, limit: int) -> Deferred[list[Chatt]]:
        self.calls.append(after)
        if after and self.error is not None:
            return fail(self.error)
        return succeed([c for c in self.chatts if c.seq > after][:limit])


def _app(store: _PagedStore, clock: Clock) -> Any:
    return ChatterApp(store=store, ollama=None, streams=Streams(clock=clock), clock=clock)  # type: ignore[arg-type]


def _dechunk(body: bytes) -> tuple[bytes, bool]:
    """
    An HTTP/1.1 chunked body decoded, and whether its last chunk came.
    """
    data = b""
    while b"\r\n" in body:
        size, rest = body.split(b"\r\n", 1)
        length = int(size, 16)
        if length == 0:
            return data, True
        data, body = data + rest[:length], rest[length + 2:]
    return data, False


class _FullAfterAWrite(StringTransport):
    """
    A transport whose buffer is full after each write until the client
    reads (:meth:`read`): it pauses its producer as a full TCP buffer does.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and not self.full:
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def read(self) -> None:
        self.full = False
        self.producer.resumeProducing()

    def ended(self) -> bool:
        return self.value().endswith(b"\r\n0\r\n\r\n")


class InMemoryGetChattsTests(SynchronousTestCase):
    """
    ``/getchatts`` on the real app over an in-memory connection, with a
    store in memory: how a cut array ends on HTTP/2, and the pace of a
    reader that stops reading on HTTP/1.1.
    """

    def test_a_cut_array_resets_the_http2_stream(self) -> None:
        """
        Over HTTP/2, a database failure after the first page ends the
        stream with RST_STREAM, never END_STREAM: the part sent cannot pass
        for the whole table; the connection carries on.
        """
        self.patch(web, "PAGE_ROWS", 2)
        store = _PagedStore(3, StoreUnavailable("the database is unavailable, try again shortly"))
        c = H2Client(self)
        c.site.resource = _app(store, c.clock).resource()
        sid = c.request(path=b"/getchatts")
        self.assertEqual(c.status(sid), 200)
        self.assertEqual(store.calls, [0, 2])
        self.assertTrue(c.body(sid).startswith(b"["))
        self.assertEqual(len(c.of(h2.events.StreamReset, sid)), 1)
        self.assertEqual(c.of(h2.events.StreamEnded, sid), [])
        self.assertFalse([f for f in c.frames() if f.stream_id == sid and "END_STREAM" in f.flags])
        self.assertEqual(c.of(h2.events.ConnectionTerminated), [])
        # nothing finishes the reset stream later (Twisted's reset would leave
        # Klein's finish() to raise KeyError, which would fail this test)
        store.error = None  # the next request is served whole, on the same connection
        again = c.request(path=b"/getchatts")
        self.assertEqual(len(json.loads(c.body(again))), 3)
        self.assertEqual(len(c.of(h2.events.StreamEnded, again)), 1)

    def test_a_reader_that_stops_stops_the_pages(self) -> None:
        """
        Over HTTP/1.1, while the connection's transport has paused its
        producer (its buffer is full: the client stopped reading), no
        further page is fetched and what is written stays bounded; each time
        the client reads, the next page follows, and the array ends whole.
        """
        self.patch(web, "PAGE_ROWS", 2)
        clock = Clock()
        store = _PagedStore(9)
        site = ChatterSite(_app(store, clock).resource(), clock=clock, max_body=1000)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = _FullAfterAWrite(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /getchatts HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(60)  # however long it waits (short of the idle timeout)
        self.assertEqual(store.calls, [0])
        written = transport.value()
        head, _, body = written.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(_dechunk(body), (b'[["u", "m0", "id-0", null],["u", "m1", "id-1", null]', False))
        reads = 0
        while not transport.ended():
            self.assertEqual(len(store.calls), reads + 1)
            reads += 1
            transport.read()
            clock.advance(0)
            self.assertLessEqual(len(store.calls), reads + 1)
        self.assertEqual(store.calls, [0, 2, 4, 6, 8])
        array, ended = _dechunk(transport.value().partition(b"\r\n\r\n")[2])
        self.assertTrue(ended)
        self.assertEqual([row[1] for row in json.loads(array)], [f"m{i}" for i in range(9)])
