# -*- test-case-name: tests.test_store -*-
"""
The chatts table: ``IChattStore`` and its PostgreSQL implementation on txpostgres
(its connections are :mod:`chatterd.pool`'s; its in-memory fake is
:class:`chatterd.testing.MemoryChattStore`).

Every statement a request needs is sent as one round trip.  Several statements
in one simple query run in one implicit transaction, so "insert the prompt and
read the history back" is atomic without ``BEGIN``/``COMMIT`` round trips.

Rows of one appID read back in insertion order: a ``seq`` identity column
breaks the ties that ``time`` has inside a transaction, and the index on
``(appid, seq)`` serves the history query.  Existing course tables keep working:
the schema only adds what is missing.
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import psycopg2
import psycopg2.errors
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError, ensureDeferred, gatherResults
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHostnameResolver, IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from txpostgres import reconnection, txpostgres
from zope.interface import Interface, implementer

from chatterd.logs import Logger
from chatterd.pool import (
    ConnectionPool,
    NoAnswer,
    PoolClosed,
    PoolTimeout,
    connection_lost,
    dsn_connect_timeout,
    with_keepalives,
)

log = Logger()
T = TypeVar("T")

#: A message as Ollama's chat API takes it: ``{"role": ..., "content": ...}``.
Message = dict[str, str]


@dataclass(frozen=True)
class Chatt:
    """
    One row of ``chatts``, as ``/getchatts`` shows it.
    """

    username: str | None
    message: str | None
    id: str
    time: datetime.datetime | None  # a course table's column may hold NULL
    seq: int


# --- errors ----------------------------------------------------------------------


class StoreError(Exception):
    """
    The database failed; the message is safe to show to a client.
    """

    status = 500


class StoreUnavailable(StoreError):
    """
    The database cannot be reached (down, restarting, or every connection busy).
    """

    status = 503


class StoreBusy(StoreUnavailable):
    """
    Every connection stayed busy for longer than the caller may wait (``--db-wait``).
    """


class LockTimeout(StoreUnavailable):
    """
    Another process kept an appID's lock longer than the caller would wait.
    """


class ValueTooLong(StoreError):
    """
    A value does not fit its column (``varchar`` limits of an existing table).
    """

    status = 400


# --- the interface ---------------------------------------------------------------


class IChattStore(Interface):
    """
    Where chatts live.  Every method returns a Deferred that cannot be cancelled
    from outside: a client that goes away must not abort a write half-way.
    (Only a wait for an appID's turn can be cancelled: see :meth:`begin_turn`
    and :meth:`replace_history`.)  Failures are :class:`StoreError` subclasses.
    """

    def post_chatt(username: str, message: str) -> Deferred[None]:
        """
        Store one chatt (``/postchatt``), with no appID.
        """

    def chatts_page(after: int, limit: int) -> Deferred[list[Chatt]]:
        """
        Up to ``limit`` chatts with ``seq > after``, oldest first (``/getchatts``
        streams the table page by page).
        """

    def begin_turn(appid: str, messages: Sequence[Message], timeout: float) -> Deferred[list[Message]]:
        """
        Take ``appid``'s turn (a lock shared by every process using this
        database), store ``messages`` and return the history to send to
        Ollama, oldest first: ``messages`` whole, the appID's ``system`` rows
        (oldest first, as many as fit in the store's history bound on their
        own), and then the newest of its other rows that fit in what is left
        of the bound (see :data:`MESSAGE_OVERHEAD`).  Nothing is deleted: the
        rows left out stay in the table.  Waits at most ``timeout`` seconds
        for the turn (then :class:`LockTimeout`, and nothing is stored).  On
        success the caller must :meth:`end_turn`; on any failure nothing is
        held.
        """

    def end_turn(appid: str, reply: str | None) -> Deferred[None]:
        """
        Store the assistant's ``reply`` (if not ``None``), then give ``appid``'s
        turn back.  The turn is given back even if storing fails (which then
        fails the Deferred).
        """

    def replace_history(appid: str, messages: Sequence[Message], timeout: float) -> Deferred[None]:
        """
        In ``appid``'s turn (waiting as :meth:`begin_turn` does), delete its
        rows and store ``messages`` instead, as one transaction.  Cancelling
        it ends the wait for the turn, so that nothing is replaced later (a
        replacement already under way is completed, and its turn given back).
        """

    def ping() -> Deferred[None]:
        """
        Run a trivial query: is the database there?
        """

    def connections_in_use() -> int:
        """
        How many of the store's connections are serving a call now (for the
        ``chatterd_database_pool_in_use`` gauge); 0 while it is not running.
        """


# --- SQL -------------------------------------------------------------------------

#: What a message costs of the history bound besides its role and content
#: (in UTF-8 bytes): the JSON around them, ``{"role":"","content":""},``.
#: It also keeps a flood of empty messages from slipping under the bound.
MESSAGE_OVERHEAD = 25

#: The default bound of the history sent to Ollama (``--max-history``).
DEFAULT_MAX_HISTORY = 4 * 1024 * 1024

#: The first round trip of a turn, as a function so that its plans are made
#: once per connection (half the server's work of the same SQL sent as text):
#: take the appID's turn (a session advisory lock), delete its rows if
#: ``replace`` (``/llmprep``), store the new messages in order, return the
#: history to send.  VOLATILE, so each statement takes a fresh snapshot: what
#: it reads and deletes, after the lock, includes what the turn before
#: committed.  Not taken: one row of NULLs, and nothing changed.
#:
#: The history is cut to ``max_bytes`` (NULL: no bound) here, so that no row
#: left out ever leaves the database.  Every row counts its role and content
#: in bytes plus ``MESSAGE_OVERHEAD``.  The system rows come first, oldest
#: first, as long as they fit; then the new rows, always; then the other
#: rows, newest first, as long as they fit in what is left.  Sizes come from
#: ``octet_length``, which reads a long value's stored size without
#: fetching the value, and each walk stops at the first row that does not
#: fit: a turn reads little more than the rows it sends, however long the
#: conversation.  A history of up to 1000 rows that fits whole (the usual
#: case) is summed and sent in two plain statements instead.
BEGIN_TURN_FUNCTION = """
CREATE OR REPLACE FUNCTION chatterd_begin_turn(
    lock_class integer, app text, roles text[], contents text[], replace boolean, max_bytes bigint)
