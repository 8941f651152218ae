# -*- test-case-name: tests.test_llmchat,tests.test_getchatts -*-
"""
Writing to clients: what chatterd does between producing bytes and the
connection taking them.

- :class:`WriteBatcher`: the frames the streams write in one reactor pass go
  out once per request at its end (one chunk or DATA frame, not one per line).
- :class:`FlowControl`: ``/getchatts`` produces its pages at the pace the
  client reads (a push producer registered on the request).
- :func:`abort_response`: a response cut short so the client sees it is
  incomplete (an HTTP/2 reset, or an aborted HTTP/1.1 connection).

(A relayed stream's pace is set by registering Ollama's transport as the
request's producer: see :mod:`chatterd.relay`.)
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.iweb import IRequest
from zope.interface import implementer

from chatterd.logs import Logger

log = Logger()


class WriteBatcher:
    """
    Gathers what the streams write during one pass of the reactor and writes
    it once per request at the end of the pass.

    Ollama's lines arrive one callback each, often many per network read;
    written one by one, each would cost a chunk header (HTTP/1.1) or a DATA
    frame (HTTP/2) and the transport's bookkeeping.  A transport sends only
    on the reactor's next pass anyway, so gathering until the end of this
    one delays nothing.  One batcher serves every stream: at most one timer
    per pass, not one per frame.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: dict[IRequest, list[bytes]] = {}
        self._call: IDelayedCall | None = None

    def write(self, request: IRequest, data: bytes) -> None:
        parts = self._pending.get(request)
        if parts is not None:
            parts.append(data)
            return
        self._pending[request] = [data]
        if self._call is None:
            self._call = self._clock.callLater(0, self._flush_all)

    def flush(self, request: IRequest) -> None:
        """
        Write what ``request`` has pending now (before it is finished).
        """
        parts = self._pending.pop(request, None)
        if parts is not None:
            request.write(b"".join(parts))
        if not self._pending and self._call is not None:
            self._call.cancel()
            self._call = None

    def _flush_all(self) -> None:
        self._call = None
        pending, self._pending = self._pending, {}
        for request, parts in pending.items():
            try:
                request.write(parts[0] if len(parts) == 1 else b"".join(parts))
            except Exception:  # that request's own trouble: the others' frames still go
                log.failure("a stream's write failed; the other streams' writes go on")


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
