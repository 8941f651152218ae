"""
``PostgresChattStore`` against a real PostgreSQL: schema, ordering, history,
atomic replacement, paging, course tables, cancellation and outages.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from chatterd import store as store_module
from chatterd import tap
from chatterd.store import (
    MESSAGE_OVERHEAD,
    IChattStore,
    LockTimeout,
    PostgresChattStore,
    StoreError,
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


#: Refuses rows whose message is "refused" (a write that fails inside a turn).
REFUSE = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.message = 'refused' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON chatts FOR EACH ROW EXECUTE FUNCTION refuse();
"""


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def history(store: PostgresChattStore, appid: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """
    Append in a turn of its own, and give the turn back.
    """
    found = await store.begin_turn(appid, messages, 1.0)
    await store.end_turn(appid, None)
    return found


def advisory_locks(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0]


class StoreCase(TestCase):
    """
    Tests on a store of their own, on a fresh database of the test cluster.
    """

    async def make_store(self, dsn: str | None = None, **kwargs: object) -> PostgresChattStore:
        self.dsn = dsn or pgcluster.fresh_database()
        store = PostgresChattStore(self.dsn, reactor=reactor, **kwargs)  # type: ignore[arg-type]
        store.startService()
        self.addCleanup(store.stopService)
        await store.started
        return store


class StoreTests(StoreCase):
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
        begin_turn stores the messages and returns the appID's whole history,
        oldest first, and nothing of other appIDs; end_turn stores the reply.
        """
        store = await self.make_store()
        first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        self.assertEqual(await store.begin_turn("a", first, 1.0), first)
        await history(store, "b", user("other app"))
        await store.end_turn("a", "Hello!")
        found = await history(store, "a", user("And?"))
        self.assertEqual(found, [*first, {"role": "assistant", "content": "Hello!"}, *user("And?")])
        self.assertEqual(advisory_locks(self.dsn), 0)

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
        found = await history(store, "tie", [])
        self.assertEqual([m["content"] for m in found], [f"m{i}" for i in range(9, 0, -1)])

    async def test_replace_history(self) -> None:
        """
        replace_history deletes the appID's rows, only those, and stores the new ones.
        """
        store = await self.make_store()
        await history(store, "a", user("old"))
        await history(store, "b", user("keep"))
        await store.replace_history("a", [{"role": "system", "content": "new"}], 1.0)
        self.assertEqual(await history(store, "a", []), [{"role": "system", "content": "new"}])
        self.assertEqual(await history(store, "b", []), user("keep"))
        self.assertEqual(advisory_locks(self.dsn), 0)

    async def test_turns_across_processes(self) -> None:
        """
        A turn is shared by every store on the database: another one cannot
        begin a turn, or replace the history, of an appID in a turn (it gets
        LockTimeout and stores nothing), other appIDs go on, and it can once
        the turn ends.
        """
        store = await self.make_store()
        other = await self.make_store(self.dsn)
        await store.begin_turn("a", user("first"), 1.0)
        await self.assertFailure(other.begin_turn("a", user("second"), 0.2), LockTimeout)
        await self.assertFailure(other.replace_history("a", user("replaced"), 0.2), LockTimeout)
        self.assertEqual(await history(other, "b", user("other app")), user("other app"))
        waiting = other.begin_turn("a", user("second"), 5.0)
        await deferLater(reactor, 0.1)
        self.assertNoResult(waiting)
        await store.end_turn("a", "reply")
        found = await waiting
        self.assertEqual([m["content"] for m in found], ["first", "reply", "second"])
        await other.end_turn("a", None)
        self.assertEqual(advisory_locks(self.dsn), 0)

    async def test_a_turn_reads_after_its_lock(self) -> None:
        """
        A turn's history is read after its lock is taken: a reply committed,
        and its lock given back, while the next turn's statement was running
        (here made slow on purpose before it tries the lock) is in that
        turn's history.
        """
        await self.make_store()
        key = {"class": store_module._LOCK_CLASS, "appid": "snap"}
        # chatterd's function, slowed down before it tries the lock
        slow = store_module.BEGIN_TURN_FUNCTION.replace("chatterd_begin_turn", "slow_begin_turn").replace(
            "    IF NOT pg_try_advisory_lock", "    PERFORM pg_sleep(0.3);\n    IF NOT pg_try_advisory_lock", 1
        )
        self.assertIn("pg_sleep", slow)
        query(self.dsn, slow)
        slow_begin = store_module._BEGIN_TURN.replace("chatterd_begin_turn", "slow_begin_turn")

        def turns() -> list[tuple[object, ...]]:
            with psycopg2.connect(self.dsn) as a, psycopg2.connect(self.dsn) as b:
                a.autocommit = b.autocommit = True
                b.cursor().execute("SELECT pg_advisory_lock(%(class)s, hashtext(%(appid)s))", key)
                reply = {"username": "assistant", "message": "earlier reply", **key}
                ending = threading.Timer(0.1, lambda: b.cursor().execute(store_module._END_TURN, reply))
                ending.start()
                cursor = a.cursor()
                cursor.execute(slow_begin, store_module._many("snap", user("prompt")))
                rows = cursor.fetchall()
                ending.join()
                cursor.execute(store_module._UNLOCK, key)
                return rows

        rows = await deferToThread(turns)
        self.assertEqual([message for _, _, message in rows], ["earlier reply", "prompt"])

    async def test_giving_up_releases_only_what_was_taken(self) -> None:
        """
        A request that gives up while its attempt waits, and did not get the
        turn, gives nothing back: the next request for the appID keeps its
        turn against other processes.
        """
        store = await self.make_store(pool_size=1)
        other = psycopg2.connect(self.dsn)
        self.addCleanup(other.close)
        other.autocommit = True
        lock = "SELECT pg_try_advisory_lock(%s, hashtext('w'))"
        cursor = other.cursor()
        cursor.execute(lock, (store_module._LOCK_CLASS,))
        self.assertTrue(cursor.fetchone()[0])  # another process holds w's turn
        locker = store._locker("w")

        def busy() -> Deferred[object]:
            return Deferred.fromCoroutine(locker.run(lambda c: c.runQuery("SELECT pg_sleep(0.3)")))

        # the locker runs, in this order: busy, first's attempt (not taken),
        # busy, second's attempt (taken: the other process has let go by then);
        # a wrong "give back" after first's attempt would come last
        busy()
        first = store.begin_turn("w", user("first"), 30)
        first.cancel()  # its phone left while its attempt waited for the connection
        self.failureResultOf(first)
        busy()
        second = store.begin_turn("w", user("second"), 30)
        await deferLater(reactor, 0.45)
        cursor.execute("SELECT pg_advisory_unlock(%s, hashtext('w'))", (store_module._LOCK_CLASS,))
        self.assertEqual([m["content"] for m in await second], ["second"])
        await deferLater(reactor, 0.3)  # the first attempt has long ended
        cursor.execute(lock, (store_module._LOCK_CLASS,))
        self.assertFalse(cursor.fetchone()[0])  # the second request still holds the turn
        await store.end_turn("w", None)
        self.assertEqual(advisory_locks(self.dsn), 0)

    async def test_a_statement_error_keeps_the_connection(self) -> None:
        """
        A statement that fails with an "operational" error on a live
        connection (here a full disk, reported by a trigger) is that
        statement's failure, a 500: the connection is not dropped, so the
        turns it holds for other appIDs hold on.
        """
        store = await self.make_store(pool_size=1)  # every appID on one locker connection
        await store.begin_turn("holding", user("hi"), 1.0)
        query(self.dsn, REFUSE.replace("RAISE EXCEPTION 'refused by a trigger'",
                                       "RAISE EXCEPTION 'no space left' USING ERRCODE = 'disk_full'"))
        failure = await self.assertFailure(store.begin_turn("other", user("refused"), 1.0), StoreError)
        self.assertNotIsInstance(failure, StoreUnavailable)
        self.assertEqual(advisory_locks(self.dsn), 1)  # "holding" still has its turn, "other" none
        another = await self.make_store(self.dsn)
        await self.assertFailure(another.begin_turn("holding", user("meanwhile"), 0.2), LockTimeout)
        await store.end_turn("holding", "reply")
        self.assertEqual(advisory_locks(self.dsn), 0)
        self.flushLoggedErrors()

    async def test_unlock_outlasts_a_busy_connection(self) -> None:
        """
        A turn given back while its connection is busy for longer than the
        pool's wait is still given back (not left held by a live session).
        """
        store = await self.make_store(pool_size=1, acquire_timeout=0.2)
        await store.begin_turn("a", user("hi"), 1.0)
        busy = Deferred.fromCoroutine(store._locker("a").run(lambda c: c.runQuery("SELECT pg_sleep(0.5)")))
        await store.end_turn("a", None)
        await busy
        self.assertEqual(advisory_locks(self.dsn), 0)

    async def test_failed_writes_give_the_turn_back(self) -> None:
        """
        A turn whose first or last write fails holds nothing afterwards (a
        session lock outlives the rolled-back statement that took it), the
        failed write left no rows, and the connection is fit for the next
        statement at once (here another appID's, queued behind it).
        """
        store = await self.make_store(pool_size=1)  # every appID on one locker connection
        other = await self.make_store(self.dsn)
        query(self.dsn, REFUSE)
        await self.assertFailure(store.begin_turn("a", user("refused"), 1.0), StoreError)
        self.assertEqual(advisory_locks(self.dsn), 0)
        await store.begin_turn("a", user("fine"), 1.0)
        ending = store.end_turn("a", "refused")
        queued = history(store, "b", user("queued behind"))
        await self.assertFailure(ending, StoreError)
        self.assertEqual(await queued, user("queued behind"))
        self.assertEqual(advisory_locks(self.dsn), 0)
        self.assertEqual(await history(other, "a", []), user("fine"))
        await self.assertFailure(store.replace_history("a", user("refused"), 1.0), StoreError)
        self.assertEqual(advisory_locks(self.dsn), 0)
        self.assertEqual(await history(store, "a", []), user("fine"))  # and the connection still works
        self.flushLoggedErrors()

    async def test_cancelled_begin_gives_the_turn_back(self) -> None:
        """
        A caller that gives up while begin_turn runs (the phone left) leaves
        the prompt stored but no turn held.
        """
        store = await self.make_store()
        d = store.begin_turn("a", user("hello"), 1.0)
        d.cancel()
        self.failureResultOf(d)
        for _ in range(100):
            if query(self.dsn, "SELECT count(*) FROM chatts")[0][0] and not advisory_locks(self.dsn):
                break
            await deferLater(reactor, 0.02)
        self.assertEqual(advisory_locks(self.dsn), 0)
        self.assertEqual(await history(store, "a", []), user("hello"))

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
        await store.begin_turn("a", [], 1.0)
        d = store.end_turn("a", "partial reply")
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


#: A user's words, which must never reach the log.
SECRET = "my bank PIN is 4711"


def logged_text(events: list[dict[str, object]]) -> str:
    """
    Everything ``events`` would write to the log: each line, its fields and any traceback.
    """
    lines = []
    for event in events:
        lines.append(formatEvent(event))
        lines.append(repr({k: v for k, v in event.items() if k != "log_logger"}))
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())  # type: ignore[attr-defined]
    return "\n".join(lines)


class ErrorLogTests(StoreCase):
    """
    A statement's failure is logged by its SQLSTATE, class and schema names,
    never by psycopg2's text, which can quote the row (a user's message).
    """

    async def failing_post(self, setup: str, message: str) -> str:
        """
        Make ``setup`` on a fresh database, post ``message`` (which must
        fail with a plain StoreError), and return what was logged.
        """
        store = await self.make_store()
        query(self.dsn, setup)
        with capturedLogs() as events:
            failure = await self.assertFailure(store.post_chatt("u", message), StoreError)
        self.assertEqual(type(failure), StoreError)
        self.assertEqual(str(failure), "database error")
        self.assertIsNone(failure.__cause__)  # nothing that quotes the row travels with it
        self.flushLoggedErrors()
        return logged_text(events)

    async def test_failing_row_detail_is_not_logged(self) -> None:
        """
        A CHECK constraint's "DETAIL: Failing row contains (...)" holds the
        message: the log has SQLSTATE 23514, the class and the constraint's
        and table's names instead.
        """
        text = await self.failing_post(
            "ALTER TABLE chatts ADD CONSTRAINT short_message CHECK (length(message) < 10)", SECRET
        )
        self.assertIn("SQLSTATE 23514", text)
        self.assertIn("CheckViolation", text)
        self.assertIn("constraint short_message", text)
        self.assertIn("table chatts", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn("4711", text)

    async def test_invalid_input_text_is_not_logged(self) -> None:
        """
        'invalid input syntax for type integer: "<the message>"' quotes the
        value in psycopg2's primary message: only SQLSTATE 22P02 is logged.
        """
        text = await self.failing_post(REFUSE.replace(
            "IF NEW.message = 'refused' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;",
            "PERFORM NEW.message::integer;",
        ), SECRET)
        self.assertIn("SQLSTATE 22P02", text)
        self.assertIn("InvalidTextRepresentation", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn("4711", text)


def size(message: dict[str, str]) -> int:
    """
    What a message costs of the history bound.
    """
    return MESSAGE_OVERHEAD + len(message["role"].encode()) + len(message["content"].encode())


def bounded(old: list[dict[str, str]], new: list[dict[str, str]], bound: int) -> list[dict[str, str]]:
    """
    The history that the bound lets through, by the rule: the system rows
    oldest first as long as they fit, the new messages always, then the
    other rows newest first as long as they fit, all in their order.
    """
    keep = set()
    used = 0
    for i, m in enumerate(old):
        if m["role"] == "system":
            if used + size(m) > bound:
                break
            used += size(m)
            keep.add(i)
    used += sum(size(m) for m in new)
    for i in reversed(range(len(old))):
        if old[i]["role"] != "system":
            used += size(old[i])
            if used > bound:
                break
            keep.add(i)
    return [m for i, m in enumerate(old) if i in keep] + new


def turn(n: int, length: int = 100) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"q{n:03}".ljust(length, ".")},
            {"role": "assistant", "content": f"a{n:03}".ljust(length, ".")}]


class HistoryBoundTests(StoreCase):
    """
    begin_turn returns at most max_history bytes of history, cut in the
    database: the new messages whole, the system prompt, the newest rows
    that fit, in order; nothing is deleted.
    """

    SYSTEM = [{"role": "system", "content": "Be brief."}]

    async def fill(self, store: PostgresChattStore, appid: str, turns: int, length: int = 100) -> list[dict[str, str]]:
        """
        /llmprep's system prompt, then ``turns`` questions and answers.
        """
        await store.replace_history(appid, self.SYSTEM, 1.0)
        rows = list(self.SYSTEM) + [m for n in range(turns) for m in turn(n, length)]
        query(self.dsn, "INSERT INTO chatts (username, message, appid) "
                        "SELECT r, m, %s FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(r, m, i) "
                        "ORDER BY i", (appid, [m["role"] for m in rows[1:]], [m["content"] for m in rows[1:]]))
        return rows

    def count(self, appid: str) -> int:
        return query(self.dsn, "SELECT count(*) FROM chatts WHERE appid = %s", (appid,))[0][0]

    async def test_the_bound_is_respected(self) -> None:
        """
        With 50 turns stored and room for 10, the history is the system
        prompt, the 10 newest turns and the new prompt, in order, within the
        bound; the 100 rows left out are still in the table.
        """
        new = user("and now?")
        bound = size(self.SYSTEM[0]) + 10 * sum(size(m) for m in turn(0)) + size(new[0])
        store = await self.make_store(max_history=bound)
        old = await self.fill(store, "a", 50)
        found = await history(store, "a", new)
        self.assertEqual(found, self.SYSTEM + [m for n in range(40, 50) for m in turn(n)] + new)
        self.assertLessEqual(sum(map(size, found)), bound)
        self.assertEqual(self.count("a"), len(old) + 1)
        self.assertEqual(await history(store, "b", user("other app")), user("other app"))

    async def test_bytes_are_counted_exactly(self) -> None:
        """
        A row counts its role and content in UTF-8 bytes plus the JSON
        framing: a bound of exactly the sizes takes the older row, one byte
        less leaves it out.
        """
        older, new = [{"role": "user", "content": "caf\u00e9 \u2615"}], user("more")
        exact = size(self.SYSTEM[0]) + size(older[0]) + size(new[0])
        for bound, expected in [(exact, self.SYSTEM + older + new), (exact - 1, self.SYSTEM + new)]:
            store = await self.make_store(max_history=bound)
            await store.replace_history("a", self.SYSTEM + older, 1.0)
            self.assertEqual(await history(store, "a", new), expected, bound)

    async def test_the_new_prompt_is_kept_whole(self) -> None:
        """
        A prompt larger than the whole bound is sent whole, with the system
        prompt (it fits on its own) and none of the older rows.
        """
        store = await self.make_store(max_history=200)
        await self.fill(store, "a", 3)
        big = user("x" * 1000)
        self.assertEqual(await history(store, "a", big), self.SYSTEM + big)
        self.assertEqual(self.count("a"), 1 + 6 + 1)

    async def test_without_a_new_message(self) -> None:
        """
        A turn with no new messages gets the newest rows that fit.
        """
        store = await self.make_store(max_history=size(self.SYSTEM[0]) + sum(size(m) for m in turn(0)))
        await self.fill(store, "a", 5)
        self.assertEqual(await history(store, "a", []), self.SYSTEM + turn(4))

    async def test_a_long_history_that_fits(self) -> None:
        """
        A history of more rows than the quick sum looks at (1000) is still
        sent whole when it fits.
        """
        store = await self.make_store()
        old = await self.fill(store, "a", 600, length=10)
        self.assertEqual(await history(store, "a", user("more")), old + user("more"))

    async def test_the_cut_follows_the_rule(self) -> None:
        """
        On histories of random roles and sizes (some multi-byte, some
        empty) and random bounds, the database keeps exactly what the rule
        says, in order.
        """
        store = await self.make_store()
        rng = random.Random(12)
        sql = store_module._BEGIN_TURN
        for case in range(40):
            roles = rng.choices(["system", "user", "assistant", "tool"], weights=[1, 4, 4, 1], k=rng.randrange(30))
            old = [{"role": r, "content": rng.choice(["", "é", "\u2615", "ab"]) * rng.randrange(60)} for r in roles]
            new = [{"role": rng.choice(["user", "system"]), "content": "n" * rng.randrange(80)}
                   for _ in range(rng.randrange(3))]
            bound = rng.randrange(2000)
            appid = f"r{case}"
            await store.replace_history(appid, old, 1.0)
            rows = query(self.dsn, sql, store_module._many(appid, new, max_bytes=bound))
            query(self.dsn, store_module._UNLOCK, {"class": store_module._LOCK_CLASS, "appid": appid})
            found = [{"role": r, "content": c} for _, r, c in rows]
            self.assertEqual(found, bounded(old, new, bound), (case, bound))
            self.assertEqual(self.count(appid), len(old) + len(new))

    async def test_an_older_schema_is_upgraded(self) -> None:
        """
        A database made by an earlier chatterd (the function without its
        bound) gets the bounded function, and the old signature, still
        called by processes not yet upgraded, sends the whole history.
        """
        dsn = pgcluster.fresh_database()
        query(dsn, "CREATE TABLE chatts (username varchar(255), message text, id uuid PRIMARY KEY DEFAULT "
                   "gen_random_uuid(), time timestamptz NOT NULL DEFAULT clock_timestamp(), appid varchar(155));"
                   "CREATE FUNCTION chatterd_begin_turn(lock_class integer, app text, roles text[], "
                   "contents text[], replace boolean) RETURNS TABLE (seq bigint, role text, content text) "
                   "LANGUAGE sql AS $$ SELECT 1::bigint, 'old'::text, 'old'::text $$")
        store = await self.make_store(dsn, max_history=size(self.SYSTEM[0]) + sum(size(m) for m in turn(0)))
        old = await self.fill(store, "a", 3)
        self.assertEqual(await history(store, "a", []), self.SYSTEM + turn(2))
        # (the lock, taken on query()'s own connection, goes with it)
        old_call = ("SELECT role, content FROM chatterd_begin_turn(%s, 'a', '{}'::text[], '{}'::text[], false)",
                    (store_module._LOCK_CLASS,))
        self.assertEqual(query(dsn, *old_call), [(m["role"], m["content"]) for m in old])
        await self.make_store(dsn)  # and again: nothing changes
        self.assertEqual(query(dsn, *old_call), [(m["role"], m["content"]) for m in old])
        self.assertEqual(await history(store, "a", []), self.SYSTEM + turn(2))


class MaxHistoryOptionTests(SynchronousTestCase):
    """
    ``--max-history BYTES`` reaches the store; 4 MiB by default.
    """

    def store(self, *argv: str) -> PostgresChattStore:
        options = tap.Options()
        options.parseOptions(["--database", "dbname=x", "--listen", "tcp:8080", *argv])
        [sequential] = tap.makeService(options, reactor=MemoryReactorClock())
        return sequential.getServiceNamed("store")  # type: ignore[no-any-return]

    def test_default(self) -> None:
        self.assertEqual(self.store()._max_history, 4 * 1024 * 1024)

    def test_given(self) -> None:
        self.assertEqual(self.store("--max-history", "65536")._max_history, 65536)

    def test_bad_values(self) -> None:
        for value in ("0", "-1", "1.5", "lots"):
            self.assertRaises(usage.UsageError, self.store, "--max-history", value)