RETURNS TABLE (seq bigint, role text, content text)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    bound bigint := coalesce(max_bytes, 9223372036854775807);
    used bigint := 0;
    first_new bigint;
    new_bytes bigint;
    old_bytes bigint;
    system_upto bigint;
    others_from bigint;
    r record;
BEGIN
    IF NOT pg_try_advisory_lock(lock_class, hashtext(app)) THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF replace THEN
        DELETE FROM chatts AS c WHERE c.appid = app;
    END IF;
    WITH added AS (
        INSERT INTO chatts (username, message, id, time, appid)
        SELECT t.r, t.m, gen_random_uuid(), clock_timestamp(), app
          FROM unnest(roles, contents) WITH ORDINALITY AS t(r, m, n)
         ORDER BY t.n
        RETURNING chatts.seq, %(overhead)d + octet_length(chatts.username) + octet_length(chatts.message) AS size
    )
    -- (the subquery sees the table as it was before the insert: the old
    -- rows; it gives up on the quick way past %(quick)d of them)
    SELECT coalesce(min(a.seq), 9223372036854775807), coalesce(sum(a.size), 0),
           (SELECT CASE WHEN count(*) <= %(quick)d THEN coalesce(sum(o.size), 0) END
              FROM (SELECT %(overhead)d + coalesce(octet_length(c.username), 0)
                           + coalesce(octet_length(c.message), 0) AS size
                      FROM chatts AS c WHERE c.appid = app ORDER BY c.seq DESC LIMIT %(quick)d + 1) AS o)
      INTO first_new, new_bytes, old_bytes FROM added AS a;
    IF new_bytes + old_bytes <= bound THEN
        -- all of it fits (the usual case)
        RETURN QUERY SELECT c.seq, c.username::text, c.message::text
                       FROM chatts AS c WHERE c.appid = app ORDER BY c.seq;
        RETURN;
    END IF;
    FOR r IN SELECT c.seq, %(overhead)d + octet_length(c.username) + coalesce(octet_length(c.message), 0) AS size
               FROM chatts AS c
              WHERE c.appid = app AND c.seq < first_new AND c.username = 'system'
              ORDER BY c.seq LOOP
        EXIT WHEN used + r.size > bound;
        used := used + r.size;
        system_upto := r.seq;
    END LOOP;
    used := used + new_bytes;
    FOR r IN SELECT c.seq, %(overhead)d + coalesce(octet_length(c.username), 0)
                           + coalesce(octet_length(c.message), 0) AS size
               FROM chatts AS c
              WHERE c.appid = app AND c.seq < first_new AND c.username IS DISTINCT FROM 'system'
              ORDER BY c.seq DESC LOOP
        EXIT WHEN used + r.size > bound;
        used := used + r.size;
        others_from := r.seq;
    END LOOP;
    RETURN QUERY
        SELECT c.seq, c.username::text, c.message::text FROM chatts AS c
         WHERE c.appid = app AND c.seq <= system_upto AND c.username = 'system'
        UNION ALL
        SELECT c.seq, c.username::text, c.message::text FROM chatts AS c
         WHERE c.appid = app AND c.seq >= others_from AND c.seq < first_new
           AND c.username IS DISTINCT FROM 'system'
        UNION ALL
        SELECT c.seq, c.username::text, c.message::text FROM chatts AS c
         WHERE c.appid = app AND c.seq >= first_new
        ORDER BY 1;
