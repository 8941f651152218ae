# -*- test-case-name: tests.test_hardening -*-
"""
chatterd's HTTP server below the routes: the site, its connections and requests.

- ``ChatterSite``: bodies kept in memory up to ``--max-body``, never parsed
  as forms, non-UTF-8 paths answered in JSON, the idle timeout.
- ``ChatterChannel``: HTTP/1.1 with a deadline for a whole request (against
  slowloris), an early ``413`` and capped headers.
- ``ChatterRequest``: one access-log line (and the request metrics) per
  request, however it ends.
"""

from __future__ import annotations

import io
import json
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest

from chatterd.http2 import CLOSE_GRACE, ChannelProtocol
from chatterd.logs import Logger, info_line
from chatterd.metrics import Metrics, route_of

log = Logger()

#: The ``Server`` header: what this is, not which versions of what it runs on.
SERVER = b"chatterd"


def json_body(request: IRequest, value: Any, status: int = 200) -> bytes:
    """
    Set a JSON answer's status and content type; return its body.
    """
    request.setResponseCode(status, HTTPStatus(status).phrase.encode())
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode("utf-8")


class BoundedBody(io.BytesIO):
    """
    A request body kept in memory up to ``limit`` bytes; past that it is
    dropped and ``too_large`` is set, so a route can answer ``413``.
    """

    def __init__(self, limit: int, declared: int | None) -> None:
        super().__init__()
        self.limit = limit
        self.too_large = declared is not None and declared > limit

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if not self.too_large and self.tell() + len(data) > self.limit:
            self.too_large = True
            self.truncate(0)
        if self.too_large:
            return len(data)
        return super().write(data)


class ChatterRequest(server.Request):
    """
    A request that logs one access line when it ends, however it ends.

    :ivar refused: the channel answered it before it was complete (408, 413).
    :ivar note: what the access line adds in brackets (a limit that refused it).
    """

    refused = False
    note: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._site: ChatterSite = self.channel.site
        self._clock: IReactorTime = self._site.clock
        self.started_at = self._clock.seconds()
        self.notifyFinish().addBoth(self._log_access)

    def _log_access(self, result: object) -> None:
        duration = self._clock.seconds() - self.started_at
        left = isinstance(result, Failure)
        metrics = self._site.metrics
        if metrics is not None:
            route = route_of(getattr(self, "path", None) or b"")
            metrics.requests.labels(route, str(self.code)).inc()
            metrics.duration.labels(route).observe(duration)
        method = self.method.decode("ascii", "replace")
        path = self.uri.decode("ascii", "replace")
        how = " (refused)" if self.refused else " (client left)" if left else ""
        if self.note:
            how += f" ({self.note})"
        info_line(
            log,
            f"{method} {path} {self.code} {self.sentLength}B {duration * 1000:.1f}ms{how}",
            method=method,
            path=path,
            status=self.code,
            length=self.sentLength,
            duration_ms=duration * 1000,
            client=str(self.getClientAddress()),
            **({"note": self.note} if self.note else {}),
        )


def _raw_error(status: bytes, message: str) -> bytes:
    """
    A whole HTTP/1.1 error response that closes the connection, for answers
    given before (or instead of) a request object.
    """
    body = json.dumps({"error": message}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    ) + body


