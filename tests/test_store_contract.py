"""
What every ``IChattStore`` must do, checked on both stores: one contract
(:class:`StoreContractMixin`) run against :class:`~chatterd.testing.MemoryChattStore`
(on a ``task.Clock``) and :class:`~chatterd.store.PostgresChattStore` (on the
test cluster).  A deliberately broken fake fails it (:class:`BrokenFakeTests`),
so the fake that routes are tested on is kept honest.

What only SQL can show (locks across real connections, the schema, outages,
course tables) stays in ``test_store`` and ``test_store_connect``.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.trial.reporter import TestResult
from zope.interface.verify import verifyObject

from chatterd.store import (
    IChattStore,
    LockTimeout,
    Message,
    PostgresChattStore,
    StoreError,
    StoreUnavailable,
    ValueTooLong,
)
from chatterd.testing import COURSE_LIMITS, MemoryChattStore, MemoryDatabase
from tests import pgcluster
from tests.test_store import bounded, size  # the rule of the cut, as the SQL's tests state it


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


SYSTEM: list[Message] = [{"role": "system", "content": "Be brief."}]


def turn(n: int, length: int = 40) -> list[Message]:
    return [{"role": "user", "content": f"q{n:03}".ljust(length, ".")},
            {"role": "assistant", "content": f"a{n:03}".ljust(length, ".")}]


class StoreContractMixin:
    """
    The contract of ``IChattStore``.  A subclass says how to make a store
    (:meth:`make_store`), a second store on the same data, as another
    process would be (:meth:`make_peer`), and how to let time pass (:meth:`wait`).
    """

    # (provided by trial's TestCase)
    assertEqual: Any
    assertFailure: Any
    assertNoResult: Any
    assertTrue: Any
    assertIsInstance: Any
    assertLessEqual: Any
    failureResultOf: Any
    fail: Any

    async def make_store(self, **kwargs: Any) -> IChattStore:
        """
        A started store on empty data; ``kwargs``: ``max_history``.
        """
        raise NotImplementedError

    async def make_peer(self, store: IChattStore) -> IChattStore:
        """
        Another started store on ``store``'s data (another chatterd process).
        """
        raise NotImplementedError

    def wait(self, seconds: float) -> Deferred[None]:
        """
        Let ``seconds`` pass on the stores' clock.
        """
        raise NotImplementedError

    async def history(self, store: IChattStore, appid: str, messages: list[Message] = []) -> list[Message]:
        found = await store.begin_turn(appid, messages, 1.0)
        await store.end_turn(appid, None)
        return found

    async def until(self, store: IChattStore, rows: int, seconds: float = 10.0) -> None:
        """
        Wait for the table to hold ``rows`` rows (writes left running by cancelled callers).
        """
        for _ in range(int(seconds / 0.02)):
            if len(await store.chatts_page(0, rows + 1)) >= rows:
                return
            await self.wait(0.02)
        self.fail(f"the table never held {rows} rows")

    # --- the interface ---

    async def test_provides_the_interface(self) -> None:
        """
        The store provides ``IChattStore``, and says how many connections it uses.
        """
        store = await self.make_store()
        self.assertTrue(verifyObject(IChattStore, store))
        self.assertEqual(store.connections_in_use(), 0)
        self.assertEqual(await store.ping(), None)

    # --- ordering and paging ---

    async def test_pages_walk_every_row_in_order(self) -> None:
        """
        ``chatts_page`` returns rows with ``seq > after``, oldest first, at
        most ``limit``; chatts and turn messages share one order; the last
        page is empty.
        """
        store = await self.make_store()
        await store.post_chatt("u", "0")
        await self.history(store, "a", user("1"))
        await store.post_chatt("O'Brien", "2 é 🐍")
        await store.begin_turn("a", user("3"), 1.0)
        await store.end_turn("a", "4")
        pages = [await store.chatts_page(0, 2)]
        while pages[-1]:
            pages.append(await store.chatts_page(pages[-1][-1].seq, 2))
        self.assertEqual([len(p) for p in pages], [2, 2, 1, 0])
        rows = [c for p in pages for c in p]
        self.assertEqual([c.message for c in rows], ["0", "1", "2 é 🐍", "3", "4"])
        self.assertEqual([c.username for c in rows], ["u", "user", "O'Brien", "user", "assistant"])
        self.assertEqual(sorted(c.seq for c in rows), [c.seq for c in rows])
        self.assertEqual(len({c.id for c in rows}), 5)
        self.assertTrue(all(c.time is not None and c.time.tzinfo is not None for c in rows))
        self.assertEqual(await store.chatts_page(rows[1].seq, 100), rows[2:])

    async def test_history_is_one_appids_in_insertion_order(self) -> None:
        """
        ``begin_turn`` stores the messages and returns the appID's history,
        oldest first, nothing of other appIDs; ``end_turn`` stores the reply.
        """
        store = await self.make_store()
        first = [*SYSTEM, *user("Hi")]
        self.assertEqual(await store.begin_turn("a", first, 1.0), first)
        self.assertEqual(await self.history(store, "b", user("other app")), user("other app"))
        await store.end_turn("a", "Hello!")
        found = await self.history(store, "a", user("And?"))
        self.assertEqual(found, [*first, {"role": "assistant", "content": "Hello!"}, *user("And?")])

    async def test_end_turn_without_a_reply_stores_nothing(self) -> None:
        """
        ``end_turn(appid, None)`` gives the turn back and stores nothing; an
        empty reply is stored.
        """
        store = await self.make_store()
        await store.begin_turn("a", user("q"), 1.0)
        await store.end_turn("a", None)
        await store.begin_turn("a", [], 1.0)
        await store.end_turn("a", "")
        self.assertEqual(await self.history(store, "a"), [*user("q"), {"role": "assistant", "content": ""}])

    # --- turns ---

    async def test_a_second_turn_waits_until_end_turn(self) -> None:
        """
        While one store holds an appID's turn, another store's ``begin_turn``
        for it waits (storing nothing) until ``end_turn``, and then sees the
        reply; other appIDs go on meanwhile.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        await store.begin_turn("a", user("first"), 1.0)
        waiting = peer.begin_turn("a", user("second"), 10.0)
        await self.wait(0.1)
        self.assertNoResult(waiting)
        self.assertEqual(await self.history(peer, "b", user("other app")), user("other app"))
        self.assertEqual([c.message for c in await store.chatts_page(0, 10)], ["first", "other app"])
        await store.end_turn("a", "reply")
        found = await waiting
        self.assertEqual([m["content"] for m in found], ["first", "reply", "second"])
        await peer.end_turn("a", None)
        self.assertEqual(await self.history(store, "a"), [*user("first"), *found[1:2], *user("second")])

    async def test_lock_timeout_stores_nothing(self) -> None:
        """
        A turn not free within ``timeout`` is a ``LockTimeout`` (a
        ``StoreUnavailable``); neither ``begin_turn`` nor ``replace_history``
        stored anything, and nothing is held: the turn is free once ended.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        await store.begin_turn("a", user("first"), 1.0)
        for attempt in (peer.begin_turn("a", user("late"), 0.2), peer.replace_history("a", user("replaced"), 0.2)):
            await self.wait(0.3)
            failure = self.failureResultOf(attempt, LockTimeout) if attempt.called else None
            if failure is None:
                await self.assertFailure(attempt, LockTimeout)
        self.assertTrue(issubclass(LockTimeout, StoreUnavailable) and issubclass(StoreUnavailable, StoreError))
        await store.end_turn("a", "reply")
        self.assertEqual(await self.history(peer, "a"), [*user("first"), {"role": "assistant", "content": "reply"}])

    async def test_cancelling_a_turn_wait(self) -> None:
        """
        Cancelling a ``begin_turn`` or ``replace_history`` that waits for
        the turn ends the wait (``CancelledError``): nothing is stored or
        replaced, later either, and the turn stays free for the next.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        await store.begin_turn("a", user("first"), 1.0)
        begin = peer.begin_turn("a", user("never"), 10.0)
        replace = peer.replace_history("a", user("never replaced"), 10.0)
        await self.wait(0.1)
        for d in (begin, replace):
            self.assertNoResult(d)
            d.cancel()
            self.failureResultOf(d, CancelledError)
        await store.end_turn("a", "reply")
        await self.wait(0.6)  # (longer than a PostgreSQL store's pause between attempts)
        self.assertEqual([m["content"] for m in await self.history(peer, "a")], ["first", "reply"])
        self.assertEqual([m["content"] for m in await self.history(store, "a")], ["first", "reply"])

    async def test_replace_history(self) -> None:
        """
        ``replace_history`` deletes one appID's rows, only those, stores the
        new ones and gives the turn back.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        await self.history(store, "a", user("old"))
        await self.history(store, "b", user("keep"))
        await store.replace_history("a", SYSTEM, 1.0)
        self.assertEqual(await self.history(peer, "a"), SYSTEM)
        self.assertEqual(await self.history(peer, "b"), user("keep"))

    async def test_replace_history_waits_for_the_turn(self) -> None:
        """
        ``replace_history`` waits for a turn held elsewhere and replaces
        what that turn stored, its reply included.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        await store.begin_turn("a", user("q"), 1.0)
        replacing = peer.replace_history("a", SYSTEM, 10.0)
        await self.wait(0.1)
        self.assertNoResult(replacing)
        await store.end_turn("a", "reply")
        await replacing
        self.assertEqual(await self.history(store, "a"), SYSTEM)

    # --- errors ---

    async def test_values_too_long(self) -> None:
        """
        On the table chatterd creates, a username past 255 characters or an
        appID past 155 is a ``ValueTooLong`` (400) that stores nothing and
        holds no turn.
        """
        store = await self.make_store()
        await self.assertFailure(store.post_chatt("u" * 256, "m"), ValueTooLong)
        await self.assertFailure(store.begin_turn("a" * 156, user("q"), 1.0), ValueTooLong)
        await store.post_chatt("u" * 255, "m" * 100_000)
        self.assertEqual([len(c.username or "") for c in await store.chatts_page(0, 10)], [255])
        self.assertEqual(await self.history(store, "a" * 155, user("q")), user("q"))
        self.assertEqual(ValueTooLong.status, 400)

    async def test_writes_cannot_be_cancelled_from_outside(self) -> None:
        """
        Cancelling ``post_chatt`` or ``end_turn`` does not abort the write:
        the row is stored, and the turn given back.
        """
        store = await self.make_store()
        peer = await self.make_peer(store)
        posting = store.post_chatt("u", "kept")
        posting.cancel()
        await store.begin_turn("a", user("q"), 1.0)
        ending = store.end_turn("a", "reply")
        ending.cancel()
        for d in (posting, ending):
            d.addErrback(lambda f: f.trap(CancelledError))
        await self.until(store, 3)
        self.assertEqual(sorted(c.message for c in await store.chatts_page(0, 10)), ["kept", "q", "reply"])
        self.assertEqual([m["content"] for m in await self.history(peer, "a")], ["q", "reply"])

    # --- the history bound ---

    async def test_the_bound_is_respected(self) -> None:
        """
        With 20 turns stored and room for 5, the history is the system
        prompt, the 5 newest turns and the new prompt, in order; the rows
        left out stay stored.
        """
        new = user("and now?")
        bound = size(SYSTEM[0]) + 5 * sum(map(size, turn(0))) + size(new[0])
        store = await self.make_store(max_history=bound)
        old = SYSTEM + [m for n in range(20) for m in turn(n)]
        await store.replace_history("a", old, 1.0)
        found = await self.history(store, "a", new)
        self.assertEqual(found, SYSTEM + [m for n in range(15, 20) for m in turn(n)] + new)
        self.assertLessEqual(sum(map(size, found)), bound)
        self.assertEqual(len(await store.chatts_page(0, 1000)), len(old) + 1)

    async def test_bytes_are_counted_exactly(self) -> None:
        """
        A row costs its role and content in UTF-8 bytes plus
        ``MESSAGE_OVERHEAD``: a bound of exactly the sizes takes the older
        row, one byte less leaves it out.
        """
        older, new = [{"role": "user", "content": "caf\u00e9 \u2615"}], user("more")
        exact = size(SYSTEM[0]) + size(older[0]) + size(new[0])
        for bound, expected in [(exact, SYSTEM + older + new), (exact - 1, SYSTEM + new)]:
            store = await self.make_store(max_history=bound)
            await store.replace_history("a", SYSTEM + older, 1.0)
            self.assertEqual(await self.history(store, "a", new), expected, bound)

    async def test_system_messages_only_while_they_fit_on_their_own(self) -> None:
        """
        A new prompt larger than the bound is sent whole, with a system
        prompt that fits on its own; a system prompt that does not fit is
        left out, and so is every system row after it.
        """
        store = await self.make_store(max_history=200)
        await store.replace_history("a", SYSTEM + turn(0) + turn(1), 1.0)
        big = user("x" * 1000)
        self.assertEqual(await self.history(store, "a", big), SYSTEM + big)
        huge = [{"role": "system", "content": "y" * 300}]
        await store.replace_history("b", huge + SYSTEM + turn(0), 1.0)
        self.assertEqual(await self.history(store, "b", user("q")), turn(0) + user("q"))

    async def test_the_cut_follows_the_rule(self) -> None:
        """
        On histories of random roles and sizes (some multi-byte, some
        empty) and random bounds, the store keeps exactly what the rule says.
        """
        rng = random.Random(15)
        for case in range(12):
            bound = rng.randrange(1500)
            store = await self.make_store(max_history=bound)
            roles = rng.choices(["system", "user", "assistant", "tool"], weights=[1, 4, 4, 1], k=rng.randrange(25))
            old = [{"role": r, "content": rng.choice(["", "é", "\u2615", "ab"]) * rng.randrange(50)} for r in roles]
            new = [{"role": rng.choice(["user", "system"]), "content": "n" * rng.randrange(80)}
                   for _ in range(rng.randrange(3))]
            await store.replace_history("r", old, 1.0)
            self.assertEqual(await self.history(store, "r", new), bounded(old, new, bound), (case, bound))