END
$fn$;
""" % {"overhead": MESSAGE_OVERHEAD, "quick": 1000}

#: The function's signature before ``max_bytes``, which chatterd processes of
#: an earlier version (during a rolling upgrade) still call: it now sends the
#: whole history, as it did, through the new one.
_OLD_BEGIN_TURN_FUNCTION = """
CREATE OR REPLACE FUNCTION chatterd_begin_turn(
    lock_class integer, app text, roles text[], contents text[], replace boolean)
RETURNS TABLE (seq bigint, role text, content text)
LANGUAGE sql VOLATILE AS $fn$
    SELECT * FROM chatterd_begin_turn(lock_class, app, roles, contents, replace, NULL::bigint)
$fn$;
"""

#: Idempotent; serialised by an advisory lock so that several chatterd
#: processes may start at once on one database.
SCHEMA = """
SELECT pg_advisory_xact_lock(7460150436385064291);
CREATE TABLE IF NOT EXISTS chatts (
    username varchar(255),
    message text,
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    time timestamptz NOT NULL DEFAULT clock_timestamp(),
    appid varchar(155)
);
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS appid varchar(155);
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'chatts'::regclass
                   AND attname = 'seq' AND NOT attisdropped) THEN
        -- number existing rows in time order, then keep numbering new ones
        ALTER TABLE chatts ADD COLUMN seq bigint;
        UPDATE chatts SET seq = o.n
          FROM (SELECT ctid AS c, row_number() OVER (ORDER BY time) AS n FROM chatts) o
         WHERE chatts.ctid = o.c;
        ALTER TABLE chatts ALTER COLUMN seq SET NOT NULL;
        ALTER TABLE chatts ALTER COLUMN seq ADD GENERATED BY DEFAULT AS IDENTITY;
        PERFORM setval(pg_get_serial_sequence('chatts', 'seq'),
                       (SELECT coalesce(max(seq), 0) + 1 FROM chatts), false);
    END IF;
