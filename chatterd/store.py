# -*- test-case-name: tests.test_store -*-
"""
The chatts table: ``IChattStore`` and its PostgreSQL implementation on txpostgres.

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
import os
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    TimeoutError,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres
from zope.interface import Interface, implementer

from chatterd.logs import Logger

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


# An appID's turn across processes is a session-level advisory lock, keyed
# (class, hash of appID), taken in the round trip of the turn's first write and
# given back in that of its last (after a COMMIT, so that the next turn sees
# it).  The lock is tried before anything is read (``BEGIN_TURN_FUNCTION``),
# and each later statement takes a fresh snapshot, so it sees whatever the
# previous holder committed before unlocking.  A hash
# collision makes two appIDs share a lock: harmless, they only take turns.  A
# failed attempt stores nothing; a failure after the lock was taken leaves it
# held (session locks ignore rollback), so it is given back.
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


def _dsn_connect_timeout(dsn: str) -> float | None:
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


def _connection_lost(error: BaseException) -> bool:
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
            deathChecker=lambda f: _connection_lost(f.value),
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
            return fail(StoreUnavailable("the store is stopped"))
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
            self._waiting.popleft().errback(StoreUnavailable("the store is stopped"))


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
        keepalives the DSN gets (:func:`with_keepalives`) are sized from it too.
    :param resolver: resolves the DSN's host names [default: the reactor's].
    :param max_history: the most bytes of history :meth:`begin_turn` returns
        (``--max-history``; see :data:`BEGIN_TURN_FUNCTION`).
    :param on_error: told the kind of every database failure
        (``unavailable``, ``busy``, ``too_long``, ``other``), for metrics.
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
            "connect_timeout": self._connect_timeout or _dsn_connect_timeout(dsn) or self._acquire_timeout,
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
        except PoolTimeout as e:
            self._on_error("busy")
            raise StoreUnavailable("the database is busy, try again shortly") from e
        except (reconnection.ConnectionDead, psycopg2.Error, ConnectionClosed) as e:
            if isinstance(e, psycopg2.Error) and not _connection_lost(e):
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
                except StoreUnavailable as e:
                    if not isinstance(e.__cause__, PoolTimeout):
                        return  # the connection, and the lock with it, is gone
                except StoreError:
                    return
            log.error("could not give back the lock of appID {appid}: its connection stayed busy", appid=appid)

        return _shield(ensureDeferred(unlock()))
