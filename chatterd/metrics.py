# -*- test-case-name: tests.test_operations -*-
"""
Prometheus metrics, through ``prometheus_client`` and its Twisted resource.

Each ``Metrics`` has a registry of its own (tests make as many as they like);
``--metrics DESC`` serves it on a listener of its own, so the public port
never exposes it.  Nothing here is touched per frame: streams report their
totals when they end.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.twisted import MetricsResource
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Site

from chatterd.logs import Logger

if TYPE_CHECKING:
    from chatterd.store import IChattStore

log = Logger()

#: Seconds between a worker's readings of its gauges.
GAUGE_PERIOD = 1.0


def multiprocess() -> bool:
    """
    Whether metrics go to prometheus_client's multiprocess files (a worker's).
    """
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

#: Routes get their own label; anything else is "other" (no label per random path).
ROUTES = frozenset(
    ["/", "/getchatts", "/postchatt", "/llmchat", "/llmprep", "/llmprompt", "/healthz", "/readyz"]
)


def route_of(path: bytes) -> str:
    """
    The route label for a request path (trailing slash ignored).
    """
    text = path.decode("ascii", "replace").split("?", 1)[0]
    text = text.rstrip("/") or "/"
    return text if text in ROUTES else "other"


def site(registry: CollectorRegistry, extra: dict[bytes, Resource] | None = None) -> Site:
    """
    A site serving ``registry`` at ``/metrics`` (and at ``/``), and
    ``extra`` resources (for operators' eyes only) beside them.
    """
    root = Resource()
    resource = MetricsResource(registry=registry)
    root.putChild(b"metrics", resource)
    root.putChild(b"", resource)
    for name, child in (extra or {}).items():
        root.putChild(name, child)
    served = Site(root)
    served.noisy = False
    served.log = lambda request: None  # type: ignore[method-assign]
    return served


class Metrics:
    """
    chatterd's metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("chatterd_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.duration = Histogram(
            "chatterd_request_duration_seconds", "Time from request to the end of its answer", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.streams = Counter("chatterd_streams", "Streams ended, by how they ended", ["route", "outcome"], registry=r)
        self.first_byte = Histogram(
            "chatterd_ollama_first_byte_seconds", "Time from sending a request to Ollama to its first byte",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.frames = Counter("chatterd_frames_relayed", "Lines of Ollama relayed to clients", registry=r)
        self.ollama_errors = Counter("chatterd_ollama_errors", "Ollama failures, by kind", ["kind"], registry=r)
        self.database_errors = Counter("chatterd_database_errors", "Database failures, by kind", ["kind"], registry=r)
        self.client_disconnects = Counter(
            "chatterd_client_disconnects",
            "Streams whose client left early (chatterd then closed the Ollama connection)", registry=r,
        )
        self.http2_defences = Counter(
            "chatterd_http2_defences",
            "HTTP/2 streams refused or reset, and connections ended, by the edge's limits, by reason",
            ["reason"], registry=r,
        )
        self.client_limit_refusals = Counter(
            "chatterd_client_limit_refusals",
            "Connections or streams refused because one client address held its share, by limit",
            ["limit"], registry=r,
        )
        # with workers, the parent's page adds up the live workers' gauges
        live = {"multiprocess_mode": "livesum"}
        self.active_streams = Gauge("chatterd_active_streams", "Streams in progress", registry=r, **live)
        self.database_pool_in_use = Gauge(
            "chatterd_database_pool_in_use", "Database connections in use", registry=r, **live)
        self.ollama_in_flight = Gauge("chatterd_ollama_in_flight", "Requests open to Ollama servers", registry=r, **live)
        self._reading: LoopingCall | None = None

    def watch(self, *, streams: Any, store: IChattStore, ollama: Any, clock: IReactorTime | None = None) -> None:
        """
        Read the gauges from their owners whenever metrics are scraped; in a
        worker (prometheus_client's multiprocess mode, where the parent
        scrapes files that the workers write), every :data:`GAUGE_PERIOD`
        seconds instead.
        """
        readings = [
            (self.active_streams, lambda: streams.active),
            (self.database_pool_in_use, store.connections_in_use),
            (self.ollama_in_flight, lambda: ollama.in_flight),
        ]
        if not multiprocess():
            for gauge, read in readings:
                gauge.set_function(read)
            return

        def read_all() -> None:
            for gauge, read in readings:
                gauge.set(read())

        self._reading = LoopingCall(read_all)
        if clock is not None:
            self._reading.clock = clock
        self._reading.start(GAUGE_PERIOD).addErrback(lambda f: log.failure("metrics: reading gauges failed", f))

    def database_error(self, kind: str) -> None:
        """
        Count a database failure (the store's ``on_error``).
        """
        self.database_errors.labels(kind).inc()

    def site(self, extra: dict[bytes, Resource] | None = None) -> Site:
        """
        A site serving these metrics (see :func:`site`).
        """
        return site(self.registry, extra)

    def stream_ended(self, route: str, relay: Any, ending: Any) -> None:
        """
        Count what a finished stream did and how it ended (a relay's ``Ending``).
        """
        self.streams.labels(route, ending.outcome).inc()
        self.frames.inc(relay.frames)
        if relay.first_byte_at is not None:
            self.first_byte.observe(relay.first_byte_at - relay.started_at)
        if ending.outcome == "client left":
            self.client_disconnects.inc()
        if ending.counted == "database":
            self.database_errors.labels("reply_insert").inc()
        elif ending.counted == "ollama":
            self.ollama_errors.labels(ending.kind).inc()
