"""
How ``PostgresChattStore`` connects: never a wait without end, never a
blocking name lookup.

- A database address that never answers (a socket that accepts and stays
  silent; a listener whose accept queue is full, so that Linux drops the
  SYNs) gets requests a ``StoreUnavailable`` within ``--db-wait``, and each
  attempt is abandoned after its own timeout while the reconnection loop
  goes on.
- A database host that falls silent once connected (here a relay that
  drops everything, both ways, mid-statement) gets requests a
  ``StoreUnavailable`` (``503``, or an error frame mid-stream) within
  ``--db-wait`` of the statement, and the connection is taken for lost and
  reopened.  The kernel is told to notice such a host too (TCP keepalives,
  ``tcp_user_timeout``).
- Host names are resolved through the (injected) resolver and libpq gets
  ``hostaddr``.

Only loopback addresses are used.  The test cluster listens on a unix socket
only, so a small TCP relay on 127.0.0.1 stands in for a database host.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from chatterd import pool as pool_module
from chatterd import store as store_module
from chatterd.pool import NameNotResolved, _names, with_addresses, with_keepalives
from chatterd.store import PostgresChattStore, StoreUnavailable
from tests import harness, pgcluster
from tests.harness import Chatterd, query
from tests.ollama_emulator import Behaviour, start_emulator
from tests.phone import read_as_phone
from tests.test_llmchat import chat

#: Seconds a connection attempt, and a request's wait, may take in these tests (--db-wait).
WAIT = 0.5
#: Seconds past the bound that an answer may still take, on a loaded 2-core machine.
MARGIN = 3.0
#: Seconds after which a test gives up on something that should have ended long before.
HUNG = 10.0


# --- stand-ins for a database host ------------------------------------------------


class _Front(portforward.ProxyServer):
    """
    One connection to the relay: silent while the relay is, else piped to
    the cluster's unix socket.
    """

    noisy = False

    def connectionMade(self) -> None:
        relay: Relay = self.factory  # type: ignore[assignment]
        relay.open.append(self)
        relay.made += 1
        if relay.silent:
            return  # accept, read what comes, say nothing
        self.transport.pauseProducing()
        client = portforward.ProxyClientFactory()
        client.protocol = _Back
        client.noisy = False
        client.setServer(self)
        reactor.connectUNIX(relay.socket, client)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and not self.factory.muted:  # type: ignore[attr-defined]
            super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.factory.open.remove(self)  # type: ignore[attr-defined]
        self.factory.lost += 1  # type: ignore[attr-defined]
        super().connectionLost(reason)


class _Back(portforward.ProxyClient):
    """
    The relay's connection to the cluster, for one of its clients.
    """

    noisy = False

    def dataReceived(self, data: bytes) -> None:
        if not self.peer.factory.muted:
            super().dataReceived(data)


class Relay(Factory):
    """
    A database host on 127.0.0.1: relays TCP to the test cluster, or
    (``silent``) accepts connections and never answers.  ``muted``, it drops
    everything on the connections it relays, both ways, as a host that
    fell off the network would (except that the relay's kernel still
    acknowledges what arrives: only chatterd's own bound can notice).
    """

    protocol = _Front
    noisy = False

    def __init__(self, case: TestCase, dsn: str, *, silent: bool) -> None:
        params = psycopg2.extensions.parse_dsn(dsn)
        self.socket = f"{params['host']}/.s.PGSQL.{params['port']}"
        self.silent = silent
        self.muted = False
        self.open: list[_Front] = []
        self.made = 0
        self.lost = 0
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        case.addCleanup(self.drop)
        self.dsn = psycopg2.extensions.make_dsn(dsn, host="127.0.0.1", port=self.port.getHost().port)

    def drop(self) -> None:
        """
        Cut every open connection.
        """
        for front in list(self.open):
            front.transport.abortConnection()


def full_listener(case: TestCase) -> int:
    """
    A port on 127.0.0.1 whose accept queue is full: nothing accepts, and the
    kernel drops every new SYN (the client retries for minutes).
    """
    server = socket.socket()
    case.addCleanup(server.close)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    for _ in range(8):
        client = socket.socket()
        case.addCleanup(client.close)
        client.settimeout(0.2)
        try:
            client.connect(("127.0.0.1", port))
        except OSError:  # timed out: the queue is full
            return port
    raise AssertionError("the accept queue never filled")


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Names and their addresses; a name it does not know has none, a name
    mapped to ``None`` never resolves.
    """

    def __init__(self, names: dict[str, list[str] | None]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> IResolutionReceiver:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)  # type: ignore[arg-type]
        addresses = self.names.get(hostName, [])
        if addresses is None:
            return receiver  # no answer, ever
        for address in addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return receiver


# --- tests -------------------------------------------------------------------------


class ConnectCase(TestCase):
    def setUp(self) -> None:
        self.connected: list[str] = []  # every DSN handed to psycopg2.connect
        real = psycopg2.connect

        def connect(dsn: str, **kwargs: Any) -> Any:
            self.connected.append(dsn)
            return real(dsn, **kwargs)

        # (not self.patch: it would put back psycopg2.connect as a method of _Connection)
        pool_module._Connection.connectionFactory = staticmethod(connect)  # type: ignore[assignment]
        self.addCleanup(delattr, pool_module._Connection, "connectionFactory")

    def make_store(self, dsn: str, **kwargs: Any) -> PostgresChattStore:
        store = PostgresChattStore(dsn, reactor=reactor, **{"acquire_timeout": WAIT, "pool_size": 1, **kwargs})
        store.startService()
        self.addCleanup(store.stopService)
        return store

    async def within(self, d: Deferred[Any], seconds: float = HUNG, what: str = "") -> Any:
        """
        ``d``'s result, failing the test (instead of hanging it) after
        ``seconds``; ``d`` itself is not cancelled (that would end it).
        """
        try:
            return await store_module._shield(d).addTimeout(seconds, reactor)
        except TimeoutError:
            self.fail(f"{what or 'no answer'} within {seconds:g} s")

    async def unavailable(self, store: PostgresChattStore, d: Deferred[Any] | None = None) -> None:
        """
        A request (by default a ``post_chatt``) gets StoreUnavailable within
        ``WAIT`` seconds (the margin is for a loaded machine).
        """
        if d is None:
            d = store.post_chatt("u", "m")
        await self.within(self.assertFailure(d, StoreUnavailable), WAIT + MARGIN, "no StoreUnavailable")

    async def eventually(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + HUNG
        while not check():
            self.assertLess(time.monotonic(), deadline, what)
            await deferLater(reactor, 0.05)

    async def post_once_back(self, store: PostgresChattStore) -> None:
        deadline = time.monotonic() + HUNG
        while True:
            try:
                return await store.post_chatt("u", "back")
            except StoreUnavailable:
                self.assertLess(time.monotonic(), deadline, "the store did not recover")
                await deferLater(reactor, 0.1)

    def tearDown(self) -> None:
        self.flushLoggedErrors(psycopg2.OperationalError, psycopg2.InterfaceError)


class UnansweringDatabaseTests(ConnectCase):
    """
    A database host that never answers costs requests --db-wait, not a hang.
    """

    async def test_a_silent_server(self) -> None:
        """
        A server that accepts and says nothing: each attempt is abandoned
        after its timeout (its socket closed), requests get StoreUnavailable,
        the attempts go on, and once the server answers the store works.
        """
        dsn = pgcluster.fresh_database()
        relay = Relay(self, dsn, silent=True)
        store = self.make_store(relay.dsn, connect_timeout=WAIT)
        self.assertEqual(await self.within(store.started), 0)
        await self.unavailable(store)
        await self.eventually(lambda: relay.lost >= 2, "the abandoned attempts left their sockets open")
        await self.eventually(lambda: relay.made > 2, "no new attempt after the first ones")
        relay.silent = False
        relay.drop()  # the attempts under way would wait out their timeout
        await self.within(Deferred.fromCoroutine(self.post_once_back(store)))
        self.assertEqual(query(dsn, "SELECT message FROM chatts"), [("back",)])  # (not through the relay,
        # which runs on the reactor that query() blocks)

    async def test_a_full_accept_queue(self) -> None:
        """
        A listener whose accept queue is full (Linux drops the SYNs, as a
        firewall that drops packets would): attempts end after their
        timeout and requests get StoreUnavailable.
        """
        port = full_listener(self)
        dsn = f"host=127.0.0.1 port={port} user=chatter dbname=chatterd"
        store = self.make_store(dsn, connect_timeout=WAIT)
        self.assertEqual(await self.within(store.started), 0)
        await self.unavailable(store)
        await self.unavailable(store)

    async def test_a_dsn_connect_timeout_is_the_attempts_timeout(self) -> None:
        """
        Without connect_timeout given to the store, the DSN's libpq
        ``connect_timeout`` bounds each attempt (libpq's asynchronous connect
        would ignore it).
        """
        port = full_listener(self)
        store = self.make_store(f"host=127.0.0.1 port={port} user=chatter dbname=chatterd connect_timeout=2")
        started = time.monotonic()
        self.assertEqual(await self.within(store.started), 0)
        self.assertGreaterEqual(time.monotonic() - started, 1.9)

    async def test_requests_do_not_wait_for_a_slow_start(self) -> None:
        """
        While the first attempts are still under way (here for 30 s),
        requests wait --db-wait for the store's start, then get StoreUnavailable.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=True)
        store = self.make_store(relay.dsn, connect_timeout=30.0)
        await self.unavailable(store)
        await self.unavailable(store, store.begin_turn("a", [], 1.0))
        self.assertFalse(store.started.called)  # type: ignore[union-attr]

    async def test_connections_are_opened_at_once(self) -> None:
        """
        Every connection of the store (the pool's and the appID lockers')
        tries at the same time, not one after the other.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=True)
        self.make_store(relay.dsn, connect_timeout=30.0, pool_size=3)
        await self.eventually(lambda: len(relay.open) == 6, "the connections were not opened together")


class SilentPeerTests(ConnectCase):
    """
    A database host that falls silent after the connection is made (its
    packets dropped, both ways) costs a statement --db-wait, not the
    kernel's TCP timeout; its connection is taken for lost and reopened.
    """

    async def test_a_statement_without_an_answer(self) -> None:
        """
        The relay drops everything mid-statement: the request gets
        StoreUnavailable within WAIT, the connection is closed (the relay
        sees it go) and reopened, and once the host answers again the store
        works.
        """
        dsn = pgcluster.fresh_database()
        relay = Relay(self, dsn, silent=False)
        store = self.make_store(relay.dsn)
        self.assertEqual(await self.within(store.started), 1)
        await store.post_chatt("u", "before")  # the schema is made, the connection idle
        relay.muted = True
        made = relay.made
        await self.unavailable(store)
        await self.eventually(lambda: relay.lost >= 1, "the connection without an answer was left open")
        await self.eventually(lambda: relay.made > made, "the lost connection was not reopened")
        relay.muted = False
        relay.drop()  # the attempts under way were muted: they would wait out their timeout
        await self.within(Deferred.fromCoroutine(self.post_once_back(store)))
        self.assertEqual(query(dsn, "SELECT message FROM chatts ORDER BY seq"), [("before",), ("back",)])

    async def test_a_turn_without_an_answer_holds_no_lock(self) -> None:
        """
        A turn's first statement without an answer: StoreUnavailable, and
        nothing is left held once the host answers again (the appID lock went
        with the connection).
        """
        dsn = pgcluster.fresh_database()
        relay = Relay(self, dsn, silent=False)
        store = self.make_store(relay.dsn)
        await store.post_chatt("u", "before")
        await store.begin_turn("a", [{"role": "user", "content": "one"}], 1.0)
        await store.end_turn("a", "reply")
        relay.muted = True
        await self.unavailable(store, store.begin_turn("a", [{"role": "user", "content": "two"}], 1.0))
        relay.muted = False
        relay.drop()
        await self.within(Deferred.fromCoroutine(self.post_once_back(store)))
        self.assertEqual(query(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"), [(0,)])

    async def test_the_kernel_is_told_to_notice_a_dead_host(self) -> None:
        """
        libpq's TCP sockets carry keepalives and a user timeout sized from
        --db-wait (here 10 s: a probe after 5 s idle, then 3 every 2 s; data
        unacknowledged for 10 s), so that a host that dropped off the
        network fails the socket in about --db-wait, idle or not.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=False)
        store = self.make_store(relay.dsn, acquire_timeout=10.0)
        self.assertEqual(await self.within(store.started), 1)
        [connection] = store.pool._all
        with socket.socket(fileno=os.dup(connection.fileno())) as sock:
            options = {
                "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "user timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
        self.assertEqual(options, {"keepalive": 1, "idle": 5, "interval": 2, "count": 3, "user timeout": 10000})


class HTTPTests(ConnectCase):
    """
    What a client of chatterd sees of a database that does not answer: a
    ``503`` JSON answer with ``Retry-After``, or mid-stream an error frame,
    within --db-wait.
    """

    async def chatterd(self, relay: Relay) -> Chatterd:
        self.emulator = await start_emulator(self)
        self.patch(harness, "PostgresChattStore", functools.partial(PostgresChattStore, acquire_timeout=WAIT))
        return await Chatterd(self, ollama=self.emulator.url, dsn=relay.dsn, pool_size=1).start()

    async def unanswered(self, server: Chatterd, path: str, body: Any) -> dict[str, Any]:
        started = time.monotonic()
        response, raw = await self.within(Deferred.fromCoroutine(server.post(path, body)), HUNG, path)
        self.assertLess(time.monotonic() - started, WAIT + MARGIN, path)
        self.assertEqual(response.code, 503, raw)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        return json.loads(raw)  # type: ignore[no-any-return]

    async def test_a_host_that_never_answers(self) -> None:
        """
        A database host that accepts and stays silent from the start:
        /postchatt and /llmchat get 503 JSON within --db-wait.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=True)
        server = await self.chatterd(relay)
        self.assertIn("database", (await self.unanswered(server, "/postchatt", {"username": "u", "message": "m"}))["error"])
        await self.unanswered(server, "/llmchat", chat())

    async def test_a_host_that_falls_silent(self) -> None:
        """
        A database host that drops everything once the connections are
        open: /postchatt and /llmchat get 503 JSON, and a stream under way
        whose reply cannot be stored ends with an error frame, each within
        --db-wait.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=False)
        server = await self.chatterd(relay)
        response, _ = await server.post("/postchatt", {"username": "u", "message": "before"})
        self.assertEqual(response.code, 200)
        self.emulator.models["stall"] = Behaviour(reply=["lost", " reply"], stall_after=1)
        s = await server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        relay.muted = True
        await self.unanswered(server, "/postchatt", {"username": "u", "message": "during"})
        await self.unanswered(server, "/llmchat", chat(appid="other"))
        started = time.monotonic()
        self.emulator.release()
        await self.within(s.done, HUNG, "the end of the stream")
        self.assertLess(time.monotonic() - started, WAIT + MARGIN)
        [error] = read_as_phone(s.body).errors
        self.assertIn("could not be stored", json.loads(error)["error"])


class ResolutionTests(ConnectCase):
    """
    Host names go through the resolver; libpq gets addresses.
    """

    async def test_names_are_resolved_by_the_resolver(self) -> None:
        """
        A DSN naming its host by name connects through the resolver's
        address: psycopg2 gets ``hostaddr`` with ``host`` kept; a
        reconnection resolves the name again.
        """
        relay = Relay(self, pgcluster.fresh_database(), silent=False)
        resolver = FakeResolver({"db.chatterd.test": ["127.0.0.1"]})
        dsn = psycopg2.extensions.make_dsn(relay.dsn, host="db.chatterd.test")
        store = self.make_store(dsn, resolver=resolver)
        self.assertEqual(await self.within(store.started), 1)  # the pool's one (and the locker's)
        await store.post_chatt("u", "by name")
        self.assertEqual(resolver.asked, ["db.chatterd.test"] * 2)
        self.assertEqual(len(self.connected), 2)
        for connected in self.connected:
            params = psycopg2.extensions.parse_dsn(connected)
            self.assertEqual((params["host"], params["hostaddr"]), ("db.chatterd.test", "127.0.0.1"))
        relay.drop()
        await self.within(Deferred.fromCoroutine(self.post_once_back(store)))
        self.assertGreater(len(resolver.asked), 2)
        self.assertTrue(all("hostaddr=127.0.0.1" in c for c in self.connected))

    async def test_a_name_that_does_not_resolve(self) -> None:
        """
        A name with no address gives StoreUnavailable, and libpq is never
        handed the name to resolve itself.
        """
        store = self.make_store("host=nowhere.chatterd.test user=chatter dbname=chatterd",
                                resolver=FakeResolver({}))
        self.assertEqual(await self.within(store.started), 0)
        await self.unavailable(store)
        self.assertEqual(self.connected, [])

    async def test_a_resolver_that_never_answers(self) -> None:
        """
        A lookup that never ends is abandoned with the attempt: StoreUnavailable.
        """
        resolver = FakeResolver({"slow.chatterd.test": None})
        store = self.make_store("host=slow.chatterd.test user=chatter dbname=chatterd",
                                resolver=resolver, connect_timeout=WAIT)
        self.assertEqual(await self.within(store.started), 0)
        await self.unavailable(store)
        await self.eventually(lambda: len(resolver.asked) > 2, "no new attempt after the first ones")
        self.assertEqual(self.connected, [])


class AddressTests(SynchronousTestCase):
    """
    Which hosts of a DSN need resolving, and the DSN libpq gets instead.
    """

    def rewrite(self, dsn: str, addresses: dict[str, list[str]], environ: dict[str, str] | None = None) -> dict[str, str]:
        return psycopg2.extensions.parse_dsn(with_addresses(dsn, addresses, environ or {}))

    def test_what_needs_resolving(self) -> None:
        """
        Names do; unix sockets, IP addresses, an absent host and a DSN with
        hostaddr do not.  PGHOST counts when the DSN has no host.
        """
        self.assertEqual(_names("host=db.example dbname=x", {}), ["db.example"])
        self.assertEqual(_names("host=/run/postgresql,127.0.0.1,::1,db,db", {}), ["db"])
        self.assertEqual(_names("postgresql://u@db.example:5433,other/x", {}), ["db.example", "other"])
        self.assertEqual(_names("dbname=x", {}), [])
        self.assertEqual(_names("dbname=x", {"PGHOST": "pg.example"}), ["pg.example"])
        self.assertEqual(_names("host=db hostaddr=10.0.0.1", {}), [])
        self.assertEqual(_names("host=db", {"PGHOSTADDR": "10.0.0.1"}), [])

    def test_addresses_replace_the_lookup(self) -> None:
        """
        Each name becomes one host entry per address, with that address as
        hostaddr; other hosts keep theirs; other keys are kept.
        """
        found = self.rewrite("host=db.example port=5433 sslmode=verify-full dbname=x", {"db.example": ["10.0.0.1", "::1"]})
        self.assertEqual(found, {"host": "db.example,db.example", "hostaddr": "10.0.0.1,::1", "port": "5433",
                                 "sslmode": "verify-full", "dbname": "x"})
        found = self.rewrite("host=/tmp,db,127.0.0.1", {"db": ["10.0.0.2"]})
        self.assertEqual((found["host"], found["hostaddr"]), ("/tmp,db,127.0.0.1", ",10.0.0.2,127.0.0.1"))

    def test_ports_per_host_follow_their_host(self) -> None:
        """
        A port list, one per host, is repeated with its host.
        """
        found = self.rewrite("postgresql://u@a:1,b:2/x", {"a": ["10.0.0.1", "10.0.0.2"], "b": ["10.0.0.3"]})
        self.assertEqual((found["host"], found["hostaddr"], found["port"]),
                         ("a,a,b", "10.0.0.1,10.0.0.2,10.0.0.3", "1,1,2"))

    def test_names_without_addresses(self) -> None:
        """
        A name with no address is left out; with nothing left, NameNotResolved.
        """
        found = self.rewrite("host=a,b", {"a": [], "b": ["10.0.0.3"]})
        self.assertEqual((found["host"], found["hostaddr"]), ("b", "10.0.0.3"))
        self.assertRaises(NameNotResolved, with_addresses, "host=a", {"a": []}, {})

    def test_keepalives(self) -> None:
        """
        The DSN gets keepalives and ``tcp_user_timeout`` sized from the
        seconds given (at least 1 s each), ``tcp_user_timeout`` no shorter
        than a connection attempt's timeout; an option the DSN sets is kept;
        ``tcp_user_timeout`` only for libpq 12 or later.
        """
        found = psycopg2.extensions.parse_dsn(with_keepalives("host=db dbname=x", 10.0))
        self.assertEqual(found, {"host": "db", "dbname": "x", "keepalives": "1", "keepalives_idle": "5",
                                 "keepalives_interval": "2", "keepalives_count": "3", "tcp_user_timeout": "10000"})
        found = psycopg2.extensions.parse_dsn(with_keepalives("postgresql://u@db/x?keepalives_idle=42&keepalives=0", 0.5))
        self.assertEqual((found["keepalives"], found["keepalives_idle"], found["keepalives_interval"],
                          found["tcp_user_timeout"]), ("0", "42", "1", "500"))
        self.assertEqual(psycopg2.extensions.parse_dsn(with_keepalives("host=db", 10.0, 30.0))["tcp_user_timeout"],
                         "30000")
        self.assertNotIn("tcp_user_timeout", with_keepalives("host=db", 10.0, libpq_version=110000))

    def test_pghost(self) -> None:
        """
        A name from PGHOST is resolved like one in the DSN.
        """
        found = self.rewrite("dbname=x", {"pg.example": ["10.0.0.4"]}, {"PGHOST": "pg.example"})
        self.assertEqual((found["host"], found["hostaddr"]), ("pg.example", "10.0.0.4"))
