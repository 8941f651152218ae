# -*- test-case-name: tests.test_tap,tests.test_http2 -*-
"""
Every private Twisted name chatterd uses, in one place.

Each exists because Twisted offers no public way to do what chatterd needs;
each was checked against the Twisted range ``setup.py`` allows (26.x: an
upper bound on the next major).  A new Twisted that moves one breaks here,
and ``tests.test_tap`` and ``tests.test_http2`` say so at once.

- ``HTTPConnectionPool._factory``: the HTTP client's connection factory
  logs "Starting factory" for every connection to Ollama; a quiet subclass of
  ``_HTTP11ClientFactory`` is the only way to silence it.
- ``StreamServerEndpointService._raiseSynchronously``: without it a listener
  that cannot bind logs the error and twistd carries on serving nothing;
  ``strports.service`` sets it for the same reason.
- ``twisted.web.http._GenericHTTPChannelProtocol`` and
  ``twisted.web._http2`` (``H2Connection``, ``H2Stream``,
  ``_END_STREAM_SENTINEL``): Twisted's switch from HTTP/1.1 to HTTP/2 on
  ALPN, and its HTTP/2 connection, which :mod:`chatterd.http2` extends with
  the edge's limits (Twisted has no public hook for any of them).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import _GenericHTTPChannelProtocol as GenericHTTPChannelProtocol
from twisted.web._http2 import _END_STREAM_SENTINEL as END_STREAM_SENTINEL
from twisted.web._http2 import H2Connection, H2Stream

__all__ = [
    "END_STREAM_SENTINEL",
    "GenericHTTPChannelProtocol",
    "H2Connection",
    "H2Stream",
    "listener",
    "quiet_pool",
]


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The HTTP client's connection factory, without a log line per connection.
    """

    noisy = False


def quiet_pool(reactor: Any, per_host: int) -> HTTPConnectionPool:
    """
    A persistent HTTP client pool that logs nothing per connection.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    pool._factory = _QuietClientFactory
    return pool


def listener(endpoint: Any, factory: Any) -> StreamServerEndpointService:
    """
    A service listening on ``endpoint``; a failed bind aborts the start
    (twistd exits), as ``strports.service`` makes it.
    """
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service
