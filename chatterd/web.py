# -*- test-case-name: tests.test_web -*-
"""
The HTTP layer: Klein routes, JSON errors, request bodies and the access log.

Routes stay thin: validate (``chatterd.api``), call the store or the relay,
serialise.  Errors before anything is written are JSON ``{"error": ...}``
answers with a 4xx or 5xx status; errors inside ``/llmchat``'s stream are SSE
error frames (see ``chatterd.relay``).  Paths work with and without a trailing
slash, without redirects.
"""

from __future__ import annotations

import io
import json
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from chatterd import api
from chatterd.api import ClientError
from chatterd.balancer import Balancer
from chatterd.metrics import Metrics, route_of
from chatterd.ollama import OllamaError
from chatterd.relay import ChatRelay, GenerateRelay, OllamaTimeout, RelayConfig
from chatterd.store import IChattStore, StoreError
from chatterd.streams import Busy, Streams

log = Logger()

BANNER = "EECS Reactive chatterd"
#: Rows per ``/getchatts`` page: memory stays bounded whatever the table's size.
PAGE_ROWS = 500


# --- requests, bodies, access log ------------------------------------------------


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
    """

    refused = False

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
        log.info(
            "{method} {path} {status} {length}B {duration_ms:.1f}ms{left}",
            method=self.method.decode("ascii", "replace"),
            path=self.uri.decode("ascii", "replace"),
            status=self.code,
            length=self.sentLength,
            duration_ms=duration * 1000,
            left=" (refused)" if self.refused else " (client left)" if left else "",
            client=str(self.getClientAddress()),
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
        # TLS waits for the client's close_notify; a client that never sends
        # one must not keep the connection for the whole idle timeout
        self._deadline = self.callLater(5, self.transport.abortConnection)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class _BadPath(resource.Resource):
    """
    A JSON 400 for a path that is not UTF-8.
    """

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return json_body(request, {"error": "the path is not UTF-8 once percent-decoded"}, 400)


def _channel(site: ChatterSite) -> http._GenericHTTPChannelProtocol:
    """
    A connection's protocol: ``ChatterChannel``, or HTTP/2 if ALPN picks it.
    """
    return http._GenericHTTPChannelProtocol(ChatterChannel())


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
        self.max_body = max_body
        self.request_timeout = request_timeout

    def getResourceFor(self, request: server.Request) -> Any:
        """
        The app, unless the path is not UTF-8 once unquoted: Klein would
        answer that with an HTML page before any route or error handler runs.
        """
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return _BadPath()
        return super().getResourceFor(request)

    def getContentFile(self, length: int | None) -> BoundedBody:
        return BoundedBody(self.max_body, length)

    def log(self, request: server.Request) -> None:
        pass


def read_body(request: IRequest) -> bytes:
    """
    The request body.

    :raises ClientError: 413 if it was larger than the limit.
    """
    content = request.content
    if getattr(content, "too_large", False):
        raise ClientError(413, f"the body is larger than {content.limit} bytes")
    content.seek(0)
    return content.read()


def json_body(request: IRequest, value: Any, status: int = 200) -> bytes:
    """
    Set a JSON answer's status and content type; return its body.
    """
    request.setResponseCode(status, HTTPStatus(status).phrase.encode())
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode("utf-8")


def abort_response(request: IRequest) -> None:
    """
    Cut a response short so that the client sees it is incomplete: reset the
    HTTP/2 stream, or abort the HTTP/1.1 connection (no last chunk is sent).
    """
    channel = request.channel  # type: ignore[attr-defined]
    if channel is None:
        return
    if hasattr(channel, "abortConnection"):  # an HTTP/2 stream
        channel.abortConnection()
    else:
        channel.transport.abortConnection()


@implementer(IPushProducer)
class FlowControl:
    """
    Tracks whether a request's connection wants more data: register it as
    the request's producer and ``await wait()`` before producing more.
    """

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self._paused = False
        self._waiting: list[Deferred[None]] = []
        request.registerProducer(self, True)

    def wait(self) -> Deferred[None]:
        """
        Fires when the connection can take more (at once if it can now).
        """
        if not self._paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()  # the request is gone; its writes are now dropped

    def unregister(self) -> None:
        if getattr(self._request, "channel", None) is not None:
            self._request.unregisterProducer()


# --- the application -------------------------------------------------------------


class ChatterApp:
    """
    chatterd's routes.

    :param store: where chatts live.
    :param ollama: the Ollama servers.
    :param streams: admission, per-appID turns and shutdown of streams.
    :param clock: for heartbeats and timing.
    :param relay: timing of relayed streams.
    :param metrics: where streams are counted.
    :param log_content: log prompts and replies (users' conversations: off
        unless debugging).
    :param ready_timeout: seconds each ``/readyz`` check may take.
    """

    app = Klein()

    def __init__(
        self,
        *,
        store: IChattStore,
        ollama: Balancer,
        streams: Streams,
        clock: IReactorTime,
        relay: RelayConfig = RelayConfig(),
        metrics: Metrics | None = None,
        log_content: bool = False,
        ready_timeout: float = 2.0,
    ) -> None:
        self.store = store
        self.ollama = ollama
        self.streams = streams
        self.clock = clock
        self.relay = relay
        self.metrics = metrics or Metrics()
        self.log_content = log_content
        self.ready_timeout = ready_timeout

    def resource(self) -> Any:
        return self.app.resource()

    # Werkzeug would answer "/getchatts//" with a redirect to "/getchatts/";
    # chatterd never redirects: such a path is simply not found.
    app.url_map.merge_slashes = False

    # --- errors ---

    @app.handle_errors(ClientError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        return json_body(request, {"error": e.message}, e.status)

    @app.handle_errors(StoreError)
    def _store_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        if e.status == 503:
            request.setHeader(b"retry-after", b"5")
        return json_body(request, {"error": str(e)}, e.status)

    @app.handle_errors(Busy)
    def _busy(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        request.setHeader(b"retry-after", str(e.retry_after).encode())
        return json_body(request, {"error": str(e)}, e.status)

    @app.handle_errors(OllamaError)
    def _ollama_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Ollama failing before anything was written (``/llmprompt`` only:
        ``/llmchat`` reports it in its stream).
        """
        status = 504 if failure.check(OllamaTimeout) else 502
        return json_body(request, {"error": str(failure.value)}, status)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        for name, value in e.get_headers():  # Allow: on a 405
            if name.lower() == "allow":
                request.setHeader(b"allow", value.encode())
        return json_body(request, {"error": f"{e.name}: {request.method.decode()} {request.path.decode()}"}, e.code)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes | None:
        log.failure("unexpected error on {path}", failure, path=request.path)
        if request.startedWriting:
            return None
        return json_body(request, {"error": "internal error (see chatterd's log)"}, 500)

    # --- health ---

    @app.route("/healthz", methods=["GET"], strict_slashes=False)
    def healthz(self, request: IRequest) -> bytes:
        """
        Liveness: the process answers.
        """
        return json_body(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"], strict_slashes=False)
    async def readyz(self, request: IRequest) -> bytes:
        """
        Readiness: the database answers a query and an Ollama server its
        version, each within ``ready_timeout``; 503 says which part is down.
        """
        try:
            await self.store.ping().addTimeout(self.ready_timeout, self.clock)
            database = "ok"
        except Exception as e:
            database = f"down: {e}" if str(e) else "down: no answer"
        ollama = await self.ollama.check()
        ready = database == "ok" and "ok" in ollama.values()
        body = {"status": "ready" if ready else "not ready", "database": database, "ollama": ollama}
        return json_body(request, body, 200 if ready else 503)

    # --- the Chatter APIs ---

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return json_body(request, BANNER)

    @app.route("/postchatt", methods=["POST"], strict_slashes=False)
    async def postchatt(self, request: IRequest) -> bytes:
        username, message = api.parse_chatt(read_body(request))
        await self.store.post_chatt(username, message)
        return json_body(request, {})

    @app.route("/getchatts", methods=["GET"], strict_slashes=False)
    async def getchatts(self, request: IRequest) -> None:
        """
        Every chatt as ``[username, message, id, time]``, oldest first, streamed
        page by page at the pace the client reads.
        """
        page = await self.store.chatts_page(0, PAGE_ROWS)  # failures here are JSON 5xx
        request.setHeader(b"content-type", b"application/json")
        flow = FlowControl(request)
        try:
            request.write(b"[")
            first = True
            while page:
                rows = (
                    json.dumps([c.username, c.message, c.id, c.time.isoformat()]) for c in page
                )
                text = ",".join(rows)
                request.write((text if first else "," + text).encode("utf-8"))
                first = False
                if len(page) < PAGE_ROWS:
                    break
                await flow.wait()
                page = await self.store.chatts_page(page[-1].seq, PAGE_ROWS)
            request.write(b"]")
        except StoreError as e:
            # The array is half sent: cut the connection so that the client
            # cannot mistake what it got for the whole table.
            log.error("getchatts broke off: {e}", e=e)
            abort_response(request)
        finally:
            flow.unregister()

    # --- the LLM APIs ---

    @app.route("/llmprep", methods=["POST"], strict_slashes=False)
    async def llmprep(self, request: IRequest) -> bytes:
        chat = api.parse_chat(read_body(request), need_model=False)
        async with self.streams.turn(chat.appid):  # not in the middle of a chat
            await self.store.replace_history(chat.appid, chat.messages)
        return json_body(request, {})

    @app.route("/llmchat", methods=["POST"], strict_slashes=False)
    async def llmchat(self, request: IRequest) -> None:
        """
        Store the new messages, send the whole history to Ollama, and relay
        its answer as SSE.  Errors before the stream are JSON; after, frames.
        """
        chat = api.parse_chat(read_body(request))
        async with self.streams.admitted(request) as slot, self.streams.turn(chat.appid, slot):
            history = await self.store.append_and_load(chat.appid, chat.messages)
            relay = ChatRelay(
                request,
                appid=chat.appid,
                model=chat.model,
                store=self.store,
                ollama=self.ollama,
                clock=self.clock,
                config=self.relay,
            )
            slot.stream = relay
            try:
                await relay.run(chat.ollama_body(history))
            finally:
                content = {"prompt": json.dumps(chat.messages), "reply": relay.reply} if self.log_content else {}
                self._stream_ended("/llmchat", relay, appid=chat.appid, model=chat.model, **content)

    @app.route("/llmprompt", methods=["POST"], strict_slashes=False)
    async def llmprompt(self, request: IRequest) -> bytes | None:
        """
        Ollama's ``/api/generate``, proxied: its NDJSON streamed back as it
        comes, or its error status and body passed through.
        """
        model, body = api.parse_generate(read_body(request))
        async with self.streams.admitted(request) as slot:
            relay = slot.stream = GenerateRelay(
                request, model=model, ollama=self.ollama, clock=self.clock, config=self.relay
            )
            try:
                return await relay.run(body)
            finally:
                self._stream_ended("/llmprompt", relay, model=model)

    def _stream_ended(self, route: str, relay: Any, **fields: Any) -> None:
        """
        One log line and the metrics for a stream that ended, however it ended.
        """
        if relay.outcome == "running":  # an exception escaped the relay: a bug
            relay.outcome, relay.error_kind = "error", "internal"
        self.metrics.stream_ended(route, relay)
        text = "{route} stream {outcome}{kind}: "
        if "appid" in fields:
            text += "appID {appid}, "
        text += "model {model}, {frames} frames, {bytes}B, {duration_ms:.0f}ms"
        if self.log_content and "prompt" in fields:
            text += ", prompt {prompt}, reply {reply!r}"
        log.info(
            text,
            route=route,
            outcome=relay.outcome,
            kind=f" ({relay.error_kind})" if relay.error_kind else "",
            error_kind=relay.error_kind,
            frames=relay.frames,
            bytes=relay.bytes,
            duration_ms=(self.clock.seconds() - relay.started_at) * 1000,
            **fields,
        )
