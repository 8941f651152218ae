# -*- test-case-name: tests.test_store_contract -*-
"""
Fakes for tests, as txacme's ``testing`` module has them: :class:`MemoryChattStore`,
an in-memory :class:`~chatterd.store.IChattStore` that keeps the contract
``tests/test_store_contract.py`` checks on both stores.

Use it where a test is about a route, the relay or validation, not about SQL:
it answers at once (its Deferreds have fired when they are returned, except a
wait for a turn), times its turn waits on the clock it is given, and fails on
demand (:meth:`MemoryChattStore.fail_next`, :attr:`MemoryChattStore.available`).
"""

from __future__ import annotations

import datetime
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from chatterd.store import (
    DEFAULT_MAX_HISTORY,
    MESSAGE_OVERHEAD,
    Chatt,
    IChattStore,
    LockTimeout,
    Message,
    StoreError,
    StoreUnavailable,
    ValueTooLong,
)

__all__ = ["COURSE_LIMITS", "SCHEMA_LIMITS", "MemoryChattStore", "MemoryDatabase"]

#: The ``varchar`` limits (in characters) of the table chatterd creates.
#: ``message`` is ``text``: no limit.
SCHEMA_LIMITS: Mapping[str, int] = {"username": 255, "appid": 155}
#: Those of the course's own table (``username varchar(32)``, ``message varchar(1000)``).
COURSE_LIMITS: Mapping[str, int] = {"username": 32, "message": 1000, "appid": 155}


@dataclass
class _Row:
    seq: int
    username: str
    message: str
    id: str
    time: datetime.datetime
    appid: str | None


@dataclass
class _Waiter:
    store: MemoryChattStore
    deferred: Deferred[None]
    timer: IDelayedCall | None = None


@dataclass
class _Turn:
    """
    One appID's lock: like a session advisory lock, held by one store (one
    process's connection) and counted, so the holder may take it again.
    """

    holder: MemoryChattStore | None = None
    count: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)


class MemoryDatabase:
    """
    What several :class:`MemoryChattStore` share when they stand for several
    chatterd processes on one database: the rows (one ``seq`` for all) and
    the appIDs' turns.
    """

    def __init__(self, limits: Mapping[str, int] = SCHEMA_LIMITS) -> None:
        self.rows: list[_Row] = []
        self.limits = dict(limits)
        self._seq = 0
        self._turns: dict[str, _Turn] = {}

    def insert(self, username: str, message: str, appid: str | None) -> None:
        self._seq += 1
        now = datetime.datetime.now(datetime.timezone.utc)
        self.rows.append(_Row(self._seq, username, message, str(uuid.uuid4()), now, appid))

    def check(self, username: str | None = None, message: str | None = None, appid: str | None = None) -> None:
        """
        Refuse, as PostgreSQL does, a value longer than its ``varchar``
        (:class:`ValueTooLong`; excess that is all spaces is allowed, and
        :meth:`fit` drops it) and text holding NUL (:class:`StoreError`).
        """
        for column, value in (("username", username), ("message", message), ("appid", appid)):
            if value is None:
                continue
            if "\x00" in value:
                raise StoreError("database error")
            limit = self.limits.get(column)
            if limit is not None and len(value.rstrip(" ")) > limit:
                raise ValueTooLong("a value is too long for its column")

    def fit(self, column: str, value: str) -> str:
        limit = self.limits.get(column)
        return value if limit is None else value[:max(limit, len(value.rstrip(" ")))]

    def turn(self, appid: str) -> _Turn:
        return self._turns.setdefault(appid, _Turn())

    def forget(self, appid: str) -> None:
        t = self._turns.get(appid)
        if t is not None and t.holder is None and not t.waiting:
            del self._turns[appid]


def _size(role: str | None, content: str | None) -> int:
    return MESSAGE_OVERHEAD + len((role or "").encode()) + len((content or "").encode())


