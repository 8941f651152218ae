"""
chatterd's HTTP/2 limits, driven frame by frame on an in-memory transport
with a fake clock: deadlines, idle and stall timers, refusals, floods.
(``tests/test_edge.py`` attacks a real chatterd over TLS.)
"""

from __future__ import annotations

import json
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server

from chatterd import http2
from chatterd.http2 import Flood, FrameGuard, TokenBucket
from chatterd.metrics import Metrics
from chatterd.site import ChatterRequest, ChatterSite


def frames(*fs: Any) -> bytes:
    return b"".join(f.serialize() for f in fs)


def ping() -> PingFrame:
    f = PingFrame(0)
    f.opaque_data = b"12345678"
    return f


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """
        A bucket gives its burst at once, then refills at its rate, never
        beyond the burst.
        """
        clock = Clock()
        bucket = TokenBucket(3, 2, clock.seconds)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)

    def test_clock_stepping_back_takes_nothing(self) -> None:
        """
        A wall clock stepped back does not drain the bucket.
        """
        now = [100.0]
        bucket = TokenBucket(1, 1, lambda: now[0])
        self.assertTrue(bucket.take())
        now[0] = 50.0
        self.assertFalse(bucket.take())
        now[0] = 51.5
        self.assertTrue(bucket.take())


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.guard = FrameGuard(self.clock.seconds)
        self.guard.feed(PREFACE)

    def feed_bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.guard.feed(data[i:i + 1])

    def test_a_normal_client_passes(self) -> None:
        """
        Headers, a body and the usual control frames, however the reads cut them.
        """
        headers = HeadersFrame(1)
        headers.data = b"x" * 300
        headers.flags.add("END_HEADERS")
        body = DataFrame(1)
        body.data = b"{}" * 1000
        body.flags.add("END_STREAM")
        update = WindowUpdateFrame(0)
        update.window_increment = 1000
        self.feed_bytewise(frames(headers, body, ping(), update))
        self.assertIsNone(self.guard.block)

    def test_a_header_block_over_the_limit_is_refused_before_its_end(self) -> None:
        """
        HEADERS without END_HEADERS, then CONTINUATIONs: refused as soon as
        the raw block passes the advertised header list size.
        """
        start = HeadersFrame(1)
        start.data = b"x" * 10000
        self.guard.feed(start.serialize())
        self.assertEqual(self.guard.block, 10000)
        more = ContinuationFrame(1)
        more.data = b"x" * 7000
        with self.assertRaises(Flood) as caught:
            self.guard.feed(more.serialize()[:9])  # its header says enough
        self.assertEqual((caught.exception.code, caught.exception.reason), (ErrorCodes.ENHANCE_YOUR_CALM, "header_block"))

    def test_a_block_that_ends_in_time_passes(self) -> None:
        """
        A block under the limit, split over CONTINUATIONs, is fine.
        """
        start = HeadersFrame(1)
        start.data = b"x" * 8000
        end = ContinuationFrame(1)
        end.data = b"x" * 8000
        end.flags.add("END_HEADERS")
        self.guard.feed(frames(start, end))
        self.assertIsNone(self.guard.block)

    def test_an_oversized_frame_is_refused_from_its_header(self) -> None:
        """
        A frame declaring more than SETTINGS_MAX_FRAME_SIZE is refused before
        its payload arrives (h2 would buffer up to 16 MiB waiting for it).
        """
        with self.assertRaises(Flood) as caught:
            self.guard.feed(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
        self.assertEqual(caught.exception.code, ErrorCodes.FRAME_SIZE_ERROR)

    def assert_flood(self, frame: Any, reason: str, allowed: int) -> None:
        data = frame.serialize()
        for _ in range(allowed):
            self.guard.feed(data)
        with self.assertRaises(Flood) as caught:
            for _ in range(allowed * 2):
                self.guard.feed(data)
        self.assertEqual((caught.exception.code, caught.exception.reason), (ErrorCodes.ENHANCE_YOUR_CALM, reason))

    def test_floods(self) -> None:
        """
        PING, WINDOW_UPDATE and empty DATA floods each trip their own bucket,
        after the burst a normal client never reaches.
        """
        budgets = http2.Budgets()
        self.assert_flood(ping(), "control", int(budgets.control[0]))
        update = WindowUpdateFrame(0)
        update.window_increment = 1
        self.assert_flood(update, "window_updates", int(budgets.window_updates[0]))
        self.assert_flood(DataFrame(1), "empty", int(budgets.empty[0]))

    def test_empty_headers_count(self) -> None:
        """
        Empty HEADERS frames without END flags spend the bucket of empty frames.
        """
        self.assert_flood(HeadersFrame(1), "empty", int(http2.Budgets().empty[0]))

    def test_resets_received_count(self) -> None:
        """
        Resets the client sends spend the reset bucket (Rapid Reset), which
        the resets chatterd sends share.
        """
        reset = RstStreamFrame(1)
        reset.error_code = ErrorCodes.CANCEL
        burst = int(http2.Budgets().resets[0])
        self.assert_flood(reset, "resets", burst)
        shared = FrameGuard(self.clock.seconds)
        shared.feed(PREFACE + reset.serialize() * (burst // 2))
        shared.sent(reset.serialize() * (burst // 2))
        with self.assertRaises(Flood) as caught:
            shared.feed(reset.serialize())
        self.assertEqual(caught.exception.reason, "resets")

    def test_a_slow_flood_is_allowed(self) -> None:
        """
        PINGs at the refill rate go on for ever.
        """
        rate = http2.Budgets().control[1]
        for _ in range(10 * int(http2.Budgets().control[0])):
            self.guard.feed(ping().serialize())
            self.clock.advance(1 / rate)

    def test_resets_sent_count(self) -> None:
        """
        Resets chatterd sends (provoked by the client) spend the reset bucket.
        """
        resets = b"".join(RstStreamFrame(2 * i + 1).serialize() for i in range(500))
        self.guard.sent(resets)
        self.guard.sent(resets)
        with self.assertRaises(Flood) as caught:
            self.guard.sent(resets)
        self.assertEqual(caught.exception.reason, "resets")


class Hello(resource.Resource):
    """
    ``GET /`` answers at once; ``POST /`` echoes the body's length.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"

    def render_POST(self, request: server.Request) -> bytes:
        return json.dumps({"got": len(request.content.read())}).encode()


class BoundedClock(Clock):
    """
    A ``Clock`` that fails a test instead of hanging it when the code under
    test keeps scheduling calls for "now" (a busy loop).
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        for _ in range(10000):
            self._sortCalls()
            if not self.calls or self.calls[0].getTime() > self.seconds():
                return
            call = self.calls.pop(0)
            call.called = 1
            call.func(*call.args, **call.kw)
        raise AssertionError("a busy loop: calls keep being scheduled for now")


class AnswersAtHeaders(ChatterRequest):
    """
    A request whose app answers as soon as its headers are in, before its
    body (when it carries ``x-answer-early``).
    """

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        self._clock.callLater(0, self._answer)  # once every header is in

    def _answer(self) -> None:
        if self.requestHeaders.hasHeader(b"x-answer-early"):
            self.write(b"early")


class Client:
    """
    An h2 client on one end of an in-memory transport to chatterd's site.
    """

    def __init__(self, case: SynchronousTestCase, request: type | None = None, **site: Any) -> None:
        self.clock = BoundedClock()
        self.metrics = Metrics()
        settings = {"max_body": 1000, "request_timeout": 5.0, "idle_timeout": 30.0, **site}
        self.site = ChatterSite(Hello(), clock=self.clock, metrics=self.metrics, **settings)
        if request is not None:
            self.site.requestFactory = request
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        self.transport.negotiatedProtocol = b"h2"
        self.protocol.makeConnection(self.transport)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.raw = b""  # what the server sent, frame by frame
        self.send()

    def send(self, raw: bytes = b"") -> None:
        self.protocol.dataReceived(self.h2.data_to_send() + raw)
        self.pump()

    def pump(self) -> None:
        self.clock.advance(0)
        for _ in range(50):  # the send loop takes a turn per frame
            self.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.raw += data
            self.events += self.h2.receive_data(data)

    def request(self, method: bytes = b"GET", path: bytes = b"/", *, body: bytes | None = None,
                headers: list[tuple[bytes, bytes]] = (), end: bool = True) -> int:  # type: ignore[assignment]
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", method), (b":path", path), (b":scheme", b"https"),
                                   (b":authority", b"x"), *headers], end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=end)
        self.send()
        return sid

    def frames(self, data: bytes | None = None) -> list[Any]:
        """
        Every frame the server sent (h2's client hides some, such as a reset
        of a stream it never opened), or the frames in ``data``.
        """
        found, data = [], self.raw if data is None else data
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9:9 + length]))
            found.append(frame)
            data = data[9 + length:]
        return found

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)]

    def status(self, sid: int) -> int | None:
        for e in self.of(h2.events.ResponseReceived, sid):
            return int(dict(e.headers)[b":status"])
        return None

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, sid))

    def advance(self, seconds: float, *, pings: bool = False) -> None:
        for _ in range(int(seconds)):
            if pings and not self.of(h2.events.ConnectionTerminated):
                self.h2.ping(b"12345678")
                self.send()
            self.clock.advance(1)
            self.pump()

    def defences(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("chatterd_http2_defences_total", {"reason": reason}) or 0.0


class StreamLimitTests(SynchronousTestCase):
    def test_a_normal_request(self) -> None:
        """
        A request is answered; the connection stays up, and says who it is
        only as "chatterd".
        """
        c = Client(self)
        sid = c.request()
        self.assertEqual((c.status(sid), c.body(sid)), (200, b"hello"))
        [response] = c.of(h2.events.ResponseReceived, sid)
        self.assertEqual(dict(response.headers)[b"server"], b"chatterd")
        self.assertFalse(c.transport.disconnecting)

    def test_a_request_that_never_arrives_gets_408(self) -> None:
        """
        HEADERS and no body, kept alive with PINGs: 408 with a JSON error at
        ``request_timeout``, then RST_STREAM(NO_ERROR); the connection and
        its other streams carry on.
        """
        c = Client(self)
        slow = c.request(b"POST", headers=[(b"content-length", b"10")], end=False)
        c.advance(4, pings=True)
        self.assertIsNone(c.status(slow))
        c.advance(2, pings=True)
        self.assertEqual(c.status(slow), 408)
        self.assertIn("did not arrive within 5 s", json.loads(c.body(slow))["error"])
        [reset] = c.of(h2.events.StreamReset, slow)
        self.assertEqual(reset.error_code, ErrorCodes.NO_ERROR)
        other = c.request()
        self.assertEqual(c.status(other), 200)
        self.assertEqual(c.defences("refused_408"), 1)

    def test_the_deadline_after_an_answer_resets_the_stream(self) -> None:
        """
        A body still not in at ``request_timeout`` when the app has already
        begun its answer: no 408 (the status is gone), the stream is reset
        with CANCEL; the connection and its other streams carry on.
        """
        c = Client(self, request=AnswersAtHeaders)
        sid = c.request(b"POST", headers=[(b"content-length", b"10"), (b"x-answer-early", b"1")], end=False)
        self.assertEqual((c.status(sid), c.body(sid)), (200, b"early"))
        c.advance(6, pings=True)
        self.assertEqual([(e.stream_id, e.error_code) for e in c.of(h2.events.StreamReset)],
                         [(sid, ErrorCodes.CANCEL)])
        self.assertEqual([int(dict(e.headers)[b":status"]) for e in c.of(h2.events.ResponseReceived, sid)], [200])
        self.assertEqual(c.body(sid), b"early")
        self.assertEqual(c.defences("refused_408"), 1)
        other = c.request()
        self.assertEqual((c.status(other), c.body(other)), (200, b"hello"))
        self.assertEqual(c.of(h2.events.ConnectionTerminated), [])
        self.assertFalse(c.transport.disconnecting)

    def test_a_trickled_body_gets_408(self) -> None:
        """
        A body sent a byte a second does not move the deadline.
        """
        c = Client(self)
        sid = c.request(b"POST", headers=[(b"content-length", b"100")], end=False)
        for _ in range(6):
            if c.status(sid) is None:
                c.h2.send_data(sid, b"x")
                c.send()
            c.advance(1)
        self.assertEqual(c.status(sid), 408)

    def test_a_body_in_time_is_served(self) -> None:
        """
        A body that arrives within the deadline is served, and the deadline
        does not fire later.
        """
        c = Client(self)
        sid = c.request(b"POST", body=b"x" * 500)
        self.assertEqual((c.status(sid), json.loads(c.body(sid))), (200, {"got": 500}))
        c.advance(10)
        self.assertEqual(c.of(h2.events.StreamReset), [])

    def test_a_declared_length_over_the_limit_gets_413_at_once(self) -> None:
        """
        ``content-length`` over ``max_body``: 413 on the HEADERS alone.
        """
        c = Client(self)
        sid = c.request(b"POST", headers=[(b"content-length", b"3000000")], end=False)
        self.assertEqual(c.status(sid), 413)
        self.assertEqual(c.of(h2.events.StreamReset, sid)[0].error_code, ErrorCodes.NO_ERROR)

    def test_an_undeclared_body_over_the_limit_gets_413_when_it_passes(self) -> None:
        """
        No ``content-length``: 413 as soon as the DATA passes ``max_body``,
        and nothing more of it is kept.
        """
        c = Client(self)
        sid = c.request(b"POST", end=False)
        c.h2.send_data(sid, b"x" * 900)
        c.send()
        self.assertIsNone(c.status(sid))
        c.h2.send_data(sid, b"x" * 200)
        c.send()
        self.assertEqual(c.status(sid), 413)
        self.assertNotIn(sid, c.protocol._channel.streams)

    def test_too_many_header_fields_get_431(self) -> None:
        """
        More than 100 header fields: 431 on that stream.
        """
        c = Client(self)
        sid = c.request(headers=[(b"x-%d" % i, b"1") for i in range(101)])
        self.assertEqual(c.status(sid), 431)
        self.assertEqual(c.status(c.request(headers=[(b"x-%d" % i, b"1") for i in range(100)])), 200)

    def test_streams_over_the_limit_are_refused(self) -> None:
        """
        The 101st concurrent stream gets REFUSED_STREAM; the others and the
        connection carry on.
        """
        c = Client(self)
        open_ = [c.request(b"POST", headers=[(b"content-length", b"1")], end=False) for _ in range(100)]
        extra = HeadersFrame(201)  # h2's client would not open it
        extra.data = c.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                                          (b":authority", b"x")])
        extra.flags.add("END_HEADERS")
        extra.flags.add("END_STREAM")
        c.send(extra.serialize())
        [reset] = [f for f in c.frames() if isinstance(f, RstStreamFrame) and f.stream_id == 201]
        self.assertEqual(reset.error_code, ErrorCodes.REFUSED_STREAM)
        c.h2.send_data(open_[0], b"x", end_stream=True)
        c.send()
        self.assertEqual(c.status(open_[0]), 200)
        self.assertEqual(c.of(h2.events.ConnectionTerminated), [])


