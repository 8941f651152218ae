# -*- test-case-name: tests.test_ollama -*-
"""
The Ollama client: streaming POSTs over treq, and parsing of Ollama's lines.

Closing the connection is the only way to make Ollama stop generating, so a
body is read by :class:`BodyStream`, whose ``done`` Deferred closes the
connection when cancelled (``treq.collect`` cannot be cancelled).
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable
from http.cookiejar import CookieJar
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from chatterd.eager import eager_reactor

#: The most of an error body chatterd reads from Ollama.
MAX_ERROR_BODY = 64 * 1024
#: The largest JSON answer to a GET (``/api/tags`` is about 1 KiB per model).
MAX_JSON_BODY = 8 * 1024 * 1024


class OllamaError(Exception):
    """
    Ollama failed; the message is meant for the app's user and developer.

    :cvar kind: a short name for metrics and logs.
    """

    kind = "error"


class OllamaUnreachable(OllamaError):
    """
    No answer from Ollama: refused, timed out, or closed before answering.
    """

    kind = "unreachable"


class OllamaBadLine(OllamaError):
    """
    Ollama sent a line chatterd cannot read.

    :ivar public: what a client is told (the line itself goes only to the log).
    """

    kind = "bad_line"

    def __init__(self, public: str, line: bytes) -> None:
        super().__init__(f"{public}: {_preview(line)}")
        self.public = public


class OllamaHTTPError(OllamaError):
    """
    Ollama answered with a status other than 200.
    """

    kind = "status"

    def __init__(self, status: int, body: bytes, content_type: bytes | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type or b"application/json; charset=utf-8"
        self.text = error_text(body)
        super().__init__(f"Ollama answered {status}: {self.text}")


def describe_failure(failure: Failure | BaseException) -> str:
    """
    A short description of a connection failure, without a traceback.
    """
    e = failure.value if isinstance(failure, Failure) else failure
    if isinstance(e, (ResponseFailed, ResponseNeverReceived)) and e.reasons:
        e = e.reasons[0].value
    text = str(e).strip().rstrip(".")
    return text or type(e).__name__


class BodyStream(Protocol):
    """
    Hands a response body to ``on_data`` as it arrives.

    ``done`` fires when the body ends; it fails if the connection breaks
    first, or with the reason given to :meth:`abort`.  Cancelling ``done``
    closes the connection at once.

    :param on_data: called with each chunk; it must not raise (call
        :meth:`abort` instead).
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self._stopped = False
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()

    def abort(self, reason: BaseException) -> None:
        """
        Stop reading, close the connection, and fail ``done`` with ``reason``.
        """
        if not self.done.called:
            self._stop()
            self.done.errback(Failure(reason))

    def dataReceived(self, data: bytes) -> None:
        if not self._stopped:
            self._on_data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


_JSON = {b"Content-Type": [b"application/json"]}