@implementer(IChattStore)
class MemoryChattStore(Service):
    """
    :class:`~chatterd.store.IChattStore` in memory, with the semantics of
    :class:`~chatterd.store.PostgresChattStore`:

    - rows of every appID in one ``seq`` order; ``chatts_page`` walks it;
    - an appID's turn is exclusive between stores on one :class:`MemoryDatabase`
      (as advisory locks are between processes) and, like a session lock,
      counted within one store (``streams.turn`` serialises a process's own
      requests); waiters are served first come, first served, each up to
      its ``timeout`` on ``clock`` (then :class:`LockTimeout`, nothing stored);
    - the history is cut to ``max_history`` by the rule of
      ``BEGIN_TURN_FUNCTION``;
    - ``ValueTooLong`` for values past ``limits`` (default
      :data:`SCHEMA_LIMITS`, the table chatterd creates; pass
      :data:`COURSE_LIMITS` for a course table), ``StoreError`` for NUL;
    - its Deferreds have fired when returned (cancelling them does nothing),
      except a wait for a turn, which cancelling ends (nothing stored).

    Stopping it fails its waiters and gives back its turns (its connections,
    and their locks, are gone).  For tests: :meth:`fail_next` queues errors
    for the next calls, and ``available = False`` fails every call with
    :class:`StoreUnavailable` (a call that gives a turn back still does).

    :param clock: times the turn waits (``reactor`` is the same, by its
        ``PostgresChattStore`` name).
    :param database: share rows and turns with other stores.
    :param on_error: told the kind of each failure, as the real store does.
    """

    name = "store"

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        reactor: IReactorTime | None = None,
        max_history: int | None = DEFAULT_MAX_HISTORY,
        database: MemoryDatabase | None = None,
        limits: Mapping[str, int] | None = None,
        on_error: Callable[[str], object] = lambda kind: None,
    ) -> None:
        chosen = clock if clock is not None else reactor
        if chosen is None:
            raise TypeError("MemoryChattStore needs a clock (clock= or reactor=)")
        self.clock: IReactorTime = chosen
        self.max_history = max_history
        if database is None:
            database = MemoryDatabase(SCHEMA_LIMITS if limits is None else limits)
        elif limits is not None:
            database.limits = dict(limits)
        self.database = database
        self.available = True
        self.started: Deferred[int] | None = None
        self._on_error = on_error
        self._errors: deque[StoreError] = deque()
        self._stopped = False

    # --- for tests ---

    def fail_next(self, error: StoreError, times: int = 1) -> None:
        """
        Make the next ``times`` calls fail with ``error`` (before they do anything).
        """
        self._errors.extend([error] * times)

    @property
    def rows(self) -> list[tuple[str, str, str | None]]:
        """
        ``(username, message, appid)`` of every row, in ``seq`` order.
        """
        return [(r.username, r.message, r.appid) for r in self.database.rows]

    # --- service ---

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.started = succeed(1)

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True
        for appid, t in list(self.database._turns.items()):
            for w in [w for w in t.waiting if w.store is self]:
                self._drop(t, w)
                w.deferred.errback(StoreUnavailable("the store is stopped"))
            if t.holder is self:
                t.holder, t.count = None, 0
                self._hand_on(appid)

    def connections_in_use(self) -> int:
        return 0  # every call is answered at once: none holds a connection

    # --- failing ---

    def _error(self) -> StoreError | None:
        if self._stopped:
            return StoreUnavailable("the store is stopped")
        if self._errors:
            return self._errors.popleft()
        if not self.available:
            return StoreUnavailable("the database is unavailable, try again shortly")
        return None

    def _report(self, error: StoreError) -> StoreError:
        if not isinstance(error, LockTimeout):
            if isinstance(error, StoreUnavailable):
                self._on_error("unavailable")
            elif isinstance(error, ValueTooLong):
                self._on_error("too_long")
            else:
                self._on_error("other")
        return error

    def _checked(self, **values: str | None) -> StoreError | None:
        try:
            self.database.check(**values)
        except StoreError as e:
            return self._report(e)
        return None

    # --- IChattStore ---

    def post_chatt(self, username: str, message: str) -> Deferred[None]:
        error = self._error() or self._checked(username=username, message=message)
        if error is not None:
            return fail(self._report(error))
        db = self.database
        db.insert(db.fit("username", username), db.fit("message", message), None)
        return succeed(None)

    def chatts_page(self, after: int, limit: int) -> Deferred[list[Chatt]]:
        error = self._error()
        if error is not None:
            return fail(self._report(error))
        rows = [r for r in self.database.rows if r.seq > after][:max(limit, 0)]
        return succeed([Chatt(r.username, r.message, r.id, r.time, r.seq) for r in rows])

    def begin_turn(self, appid: str, messages: Sequence[Message], timeout: float) -> Deferred[list[Message]]:
        return self._in_turn(appid, list(messages), timeout, replace=False)

    def end_turn(self, appid: str, reply: str | None) -> Deferred[None]:
        error = self._error()
        if error is None and reply is not None:
            error = self._checked(username="assistant", message=reply, appid=appid)
        if error is None and reply is not None:  # stored even out of turn, as the real store does
            self.database.insert("assistant", self.database.fit("message", reply), self.database.fit("appid", appid))
        self._unlock(appid)  # given back even if storing failed
        return succeed(None) if error is None else fail(self._report(error))

    def replace_history(self, appid: str, messages: Sequence[Message], timeout: float) -> Deferred[None]:
        d = self._in_turn(appid, list(messages), timeout, replace=True)

        def give_back(_: object) -> None:
            self._unlock(appid)

        return d.addCallback(give_back)

    def ping(self) -> Deferred[None]:
        error = self._error()
        return succeed(None) if error is None else fail(self._report(error))

    # --- turns ---

    def _in_turn(self, appid: str, messages: list[Message], timeout: float, *, replace: bool) -> Deferred[list[Message]]:
        error = self._error()
        if error is not None:
            return fail(self._report(error))
        t = self.database.turn(appid)
        if t.holder is None or t.holder is self:
            t.holder, t.count = self, t.count + 1
            return self._apply(appid, messages, replace)
        waiter = _Waiter(self, Deferred(lambda d: self._drop(t, waiter)))
        t.waiting.append(waiter)

        def expire() -> None:
            waiter.timer = None
            self._drop(t, waiter)
            waiter.deferred.errback(LockTimeout("another chatterd is still streaming for this appID"))

        waiter.timer = self.clock.callLater(max(timeout, 0), expire)
        return waiter.deferred.addCallback(lambda _: self._apply(appid, messages, replace))

    def _drop(self, t: _Turn, waiter: _Waiter) -> None:
        if waiter in t.waiting:
            t.waiting.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _apply(self, appid: str, messages: list[Message], replace: bool) -> Deferred[list[Message]]:
        """
        In the turn: check, (replace or) append, read the history; a failure
        gives the turn back.
        """
        error = self._checked(appid=appid)
        for m in messages:
            error = error or self._checked(username=m["role"], message=m["content"])
        if error is not None:
            self._unlock(appid)
            return fail(error)
        db = self.database
        if replace:
            db.rows = [r for r in db.rows if r.appid != appid]
        first_new = db._seq + 1
        for m in messages:
            db.insert(db.fit("username", m["role"]), db.fit("message", m["content"]), db.fit("appid", appid))
        mine = [r for r in db.rows if r.appid == appid]
        old = [r for r in mine if r.seq < first_new]
        new = [r for r in mine if r.seq >= first_new]
        kept = new if replace else self._bounded(old, new)
        return succeed([{"role": r.username, "content": r.message} for r in sorted(kept, key=lambda r: r.seq)])

    def _bounded(self, old: list[_Row], new: list[_Row]) -> list[_Row]:
        """
        The rows of ``BEGIN_TURN_FUNCTION``'s cut: all if they fit; else the
        old system rows, oldest first, while they fit on their own; the new
        rows always; then the other old rows, newest first, while they fit
        in what is left.  Each walk stops at the first row that does not fit.
        """
        if self.max_history is None:
            return old + new
        bound = self.max_history
        if sum(_size(r.username, r.message) for r in old + new) <= bound:
            return old + new
        kept: list[_Row] = []
        used = 0
        for r in old:
            if r.username == "system":
                if used + _size(r.username, r.message) > bound:
                    break
                used += _size(r.username, r.message)
                kept.append(r)
        used += sum(_size(r.username, r.message) for r in new)
        for r in reversed(old):
            if r.username != "system":
                if used + _size(r.username, r.message) > bound:
                    break
                used += _size(r.username, r.message)
                kept.append(r)
        return kept + new

    def _unlock(self, appid: str) -> None:
        """
        Give one count of ``appid``'s turn back, if this store holds it (as
        ``pg_advisory_unlock`` does), and hand a free turn to the next waiter.
        """
        t = self.database.turn(appid)
        if t.holder is self:
            t.count -= 1
            if t.count <= 0:
                t.holder, t.count = None, 0
        self._hand_on(appid)

    def _hand_on(self, appid: str) -> None:
        t = self.database.turn(appid)
        if t.holder is None and t.waiting:
            waiter = t.waiting.popleft()
            self._drop(t, waiter)
            t.holder, t.count = waiter.store, 1
            waiter.deferred.callback(None)
        self.database.forget(appid)