END $$;
CREATE UNIQUE INDEX IF NOT EXISTS chatts_seq ON chatts (seq);
CREATE INDEX IF NOT EXISTS chatts_appid_seq ON chatts (appid, seq);
""" + BEGIN_TURN_FUNCTION + _OLD_BEGIN_TURN_FUNCTION

# ``id`` and ``time`` are given explicitly: a course table may lack defaults.
_INSERT_ONE = """
INSERT INTO chatts (username, message, id, time, appid)
VALUES (%(username)s, %(message)s, gen_random_uuid(), clock_timestamp(), %(appid)s);
"""
_PAGE = """
SELECT username, message, id::text, time, seq FROM chatts
 WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;
"""


# An appID's turn across processes: see "Turns across processes" in
# PostgresChattStore's docstring, the one description of the protocol.
_LOCK_CLASS = 1667788099
#: How many times an unlock waits ``--db-wait`` for its busy connection.
_UNLOCK_TRIES = 6
_UNLOCK = "SELECT pg_advisory_unlock(%(class)s, hashtext(%(appid)s));"

#: Take the turn, (replace or) append the messages and read the history, in
#: one round trip (``BEGIN_TURN_FUNCTION``).  Rows are (seq, role, content); a
#: single row of NULLs means "not your turn" (and nothing was changed).
_BEGIN_TURN = """
SELECT seq, role, content
  FROM chatterd_begin_turn(%(class)s, %(appid)s, %(roles)s::text[], %(contents)s::text[], %(replace)s,
                           %(max)s::bigint);