@implementer(IBodyProducer)
class _Body:
    """
    A request body written in one go (treq's default for bytes goes through
    a cooperator task, a reactor turn per piece).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _NoCookies(CookieJar):
    """
    A cookie jar that keeps nothing: Ollama sets no cookies, and treq would
    otherwise run urllib's cookie machinery on every request.
    """

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class _ReadyURL(EncodedURL):
    """
    An address already in URI form: treq would otherwise parse and IDNA-check
    it again on every request (a good part of treq's cost per request).
    """

    _text = ""

    @classmethod
    def of(cls, text: str) -> _ReadyURL:
        url = cls.from_text(EncodedURL.from_text(text).to_uri().to_text())
        url._text = url.to_text()
        return url

    def to_uri(self) -> _ReadyURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._text or super().to_text(with_password)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Where the agent connects for each Ollama server: one endpoint per server,
    made once.  Twisted's agent makes a ``HostnameEndpoint`` per request
    (IDNA-encoding the host each time), which for an IP address still
    resolves it in a thread before connecting.  A server given by IP address
    gets connections that send at once (:mod:`chatterd.eager`): the request
    leaves in the reactor turn that makes it.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            endpoint = self._made[key] = self._make(*key)
        return endpoint

    def _make(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        text = host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(text):
            endpoint = TCP4ClientEndpoint(eager_reactor(self._reactor), text, port, timeout=self._timeout)
        elif isIPv6Address(text):
            endpoint = TCP6ClientEndpoint(eager_reactor(self._reactor), text, port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        if scheme == b"https":
            return wrapClientTLS(BrowserLikePolicyForHTTPS().creatorForNetloc(host, port), endpoint)
        if scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {scheme!r}")
        return endpoint


def http_client(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> HTTPClient:
    """
    The treq client chatterd talks to Ollama with: connections kept in
    ``pool``, one endpoint per server, no cookies.
    """
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout), pool=pool)
    return HTTPClient(agent, cookiejar=_NoCookies())


class OllamaClient:
    """
    Talks to one Ollama server.

    :param http: a treq ``HTTPClient`` (see :func:`http_client`; its agent's
        pool keeps connections to Ollama open between requests).
    :param url: Ollama's base URL, e.g. ``http://localhost:11434``.
    """

    def __init__(self, http: Any, url: str) -> None:
        self._http = http
        self.url = url.rstrip("/")
        self._urls: dict[str, _ReadyURL] = {}

    def _address(self, path: str) -> _ReadyURL:
        text = self.url + path
        url = self._urls.get(text)
        if url is None:
            url = self._urls[text] = _ReadyURL.of(text)
        return url

    async def post(self, path: str, body: bytes) -> IResponse:
        """
        POST a JSON ``body`` to ``path`` and return the response as soon as its
        headers arrive; read the body with :class:`BodyStream`.

        :raises OllamaUnreachable: naming the URL, if no response comes.
        """
        url = self.url + path
        try:
            return await self._http.post(
                self._address(path),
                data=_Body(body),
                headers=_JSON,
                unbuffered=True,
                allow_redirects=False,
            )
        except CancelledError:
            raise
        except (ConnectError, TimeoutError, ResponseNeverReceived, ResponseFailed) as e:
            if any(r.check(CancelledError) for r in getattr(e, "reasons", ())):
                raise CancelledError() from None  # we gave up on it: not Ollama's fault
            raise OllamaUnreachable(f"cannot reach Ollama at {url}: {describe_failure(e)}") from None

    async def get_json(self, path: str, timeout: float, clock: IReactorTime) -> Any:
        """
        GET ``path`` and decode its JSON answer, the whole exchange (headers
        and body) within ``timeout`` seconds of ``clock``; on timeout the
        connection is closed.

        :raises OllamaError: for no answer in time, a non-200 status, or a
            body that is not JSON (or larger than :data:`MAX_JSON_BODY`).
        """
        url = self.url + path
        exchange = Deferred.fromCoroutine(self._get_json(path))  # cancelling it closes the connection
        try:
            return await exchange.addTimeout(timeout, clock)
        except OllamaError:
            raise
        except DeferredTimeout:
            raise OllamaUnreachable(f"{url} did not answer within {timeout:g} s") from None
        except CancelledError:
            raise
        except ValueError:
            raise OllamaError(f"{url} did not answer JSON") from None
        except Exception as e:
            raise OllamaUnreachable(f"cannot reach Ollama at {url}: {describe_failure(e)}") from None

    async def _get_json(self, path: str) -> Any:
        # treq's own timeout= would stop at the headers; the caller's bounds it all
        response = await self._http.get(self._address(path), unbuffered=True, allow_redirects=False)
        if response.code != 200:
            raise await read_error(response)
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            chunks.append(data)
            size += len(data)
            if size > MAX_JSON_BODY:
                reader.abort(ValueError("too large"))

        reader = BodyStream(collect)
        response.deliverBody(reader)
        await reader.done
        return json.loads(b"".join(chunks))


async def read_error(response: IResponse) -> OllamaHTTPError:
    """
    Read a non-200 answer's body (at most 64 KiB) and make an error of it,
    using Ollama's own ``{"error": ...}`` text when there is one.
    """
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        chunks.append(data)
        size += len(data)
        if size >= MAX_ERROR_BODY:
            reader.abort(_Enough())

    reader = BodyStream(collect)
    response.deliverBody(reader)
    try:
        await reader.done
    except _Enough:
        pass
    except (ResponseFailed, ConnectionClosed):
        pass  # a torn error body still says something
    body = b"".join(chunks)[:MAX_ERROR_BODY]
    content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
    return OllamaHTTPError(response.code, body, content_type)


class _Enough(Exception):
    """
    Enough of an error body was read.
    """


def error_text(body: bytes) -> str:
    """
    Ollama's error message from an error body: its ``error`` field, else the
    body itself, trimmed.
    """
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return obj["error"]
    text = body.decode("utf-8", "replace").strip()
    return text[:500] or "(no error text)"


#: The JSON scanner under ``json.loads`` (C), without its per-call checks and
#: two regular-expression matches: ``(value, end)`` for a value at ``idx``.
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]


def parse_chat_line(line: bytes) -> tuple[str, bool]:
    """
    Read one line of Ollama's ``/api/chat`` stream.

    :returns: ``(message.content, done)``; content is ``""`` when absent.
    :raises OllamaError: for an ``{"error": ...}`` line or a line that is not
        a JSON object.
    """
    try:
        text = line.strip(b" \t\r\n").decode("utf-8")  # JSON's whitespace only
        obj, end = _scan(text, 0)
        if end != len(text):
            raise ValueError("extra data")
    except (ValueError, StopIteration):  # UnicodeDecodeError included; StopIteration: no value
        raise OllamaBadLine("Ollama sent a line that is not JSON", line) from None
    if not isinstance(obj, dict):
        raise OllamaBadLine("Ollama sent a line that is not a JSON object", line)
    if "error" in obj:
        raise OllamaError(f"Ollama: {obj['error']}")
    message = obj.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return (content if isinstance(content, str) else ""), obj.get("done") is True


def _preview(line: bytes, size: int = 80) -> str:
    text = line[:size].decode("utf-8", "replace")
    return text + ("..." if len(line) > size else "")