class ConnectionLimitTests(SynchronousTestCase):
    def test_only_pings_is_idle(self) -> None:
        """
        A connection with no stream, kept busy with PINGs, closes at ``idle_timeout``.
        """
        c = Client(self, idle_timeout=10.0)
        c.advance(8, pings=True)
        self.assertFalse(c.transport.disconnecting)
        c.advance(4, pings=True)
        self.assertTrue(c.transport.disconnecting)
        [goaway] = c.of(h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, ErrorCodes.NO_ERROR)

    def test_an_open_stream_is_not_idle(self) -> None:
        """
        While a stream is open (waiting on the server) the connection is not
        idle; it becomes idle when the stream ends.
        """
        c = Client(self, idle_timeout=10.0, request_timeout=100.0)
        sid = c.request(b"POST", headers=[(b"content-length", b"1")], end=False)
        c.advance(20)
        self.assertFalse(c.transport.disconnecting)
        c.h2.send_data(sid, b"x", end_stream=True)
        c.send()
        self.assertEqual(c.status(sid), 200)
        c.advance(11)
        self.assertTrue(c.transport.disconnecting)

    def test_output_that_cannot_drain_is_reset_without_a_busy_loop(self) -> None:
        """
        A client that keeps its windows at zero: the stream's output waits
        without the send loop spinning, and is reset after ``idle_timeout``.
        """
        c = Client(self, idle_timeout=10.0)
        c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        c.send()
        sid = c.request()
        self.assertEqual((c.status(sid), c.body(sid)), (200, b""))
        # nothing is due now: Twisted's loop would pick the blocked stream every turn
        due = [call for call in c.clock.getDelayedCalls() if call.getTime() <= c.clock.seconds()]
        self.assertEqual(due, [])
        c.advance(11)
        self.assertEqual(c.of(h2.events.StreamReset, sid)[0].error_code, ErrorCodes.CANCEL)
        self.assertEqual(c.defences("stalled_stream"), 1)

    def test_a_window_opened_by_settings_lets_the_stream_go(self) -> None:
        """
        A window closed by SETTINGS and opened by SETTINGS again: the output flows.
        """
        c = Client(self)
        c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        c.send()
        sid = c.request()
        c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        c.send()
        self.assertEqual(c.body(sid), b"hello")

    def test_a_client_that_stops_reading_is_cut_off(self) -> None:
        """
        The transport stays paused (the client reads nothing) for ``idle_timeout``: aborted.
        """
        c = Client(self, idle_timeout=10.0, request_timeout=100.0)
        c.request(b"POST", headers=[(b"content-length", b"1")], end=False)  # not idle: a stream is open
        c.protocol._channel.pauseProducing()
        c.advance(11)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.defences("not_reading"), 1)

    def test_a_flood_ends_the_connection(self) -> None:
        """
        A PING flood gets GOAWAY(ENHANCE_YOUR_CALM) and the connection closes.
        """
        c = Client(self)
        c.send(frames(*[ping() for _ in range(1000)]))
        [goaway] = c.of(h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.defences("control"), 1)

    def test_an_empty_headers_flood_ends_the_connection(self) -> None:
        """
        150 requests, each opened by an empty HEADERS frame without END flags
        (its block in a CONTINUATION; valid HTTP/2): GOAWAY(ENHANCE_YOUR_CALM)
        for empty frames before any of them is served, and the connection closes.
        """
        c = Client(self)
        block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in (
            (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"x"))])
        flood = []
        for sid in range(1, 301, 2):
            start, rest = HeadersFrame(sid), ContinuationFrame(sid)
            rest.data = block
            rest.flags.add("END_HEADERS")
            flood += [start, rest]
        # not c.send: h2's client would choke on resets of streams it never opened
        c.protocol.dataReceived(frames(*flood))
        c.clock.advance(0)
        sent = c.frames(c.transport.value())
        self.assertEqual([f.error_code for f in sent if isinstance(f, GoAwayFrame)], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertEqual([f for f in sent if isinstance(f, HeadersFrame)], [])
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.defences("empty"), 1)

    def test_the_deadline_counts_from_the_first_header_byte(self) -> None:
        """
        Headers that took most of ``request_timeout`` leave the body only
        the rest of it, not a whole ``request_timeout`` more.
        """
        c = Client(self)
        c.h2.send_headers(1, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"),
                              (b":authority", b"x"), (b"content-length", b"10")])
        pending = c.frames(c.h2.data_to_send())
        [headers] = [f for f in pending if isinstance(f, HeadersFrame)]  # sent below in two frames instead
        block = headers.data
        start = HeadersFrame(1)
        start.data = block[:5]
        c.send(frames(*(f for f in pending if f is not headers), start))
        c.advance(4)  # of 5
        rest = ContinuationFrame(1)
        rest.data = block[5:]
        rest.flags.add("END_HEADERS")
        c.send(rest.serialize())
        self.assertIsNone(c.status(1))
        c.advance(1)
        self.assertEqual(c.status(1), 408)
        self.assertEqual(c.of(h2.events.ConnectionTerminated), [])

    def test_a_header_block_must_end_in_time(self) -> None:
        """
        A header block left unfinished (nothing else may be sent meanwhile)
        ends the connection at ``request_timeout``.
        """
        c = Client(self)
        start = HeadersFrame(1)
        start.data = c.h2.encoder.encode([(b":method", b"GET"), (b":path", b"/")])
        c.send(start.serialize())
        c.advance(6)
        [goaway] = c.of(h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
