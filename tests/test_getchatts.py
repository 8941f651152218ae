"""
``GET /getchatts`` over HTTP on course-shaped tables: every row is served
(a NULL ``time`` as ``null``), and an array that breaks off half-way is cut
so that no client can take it for the whole table.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from chatterd import web
from chatterd.store import Chatt, StoreUnavailable
from tests import pgcluster
from tests.harness import Chatterd, query
from tests.ollama_emulator import closed_port

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