class ChatterChannel(http.HTTPChannel):
    """
    HTTP/1.1 with limits against slow and oversized requests.

    - A request's headers and body must arrive within the site's
      ``request_timeout`` (Twisted's own timeout restarts with every byte,
      so a client trickling one byte a minute would never hit it): ``408``.
    - A ``Content-Length`` over the site's ``max_body`` is answered ``413``
      at once, without reading the body.
    - At most 100 headers and 16 KiB of them.
    """

    maxHeaders = 100
    totalHeadersSize = 16384
    _deadline: IDelayedCall | None = None
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.site.request_timeout, self._too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self._refuse(b"413 Payload Too Large", f"the body is larger than {self.site.max_body} bytes")
            return
        super().allHeadersReceived()

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_deadline()
        if self._cut_off is not None and self._cut_off.active():
            self._cut_off.cancel()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(b"408 Request Timeout", f"the request did not arrive within {self.site.request_timeout:g} s")

    def _refuse(self, status: bytes, message: str) -> None:
        self._stop_deadline()
        self._refused = True
        if self.requests:  # for the access log
            request = self.requests[-1]
            request.refused = True
            request.setResponseCode(int(status[:3]))
            request.method = getattr(self, "_command", None) or request.method
            request.uri = request.path = getattr(self, "_path", None) or request.uri
        self.transport.write(_raw_error(status, message))
        self.transport.loseConnection()
        self._cut_off_soon(5)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # --- going away gracefully (a worker retiring at a reload) ---

    _retiring = False
    _answered = 0
    _cut_off: IDelayedCall | None = None

    def retire(self) -> None:
        """
        Close once nothing is in progress: now if the connection sits idle
        between requests, else after the answer being made (no request is
        cut).  A connection that has sent nothing yet gets its first answer
        first: closing it now would refuse a request already on its way.
        """
        self._retiring = True
        if self.requests:
            self.persistent = False  # requestDone closes after this answer
            for request in self.requests:
                if not request.startedWriting:  # say so, as the last answer
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        elif self._answered:
            self.transport.loseConnection()
            self._cut_off_soon()

    def _cut_off_soon(self, seconds: float = CLOSE_GRACE) -> None:
        """
        After ``loseConnection``: TLS waits for the client's close_notify, and
        a client that never sends one (an idle pooled client does not read)
        must not keep the connection for the whole idle timeout, nor a
        retiring worker waiting for it: cut it off after ``seconds``.
        """
        if self._cut_off is None:
            self._cut_off = self.callLater(seconds, self.transport.abortConnection)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self._retiring:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def requestDone(self, request: Any) -> None:
        self._answered += 1
        super().requestDone(request)
        if self._retiring and not self.persistent:  # super() closed it
            self._cut_off_soon()


class _BadPath(resource.Resource):
    """
    A JSON 400 for a path that is not UTF-8.
    """

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return json_body(request, {"error": "the path is not UTF-8 once percent-decoded"}, 400)


def _channel(site: ChatterSite) -> ChannelProtocol:
    """
    A connection's protocol: ``ChatterChannel``, or HTTP/2 with the same
    limits (:mod:`chatterd.http2`) if ALPN picks it.
    """
    return ChannelProtocol(ChatterChannel())


class ChatterSite(server.Site):
    """
    A ``Site`` with chatterd's request and channel classes, body and time
    limits, and no Common Log Format lines (``ChatterRequest`` logs through
    ``twisted.logger``).

    :param max_body: the largest request body, in bytes.
    :param request_timeout: seconds for a request's headers and body to arrive.
    :param idle_timeout: seconds an idle connection is kept open.
    :param metrics: where requests are counted, if anywhere.
    """

    requestFactory = ChatterRequest
    protocol = _channel
    noisy = False  # no "Starting factory" lines

    def __init__(
        self,
        resource: Any,
        *,
        clock: IReactorTime,
        max_body: int,
        request_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        # parsePOSTFormSubmission=False: bodies are JSON, never forms (Twisted
        # would answer a malformed multipart body with a bare 400 itself)
        super().__init__(resource, timeout=idle_timeout, reactor=clock, parsePOSTFormSubmission=False)
        self.clock = clock
        self.metrics = metrics
        #: open connections (their ``ChannelProtocol``), and whether they are asked to go
        self.connections: set[Any] = set()
        self.retiring = False
        self.max_body = max_body
        self.request_timeout = request_timeout

    def getResourceFor(self, request: server.Request) -> Any:
        """
        The app, unless the path is not UTF-8 once unquoted: Klein would
        answer that with an HTML page before any route or error handler runs.
        """
        request.setHeader(b"server", SERVER)  # not Twisted's name and exact version
        request.setHeader(b"x-content-type-options", b"nosniff")  # a browser takes JSON as JSON
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return _BadPath()
        return super().getResourceFor(request)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.connections.add(protocol)
            if self.retiring:
                protocol.retire()
        return protocol

    def retire(self) -> None:
        """
        Ask every connection to go once what it is doing is done (a worker
        retiring at a reload, its listeners already closed): HTTP/1.1 after
        its current answer, HTTP/2 with ``GOAWAY`` once no stream is open.
        """
        self.retiring = True
        for protocol in list(self.connections):
            protocol.retire()

    def getContentFile(self, length: int | None) -> BoundedBody:
        return BoundedBody(self.max_body, length)

    def log(self, request: server.Request) -> None:
        pass
