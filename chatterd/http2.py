# -*- test-case-name: tests.test_http2,tests.test_edge -*-
"""
HTTP/2 at the edge: Twisted's HTTP/2 connection with the limits of chatterd's
HTTP/1.1 side, and defences against the floods particular to HTTP/2.

chatterd serves phones directly, so what an nginx in front would refuse it
must refuse itself (see ``docs/security.md`` for each limit and its test).

**Per stream** (the connection and its other streams carry on):

- a request's headers and body must arrive within the site's
  ``request_timeout`` (``408``; PINGs and a trickled body do not extend it);
- a body over ``max_body`` is refused with ``413`` as soon as that is known:
  at once from ``content-length``, else when the DATA received passes it;
- more than ``MAX_HEADERS`` header fields: ``431``;
- streams beyond ``SETTINGS_MAX_CONCURRENT_STREAMS``: ``REFUSED_STREAM``;
- output that cannot drain (the client keeps the stream's window at zero)
  for ``idle_timeout``: the stream is reset.

A refusal answers with a JSON error when nothing was answered yet, and then
resets the stream with ``NO_ERROR`` (RFC 9113 §8.1: the client stops sending
its body); chatterd reads nothing more of it.

**Per connection**, answered with ``GOAWAY`` and a closed connection:

- a header block (HEADERS and its CONTINUATIONs) over the advertised
  ``MAX_HEADER_LIST_SIZE``, counted on the raw frames *before* they are
  buffered or decoded (CVE-2024-27316), and a frame longer than
  ``SETTINGS_MAX_FRAME_SIZE`` before its payload is buffered;
- floods of PING/SETTINGS/PRIORITY, WINDOW_UPDATE, empty frames, or resets in
  either direction (Rapid Reset, MadeYouReset): a token bucket per kind;
- a transport that stays paused (the client stopped reading) for
  ``idle_timeout``: aborted.

An idle connection (no stream open) closes after ``idle_timeout``; only
requests count as activity, PINGs do not.  PRIORITY signals are ignored
(RFC 9113 deprecates them; they cost a tree walk each).

None of this touches the path of a relayed frame: the checks run on what a
client sends (frame headers only), on control frames chatterd sends, and on
rare events (a window or a transport filling up).

This module builds on Twisted's private HTTP/2 classes (imported from
:mod:`chatterd.twistedcompat`, which says why) and on h2's stream
bookkeeping: checked against Twisted 26.x and h2 4.x, the ranges
``setup.py`` allows.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import priority
from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from chatterd.logs import Logger
from chatterd.twistedcompat import END_STREAM_SENTINEL as _END_STREAM_SENTINEL
from chatterd.twistedcompat import GenericHTTPChannelProtocol, H2Connection, H2Stream

log = Logger()

#: What chatterd advertises and enforces (the same caps as its HTTP/1.1 side).
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 16384
MAX_HEADERS = 100
MAX_FRAME_SIZE = 16384
#: The most unsent data a stream holds in chatterd: past it the stream's
#: producer (a relay's connection to Ollama, say) is paused, whatever the
#: client's flow-control window.
STREAM_BUFFER = 64 * 1024
#: Seconds a client gets to close a connection that chatterd has ended.
CLOSE_GRACE = 2.0

# Frame types and flags (RFC 9113 §6).
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = range(10)
_END_STREAM, _END_HEADERS = 0x1, 0x4
_PREFACE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


class _EveryStream:
    """
    What ``H2Connection._handleWindowUpdate`` takes for a change to every
    stream's window (as a WINDOW_UPDATE on the connection is).
    """

    stream_id = 0


_EVERY_STREAM = _EveryStream()


class TokenBucket:
    """
    A budget of ``burst`` events that refills at ``rate`` per second.

    :param now: the clock, read only when a token is taken.
    """

    __slots__ = ("_burst", "_rate", "_now", "_tokens", "_at")

    def __init__(self, burst: float, rate: float, now: Callable[[], float]) -> None:
        self._burst = burst
        self._rate = rate
        self._now = now
        self._tokens = burst
        self._at = now()

    def take(self, n: int = 1) -> bool:
        """
        Spend ``n`` tokens; ``False`` (and nothing spent) if there are not enough.
        """
        if self._tokens < n:
            now = self._now()
            # max(): a wall clock stepped back must not drain the bucket
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
            self._at = now
            if self._tokens < n:
                return False
        self._tokens -= n
        return True


@dataclass(frozen=True)
class Budgets:
    """
    Per connection: how many frames of each kind a client may send in a
    burst, and how many per second after that.  A normal client sends one
    SETTINGS, a few PINGs, WINDOW_UPDATEs as it reads and resets as its user
    cancels: far below these.
    """

    control: tuple[float, float] = (200, 20)  # PING, SETTINGS, PRIORITY, unknown types
    window_updates: tuple[float, float] = (2000, 500)
    empty: tuple[float, float] = (100, 10)  # DATA/HEADERS/CONTINUATION with no payload and no END flag
    resets: tuple[float, float] = (1000, 33)  # RST_STREAM received or sent (as Twisted's own bucket)


class Flood(Exception):
    """
    A client broke a connection-wide limit; the connection gets GOAWAY.

    :ivar code: the GOAWAY error code.
    :ivar reason: a short name, for logs and metrics.
    """

    def __init__(self, code: ErrorCodes, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason


class FrameGuard:
    """
    Reads the frame headers of what a client sends before h2 sees the bytes,
    and raises :class:`Flood` for a frame or header block that is too large
    or a kind of frame sent too often.  Pure: bytes in, verdicts out.

    Only 9-byte frame headers are looked at (the payloads are skipped), so
    the cost is a few hundred nanoseconds per frame a client sends.
    """

    def __init__(self, now: Callable[[], float], budgets: Budgets = Budgets(), *,
                 max_frame: int = MAX_FRAME_SIZE, max_block: int = MAX_HEADER_LIST_SIZE) -> None:
        self._max_frame = max_frame
        self._max_block = max_block
        self._buckets = {kind: TokenBucket(burst, rate, now) for kind, (burst, rate) in vars(budgets).items()}
        self._skip = _PREFACE  # bytes of the current payload (or the preface) not yet seen
        self._head = b""  # a frame header cut short by the end of a read
        #: raw bytes of the header block in progress, or None between blocks
        self.block: int | None = None

    def feed(self, data: bytes) -> None:
        """
        Look at the next bytes a client sent.

        :raises Flood: at the first frame that breaks a limit.
        """
        pos, end = 0, len(data)
        if self._head:
            data = self._head + data
            pos, end, self._head = 0, len(data), b""
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
                if self._skip:
                    return
            if end - pos < 9:
                self._head = data[pos:end]
                return
            length = int.from_bytes(data[pos:pos + 3], "big")
            self._frame(length, data[pos + 3], data[pos + 4])
            pos += 9
            self._skip = length

    def _frame(self, length: int, kind: int, flags: int) -> None:
        if length > self._max_frame:
            raise Flood(ErrorCodes.FRAME_SIZE_ERROR, "frame_size",
                        f"a frame of {length} bytes (the limit is {self._max_frame})")
        if kind == _HEADERS or kind == _CONTINUATION:
            block = length if kind == _HEADERS else (self.block or 0) + length
            if block > self._max_block:
                raise Flood(ErrorCodes.ENHANCE_YOUR_CALM, "header_block",
                            f"a header block over {self._max_block} bytes")
            self.block = None if flags & _END_HEADERS else block
            if length == 0 and not flags & (_END_HEADERS | _END_STREAM):
                self._spend("empty")
        elif kind == _DATA:
            if length == 0 and not flags & _END_STREAM:
                self._spend("empty")
        elif kind == _WINDOW_UPDATE:
            self._spend("window_updates")
        elif kind == _RST_STREAM:
            self._spend("resets")
        elif kind != _GOAWAY:
            self._spend("control")

    def _spend(self, kind: str, n: int = 1) -> None:
        if not self._buckets[kind].take(n):
            raise Flood(ErrorCodes.ENHANCE_YOUR_CALM, kind, f"too many {kind.replace('_', ' ')} frames")

    def sent(self, data: bytes) -> None:
        """
        Count the resets among whole frames chatterd is about to send (a
        client can provoke those with malformed frames: "MadeYouReset").

        :raises Flood: if the client has provoked too many.
        """
        pos, end = 0, len(data)
        resets = 0
        while pos + 9 <= end:
            if data[pos + 3] == _RST_STREAM:
                resets += 1
            pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
        if resets:
            self._spend("resets", resets)


class _Connection(h2.connection.H2Connection):
    """
    h2's connection state machine, refusing a stream over the concurrency
    limit with ``REFUSED_STREAM`` (a stream error, RFC 9113 §5.1.2) where h2
    would end the whole connection.
    """

    def _receive_headers_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            sid = frame.stream_id
            if sid % 2 == 0 or sid <= self.highest_inbound_stream_id:
                raise
        # Decode the block all the same, so that HPACK's table stays in step,
        # then remember the stream as reset by us: its DATA in flight is then
        # answered as h2 answers any stream it reset.
        h2.connection._decode_headers(self.decoder, frame.data)
        self.highest_inbound_stream_id = sid
        self._closed_streams[sid] = h2.stream.StreamClosedBy.SEND_RST_STREAM
        refuse = RstStreamFrame(sid)
        refuse.error_code = ErrorCodes.REFUSED_STREAM
        return [refuse], []


def _h2_config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=False, header_encoding=None)


class ChatterStream(H2Stream):
    """
    One HTTP/2 stream, with a deadline for its request to arrive, a count of
    its body, and a timer for output that cannot drain.
    """

    received = 0
    _deadline: IDelayedCall | None = None
    _stall: IDelayedCall | None = None

    def flowControlBlocked(self) -> None:
        if self._stall is None and self._conn.idle_timeout:
            self._stall = self._conn.callLater(self._conn.idle_timeout, self._conn._stalled, self.streamID)
        super().flowControlBlocked()

    def windowUpdated(self) -> None:
        if self._stall is not None and self._conn.conn.local_flow_control_window(self.streamID) > 0:
            self._stop(self._stall)
            self._stall = None
        super().windowUpdated()

    def arrived(self) -> None:
        """
        The whole request is here: stop its deadline.
        """
        if self._deadline is not None:
            self._stop(self._deadline)
            self._deadline = None

    def abortConnection(self) -> None:
        """
        Cut the response short: reset the stream (``CANCEL``) and tell its
        request that the client is gone, so that nothing finishes it later
        (Twisted's own reset leaves the request to finish a stream that no
        longer exists, which raises).
        """
        self._conn._reset(self, ErrorCodes.CANCEL, "the response was cut short")

    def ended(self) -> None:
        self.arrived()
        if self._stall is not None:
            self._stop(self._stall)
            self._stall = None

    @staticmethod
    def _stop(call: IDelayedCall) -> None:
        if call.active():
            call.cancel()


class ChatterH2Connection(H2Connection):
    """
    Twisted's HTTP/2 connection with chatterd's limits (see the module's
    docstring).  Its settings come from the site: ``request_timeout``,
    ``idle_timeout``, ``max_body``, ``metrics``.
    """

    budgets = Budgets()
    #: seconds: an idle connection's life, and how long output may not move
    idle_timeout: float | None = None

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.conn = _Connection(config=_h2_config())
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        })
        self.conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE  # h2 sets it only once acknowledged
        self._guard = FrameGuard(reactor.seconds, self.budgets)
        self._now = reactor.seconds
        self._header_deadline: IDelayedCall | None = None
        #: when the header block being received began, if it spans several reads
        self._block_began: float | None = None
        self._paused_since: IDelayedCall | None = None
        self._cut_off: IDelayedCall | None = None
        self._closing = False

    def connectionMade(self) -> None:
        # setTimeout(None) forgets the period (TimeoutMixin keeps one), so
        # keep it here: the idle timer is off while streams are open
        self.idle_timeout = self.timeOut
        super().connectionMade()

    # --- what the client sends ---

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._guard.feed(data)
        except Flood as flood:
            self._goaway(flood)
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 has queued its GOAWAY
            self._close("protocol_error", e)
            return
        self._watch_header_block()
        active = False
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._requestReceived(event)
                active = True
            elif isinstance(event, h2.events.DataReceived):
                self._requestDataReceived(event)
                active = True
            elif isinstance(event, h2.events.StreamEnded):
                self._requestEnded(event)
            elif isinstance(event, h2.events.StreamReset):
                self._requestAborted(event)
            elif isinstance(event, h2.events.WindowUpdated):
                self._handleWindowUpdate(event)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._handleWindowUpdate(_EVERY_STREAM)  # every stream's window moved
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.transport.loseConnection()
                self.connectionLost(Failure(ConnectionLost("Remote peer sent GOAWAY")), _cancelTimeouts=False)
            # PriorityUpdated is ignored: RFC 9113 deprecates priority signals
        if active:
            self.resetTimeout()  # only requests are activity; PINGs and SETTINGS are not
        self._tryToWriteControlData()

    def _watch_header_block(self) -> None:
        """
        A header block must be complete within ``request_timeout``: until it
        is, nothing else may be sent on the connection.
        """
        if self._guard.block is None:
            if self._header_deadline is not None:
                ChatterStream._stop(self._header_deadline)
                self._header_deadline = None
        elif self._header_deadline is None:
            self._block_began = self._now()
            timeout = self.site.request_timeout
            flood = Flood(ErrorCodes.ENHANCE_YOUR_CALM, "slow_headers", f"headers not complete within {timeout:g} s")
            self._header_deadline = self.callLater(timeout, self._goaway, flood)

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        stream = ChatterStream(sid, self, event.headers, self.requestFactory, self.site, self.factory)
        self.streams[sid] = stream
        self._streamCleanupCallbacks[sid] = Deferred()
        self._outboundStreamQueues[sid] = deque()
        self.priority.insert_stream(sid)
        self.priority.block(sid)
        if len(self.streams) == 1:
            self.setTimeout(None)  # idle only while no stream is open
        site = self.site
        fields = sum(1 for name, _ in event.headers if not name.startswith(b":"))
        if fields > MAX_HEADERS:
            self._refuse(stream, 431, f"more than {MAX_HEADERS} header fields")
        elif stream._request.content.too_large:  # its content-length
            self._refuse(stream, 413, f"the body is larger than {site.max_body} bytes")
        elif event.stream_ended is None:
            # the deadline counts from the first byte of the stream's headers
            timeout = site.request_timeout
            spent = self._now() - self._block_began if self._block_began is not None else 0.0
            stream._deadline = self.callLater(max(timeout - spent, 0.0), self._refuse, stream, 408,
                                              f"the request did not arrive within {timeout:g} s")
        self._block_began = None

    def _requestDataReceived(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:  # refused: nothing more of it is kept
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.received += len(event.data)
        if stream.received > self.site.max_body:
            self._refuse(stream, 413, f"the body is larger than {self.site.max_body} bytes")
            return
        stream.receiveDataChunk(event.data, event.flow_controlled_length)

    def _requestEnded(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.arrived()
            stream.requestComplete()

    def _handleWindowUpdate(self, event: Any) -> None:
        super()._handleWindowUpdate(event)
        # a stream set aside with a closed window may go now: wake the loop
        if self._sendingDeferred is not None:
            d, self._sendingDeferred = self._sendingDeferred, None
            d.callback(None)

    def _requestAborted(self, event: h2.events.StreamReset) -> None:
        if event.stream_id in self.streams:
            super()._requestAborted(event)

    def _handlePriorityUpdate(self, event: Any) -> None:
        pass  # see dataReceived

    # --- what chatterd sends ---

    def _sendPrioritisedData(self, *args: Any) -> None:
        """
        Twisted's sending loop, one frame per reactor turn, except that a
        stream whose window is closed is set aside until a WINDOW_UPDATE (or
        SETTINGS) opens it.  Twisted's would pick it again every turn, a busy
        loop: a client that keeps a window at zero held a whole core.
        """
        if not self._stillProducing:
            return
        stream = None
        while stream is None:
            try:
                stream = next(self.priority)
            except priority.DeadlockError:
                # every stream is blocked or idle: wait for one to have data
                assert self._sendingDeferred is None
                self._sendingDeferred = Deferred()
                self._sendingDeferred.addCallback(self._sendPrioritisedData)
                return
        if self._consumerBlocked is not None:  # wait behind the transport
            self._consumerBlocked.addCallback(self._sendPrioritisedData)
            return
        self.resetTimeout()
        queue = self._outboundStreamQueues[stream]
        window = self.conn.local_flow_control_window(stream)
        frameData = queue.popleft()
        if frameData is _END_STREAM_SENTINEL:
            self.conn.end_stream(stream)
            self.transport.write(self.conn.data_to_send())
            self._requestDone(stream)
        elif window <= 0:
            queue.appendleft(frameData)
            self.priority.block(stream)  # _handleWindowUpdate unblocks it
            self.streams[stream].flowControlBlocked()
        else:
            size = min(self.conn.max_outbound_frame_size, window)
            if len(frameData) > size:
                queue.appendleft(frameData[size:])
                frameData = frameData[:size]
            self.conn.send_data(stream, frameData)
            self.transport.write(self.conn.data_to_send())
            if not queue:
                self.priority.block(stream)
            state = self.streams[stream]
            if self.remainingOutboundWindow(stream) <= 0:
                state.flowControlBlocked()
            elif not state._producerProducing and state.producer is not None:
                state.windowUpdated()  # paused by STREAM_BUFFER, and there is room again
        self._reactor.callLater(0, self._sendPrioritisedData)

    def remainingOutboundWindow(self, streamID: int) -> int:
        """
        How much more a stream may queue: its window, but never more than
        ``STREAM_BUFFER`` in all.  (With Twisted's, a client that opens its
        windows wide had chatterd queue everything a stream produced in
        memory while the sending loop, a frame per turn, fell behind.)
        """
        window = min(self.conn.local_flow_control_window(streamID), STREAM_BUFFER)
        queued = sum(len(chunk) for chunk in self._outboundStreamQueues[streamID] if chunk is not _END_STREAM_SENTINEL)
        return window - queued

    def _tryToWriteControlData(self) -> bool:
        """
        Twisted's, counting the resets among the control frames first (the
        frames of relayed data do not pass here).
        """
        pending = self.conn._data_to_send
        if pending:
            try:
                self._guard.sent(bytes(pending))
            except Flood as flood:
                self._goaway(flood)
                return False
        return super()._tryToWriteControlData()

    def _requestDone(self, streamID: int) -> None:
        stream = self.streams.get(streamID)
        if isinstance(stream, ChatterStream):
            stream.ended()
        super()._requestDone(streamID)
        if not self.streams and not self._closing:
            if self._retiring:
                self.retire()
            else:
                self.setTimeout(self.idle_timeout)

    def pauseProducing(self) -> None:
        """
        The client stopped reading: pause every stream's producer too (its
        window may be open, but nothing it writes can go), and give up on the
        connection if it stays so for ``idle_timeout``.
        """
        super().pauseProducing()
        for stream in self.streams.values():
            stream.flowControlBlocked()
        if self._paused_since is None and self.idle_timeout:
            self._paused_since = self.callLater(self.idle_timeout, self._not_reading)

    def resumeProducing(self) -> None:
        if self._paused_since is not None:
            ChatterStream._stop(self._paused_since)
            self._paused_since = None
        super().resumeProducing()
        for stream in list(self.streams.values()):
            stream.windowUpdated()

    # --- refusing ---

    def _refuse(self, stream: ChatterStream, status: int, message: str) -> None:
        """
        Answer ``status`` with a JSON error (if nothing was answered yet), then
        reset the stream and forget it; the access log shows it as refused.
        """
        sid = stream.streamID
        if self.streams.get(sid) is not stream:
            return
        request = stream._request
        request.refused = True
        if request.method == b"(no method yet)":
            request.method = stream.command or b"-"
            request.uri = request.path = stream.path or b"-"
        answered = request.startedWriting
        if not answered:
            request.setResponseCode(status)
            body = json.dumps({"error": message}).encode()
            headers = [(b":status", b"%d" % status), (b"content-type", b"application/json"),
                       (b"content-length", b"%d" % len(body))]
            try:
                fits = self.conn.local_flow_control_window(sid) >= len(body)
                self.conn.send_headers(sid, headers if fits else headers[:2], end_stream=not fits)
                if fits:
                    self.conn.send_data(sid, body, end_stream=True)
            except h2.exceptions.StreamClosedError:
                pass
        self._count(f"refused_{status}")
        self._reset(stream, ErrorCodes.CANCEL if answered else ErrorCodes.NO_ERROR, f"refused: {status}")

    def _reset(self, stream: ChatterStream, code: ErrorCodes, why: str) -> None:
        """
        Reset a stream and forget it, telling its request that the client is
        gone (so a relay stops, and stores what it has).
        """
        sid = stream.streamID
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.StreamClosedError:
            pass
        stream.connectionLost(Failure(ConnectionLost(why)))
        if self._tryToWriteControlData() and sid in self.streams:
            self._requestDone(sid)

    def _stalled(self, sid: int) -> None:
        """
        A stream's output could not move for ``idle_timeout``: reset it.
        """
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream._stall = None
        if self.conn.local_flow_control_window(sid) > 0 and self._consumerBlocked is None:
            return  # it can move again
        self._count("stalled_stream")
        log.info("HTTP/2 stream {sid} from {client} could not drain for {t:g} s: reset",
                 sid=sid, client=self._client(), t=self.idle_timeout)
        self._reset(stream, ErrorCodes.CANCEL, "its output could not drain")

    def _not_reading(self) -> None:
        self._paused_since = None
        self._count("not_reading")
        log.info("{client} read nothing for {t:g} s: connection aborted", client=self._client(),
                 t=self.idle_timeout)
        self._closing = True
        self.transport.abortConnection()

    # --- going away gracefully (a worker retiring at a reload) ---

    _retiring = False

    def retire(self) -> None:
        """
        Go once no stream is open: ``GOAWAY(NO_ERROR)`` naming the last
        stream, then close.  Streams that come meanwhile are served, and a
        connection that has sent no request yet gets its first one served
        (closing it now would refuse a request already on its way).

        A GOAWAY sent while streams run would be RFC 9113's graceful way,
        but some clients take any frame after a GOAWAY for a protocol error
        (python-h2 does, and so does h2's server side here), which would cut
        the very streams a reload must not cut.
        """
        self._retiring = True
        if not self.streams and self.conn.highest_inbound_stream_id and not self._closing:
            self.conn.close_connection(error_code=ErrorCodes.NO_ERROR)
            self._close(None, ConnectionLost("retired"))

    def timeoutConnection(self) -> None:
        """
        Idle for ``idle_timeout``: GOAWAY, then close as for a flood (Twisted's
        own waits for the client's close_notify for 15 s more).
        """
        log.info("HTTP/2 connection from {client} idle for {t:g} s: closed", client=self._client(), t=self.idle_timeout)
        self.conn.close_connection(error_code=ErrorCodes.NO_ERROR)
        self._close(None, ConnectionLost("idle"))

    def _goaway(self, flood: Flood) -> None:
        """
        End the connection for a flood: GOAWAY with its code, then close.
        """
        if not self._closing:
            self.conn.close_connection(error_code=flood.code)
            self._close(flood.reason, flood)

    def _close(self, reason: str | None, why: BaseException) -> None:
        """
        Send what h2 has queued (its GOAWAY) and close.  TLS waits for the
        client's close_notify, and for the transport's producer (this
        connection) to go: the producer goes now, and a client that does not
        close within ``CLOSE_GRACE`` seconds is cut off.

        :param reason: the defence that ended it (logged and counted), if one did.
        """
        self._closing = True
        if reason is not None:
            self._count(reason)
            log.info("HTTP/2 connection from {client} ended ({reason}): {e}", client=self._client(),
                     reason=reason, e=why)
        transport = self.transport
        transport.write(self.conn.data_to_send())
        transport.unregisterProducer()
        transport.loseConnection()
        self.connectionLost(Failure(ConnectionLost(str(why))))
        self._cut_off = self.callLater(CLOSE_GRACE, transport.abortConnection)

    def connectionLost(self, reason: Failure, _cancelTimeouts: bool = True) -> None:
        if self._cut_off is not None and self._cut_off.active():
            self._cut_off.cancel()  # it closed in time
        for call in (self._header_deadline, self._paused_since):
            if call is not None and call.active():
                call.cancel()
        super().connectionLost(reason, _cancelTimeouts)

    # --- bookkeeping ---

    def _count(self, reason: str) -> None:
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.http2_defences.labels(reason).inc()

    def _client(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", peer))


class ChannelProtocol(GenericHTTPChannelProtocol):
    """
    A connection's protocol: the HTTP/1.1 channel it is made with, or
    :class:`ChatterH2Connection` once ALPN has picked ``h2`` (Twisted's own
    switch, ``_GenericHTTPChannelProtocol.dataReceived``, would make a plain
    ``H2Connection``).
    """

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None and getattr(self._channel.transport, "negotiatedProtocol", None) == b"h2":
            self._switch_to_h2()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._site.connections.discard(self)
        super().connectionLost(reason)

    def retire(self) -> None:
        """
        Go once what the connection is doing is done (see ``ChatterSite.retire``).
        """
        self._channel.retire()

    def _switch_to_h2(self) -> None:
        old = self._channel
        producer = old._networkProducer
        producer.unregisterProducer()
        old.setTimeout(None)
        channel = ChatterH2Connection(self._site.clock)
        channel.requestFactory = self._requestFactory
        channel.site = self._site
        channel.factory = self._factory
        channel.timeOut = self._timeOut
        channel.callLater = self._callLater
        self._channel = channel
        channel.makeConnection(old.transport)
        producer.registerProducer(channel, True)
        self._negotiatedProtocol = b"h2"
        if old._retiring:
            channel.retire()