class MemoryStoreContractTests(StoreContractMixin, TestCase):
    """
    The contract on the in-memory fake (on a ``task.Clock``: no real time passes).
    """

    store_class: type[MemoryChattStore] = MemoryChattStore

    def setUp(self) -> None:
        self.clock = Clock()

    async def make_store(self, **kwargs: Any) -> MemoryChattStore:
        store = self.store_class(clock=self.clock, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    async def make_peer(self, store: IChattStore) -> MemoryChattStore:
        assert isinstance(store, MemoryChattStore)
        peer = self.store_class(clock=self.clock, database=store.database, max_history=store.max_history)
        peer.startService()
        self.addCleanup(peer.stopService)
        return peer

    def wait(self, seconds: float) -> Deferred[None]:
        self.clock.advance(seconds)
        return succeed(None)


class PostgresStoreContractTests(StoreContractMixin, TestCase):
    """
    The contract on PostgreSQL (a fresh database of the test cluster per store,
    and per peer the same one).
    """

    async def make_store(self, **kwargs: Any) -> PostgresChattStore:
        return await self._start(pgcluster.fresh_database(), **kwargs)

    async def make_peer(self, store: IChattStore) -> PostgresChattStore:
        assert isinstance(store, PostgresChattStore)
        return await self._start(store._dsn, max_history=store._max_history)  # type: ignore[arg-type]

    async def _start(self, dsn: str, **kwargs: Any) -> PostgresChattStore:
        store = PostgresChattStore(dsn, reactor=reactor, pool_size=2, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        await store.started
        return store

    def wait(self, seconds: float) -> Deferred[None]:
        return deferLater(reactor, seconds)


# --- a fake that breaks the contract fails it ------------------------------------


class NewestFirstMemoryChattStore(MemoryChattStore):
    """
    Broken: returns the history newest first.
    """

    def begin_turn(self, appid: str, messages: Any, timeout: float) -> Deferred[list[Message]]:
        return super().begin_turn(appid, messages, timeout).addCallback(lambda h: h[::-1])


class NeverWaitsMemoryChattStore(MemoryChattStore):
    """
    Broken: every store gets every turn at once (no lock between processes).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["database"] = MemoryDatabase()  # each "process" alone, turns and rows
        super().__init__(**kwargs)


class KeepsEverythingMemoryChattStore(MemoryChattStore):
    """
    Broken: ignores the history bound.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["max_history"] = None
        super().__init__(**kwargs)


class BrokenFakeTests(SynchronousTestCase):
    """
    The contract catches a fake that breaks it: some contract tests, run
    (with trial's ``TestCase.run``) on a broken fake, fail; the same ones
    pass on the honest fake.
    """

    #: broken store, the contract tests it must fail
    CASES = [
        (NewestFirstMemoryChattStore, ["test_history_is_one_appids_in_insertion_order",
                                       "test_a_second_turn_waits_until_end_turn",
                                       "test_the_bound_is_respected"]),
        (NeverWaitsMemoryChattStore, ["test_a_second_turn_waits_until_end_turn",
                                      "test_lock_timeout_stores_nothing",
                                      "test_cancelling_a_turn_wait"]),
        (KeepsEverythingMemoryChattStore, ["test_the_bound_is_respected",
                                           "test_system_messages_only_while_they_fit_on_their_own",
                                           "test_the_cut_follows_the_rule"]),
    ]

    def run_contract(self, store_class: type[MemoryChattStore], names: list[str]) -> TestResult:
        case = type(f"Contract_{store_class.__name__}", (MemoryStoreContractTests,), {"store_class": store_class})
        result = TestResult()
        for name in names:
            case(name).run(result)
        return result

    def test_the_honest_fake_passes(self) -> None:
        """
        The tests used below pass on :class:`MemoryChattStore` itself.
        """
        names = sorted({n for _, ns in self.CASES for n in ns})
        result = self.run_contract(MemoryChattStore, names)
        self.assertEqual((result.failures, result.errors, result.successes), ([], [], len(names)))

    def test_broken_fakes_fail_the_contract(self) -> None:
        """
        Each broken fake fails every contract test that checks what it
        breaks, by an assertion (not a crash).
        """
        for store_class, names in self.CASES:
            result = self.run_contract(store_class, names)
            failed = sorted(case.id().rsplit(".", 1)[-1] for case, _ in result.failures)
            self.assertEqual(failed, sorted(names), store_class.__name__)
            self.assertEqual(result.errors, [], store_class.__name__)


class MemoryStoreTests(SynchronousTestCase):
    """
    What only the fake has: failures on demand, a course table's limits, stopping.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.errors: list[str] = []
        self.store = MemoryChattStore(clock=self.clock, on_error=self.errors.append)
        self.store.startService()

    def test_needs_a_clock(self) -> None:
        """
        The fake times its waits on the clock it is given (``clock=`` or ``reactor=``).
        """
        self.assertRaises(TypeError, MemoryChattStore)
        self.assertIs(MemoryChattStore(reactor=self.clock).clock, self.clock)

    def test_fail_next(self) -> None:
        """
        ``fail_next`` fails the next calls before they do anything; a turn
        whose end fails is given back all the same.
        """
        self.store.fail_next(StoreError("database error"))
        self.failureResultOf(self.store.post_chatt("u", "m"), StoreError)
        self.store.fail_next(StoreUnavailable("down"), times=2)
        self.failureResultOf(self.store.begin_turn("a", user("q"), 1.0), StoreUnavailable)
        self.failureResultOf(self.store.chatts_page(0, 10), StoreUnavailable)
        self.assertEqual(self.store.rows, [])
        self.successResultOf(self.store.begin_turn("a", user("q"), 1.0))
        self.store.fail_next(StoreError("database error"))
        self.failureResultOf(self.store.end_turn("a", "reply"), StoreError)
        peer = MemoryChattStore(clock=self.clock, database=self.store.database)
        self.assertEqual(self.successResultOf(peer.begin_turn("a", [], 0)), user("q"))
        self.assertEqual(self.errors, ["other", "unavailable", "unavailable", "other"])

    def test_unavailable(self) -> None:
        """
        ``available = False`` fails every call with ``StoreUnavailable``.
        """
        self.store.available = False
        for d in (self.store.ping(), self.store.post_chatt("u", "m"), self.store.chatts_page(0, 1),
                  self.store.begin_turn("a", [], 1.0), self.store.replace_history("a", [], 1.0)):
            self.failureResultOf(d, StoreUnavailable)
        self.store.available = True
        self.successResultOf(self.store.ping())

    def test_course_limits(self) -> None:
        """
        With the course table's limits, a username past 32 characters or a
        message past 1000 is ``ValueTooLong``; excess spaces are dropped,
        as PostgreSQL does.
        """
        store = MemoryChattStore(clock=self.clock, limits=COURSE_LIMITS)
        self.failureResultOf(store.post_chatt("u" * 33, "m"), ValueTooLong)
        self.failureResultOf(store.post_chatt("u", "m" * 1001), ValueTooLong)
        self.successResultOf(store.post_chatt("u" * 32 + "   ", "m"))
        self.failureResultOf(store.post_chatt("u", "nul\x00"), StoreError)
        self.assertEqual(store.rows, [("u" * 32, "m", None)])

    def test_stopping_fails_waiters_and_gives_turns_back(self) -> None:
        """
        A stopped store fails its calls and waits with ``StoreUnavailable``
        and holds no turn any more.
        """
        peer = MemoryChattStore(clock=self.clock, database=self.store.database)
        peer.startService()
        self.successResultOf(peer.begin_turn("a", [], 1.0))
        waiting = self.store.begin_turn("a", [], 10.0)
        self.store.stopService()
        self.failureResultOf(waiting, StoreUnavailable)
        self.failureResultOf(self.store.ping(), StoreUnavailable)
        waiting = MemoryChattStore(clock=self.clock, database=peer.database).begin_turn("a", user("q"), 10.0)
        peer.stopService()
        self.assertEqual(self.successResultOf(waiting), user("q"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