"""

#: Store the reply, commit, then give the turn back, in one round trip.  (No
#: BEGIN: if the insert fails, the implicit transaction is rolled back and
#: the connection is left clean; the unlock, skipped, must follow.)
_END_TURN = _INSERT_ONE + "COMMIT;" + _UNLOCK


def _taken(rows: list[tuple[Any, ...]]) -> bool:
    """
    Whether ``_BEGIN_TURN`` got the turn.
    """
    return rows != [(None, None, None)]


def _holds(outcome: Any) -> bool:
    """
    Whether a ``_BEGIN_TURN`` may have left its appID's lock held: it took
    it, or it ran and failed afterwards.  (A ``StoreUnavailable`` statement
    never ran, or its connection, and the lock with it, is gone.)
    """
    if isinstance(outcome, Failure):
        return not outcome.check(StoreUnavailable)
    return _taken(outcome)


def _many(
    appid: str, messages: Sequence[Message], *, replace: bool = False, max_bytes: int | None = None
) -> dict[str, Any]:
    return {
        "class": _LOCK_CLASS,
        "appid": appid,
        "roles": [m["role"] for m in messages],
        "contents": [m["content"] for m in messages],
        "replace": replace,
        "max": max_bytes,
    }


#: psycopg2's diagnostics that name schema objects, never values.
_SAFE_DIAGNOSTICS = ("schema_name", "table_name", "column_name", "datatype_name", "constraint_name")


def error_summary(error: psycopg2.Error) -> str:
    """
    What may be logged of a database error: its SQLSTATE, its class and the
    schema objects it names.  Never its text: the message and its
    ``DETAIL`` can quote the values of a row (``Failing row contains
    (...)``, ``invalid input syntax for type ...: "..."``), a user's words.
    """
    parts = [f"SQLSTATE {error.pgcode or 'none'}", type(error).__name__]
    diag = getattr(error, "diag", None)
    for field in _SAFE_DIAGNOSTICS:
        value = getattr(diag, field, None)
        if value:
            parts.append(f"{field[:-len('_name')]} {value}")
    return ", ".join(parts)


# --- the store -------------------------------------------------------------------


def _shield(d: Deferred[T], abandoned: Callable[[Any], object] | None = None) -> Deferred[T]:
    """
    A Deferred that mirrors ``d``; cancelling it leaves ``d`` running to the end.

    :param abandoned: if the mirror was cancelled first, called with what
        ``d`` fired with in the end (a result or a ``Failure``).
    """
    shielded: Deferred[T] = Deferred()

    def mirror(result: Any) -> None:
        if not shielded.called:
            shielded.callback(result)
        elif abandoned is not None:
            abandoned(result)

    d.addBoth(mirror)
    return shielded


DSNSource = Union[str, Callable[[], str]]


@implementer(IChattStore)
class PostgresChattStore(Service):
    """
    ``IChattStore`` on PostgreSQL.  Its pool connects when the service starts.

    :param dsn: a libpq connection string, or a callable returning one once the
        service starts (the embedded server's address is known only then).
    :param acquire_timeout: seconds a call waits for a free connection, or
        for the store's start (``--db-wait``); then :class:`StoreUnavailable`.
    :param connect_timeout: seconds one attempt to connect may take before it
        is abandoned (and tried again later) [default: the DSN's
        ``connect_timeout``, else ``acquire_timeout``].
    :param answer_timeout: seconds a statement sent may go without an
        answer; then its connection is taken for lost (closed and reopened,
        its appID locks gone with it) and the call fails with
        :class:`StoreUnavailable` [default: ``acquire_timeout``].  The TCP
        keepalives the DSN gets (:func:`~chatterd.pool.with_keepalives`) are sized from it too.
    :param resolver: resolves the DSN's host names [default: the reactor's].
    :param max_history: the most bytes of history :meth:`begin_turn` returns
        (``--max-history``; see :data:`BEGIN_TURN_FUNCTION`).
    :param on_error: told the kind of every database failure
        (``unavailable``, ``busy``, ``too_long``, ``other``), for metrics.

    **Turns across processes** (the advisory-lock protocol):

    - *The lock*: a session-level advisory lock keyed ``(_LOCK_CLASS,
      hashtext(appid))`` (a hash collision makes two appIDs take turns:
      harmless).  Session locks outlive a rollback and count (taken twice by
      one session, given back twice); unlocking one not held does nothing.
    - *Its connection*: one of the lockers, ``pool_size`` single-connection
      pools apart from the shared pool (a lock is held for a whole stream),
      chosen by ``crc32(appid)`` (:meth:`_locker`), so that the unlock runs
      on the session that took the lock.
    - *Taken* by ``pg_try_advisory_lock``, first thing in
      ``chatterd_begin_turn`` (:data:`BEGIN_TURN_FUNCTION`, run by
      ``_BEGIN_TURN``), in the round trip that then stores the prompt and
      reads the history (each statement takes a fresh snapshot: it sees what
      the previous holder committed).  Not taken: one row of NULLs
      (:func:`_taken`) and nothing changed; :meth:`_begin_turn` tries again,
      backing off from 20 ms to 0.5 s.
    - *Given back* by ``pg_advisory_unlock`` (``_UNLOCK``): last in
      ``_END_TURN`` (``INSERT; COMMIT; unlock``: after the commit, so the
      next turn sees the reply), or alone (:meth:`_unlock`): for
      ``end_turn(appid, None)``, after ``replace_history``, after a failure.
    - *On failure*:

      - the turn is not free within ``timeout``: :class:`LockTimeout`;
        nothing stored, nothing held.
      - ``_BEGIN_TURN`` fails with :class:`StoreUnavailable`: it never ran
        (:class:`StoreBusy`, or the store not started) or its connection is
        lost (:func:`~chatterd.pool.connection_lost`; the server drops the
        session's locks): nothing to give back.
      - ``_BEGIN_TURN`` fails otherwise (a statement error on a live
        connection, say :class:`ValueTooLong`): it may have taken the lock
        after its writes were rolled back, so :meth:`_unlock` follows before
        the call fails.  A statement error never drops the connection, so
        the other appIDs' locks on it hold.
      - the caller gives up (cancels) while ``_BEGIN_TURN`` runs: the
        statement runs to its end (:func:`_shield`) and the lock is given
        back only if it may have been taken (:func:`_holds`): giving back
        one not taken would release another request's count.  Cancelled
        while pausing between attempts: nothing was taken.
      - the connection is lost mid-turn: the lock went with the session
        (another process may take the turn at once); ``end_turn`` fails with
        :class:`StoreUnavailable`, and the unlock it tries finds nothing.
      - ``_END_TURN``'s insert fails: its implicit transaction rolls back
        and skips the unlock, so :meth:`_unlock` is started at once and the
        call fails without waiting for it.
      - the unlock finds its connection busy (:class:`StoreBusy`: a long
        statement of another appID on that locker): it tries again, up to
        ``_UNLOCK_TRIES`` waits of ``acquire_timeout``, then logs an error
        (the lock is held until that connection closes).  Any other failure
        of the unlock means the session, and the lock, are gone, or there is
        nothing more to do; it never raises.
    """

    name = "store"

    def __init__(
        self,
        dsn: DSNSource,
        *,
        reactor: IReactorTime,
        pool_size: int = 4,
        acquire_timeout: float = 10.0,
        connect_timeout: float | None = None,
        answer_timeout: float | None = None,
        resolver: IHostnameResolver | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        on_error: Callable[[str], object] = lambda kind: None,
    ) -> None:
        self._dsn = dsn
        self._on_error = on_error
        self._reactor = reactor
        self._pool_size = pool_size
        self._acquire_timeout = acquire_timeout
        self._connect_timeout = connect_timeout
        self._answer_timeout = acquire_timeout if answer_timeout is None else answer_timeout
        self._resolver = resolver if resolver is not None else getattr(reactor, "nameResolver", None)
        self._max_history = max_history
        self._pool: ConnectionPool | None = None
        self._lockers: list[ConnectionPool] = []
        self._schema_ready = False
        self._schema_lock = DeferredLock()
        self.started: Deferred[int] | None = None

    # --- service ---

    def startService(self) -> None:
        super().startService()
        dsn = self._dsn() if callable(self._dsn) else self._dsn
        connecting = {
            "connect_timeout": self._connect_timeout or dsn_connect_timeout(dsn) or self._acquire_timeout,
            "resolver": self._resolver,
        }
        dsn = with_keepalives(dsn, self._answer_timeout, connecting["connect_timeout"])
        self._pool = ConnectionPool(dsn, self._pool_size, self._reactor, self._acquire_timeout, **connecting)
        # appID locks live on connections of their own: they are held for a
        # whole stream, which must not take a pool connection out of service.
        # A session lock is given back on the connection that took it, so an
        # appID always uses the same one (chosen by hash).
        self._lockers = [
            ConnectionPool(dsn, 1, self._reactor, self._acquire_timeout, **connecting)
            for _ in range(self._pool_size)
        ]
        self.started = ensureDeferred(self._start(self._pool, self._lockers))

    async def _start(self, pool: ConnectionPool, lockers: list[ConnectionPool]) -> int:
        """
        Connect, then create the schema; a database that is down now is
        logged, not fatal: the pool reconnects and the schema follows.
        """
        connected, *_ = await gatherResults([pool.start(), *(locker.start() for locker in lockers)])
        if not connected:
            log.error(
                "database unreachable at start; requests that need it get 503 "
                "until it is back (retrying every few seconds)"
            )
            return 0
        log.info("database: {n} of {size} connections open", n=connected, size=self._pool_size)
        try:
            await pool.run(self._with_schema)
        except psycopg2.Error as e:
            log.error("could not create the schema ({error}); will retry with the next request",
                      error=error_summary(e))
        except Exception:
            log.failure("could not create the schema; will retry with the next request")
        return connected

    def stopService(self) -> None:
        super().stopService()
        for pool in [self._pool, *self._lockers]:
            if pool is not None:
                pool.close()

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        return self._pool

    # --- running SQL ---

    async def _with_schema(self, c: txpostgres.Connection) -> None:
        if self._schema_ready:
            return
        await self._schema_lock.acquire()
        try:
            if not self._schema_ready:
                await c.runOperation(SCHEMA)
                self._schema_ready = True
                log.info("database schema ready")
        finally:
            self._schema_lock.release()

    async def _run(
        self, method: str, sql: str, params: dict[str, Any], *, pool: ConnectionPool | None = None
    ) -> Any:
        async def body(c: txpostgres.Connection) -> Any:
            await self._with_schema(c)
            return await self._answered(c, getattr(c, method)(sql, params))

        if self.started is not None and not self.started.called:
            # requests that come while connecting wait for it, as long as for a connection
            try:
                await _shield(self.started).addTimeout(self._acquire_timeout, self._reactor)
            except TimeoutError:
                self._on_error("unavailable")
                raise StoreUnavailable("the database is not reachable yet, try again shortly") from None
        try:
            return await (pool or self.pool).run(body)
        except StoreError:
            raise
        except PoolClosed:
            raise StoreUnavailable("the store is stopped") from None
        except PoolTimeout as e:
            self._on_error("busy")
            raise StoreBusy("the database is busy, try again shortly") from e
        except (reconnection.ConnectionDead, psycopg2.Error, ConnectionClosed) as e:
            if isinstance(e, psycopg2.Error) and not connection_lost(e):
                raise self._failed(e) from None  # its text may quote a row: not passed on
            self._on_error("unavailable")
            raise StoreUnavailable("the database is unavailable, try again shortly") from e
        except Exception as e:
            raise self._failed(e) from e

    def _answered(self, c: txpostgres.Connection, d: Deferred[T]) -> Deferred[T]:
        """
        ``d``, a statement running on ``c``, or :class:`NoAnswer` if it has
        no answer within ``answer_timeout``: a database host that stops
        answering (packets dropped, a dead peer that never resets the
        connection) would otherwise hold the call until the kernel gives up
        on the socket.  ``c`` is then taken for lost by its death checker,
        which closes it (failing ``d``) and opens it anew.

        (The schema is not bounded so: it may take long on a large course
        table, and runs once.)
        """
        seconds = self._answer_timeout

        def lost() -> None:
            log.warn("database: no answer to a statement within {seconds:g} s; "
                     "taking its connection for lost and reopening it", seconds=seconds)
            answer.errback(NoAnswer(f"no answer from the database within {seconds:g} s"))
            c.detector.checkForDeadConnection(Failure(NoAnswer("no answer")))

        answer: Deferred[T] = Deferred()
        timer = self._reactor.callLater(seconds, lost)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if not answer.called:
                answer.callback(result)

        d.addBoth(done)
        return answer

    def _failed(self, error: Exception) -> StoreError:
        """
        What a statement's own failure (the connection lives on) is reported
        as; it is logged, but only by :func:`error_summary`.
        """
        if isinstance(error, psycopg2.errors.StringDataRightTruncation):
            self._on_error("too_long")
            return ValueTooLong("a value is too long for its column")
        self._on_error("other")
        if isinstance(error, psycopg2.Error):
            log.error("database error: {error}", error=error_summary(error), sqlstate=error.pgcode)
        else:
            log.failure("database error", Failure(error))  # not psycopg2's: a bug, with its traceback
        return StoreError("database error")

    def _call(self, method: str, sql: str, params: dict[str, Any]) -> Deferred[Any]:
        return _shield(ensureDeferred(self._run(method, sql, params)))

    # --- IChattStore ---

    def post_chatt(self, username: str, message: str) -> Deferred[None]:
        params = {"username": username, "message": message, "appid": None}
        return self._call("runOperation", _INSERT_ONE, params)

    def chatts_page(self, after: int, limit: int) -> Deferred[list[Chatt]]:
        d = self._call("runQuery", _PAGE, {"after": after, "limit": limit})
        return d.addCallback(lambda rows: [Chatt(*row) for row in rows])

    def begin_turn(self, appid: str, messages: Sequence[Message], timeout: float) -> Deferred[list[Message]]:
        params = _many(appid, messages, max_bytes=self._max_history)
        d = ensureDeferred(self._begin_turn(appid, params, timeout))
        return d.addCallback(lambda rows: [{"role": r, "content": m} for _, r, m in rows])

    def end_turn(self, appid: str, reply: str | None) -> Deferred[None]:
        return _shield(ensureDeferred(self._end_turn(appid, reply)))

    async def _end_turn(self, appid: str, reply: str | None) -> None:
        if reply is None:
            await self._unlock(appid)
            return
        params = {"username": "assistant", "message": reply, "appid": appid, "class": _LOCK_CLASS}
        try:
            await self._run("runQuery", _END_TURN, params, pool=self._locker(appid))
        except StoreError:
            self._unlock(appid)  # the unlock was skipped; report the failure without waiting for it
            raise

    def replace_history(self, appid: str, messages: Sequence[Message], timeout: float) -> Deferred[None]:
        async def replace() -> None:
            await self._begin_turn(appid, _many(appid, messages, replace=True), timeout)
            await self._unlock(appid)

        # not shielded: a caller that gives up (shutdown, the client gone)
        # must not have its history replaced once the turn comes after all
        return ensureDeferred(replace())

    def ping(self) -> Deferred[None]:
        return self._call("runQuery", "SELECT 1", {}).addCallback(lambda _: None)

    def connections_in_use(self) -> int:
        # the shared pool's only: a locker connection is held for a whole stream
        return self._pool.in_use if self.running and self._pool is not None else 0

    # --- turns ---

    def _locker(self, appid: str) -> ConnectionPool:
        return self._lockers[zlib.crc32(appid.encode()) % len(self._lockers)]

    async def _begin_turn(self, appid: str, params: dict[str, Any], timeout: float) -> Any:
        """
        Run ``_BEGIN_TURN`` until it gets the turn or ``timeout`` seconds have
        passed.  A failure, or a caller that gives up meanwhile, leaves the
        lock given back.
        """

        def abandoned(outcome: Any) -> None:
            # the caller gave up while the statement ran: give back what it took
            if _holds(outcome):
                self._unlock(appid)

        deadline = self._reactor.seconds() + timeout
        pause = 0.02
        while True:
            attempt = ensureDeferred(self._run("runQuery", _BEGIN_TURN, params, pool=self._locker(appid)))
            try:
                rows = await _shield(attempt, abandoned)
            except StoreUnavailable:
                raise  # it never ran, or its connection (and so the lock) is gone
            except StoreError:
                await self._unlock(appid)  # it may have failed after taking the lock
                raise
            if _taken(rows):
                return rows
            if self._reactor.seconds() + pause > deadline:
                raise LockTimeout("another chatterd is still streaming for this appID")
            await deferLater(self._reactor, pause)
            pause = min(pause * 2, 0.5)

    def _unlock(self, appid: str) -> Deferred[None]:
        """
        Give ``appid``'s lock back.  Never fails: if the database went away,
        the lock went with the connection that held it; while its connection
        is busy (a pool timeout), it keeps trying.
        """
        params = {"class": _LOCK_CLASS, "appid": appid}

        async def unlock() -> None:
            for _ in range(_UNLOCK_TRIES):
                try:
                    await self._run("runQuery", _UNLOCK, params, pool=self._locker(appid))
                    return
                except StoreBusy:
                    continue  # its connection stayed busy: wait again
                except StoreError:
                    return  # the session, and the lock with it, is gone (or the statement failed)
            log.error("could not give back the lock of appID {appid}: its connection stayed busy", appid=appid)

        return _shield(ensureDeferred(unlock()))
