# -*- test-case-name: tests.test_tap -*-
"""
The command line and the service tree: ``twistd chatterd`` and ``chatterd.tac``
both go through :class:`Options` and :func:`makeService`.

The tree (see :func:`makeService` for the order, said once, in code)::

    MultiService
    └── EmbeddedPostgresService      (only without --database)
        └── _Sequential              started in order, stopped in reverse
            ├── PostgresChattStore       (the connection pools)
            ├── the HTTP client's pool   (persistent connections to Ollama)
            ├── Balancer                 (the Ollama servers)
            ├── Streams                  (drains running streams at shutdown)
            ├── one listener per --listen, the --metrics listener
            └── _NoReload, _Announce

With ``--workers N`` the ``_Sequential`` holds the ``Supervisor`` of the
worker processes (and the ``--metrics`` listener) instead.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python import usage

from chatterd import logs, tls, twistedcompat
from chatterd.balancer import Balancer
from chatterd.clients import ConnectionLimit
from chatterd.logs import Logger
from chatterd.metrics import Metrics
from chatterd.ollama import OllamaClient, http_client
from chatterd.relay import RelayConfig
from chatterd.site import ChatterSite
from chatterd.store import DEFAULT_MAX_HISTORY, PostgresChattStore
from chatterd.streams import Streams, default_client_streams
from chatterd.web import ChatterApp, ReadinessResource

log = Logger()

DEFAULT_LISTEN = "ssl:443"
DEFAULT_OLLAMA = "http://localhost:11434"
DEFAULT_MAX_BODY = 1024 * 1024
#: A reply of 4 MiB is about a million tokens, far past any model's context.
DEFAULT_MAX_REPLY = 4 * 1024 * 1024


def ollama_url(value: str) -> str:
    """
    Normalise an Ollama address as Ollama's own tools read ``OLLAMA_HOST``:
    without a scheme it is ``http`` on port 11434 (with one, the scheme's
    port), and a wildcard bind address means this host.
    """
    value = value.strip()
    bare = "://" not in value
    parts = urlsplit("http://" + value if bare else value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(f"--ollama: not an http(s) URL: {value!r}")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parts.hostname, parts.hostname)
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (11434 if bare else None)
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _positive(kind: type, what: str) -> Any:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"--{what}: not a number: {value!r}") from None
        if number <= 0:
            raise usage.UsageError(f"--{what}: must be positive, not {value}")
        return number

    return parse


def _limit(what: str) -> Any:
    """
    A parser for a count that may be 0 (off).
    """

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{what}: not a whole number: {value!r}") from None
        if number < 0:
            raise usage.UsageError(f"--{what}: must be 0 (off) or more, not {value}")
        return number

    return parse


def _workers(value: str) -> int:
    """
    ``--workers``: a positive count, or ``auto`` for one per CPU.
    """
    if value == "auto":
        return os.cpu_count() or 1
    return int(_positive(int, "workers")(value))


#: Connections one client address may hold at once.  A lecture hall of 300
#: phones behind one campus NAT address holds one or two each (HTTP/2
#: multiplexes every request on one), so up to about 600; 1024 leaves room
#: above that.  A TLS connection holds some 50-100 kB, so 1024 bounds what one
#: address can take to about 100 MB, far below what the process can hold (and
#: within the unit's LimitNOFILE=65536 with every stream's two descriptors).
DEFAULT_MAX_CLIENT_CONNECTIONS = 1024


class Options(usage.Options):
    """
    ``twistd chatterd`` options.
    """

    synopsis = "[--listen DESC]... [options]"
    longdesc = (
        "chatterd serves the EECS Reactive llmChat apps: it stores chatts in "
        "PostgreSQL and relays Ollama's streamed chat as Server-Sent Events."
    )

    optParameters = [
        ["certs", None, "certs", "Directory of chatterd.crt and chatterd.key (made if missing)."],
        ["database", None, None, "libpq connection string [default: an embedded PostgreSQL]."],
        ["data-dir", None, None,
         "Embedded PostgreSQL's directory [default: /var/lib/chatterd as root, "
         "else $XDG_DATA_HOME/chatterd]."],
        ["heartbeat", None, 15.0, "Seconds of silence before an SSE ': ping'.",
         _positive(float, "heartbeat")],
        ["max-body", None, DEFAULT_MAX_BODY, "Largest request body in bytes.",
         _positive(int, "max-body")],
        ["max-history", None, DEFAULT_MAX_HISTORY,
         "Most bytes of an appID's history sent to Ollama: its system messages, oldest first, "
         "while they fit on their own; the new messages, always whole; then the newest others "
         "that fit in what is left (older rows stay stored).",
         _positive(int, "max-history")],
        ["db-pool-size", None, 4, "Database connections.", _positive(int, "db-pool-size")],
        ["db-wait", None, 10.0, "Seconds a request waits for a free database connection, then for each answer.",
         _positive(float, "db-wait")],
        ["connect-timeout", None, 10.0, "Seconds to wait for a connection to Ollama.",
         _positive(float, "connect-timeout")],
        ["first-byte-timeout", None, 300.0,
         "Seconds to wait for Ollama's first byte (model loading included).",
         _positive(float, "first-byte-timeout")],
        ["stall-timeout", None, 120.0, "Seconds Ollama may fall silent mid-stream.",
         _positive(float, "stall-timeout")],
        ["max-streams", None, 1000, "Most streams at once; more get 503.", _positive(int, "max-streams")],
        ["max-reply", None, DEFAULT_MAX_REPLY,
         "Longest reply in bytes a /llmchat stream gathers; past it the stream ends with an error "
         "(what came is stored).", _positive(int, "max-reply")],
        ["max-client-connections", None, DEFAULT_MAX_CLIENT_CONNECTIONS,
         "Most connections one client address may hold; more are closed at accept (0: no limit).",
         _limit("max-client-connections")],
        ["max-client-streams", None, None,
         "Most /llmchat, /llmprompt and /llmprep streams one client address may hold; more get 503 "
         "(0: no limit) [default: a quarter of --max-streams].",
         _limit("max-client-streams")],
        ["lock-wait", None, 300.0,
         "Seconds a request waits for an earlier stream of the same appID.",
         _positive(float, "lock-wait")],
        ["grace", None, 30.0, "Seconds running streams get to finish at shutdown.",
         _positive(float, "grace")],
        ["request-timeout", None, 30.0, "Seconds for a request's headers and body to arrive.",
         _positive(float, "request-timeout")],
        ["idle-timeout", None, 60.0, "Seconds an idle connection stays open.",
         _positive(float, "idle-timeout")],
        ["metrics", None, None,
         "Serve Prometheus metrics on this endpoint, e.g. tcp:9100:interface=127.0.0.1 [default: off]."],
        ["tags-refresh", None, 60.0, "Seconds between refreshes of each Ollama server's model list.",
         _positive(float, "tags-refresh")],
        ["log-format", None, "text", "Log lines as text or json (one object per line)."],
        ["workers", None, 1,
         "Worker processes serving the listeners, or 'auto' for one per CPU; with more than one, "
         "a small parent supervises them and SIGHUP reloads without dropping anything.",
         _workers],
        ["reload-grace", None, 600.0,
         "With --workers: seconds the old workers of a reload (SIGHUP) get to finish their streams.",
         _positive(float, "reload-grace")],
    ]

    optFlags = [
        ["log-content", None, "Log prompts and replies (users' conversations: for debugging only)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["cert-name"] = []
        self["ollama"] = []

    def opt_ollama(self, url: str) -> None:
        """
        An Ollama server's URL (repeatable: requests are spread over them)
        [default: $OLLAMA_HOST or http://localhost:11434].
        """
        self["ollama"].append(ollama_url(url))

    def opt_listen(self, description: str) -> None:
        """
        Where to listen, as a Twisted endpoint (repeatable) [default: ssl:443].
        An ssl: endpoint that names no privateKey uses --certs.
        """
        self["listen"].append(description)

    def opt_cert_name(self, name: str) -> None:
        """
        Another host name or IP address for a generated certificate (repeatable).
        """
        self["cert-name"].append(name)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            if not description.partition(":")[1]:
                raise usage.UsageError(f"--listen: not an endpoint description: {description!r}")
        if not self["ollama"]:
            self["ollama"] = [ollama_url(os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA)]
        self.client_streams_derived = self["max-client-streams"] is None
        if self.client_streams_derived:
            self["max-client-streams"] = default_client_streams(self["max-streams"])
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format: text or json, not {self['log-format']!r}")
        if self["log-format"] == "json" and self.parent is not None:
            # under twistd: its own --logger option, read before it starts logging
            self.parent["logger"] = "chatterd.logs.json_observer"


# --- assembly: one small builder per component, then the order, once ---

Announcements = list[tuple[str, dict[str, Any]]]


def makeService(options: Options, reactor: Any = None,
                inherited: dict[str, tuple[int, int]] | None = None) -> IService:
    """
    Build chatterd's service tree from parsed :class:`Options`.

    This is the only place that reads configuration or touches the global
    reactor; everything below gets its reactor, store and client passed in.
    With ``--workers`` over 1 the tree is the workers' parent (see
    :mod:`chatterd.workers`): the database and the listening sockets, and
    no request work.

    **Order.** The services under the database are started in the order of
    the list built here and stopped in the reverse order, one at a time
    (:class:`_Sequential`): listeners close first, then running streams
    drain, then the connections to Ollama and to the database close, and
    the embedded PostgreSQL (the tree's root, when there is one) stops last.

    :param inherited: in a worker (see :mod:`chatterd.worker`), the
        listening sockets its parent bound, by ``--listen`` description, as
        ``(descriptor, address family)``.
    """
    if reactor is None:
        from twisted.internet import reactor
    for stream in (sys.stdout, sys.stderr):  # where twistd's observers write
        logs.never_fail_to_encode(stream)
    announce: Announcements = []
    top, dsn = _database(options, announce)
    certificate = _certificate(options, announce)
    if options["workers"] > 1:
        services = _supervisor(options, reactor, dsn, announce)
    else:
        services = _server(options, reactor, dsn, certificate, announce, inherited)
        if inherited is None:
            services.append(_NoReload(reactor))
    if options["log-content"]:
        announce.append(("logging message contents (--log-content): turn it off outside debugging", {}))
    if inherited is None:  # a worker's parent has said it all
        services.append(_Announce(announce))
    ordered = _Sequential()
    for service in services:
        service.setServiceParent(ordered)
    ordered.setServiceParent(top)
    return top


def _database(options: Options, announce: Announcements) -> tuple[MultiService, Any]:
    """
    The tree's root and the database's DSN: with ``--database``, an empty
    root and that DSN; else the embedded PostgreSQL as the root (it starts
    before everything under it and stops after) and its DSN once started.
    """
    if options["database"]:
        announce.append(("database: the configured DSN", {}))
        return MultiService(), options["database"]
    from chatterd.pgembed import EmbeddedPostgres, EmbeddedPostgresService, default_base

    base = default_base(options["data-dir"])
    embedded = EmbeddedPostgresService(EmbeddedPostgres(base))
    announce.append(("database: embedded PostgreSQL in {base}", {"base": str(base)}))
    top = MultiService()
    embedded.setServiceParent(top)
    return embedded, embedded.get_dsn


def _needs_generated_certificate(description: str) -> bool:
    args, kwargs = tls.parse_description(description)
    return args[0] == "ssl" and len(args) < 3 and "privateKey" not in kwargs


def _certificate(options: Options, announce: Announcements) -> tuple[Path, Path]:
    """
    The certificate and key of ``ssl:`` listeners that name none, made if missing.
    """
    cert_path = Path(options["certs"]) / tls.CERT_FILE
    key_path = Path(options["certs"]) / tls.KEY_FILE
    if any(_needs_generated_certificate(d) for d in options["listen"]):
        cert_path, key_path, made = tls.ensure_certificate(options["certs"], options["cert-name"])
        cert = tls.load_certificate(cert_path)
        announce.append((
            "certificate {state}: {path} (SHA-256 {fingerprint}); valid until {until}; "
            "names: {names}",
            {
                "state": "generated" if made else "in use",
                "path": str(cert_path.resolve()),
                "fingerprint": tls.fingerprint(cert),
                "until": f"{cert.not_valid_after_utc:%Y-%m-%d}",
                "names": ", ".join(tls.certificate_names(cert)),
            },
        ))
    return cert_path, key_path


def _store(options: Options, reactor: Any, dsn: Any, metrics: Metrics) -> PostgresChattStore:
    return PostgresChattStore(
        dsn,
        reactor=reactor,
        pool_size=options["db-pool-size"],
        acquire_timeout=options["db-wait"],
        max_history=options["max-history"],
        on_error=metrics.database_error,
    )


def _ollama(options: Options, reactor: Any) -> tuple[Service, Balancer]:
    """
    The Ollama servers behind one balancer, and the service that closes
    their persistent connections at shutdown.
    """
    pool = twistedcompat.quiet_pool(reactor, per_host=64)
    http = http_client(reactor, pool, options["connect-timeout"])
    balancer = Balancer(
        [OllamaClient(http, url) for url in options["ollama"]], clock=reactor, refresh=options["tags-refresh"]
    )
    return _HTTPPoolService(pool), balancer


def _streams(options: Options, reactor: Any) -> Streams:
    return Streams(
        clock=reactor,
        max_streams=options["max-streams"],
        max_client_streams=options["max-client-streams"],
        grace=options["grace"],
        lock_wait=options["lock-wait"],
    )


def _relay(options: Options) -> RelayConfig:
    return RelayConfig(
        heartbeat=options["heartbeat"],
        first_byte_timeout=options["first-byte-timeout"],
        stall_timeout=options["stall-timeout"],
        max_reply=options["max-reply"],
    )


def _site(options: Options, reactor: Any, app: ChatterApp, metrics: Metrics) -> ChatterSite:
    return ChatterSite(
        app.resource(),
        clock=reactor,
        max_body=options["max-body"],
        request_timeout=options["request-timeout"],
        idle_timeout=options["idle-timeout"],
        metrics=metrics,
    )


def _listeners(options: Options, reactor: Any, site: ChatterSite, certificate: tuple[Path, Path],
               metrics: Metrics, inherited: dict[str, tuple[int, int]] | None) -> list[Service]:
    """
    One listener per ``--listen``, sharing one count of connections per client.
    """
    connections = ConnectionLimit(
        options["max-client-connections"], reactor,
        on_refused=metrics.client_limit_refusals.labels("connections").inc,
    )
    found: list[Service] = []
    for description in options["listen"]:
        try:
            endpoint = tls.server_endpoint(reactor, description, *certificate, connections,
                                           inherited=(inherited or {}).get(description))
        except (ValueError, OSError) as e:
            raise usage.UsageError(f"--listen {description}: {e}") from None
        found.append(twistedcompat.listener(endpoint, site))
    return found


def _server(options: Options, reactor: Any, dsn: Any, certificate: tuple[Path, Path],
            announce: Announcements, inherited: dict[str, tuple[int, int]] | None) -> list[Service]:
    """
    A chatterd that answers requests: its services in start order.
    """
    metrics = Metrics()
    store = _store(options, reactor, dsn, metrics)
    http_pool, ollama = _ollama(options, reactor)
    streams = _streams(options, reactor)
    app = ChatterApp(store=store, ollama=ollama, streams=streams, clock=reactor, relay=_relay(options),
                     metrics=metrics, log_content=options["log-content"])
    site = _site(options, reactor, app, metrics)
    metrics.watch(streams=streams, store=store, ollama=ollama, clock=reactor)
    listeners = _listeners(options, reactor, site, certificate, metrics, inherited)
    announce.append(("Ollama: {urls}", {"urls": ", ".join(options["ollama"])}))
    announce += [("listening on {listen}", {"listen": d}) for d in options["listen"]]
    services: list[Service] = [store, http_pool, ollama, streams, *listeners]
    if options["metrics"]:
        endpoint = endpoints.serverFromString(reactor, options["metrics"])
        services.append(StreamServerEndpointService(endpoint, metrics.site({b"readyz": ReadinessResource(app)})))
        announce.append(("metrics on {listen}", {"listen": options["metrics"]}))
    return services


def _supervisor(options: Options, reactor: Any, dsn: Any, announce: Announcements) -> list[Service]:
    """
    The workers' parent: it binds the listeners and hands them to
    ``--workers`` processes that serve them, and serves the metrics of all.
    """
    from chatterd.workers import Supervisor, log_destination, metrics_site, worker_options

    metrics_dir = tempfile.mkdtemp(prefix="chatterd-metrics-") if options["metrics"] else None
    services: list[Service] = [Supervisor(
        count=options["workers"],
        options=worker_options(options),
        dsn=dsn,
        listen=options["listen"],
        reactor=reactor,
        grace=options["grace"],
        reload_grace=options["reload-grace"],
        metrics_dir=metrics_dir,
        log=log_destination(options),
    )]
    announce += [("listening on {listen} ({n} workers)", {"listen": d, "n": options["workers"]})
                 for d in options["listen"]]
    if metrics_dir is not None:
        endpoint = endpoints.serverFromString(reactor, options["metrics"])
        services.append(StreamServerEndpointService(endpoint, metrics_site(metrics_dir)))
        announce.append(("metrics of every worker on {listen}", {"listen": options["metrics"]}))
    return services


class _Sequential(MultiService):
    """
    A ``MultiService`` that stops its children one at a time, last started first.
    """

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            await maybeDeferred(child.stopService)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


class _HTTPPoolService(Service):
    """
    Closes the persistent connections to Ollama at shutdown.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self._pool.closeCachedConnections()


class _Announce(Service):
    """
    Logs what chatterd serves, once everything has started.
    """

    def __init__(self, lines: Announcements) -> None:
        self._lines = lines

    def startService(self) -> None:
        super().startService()
        for fmt, fields in self._lines:
            log.info(fmt, **fields)


class _NoReload(Service):
    """
    A single chatterd cannot reload without dropping streams: SIGHUP (by
    default the end of the process) is logged and ignored.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(
            log.warn, "SIGHUP ignored: reloading needs --workers 2 or more (or auto); restart instead"))


#: ``chatterd.tac``'s environment variables and the options they stand for.
ENVIRONMENT = {
    "CHATTERD_CERTS": "--certs",
    "CHATTERD_OLLAMA": "--ollama",
    "CHATTERD_DATABASE": "--database",
    "CHATTERD_DATA_DIR": "--data-dir",
    "CHATTERD_HEARTBEAT": "--heartbeat",
    "CHATTERD_MAX_BODY": "--max-body",
    "CHATTERD_METRICS": "--metrics",
    "CHATTERD_LOG_FORMAT": "--log-format",
    "CHATTERD_WORKERS": "--workers",
}


def options_from_environment(environ: Any) -> list[str]:
    """
    The command line that ``chatterd.tac``'s environment stands for.

    ``CHATTERD_LISTEN`` holds endpoint descriptions separated by spaces; unset
    variables keep their defaults; ``CHATTERD_ARGS`` adds any other options.
    """
    argv: list[str] = []
    for description in environ.get("CHATTERD_LISTEN", "").split():
        argv += ["--listen", description]
    for name, option in ENVIRONMENT.items():
        if name == "CHATTERD_OLLAMA":  # several URLs, separated by spaces
            for url in environ.get(name, "").split():
                argv += [option, url]
        elif environ.get(name):
            argv += [option, environ[name]]
    return argv + shlex.split(environ.get("CHATTERD_ARGS", ""))
