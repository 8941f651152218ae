"""
``PostgresChattStore`` against a real PostgreSQL: schema, ordering, history,
atomic replacement, paging, course tables, cancellation and outages.
"""

from __future__ import annotations

import time

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from chatterd.store import (
    IChattStore,
    PostgresChattStore,
    StoreUnavailable,
    ValueTooLong,
)
from tests import pgcluster
from tests.harness import query

#: The course's own table, as its setup pages make it (no seq, no defaults on id).
COURSE_TABLE = """
CREATE TABLE chatts (username varchar(32), message varchar(1000), id uuid PRIMARY KEY,
                     time timestamptz DEFAULT CURRENT_TIMESTAMP);
ALTER TABLE chatts ADD COLUMN appID varchar(155);
"""


class StoreTests(TestCase):
    async def make_store(self, dsn: str | None = None, **kwargs: object) -> PostgresChattStore:
        self.dsn = dsn or pgcluster.fresh_database()
        store = PostgresChattStore(self.dsn, reactor=reactor, **kwargs)  # type: ignore[arg-type]
        store.startService()
        self.addCleanup(store.stopService)
        await store.started
        return store

    async def test_interface(self) -> None:
        """
        The store provides IChattStore.
        """
        self.assertTrue(verifyObject(IChattStore, await self.make_store()))

    async def test_schema(self) -> None:
        """
        The table has the course's columns, plus seq and the two indexes.
        """
        await self.make_store()
        columns = query(self.dsn, "SELECT column_name, data_type FROM information_schema.columns "
                                  "WHERE table_name = 'chatts' ORDER BY ordinal_position")
        self.assertEqual([c[0] for c in columns], ["username", "message", "id", "time", "appid", "seq"])
        indexes = {r[0] for r in query(self.dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'chatts'")}
        self.assertEqual(indexes, {"chatts_pkey", "chatts_seq", "chatts_appid_seq"})

    async def test_schema_is_idempotent(self) -> None:
        """
        Starting again on the same database changes nothing and loses nothing.
        """
        store = await self.make_store()
        await store.post_chatt("u", "m")
        again = await self.make_store(self.dsn)
        await again.post_chatt("u", "n")
        self.assertEqual(query(self.dsn, "SELECT message FROM chatts ORDER BY seq"), [("m",), ("n",)])

    async def test_history_in_insertion_order(self) -> None:
        """
        append_and_load stores the messages and returns the appID's whole
        history, oldest first, and nothing of other appIDs.
        """
        store = await self.make_store()
        first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        self.assertEqual(await store.append_and_load("a", first), first)
        await store.append_and_load("b", [{"role": "user", "content": "other app"}])
        await store.add_reply("a", "Hello!")
        history = await store.append_and_load("a", [{"role": "user", "content": "And?"}])
        self.assertEqual(history, [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}])

    async def test_ties_in_time_keep_insertion_order(self) -> None:
        """
        Rows whose timestamps tie (the course inserts them in one transaction)
        still read back in insertion order.
        """
        store = await self.make_store()
        query(self.dsn, "INSERT INTO chatts (username, message, time, appid) "
                        "SELECT 'user', 'm' || i, '2026-01-01T00:00:00Z', 'tie' "
                        "FROM generate_series(9, 1, -1) AS i")
        # rewrite two rows, which moves them to the end of the heap: a scan
        # in physical order no longer matches insertion order
        query(self.dsn, "UPDATE chatts SET message = message WHERE message IN ('m9', 'm5')")
        by_time = query(self.dsn, "SET enable_indexscan = off; SET enable_bitmapscan = off; "
                                  "SELECT message FROM chatts WHERE appid = 'tie' ORDER BY time")
        self.assertNotEqual([m for (m,) in by_time], [f"m{i}" for i in range(9, 0, -1)])
        history = await store.append_and_load("tie", [])
        self.assertEqual([m["content"] for m in history], [f"m{i}" for i in range(9, 0, -1)])

    async def test_replace_history(self) -> None:
        """
        replace_history deletes the appID's rows, only those, and stores the new ones.
        """
        store = await self.make_store()
        await store.append_and_load("a", [{"role": "user", "content": "old"}])
        await store.append_and_load("b", [{"role": "user", "content": "keep"}])
        await store.replace_history("a", [{"role": "system", "content": "new"}])
        self.assertEqual(await store.append_and_load("a", []), [{"role": "system", "content": "new"}])
        self.assertEqual(await store.append_and_load("b", []), [{"role": "user", "content": "keep"}])

    async def test_pages(self) -> None:
        """
        chatts_page walks the table in order, page by page.
        """
        store = await self.make_store()
        for i in range(5):
            await store.post_chatt("u", str(i))
        first = await store.chatts_page(0, 2)
        second = await store.chatts_page(first[-1].seq, 2)
        third = await store.chatts_page(second[-1].seq, 2)
        self.assertEqual([c.message for c in first + second + third], ["0", "1", "2", "3", "4"])
        self.assertEqual(await store.chatts_page(third[-1].seq, 2), [])
        self.assertIsNotNone(first[0].time.tzinfo)

    async def test_history_query_uses_the_index(self) -> None:
        """
        The per-appID history query is served by the (appid, seq) index.
        """
        await self.make_store()
        plan = query(self.dsn, "SET enable_seqscan = off; EXPLAIN SELECT username, message FROM chatts "
                               "WHERE appid = 'x' ORDER BY seq")
        self.assertIn("chatts_appid_seq", " ".join(r[0] for r in plan))

    async def test_course_table_keeps_working(self) -> None:
        """
        An existing course table (no seq, no id default, varchar(32) names) is
        upgraded in place: old rows keep their time order, new rows follow.
        """
        dsn = pgcluster.fresh_database()
        query(dsn, COURSE_TABLE)
        query(dsn, "INSERT INTO chatts (username, message, id, time) VALUES "
                   "('b', 'second', gen_random_uuid(), '2026-01-02'), ('a', 'first', gen_random_uuid(), '2026-01-01')")
        store = await self.make_store(dsn)
        await store.post_chatt("c", "third")
        page = await store.chatts_page(0, 10)
        self.assertEqual([c.message for c in page], ["first", "second", "third"])
        e = await self.assertFailure(store.post_chatt("x" * 33, "too long for the course's varchar(32)"), ValueTooLong)
        self.assertEqual(e.status, 400)

    async def test_cancelled_write_still_lands(self) -> None:
        """
        Cancelling a store call (a client left) does not abort the write.
        """
        store = await self.make_store()
        d = store.add_reply("a", "partial reply")
        d.cancel()
        self.failureResultOf(d)
        for _ in range(100):
            if query(self.dsn, "SELECT count(*) FROM chatts")[0][0]:
                break
            await deferLater(reactor, 0.02)
        self.assertEqual(query(self.dsn, "SELECT username, message, appid FROM chatts"), [("assistant", "partial reply", "a")])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_pool_wait_is_bounded(self) -> None:
        """
        A request that waits longer than acquire_timeout for a connection gets
        StoreUnavailable (a 503), not an endless wait.
        """
        store = await self.make_store(pool_size=1, acquire_timeout=0.2)
        blocker = Deferred.fromCoroutine(store.pool.run(lambda c: c.runQuery("SELECT pg_sleep(1)")))
        await self.assertFailure(store.post_chatt("u", "m"), StoreUnavailable)
        await blocker


class OutageTests(TestCase):
    """
    The database going away and coming back, on the shared test cluster.
    """

    def tearDown(self) -> None:
        pgcluster.start()  # whatever happened, leave the cluster running

    async def post_once_back(self, store: PostgresChattStore, message: str, within: float = 10.0) -> None:
        """
        Post a chatt, retrying while the store is unavailable, for at most ``within`` seconds.
        """
        deadline = time.monotonic() + within
        while True:
            try:
                return await store.post_chatt("u", message)
            except StoreUnavailable:
                self.assertLess(time.monotonic(), deadline, "the store did not recover")
                await deferLater(reactor, 0.2)

    async def test_restart_recovers_without_a_restart_of_chatterd(self) -> None:
        """
        While PostgreSQL is down, calls fail fast with StoreUnavailable; once
        it is back, the same store works again within a few seconds.
        """
        dsn = pgcluster.fresh_database()
        store = PostgresChattStore(dsn, reactor=reactor, pool_size=2)
        store.startService()
        self.addCleanup(store.stopService)
        await store.started
        await store.post_chatt("u", "before")
        pgcluster.stop()
        started = time.monotonic()
        for _ in range(3):
            await self.assertFailure(store.post_chatt("u", "during"), StoreUnavailable)
        self.assertLess(time.monotonic() - started, 5)
        pgcluster.start()
        await self.post_once_back(store, "after")
        recovered = time.monotonic() - started
        self.assertEqual(query(dsn, "SELECT message FROM chatts ORDER BY seq"), [("before",), ("after",)])
        self.assertLess(recovered, 10)
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)

    async def test_down_at_start(self) -> None:
        """
        A store started while PostgreSQL is down starts anyway, answers
        StoreUnavailable, and creates its schema once the database is back.
        """
        dsn = pgcluster.fresh_database()
        pgcluster.stop()
        store = PostgresChattStore(dsn, reactor=reactor, pool_size=2)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual(await store.started, 0)
        await self.assertFailure(store.post_chatt("u", "m"), StoreUnavailable)
        pgcluster.start()
        await self.post_once_back(store, "m")
        self.assertEqual(query(dsn, "SELECT username, message FROM chatts"), [("u", "m")])
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)
