# -*- test-case-name: tests.test_operations -*-
"""
Prometheus metrics, through ``prometheus_client`` and its Twisted resource.

Each ``Metrics`` has a registry of its own (tests make as many as they like);
``--metrics DESC`` serves it on a listener of its own, so the public port
never exposes it.  Nothing here is touched per frame: streams report their
totals when they end.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

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
        self.active_streams = Gauge("chatterd_active_streams", "Streams in progress", registry=r)
        self.database_pool_in_use = Gauge("chatterd_database_pool_in_use", "Database connections in use", registry=r)
        self.ollama_in_flight = Gauge("chatterd_ollama_in_flight", "Requests open to Ollama servers", registry=r)

    def watch(self, *, streams: Any, store: Any, ollama: Any) -> None:
        """
        Read the gauges from their owners whenever metrics are scraped.
        """
        self.active_streams.set_function(lambda: streams.active)
        self.database_pool_in_use.set_function(lambda: store.pool.in_use if store.running else 0)
        self.ollama_in_flight.set_function(lambda: ollama.in_flight)

    def database_error(self, kind: str) -> None:
        """
        Count a database failure (the store's ``on_error``).
        """
        self.database_errors.labels(kind).inc()

    def site(self, extra: dict[bytes, Resource] | None = None) -> Site:
        """
        A site serving the metrics at ``/metrics`` (and at ``/``), and
        ``extra`` resources (for operators' eyes only) beside them.
        """
        root = Resource()
        resource = MetricsResource(registry=self.registry)
        root.putChild(b"metrics", resource)
        root.putChild(b"", resource)
        for name, child in (extra or {}).items():
            root.putChild(name, child)
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        return site

    def stream_ended(self, route: str, relay: Any) -> None:
        """
        Count what a finished stream did.
        """
        self.streams.labels(route, relay.outcome).inc()
        self.frames.inc(relay.frames)
        if relay.first_byte_at is not None:
            self.first_byte.observe(relay.first_byte_at - relay.started_at)
        if relay.outcome == "client left":
            self.client_disconnects.inc()
        kind = relay.error_kind
        if kind == "database":
            self.database_errors.labels("reply_insert").inc()
        elif kind not in (None, "shutdown", "internal"):
            self.ollama_errors.labels(kind).inc()
