"""
chatterd at its HTTP/2 edge, attacked as a hostile client would: real TLS and
raw HTTP/2 frames (:mod:`tests.h2attack`) against ``twistd chatterd`` in a
child process (:mod:`tests.edge_server`).

One test (or a few) per defence that ``docs/security.md`` lists, grouped by
the items of issue 11 ("The HTTP/2 edge").  A flood must end in GOAWAY
(ENHANCE_YOUR_CALM unless said otherwise) and a closed connection, with the
server's resident memory grown by less than 8 MiB and another client (another
source address) served at once afterwards.

Issue item -> test class.  1, the HTTP/1.1 limits per stream:
RequestDeadlineTests, BodySizeTests, HeaderCountTests, IdleTests (and
SettingsTests for what is advertised).  2, the floods particular to HTTP/2:
HeaderBlockTests (and test_goaway_then_close for "then the server closes"),
FrameSizeTests, FloodTests, EmptyHeadersTests, ResetTests, OutputTests,
ConcurrencyTests.  3, fair shares per client: PerClientTests,
PerClientDefaultTests, PerClientOffTests.  What must keep holding: CancelTests
(a phone's RST_STREAM cancels Ollama at once),
FloodTests.test_normal_client_not_affected.

The blocking attack client runs in a thread, so that the reactor keeps
serving the Ollama emulator the tests start (:func:`edge_server.start_emulator`).
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import hpack
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests import tlsclient
from tests.edge_server import EdgeServer, server, start_emulator, stop_all
from tests.h2attack import (
    INITIAL_WINDOW_SIZE,
    MAX_WINDOW,
    Attacker,
    ErrorCodes,
    MemoryWatch,
    Received,
    code_name,
    continuation,
    data,
    frame_header,
    header_block,
    headers,
    ping,
    priority,
    repeat,
    rst_stream,
    served,
    settings,
    window_update,
)
from tests.harness import query
from tests.ollama_emulator import Behaviour
from tests.phone import read_as_phone

MiB = 1 << 20
#: The most a flood may grow the server's resident memory.
MEMORY_BOUND = 8 * MiB
REQUEST_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
MAX_BODY = 1 * MiB  # chatterd's default
#: How long a server has to answer what it must answer "at once".
PROMPTLY = 3.0
#: How late after its deadline a timer may fire on a loaded machine.
SLACK = 3.0
#: How long a server has to close a connection once it has sent GOAWAY (a
#: TLS close waits for the client's close_notify, which a hostile client never
#: sends; chatterd's HTTP/1.1 refusals abort the connection 5 s after).
CLOSE_WAIT = 7.0
EYC, FRAME_SIZE = ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.FRAME_SIZE_ERROR
LOCAL = "127.0.0.1"

#: Short deadlines, so that the tests that wait for them are quick.
EDGE = ["--request-timeout", f"{REQUEST_TIMEOUT:g}", "--idle-timeout", f"{IDLE_TIMEOUT:g}"]
#: Small per-client limits.
FAIR = ["--max-client-connections", "3", "--max-client-streams", "2"]
#: The per-client defaults: a quarter of --max-streams (2 of 8) and 1024 connections.
DEFAULTS = ["--max-streams", "8"]
#: 0 turns both per-client limits off.
OFF = ["--max-streams", "8", "--max-client-streams", "0", "--max-client-connections", "0"]


def tearDownModule() -> None:
    """Stop the edge servers when the module is done (trial never calls this: they stop at exit)."""
    stop_all()


def chat_body(appid: str, model: str = "llama3.2", message: str = "Hi") -> bytes:
    return json.dumps({"appID": appid, "model": model, "messages": [{"role": "user", "content": message}],
                       "stream": True}).encode()


def post(c: Attacker, path: str, body: bytes, *, end_stream: bool = True) -> int:
    """
    A POST with a JSON body and its content-length; returns the stream id.
    """
    sid = c.request("POST", path, [("content-type", "application/json"), ("content-length", str(len(body)))],
                    end_stream=False)
    c.send_body(sid, body, end_stream=end_stream)
    return sid


def raw_block_frames(sid: int, block: bytes, size: int = 16384) -> bytes:
    """
    ``block`` as HEADERS (with END_STREAM: a GET) plus CONTINUATIONs of
    ``size`` bytes, the last with END_HEADERS.
    """
    parts = [block[i:i + size] for i in range(0, len(block), size)] or [b""]
    out = headers(sid, parts[0], end_headers=len(parts) == 1, end_stream=True)
    for i, part in enumerate(parts[1:], 2):
        out += continuation(sid, part, end_headers=i == len(parts))
    return out


def plain_block(method: str, path: str) -> bytes:
    """
    A header block that leaves the HPACK dynamic table alone (literals never
    indexed), for streams the server may refuse without decoding it.
    """
    fields = [(":method", method), (":path", path), (":scheme", "https"), (":authority", LOCAL)]
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in fields])


def refused_at_accept(port: int, source: str, timeout: float = PROMPTLY) -> str | None:
    """
    Connect over plain TCP and send nothing: how the server ended it
    (``"eof"``, ``"reset"``), or ``None`` if it kept the connection open,
    waiting for a TLS handshake, for ``timeout`` seconds.
    """
    with socket.create_connection((LOCAL, port), timeout=timeout, source_address=(source, 0)) as sock:
        try:
            return "eof" if sock.recv(1) == b"" else "data"
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            return None


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(re.escape(name + "{" + labels + "}") + r" ([0-9.e+]+)", text)
    return float(match.group(1)) if match else 0.0


class _EdgeCase(TestCase):
    """
    Tests against one shared chatterd configuration.
    """

    timeout = 90
    name = "edge"
    options = EDGE
    with_metrics = False

    async def setUp(self) -> None:
        self.srv: EdgeServer = await deferToThread(server, self.name, self.options, metrics=self.with_metrics)

    def attacker(self, source: str | None = None, **kwargs: Any) -> Attacker:
        return Attacker(LOCAL, self.srv.port, source=source, **kwargs)

    async def assert_served(self, source: str = "127.0.0.2") -> None:
        """
        Another client, from another address, is served at once.
        """
        try:
            reply = await deferToThread(served, LOCAL, self.srv.port, self.srv.cafile, source=source,
                                        timeout=PROMPTLY + 2)
        except Exception as e:
            self.fail(f"another client was not served at once: {e!r}")
        self.assertEqual(reply.status, 200)

    # --- floods ---

    def flood(
        self, make: Callable[[Attacker, Any], Iterable[bytes]], *, setup: Callable[[Attacker], Any] | None = None,
        sync: bool = True, close: int | None = EYC, **kwargs: Any,
    ) -> tuple[Received, MemoryWatch, int]:
        """
        (In a thread.)  A fresh connection, ``setup`` on it, then the flood
        ``make`` yields, while watching the server's memory.  Then, unless it
        ended already: with ``sync``, a PING whose ACK shows the server took
        it all without a GOAWAY (else :data:`PROMPTLY` seconds for one, for
        floods a PING would interrupt); after a GOAWAY with error code
        ``close``, :data:`CLOSE_WAIT` seconds for the close.
        """
        with self.attacker(**kwargs) as c:
            context = setup(c) if setup else None
            with MemoryWatch(self.srv.pid) as memory:
                sent = c.flood(make(c, context), timeout=20)
                if c.received.goaway is None and c.received.closed is None:
                    c.sync(PROMPTLY + 2) if sync else c.wait_goaway(PROMPTLY)
                if c.received.goaway is not None and c.received.goaway.error_code == close:
                    c.wait_closed(CLOSE_WAIT)
            return c.received, memory, sent

    def assert_refused(
        self, received: Received, memory: MemoryWatch, *, code: int = EYC, closed: bool = True, note: str = "",
    ) -> None:
        """
        GOAWAY ``code`` (and, with ``closed``, a closed connection); memory bounded.
        """
        what = f"got {received.summary()}; {memory}{note}"
        if code_name(received.goaway and received.goaway.error_code) != code_name(code):
            self.fail(f"expected GOAWAY {code_name(code)}; {what}")
        if closed and received.closed is None:
            self.fail(f"the connection stayed open {CLOSE_WAIT:g} s after the GOAWAY; {what}")
        if memory.growth >= MEMORY_BOUND:
            self.fail(f"the server's memory grew {memory.growth / MiB:.1f} MiB; {what}")

    async def assert_flood_refused(
        self, make: Callable[[Attacker, Any], Iterable[bytes]], *, code: int = EYC, closed: bool = True,
        setup: Callable[[Attacker], Any] | None = None, sync: bool = True,
    ) -> Received:
        """
        The flood gets GOAWAY ``code`` and a close (unless not ``closed``:
        see ``test_goaway_then_close``), memory stays bounded, and another
        client is served at once.
        """
        received, memory, sent = await deferToThread(self.flood, make, setup=setup, sync=sync,
                                                     close=code if closed else None)
        self.assert_refused(received, memory, code=code, closed=closed, note=f"; sent {sent / MiB:.1f} MiB")
        await self.assert_served()
        return received


def open_post(c: Attacker) -> int:
    """A stream waiting for its body: POST /postchatt without END_STREAM."""
    return c.request("POST", "/postchatt", [("content-type", "application/json")], end_stream=False)


class SettingsTests(_EdgeCase):
    async def test_advertised_settings(self) -> None:
        """
        chatterd advertises MAX_CONCURRENT_STREAMS 100, MAX_HEADER_LIST_SIZE
        16384 (as its HTTP/1.1 cap) and MAX_FRAME_SIZE 16384.
        """
        def look() -> dict[int, int]:
            with self.attacker() as c:
                return dict(c.received.settings)

        found = await deferToThread(look)
        self.assertEqual(
            (found.get(0x3), found.get(0x6), found.get(0x5, 16384)), (100, 16384, 16384), f"SETTINGS: {found}"
        )


class RequestDeadlineTests(_EdgeCase):
    """
    Item 1 (slow requests): a stream's headers and whole body arrive within
    --request-timeout.
    """

    def slow_request(self, tick: Callable[[Attacker, int], None], extra: list[tuple[str, str]]) -> Any:
        """
        (In a thread.)  Open a POST stream, call ``tick`` every 0.3 s until it
        is answered or request-timeout + 5 s passed; then a GET on the same
        connection.  Returns (received, seconds, stream, second stream).
        """
        with self.attacker() as c:
            sid = c.request("POST", "/postchatt", [("content-type", "application/json"), *extra], end_stream=False)
            started = time.monotonic()
            while time.monotonic() - started < REQUEST_TIMEOUT + SLACK and not c.wait_stream(sid, 0.3):
                tick(c, sid)
            elapsed = time.monotonic() - started
            if c.received.status(sid) is not None:
                c.read_until(lambda: sid in c.received.resets, PROMPTLY)
            after = c.request("GET", "/")
            c.wait_stream(after, PROMPTLY)
            return c.received, elapsed, sid, after

    def assert_408(self, result: Any) -> None:
        received, elapsed, sid, after = result
        what = f"after {elapsed:.1f} s: {received.summary()}"
        self.assertEqual(received.status(sid), 408, f"no 408 {what}")
        self.assertGreaterEqual(elapsed, REQUEST_TIMEOUT * 0.9, what)  # not before the deadline
        self.assertEqual(received.header(sid, "content-type"), "application/json")
        self.assertIn("error", json.loads(received.body(sid)))
        self.assertIn(sid, received.ended, f"408 without END_STREAM: {what}")
        reset = code_name(received.resets.get(sid))
        self.assertEqual(reset, "NO_ERROR", f"RST_STREAM {reset}, not NO_ERROR, after the 408: {what}")
        self.assertIsNone(received.goaway, what)  # the connection carries on...
        self.assertEqual(received.status(after), 200, what)  # ... and serves its next stream

    async def test_body_never_sent(self) -> None:
        """
        HEADERS and then no body, the connection kept busy with PINGs:
        408 JSON + RST_STREAM(NO_ERROR) at the deadline; the connection
        and its next stream carry on.
        """
        result = await deferToThread(self.slow_request, lambda c, sid: c.send(ping()), [("content-length", "40")])
        self.assert_408(result)

    async def test_trickled_body(self) -> None:
        """
        A body trickled one byte every 0.3 s, with PINGs and WINDOW_UPDATEs:
        the deadline is not extended.
        """
        def tick(c: Attacker, sid: int) -> None:
            c.send(data(sid, b" ") + ping() + window_update(0, 1) + window_update(sid, 1))

        result = await deferToThread(self.slow_request, tick, [("content-length", "1000")])
        self.assert_408(result)

    async def test_trickled_header_block(self) -> None:
        """
        A header block trickled one byte at a time in CONTINUATION frames
        never becomes a request: the stream (or the connection) is ended
        within request-timeout + 3 s.
        """
        block = header_block("POST", "/postchatt", [("x-slow", "a" * 500)], huffman=False)

        def attack() -> tuple[Received, float]:
            with self.attacker() as c:
                c.send(headers(1, block[:10], end_headers=False))
                started = time.monotonic()
                for i in range(10, len(block)):
                    if time.monotonic() - started > REQUEST_TIMEOUT + SLACK or c.received.closed:
                        break
                    c.send(continuation(1, block[i:i + 1]))
                    c.read_until(lambda: c.received.goaway is not None or 1 in c.received.resets
                                 or c.received.status(1) is not None, 0.3)
                    if c.received.goaway is not None or 1 in c.received.resets or c.received.status(1):
                        break
                return c.received, time.monotonic() - started

        received, elapsed = await deferToThread(attack)
        ended = received.goaway is not None or received.closed or 1 in received.resets or received.status(1)
        self.assertTrue(ended, f"still open, nothing answered after {elapsed:.1f} s: {received.summary()}")
        self.assertLess(elapsed, REQUEST_TIMEOUT + SLACK + 1)


class BodySizeTests(_EdgeCase):
    """
    Item 1 (oversized bodies): a body over --max-body is refused before it is read.
    """

    def assert_413(self, received: Received, sid: int, what: str) -> None:
        self.assertEqual(received.status(sid), 413, what)
        self.assertEqual(received.header(sid, "content-type"), "application/json", what)
        self.assertIn("error", json.loads(received.body(sid)))
        reset = code_name(received.resets.get(sid))
        self.assertEqual(reset, "NO_ERROR", f"RST_STREAM {reset}, not NO_ERROR, after the 413: {what}")

    async def test_declared_too_large(self) -> None:
        """
        A content-length over --max-body: 413 JSON at once, when HEADERS
        arrive, before any DATA; then RST_STREAM(NO_ERROR).
        """
        def attack() -> Received:
            with self.attacker() as c:
                sid = c.request("POST", "/postchatt", [("content-length", str(3 * MiB))], end_stream=False)
                c.wait_stream(sid, PROMPTLY)
                c.read_until(lambda: sid in c.received.resets, 1)
                return c.received

        received = await deferToThread(attack)
        self.assert_413(received, 1, f"nothing but HEADERS sent, within {PROMPTLY} s: {received.summary()}")
        await self.assert_served()

    async def test_undeclared_too_large(self) -> None:
        """
        No content-length: 413 + RST_STREAM(NO_ERROR) as soon as the DATA
        received passes --max-body, before the body ends; the server stops
        reading it (its windows close) and its memory stays bounded.
        """
        body = b"x" * (3 * MiB)

        def attack() -> tuple[Received, int, bool, MemoryWatch]:
            with self.attacker() as c, MemoryWatch(self.srv.pid) as memory:
                sid = c.request("POST", "/postchatt", [("content-type", "application/json")], end_stream=False)
                sent = c.send_body(sid, body, end_stream=False, timeout=10)
                ended = sent == len(body) and c.send(data(sid, end_stream=True))  # today's chatterd needs this
                c.wait_stream(sid, PROMPTLY)
                c.read_until(lambda: sid in c.received.resets, 1)
                return c.received, sent, ended, memory

        received, sent, ended, memory = await deferToThread(attack)
        what = f"sent {sent / MiB:.2f} MiB, END_STREAM {'sent' if ended else 'not sent'}: {received.summary()}"
        self.assertFalse(ended, f"chatterd read the whole body before answering: {what}")
        self.assert_413(received, 1, what)
        self.assertLess(sent, MAX_BODY + 256 * 1024, what)
        self.assertLess(memory.growth, MEMORY_BOUND, str(memory))
        await self.assert_served()


class HeaderCountTests(_EdgeCase):
    async def test_too_many_headers(self) -> None:
        """
        Item 1 (header caps): more than 100 header fields get 431 JSON on that stream;
        the connection carries on (90 headers are served).
        """
        def attack() -> Received:
            with self.attacker() as c:
                many = c.request("GET", "/", [(f"x-h{i}", "v") for i in range(101)])
                c.wait_stream(many, PROMPTLY)
                fewer = c.request("GET", "/", [(f"x-h{i}", "v") for i in range(90)])
                c.wait_stream(fewer, PROMPTLY)
                return c.received

        received = await deferToThread(attack)
        self.assertEqual((received.status(1), received.status(3)), (431, 200), received.summary())
        self.assertEqual(received.header(1, "content-type"), "application/json")
        self.assertIn("error", json.loads(received.body(1)))
        self.assertIsNone(received.goaway)


class HeaderBlockTests(_EdgeCase):
    """
    Item 2 (CONTINUATION floods): header blocks larger than MAX_HEADER_LIST_SIZE.
    """

    async def test_continuation_flood(self) -> None:
        """
        HEADERS without END_HEADERS, then 100 MiB of CONTINUATION frames:
        GOAWAY ENHANCE_YOUR_CALM and a close long before they are all sent;
        memory grows by less than 8 MiB; another client is served.
        """
        total = 100 * MiB

        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            yield headers(1, header_block(encoder=c.encoder), end_headers=False)
            yield from repeat(continuation(1, b"\0" * 16384), total // (16384 + 9))

        received, memory, sent = await deferToThread(self.flood, flood, sync=False)
        self.assert_refused(received, memory, note=f"; sent {sent / MiB:.1f} of 100 MiB")
        self.assertLess(sent, total / 3, f"the connection stayed open for {sent / MiB:.0f} MiB of the flood")
        await self.assert_served()

    async def test_small_continuations_counted_in_bytes(self) -> None:
        """
        A header block of 40 CONTINUATIONs of 1 KiB (fewer frames than h2's
        own backlog of 64): refused as soon as its raw bytes pass 16384,
        without waiting for END_HEADERS.
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            yield headers(1, header_block(encoder=c.encoder), end_headers=False)
            yield from repeat(continuation(1, b"\0" * 1024), 40)

        received, memory, sent = await deferToThread(self.flood, flood, sync=False)
        self.assert_refused(received, memory)
        await self.assert_served()

    async def test_empty_continuations(self) -> None:
        """
        HEADERS then 10,000 empty CONTINUATIONs: GOAWAY (ENHANCE_YOUR_CALM
        or PROTOCOL_ERROR), memory bounded.  (Holds today: h2's backlog of
        64 CONTINUATIONs.)
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            yield headers(1, header_block(encoder=c.encoder), end_headers=False)
            yield from repeat(continuation(1, b""), 10_000)

        received, memory, _ = await deferToThread(self.flood, flood, sync=False, close=None)
        self.assertIn(code_name(received.goaway and received.goaway.error_code),
                      ("ENHANCE_YOUR_CALM", "PROTOCOL_ERROR"), received.summary())
        self.assertLess(memory.growth, MEMORY_BOUND, str(memory))
        await self.assert_served()

    async def test_large_header_value(self) -> None:
        """
        A 200 KB header value spread over CONTINUATIONs: GOAWAY
        ENHANCE_YOUR_CALM.  (Holds today.)
        """
        block = header_block("GET", "/", [("x-big", "a" * 200_000)], huffman=False)
        await self.assert_flood_refused(lambda c, _: [raw_block_frames(1, block)], closed=False)

    async def test_two_thousand_headers(self) -> None:
        """
        2,000 small headers: GOAWAY ENHANCE_YOUR_CALM.  (Holds today.)
        """
        block = header_block("GET", "/", [(f"x-header-{i:04}", f"value-{i:04}") for i in range(2000)],
                             huffman=False)
        await self.assert_flood_refused(lambda c, _: [raw_block_frames(1, block)], closed=False)

    async def test_decoded_list_over_limit(self) -> None:
        """
        A block of fewer than 16384 raw bytes that decodes to more (one
        Huffman-coded 17 KB value, 10.6 KB on the wire): GOAWAY, as the
        decoded size counts too.
        """
        def attack() -> Received:
            block = header_block("GET", "/", [("x-big", "a" * 17_000)])  # Huffman: 5 bits per "a"
            assert len(block) < 16384
            with self.attacker() as c:
                c.send(raw_block_frames(1, block))
                c.read_until(lambda: c.received.goaway is not None or 1 in c.received.ended, PROMPTLY)
                return c.received

        received = await deferToThread(attack)
        self.assertIn(code_name(received.goaway and received.goaway.error_code),
                      ("ENHANCE_YOUR_CALM", "PROTOCOL_ERROR", "COMPRESSION_ERROR"), received.summary())

    async def test_goaway_then_close(self) -> None:
        """
        After its GOAWAY (here for a 200 KB header), chatterd closes the TCP
        connection itself, though the client never sends close_notify.
        """
        block = header_block("GET", "/", [("x-big", "a" * 200_000)], huffman=False)

        def attack() -> tuple[Received, float]:
            with self.attacker() as c:
                c.send(raw_block_frames(1, block))
                c.wait_goaway(PROMPTLY)
                started = time.monotonic()
                c.wait_closed(CLOSE_WAIT)
                return c.received, time.monotonic() - started

        received, waited = await deferToThread(attack)
        self.assertIsNotNone(received.goaway, received.summary())
        self.assertIsNotNone(received.closed, f"still open {waited:.1f} s after the GOAWAY: {received.summary()}")


class FrameSizeTests(_EdgeCase):
    async def test_declared_length_over_max_frame_size(self) -> None:
        """
        Item 2: a frame header declaring 16 MiB gets GOAWAY FRAME_SIZE_ERROR
        at once, without waiting for the payload.
        """
        def attack() -> tuple[Received, MemoryWatch]:
            with self.attacker() as c, MemoryWatch(self.srv.pid) as memory:
                c.send(frame_header(2**24 - 1, 0x0, 0, 1) + b"\0" * 1000)
                c.wait_goaway(PROMPTLY)
                if c.received.goaway is not None:
                    c.wait_closed(CLOSE_WAIT)
                return c.received, memory

        received, memory = await deferToThread(attack)
        self.assert_refused(received, memory, code=FRAME_SIZE)
        await self.assert_served()


class FloodTests(_EdgeCase):
    """
    Item 2: floods of control and empty frames get GOAWAY ENHANCE_YOUR_CALM.
    """

    async def test_ping_flood(self) -> None:
        """10,000 PINGs."""
        await self.assert_flood_refused(lambda c, _: repeat(ping(), 10_000))

    async def test_settings_flood(self) -> None:
        """10,000 empty SETTINGS frames."""
        await self.assert_flood_refused(lambda c, _: repeat(settings(), 10_000))

    async def test_priority_flood(self) -> None:
        """10,000 PRIORITY frames reshuffling one stream."""
        await self.assert_flood_refused(lambda c, _: repeat(priority(1, 0, 16), 10_000))

    async def test_priority_tree_flood(self) -> None:
        """
        10,000 PRIORITY frames building a chain of idle streams (today: an
        unhandled TooManyStreamsError from the priority tree, and a bare close).
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            frames = (priority(1 + 2 * i, max(0, 2 * i - 1), exclusive=True) for i in range(10_000))
            while batch := b"".join(f for _, f in zip(range(4096), frames)):
                yield batch

        await self.assert_flood_refused(flood)

    async def test_window_update_flood_on_connection(self) -> None:
        """100,000 WINDOW_UPDATEs of 1 on the connection."""
        await self.assert_flood_refused(lambda c, _: repeat(window_update(0, 1), 100_000))

    async def test_window_update_flood_on_stream(self) -> None:
        """100,000 WINDOW_UPDATEs of 1 on an open stream."""
        await self.assert_flood_refused(lambda c, sid: repeat(window_update(sid, 1), 100_000), setup=open_post)

    async def test_empty_data_flood(self) -> None:
        """10,000 empty DATA frames without END_STREAM on an open stream."""
        await self.assert_flood_refused(lambda c, sid: repeat(data(sid), 10_000), setup=open_post)

    async def test_normal_client_not_affected(self) -> None:
        """
        A normal client (the h2 library) reading a long /llmchat stream of
        3,000 frames, with the WINDOW_UPDATEs h2 sends, is never cut off.
        """
        emulator = await start_emulator(self)
        emulator.models["long"] = Behaviour(reply=[" w"] * 3000)
        body = chat_body(f"normal-{uuid.uuid4().hex[:8]}", "long")
        reply = await deferToThread(tlsclient.h2_request, LOCAL, self.srv.port, "/llmchat", self.srv.cafile,
                                    method="POST", body=body, timeout=30)
        self.assertEqual(reply.status, 200)
        self.assertEqual(read_as_phone(reply.body).bubble, " w" * 3000)


class EmptyHeadersTests(_EdgeCase):
    """
    Item 2: empty HEADERS frames spend the bucket of empty frames.  (On the
    server with metrics, which tell what ended the connection.)
    """

    name = "defaults"
    options = DEFAULTS
    with_metrics = True

    async def test_empty_headers_flood(self) -> None:
        """
        10,000 GETs, each opened by an empty HEADERS frame without END flags
        (its block all in a CONTINUATION): valid HTTP/2, so only the count of
        empty frames stops it at once, with GOAWAY ENHANCE_YOUR_CALM
        counted as ``empty`` (without it, the refused streams' resets end it
        thousands of streams later); memory bounded; another client served.
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            block = plain_block("GET", "/")
            for _ in range(100):
                batch = b""
                for _ in range(100):
                    sid = c.next_stream()
                    batch += headers(sid, b"", end_headers=False) + continuation(sid, block, end_headers=True)
                yield batch

        def empty() -> float:
            return metric(self.srv.metrics(), "chatterd_http2_defences_total", 'reason="empty"')

        before = await deferToThread(empty)
        received = await self.assert_flood_refused(flood)
        self.assertEqual(await deferToThread(empty) - before, 1,
                         f"the connection was not ended for empty frames: {received.summary()}")


class ResetTests(_EdgeCase):
    """
    Item 2 (Rapid Reset, MadeYouReset): resets, by the client or provoked
    from the server.
    """

    async def test_rapid_reset(self) -> None:
        """
        HEADERS + RST_STREAM, 5,000 times: GOAWAY ENHANCE_YOUR_CALM.
        (Holds today: Twisted's reset token bucket.)
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            for i in range(5000):
                sid = 1 + 2 * i
                yield headers(sid, header_block(encoder=c.encoder), end_stream=True) + rst_stream(sid)

        await self.assert_flood_refused(flood, closed=False)

    async def test_made_you_reset_data_on_half_closed_stream(self) -> None:
        """
        A GET with END_STREAM, then DATA on it (the server must reset the
        stream), 5,000 times: GOAWAY ENHANCE_YOUR_CALM.  (Holds today: h2
        reports these resets to Twisted's bucket.)
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            for i in range(5000):
                sid = 1 + 2 * i
                yield headers(sid, header_block(encoder=c.encoder), end_stream=True) + data(sid, b"x")

        received = await self.assert_flood_refused(flood, closed=False)
        self.assertTrue(received.resets, "the server reset no stream")

    async def test_made_you_reset_window_update_zero(self) -> None:
        """
        Open a stream, send WINDOW_UPDATE 0 on it, 5,000 times.  RFC 9113
        makes that a stream error, which could provoke a reset per frame;
        h2 (and so chatterd) makes it a connection error: GOAWAY
        PROTOCOL_ERROR at the first, which bounds the provoked resets at none.
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            for i in range(5000):
                sid = 1 + 2 * i
                yield headers(sid, header_block("POST", "/postchatt", encoder=c.encoder)) + window_update(sid, 0)

        received = await self.assert_flood_refused(flood, code=ErrorCodes.PROTOCOL_ERROR)
        self.assertFalse(received.resets, "streams were reset before the GOAWAY")


class IdleTests(_EdgeCase):
    """
    Item 1 (idle connections): a connection with no stream closes after
    --idle-timeout, whatever control frames it receives.
    """

    def keep_alive(self, tick: bytes) -> tuple[Received, float]:
        with self.attacker() as c:
            started = time.monotonic()
            while time.monotonic() - started < IDLE_TIMEOUT + SLACK and c.received.goaway is None:
                c.send(tick)
                c.read_until(lambda: c.received.goaway is not None, 0.5)
            elapsed = time.monotonic() - started
            if c.received.goaway is not None:
                c.wait_closed(CLOSE_WAIT)
            return c.received, elapsed

    def assert_closed_idle(self, received: Received, elapsed: float) -> None:
        what = f"after {elapsed:.1f} s: {received.summary()}"
        if code_name(received.goaway and received.goaway.error_code) != "NO_ERROR":
            self.fail(f"expected GOAWAY NO_ERROR at idle-timeout ({IDLE_TIMEOUT:g} s); {what}")
        self.assertGreaterEqual(elapsed, IDLE_TIMEOUT * 0.9, what)
        self.assertIsNotNone(received.closed, f"GOAWAY, but not closed {CLOSE_WAIT:g} s later; {what}")

    async def test_pings_are_not_activity(self) -> None:
        """A PING every 0.5 s: GOAWAY NO_ERROR and a close after idle-timeout."""
        self.assert_closed_idle(*await deferToThread(self.keep_alive, ping()))

    async def test_settings_and_window_updates_are_not_activity(self) -> None:
        """Empty SETTINGS and WINDOW_UPDATEs every 0.5 s: the same."""
        self.assert_closed_idle(*await deferToThread(self.keep_alive, settings() + window_update(0, 1)))


class OutputTests(_EdgeCase):
    """
    Item 2 (windows at zero, a client that does not read): output that
    cannot drain holds bounded memory and is ended after --idle-timeout.
    """

    async def test_zero_window(self) -> None:
        """
        INITIAL_WINDOW_SIZE 0 and no WINDOW_UPDATE, five long /llmchat
        streams: memory stays bounded, and each stream is reset (CANCEL)
        after idle-timeout.
        """
        emulator = await start_emulator(self)
        # thinking is relayed but not kept for the stored reply, so what is
        # measured is only what chatterd buffers (the reply a stream keeps is
        # bounded by --max-reply, tested in test_llmchat.ReplyLimitTests)
        emulator.models["big"] = Behaviour(thinking=["x" * 1000] * 2000, reply=["ok"])
        tag = uuid.uuid4().hex[:8]

        def attack() -> tuple[Received, list[int], MemoryWatch, float]:
            with self.attacker(settings={INITIAL_WINDOW_SIZE: 0}, grant=False) as c, \
                    MemoryWatch(self.srv.pid) as memory:
                sids = [post(c, "/llmchat", chat_body(f"zero-{tag}-{i}", "big")) for i in range(5)]
                started = time.monotonic()
                c.read_until(lambda: all(s in c.received.resets for s in sids), IDLE_TIMEOUT + SLACK)
                return c.received, sids, memory, time.monotonic() - started

        received, sids, memory, elapsed = await deferToThread(attack)
        what = f"after {elapsed:.1f} s: {received.summary()}; {memory}"
        self.assertEqual([received.status(s) for s in sids], [200] * 5, what)
        resets = [code_name(received.resets.get(s)) for s in sids]
        self.assertEqual(resets, ["CANCEL"] * 5, f"RST_STREAMs {resets} {what}")
        self.assertGreaterEqual(elapsed, IDLE_TIMEOUT * 0.9, what)
        self.assertLess(memory.growth, MEMORY_BOUND, what)
        await self.assert_served()

    async def test_client_stops_reading(self) -> None:
        """
        Huge windows, ten long /llmchat streams, then the client stops
        reading TCP: memory stays bounded and the connection is aborted after
        idle-timeout without progress (the streams never finish).
        """
        emulator = await start_emulator(self)
        # thinking is relayed but not kept for the stored reply, so what is
        # measured is only what chatterd buffers (the reply a stream keeps is
        # bounded by --max-reply, tested in test_llmchat.ReplyLimitTests)
        emulator.models["big"] = Behaviour(thinking=["x" * 1000] * 2000, reply=["ok"])
        tag = uuid.uuid4().hex[:8]

        def attack() -> tuple[Received, list[int], MemoryWatch]:
            with self.attacker(settings={INITIAL_WINDOW_SIZE: MAX_WINDOW}, grant=False, rcvbuf=4096,
                               keep_bodies=False) as c, MemoryWatch(self.srv.pid) as memory:
                c.send(window_update(0, MAX_WINDOW - 65535))
                sids = [post(c, "/llmchat", chat_body(f"unread-{tag}-{i}", "big")) for i in range(10)]
                time.sleep(IDLE_TIMEOUT + 2)  # not reading
                c.wait_closed(SLACK)
                return c.received, sids, memory

        received, sids, memory = await deferToThread(attack)
        what = f"{received.summary()}; {memory}; streams finished: {len(received.ended)} of 10"
        self.assertIsNotNone(received.closed, f"still open: {what}")
        self.assertLess(len(received.ended), 10, what)
        self.assertLess(memory.growth, MEMORY_BOUND, what)
        await self.assert_served()


class CancelTests(_EdgeCase):
    """
    What must keep holding: a phone's RST_STREAM reaches the relay.
    """

    async def test_reset_cancels_ollama_at_once(self) -> None:
        """
        RST_STREAM(CANCEL) on a /llmchat stream Ollama is still answering:
        chatterd closes its request to Ollama at once and stores the partial
        reply; the connection carries on.
        """
        emulator = await start_emulator(self)
        emulator.models["stall"] = Behaviour(reply=["Half", " a", " reply"], stall_after=2)
        appid = f"cancel-{uuid.uuid4().hex[:8]}"
        c = await deferToThread(self.attacker)
        self.addCleanup(c.close)
        sid = await deferToThread(post, c, "/llmchat", chat_body(appid, "stall"))
        record = await emulator.when_stalled()
        seen = await deferToThread(c.read_until, lambda: b'" a"' in c.received.body(sid), PROMPTLY)
        self.assertTrue(seen, f"the first frames never came: {c.received.summary()}")

        await deferToThread(c.send, rst_stream(sid, ErrorCodes.CANCEL))
        ended = record.ended()
        ended.addTimeout(PROMPTLY, reactor)
        try:
            outcome = await ended
        except defer.TimeoutError:
            self.fail(f"Ollama's request was still open {PROMPTLY:g} s after the phone's RST_STREAM")
        self.assertEqual(outcome, "client_left")

        def stored() -> list[tuple[Any, ...]]:
            deadline = time.monotonic() + PROMPTLY
            while True:
                rows = query(self.srv.dsn, "SELECT username, message FROM chatts WHERE appid = %s ORDER BY seq",
                             (appid,))
                if len(rows) == 2 or time.monotonic() > deadline:
                    return rows
                time.sleep(0.05)  # another process's writes: polled

        self.assertEqual(await deferToThread(stored), [("user", "Hi"), ("assistant", "Half a")])

        def next_stream() -> int | None:
            after = c.request("GET", "/")
            c.wait_stream(after, PROMPTLY)
            return c.received.status(after)

        self.assertEqual(await deferToThread(next_stream), 200, c.received.summary())
        self.assertIsNone(c.received.goaway)


class ConcurrencyTests(_EdgeCase):
    """
    Item 2, MAX_CONCURRENT_STREAMS (on a server with the default 30 s request
    timeout, so that 100 streams can wait for their bodies as long as the
    test needs).
    """

    name = "defaults"
    options = DEFAULTS
    with_metrics = True

    def open_hundred(self, c: Attacker) -> list[int]:
        body = json.dumps({"username": "u", "message": "held"}).encode()
        frames = b""
        sids = []
        for _ in range(100):
            sid = c.next_stream()
            block = header_block("POST", "/postchatt", [("content-type", "application/json"),
                                                       ("content-length", str(len(body)))], encoder=c.encoder)
            frames += headers(sid, block)
            sids.append(sid)
        c.send(frames)
        return sids

    async def test_streams_beyond_the_limit_are_refused(self) -> None:
        """
        With 100 streams open, the 101st gets RST_STREAM(REFUSED_STREAM);
        the connection stays open and the open streams carry on.
        """
        body = json.dumps({"username": "u", "message": "held"}).encode()

        def attack() -> tuple[Received, list[int], int]:
            with self.attacker() as c:
                sids = self.open_hundred(c)
                extra = c.next_stream()
                c.send(headers(extra, plain_block("GET", "/"), end_stream=True))
                c.wait_stream(extra, PROMPTLY)
                c.send(data(sids[0], body, end_stream=True))
                c.wait_stream(sids[0], PROMPTLY)
                return c.received, sids, extra

        received, sids, extra = await deferToThread(attack)
        reset = code_name(received.resets.get(extra))
        self.assertEqual(reset, "REFUSED_STREAM", f"stream 101 reset: {reset}; {received.summary()}")
        self.assertIsNone(received.goaway, received.summary())
        self.assertEqual(received.status(sids[0]), 200, received.summary())

    async def test_made_you_reset_refused_streams(self) -> None:
        """
        With 100 streams open, 5,000 more, each refused: GOAWAY
        ENHANCE_YOUR_CALM, memory bounded.
        """
        def flood(c: Attacker, _: Any) -> Iterator[bytes]:
            block = plain_block("GET", "/")
            for _ in range(50):
                yield b"".join(headers(c.next_stream(), block, end_stream=True) for _ in range(100))

        await self.assert_flood_refused(flood, setup=self.open_hundred)


class _PerClientCase(_EdgeCase):
    """
    Per-client limits, each test from its own source addresses (so that
    connections another test just closed are not counted against it).
    """

    def hold_connections(self, source: str, count: int) -> list[Attacker]:
        """(In a thread.)  ``count`` TLS + HTTP/2 connections from ``source``."""
        held: list[Attacker] = []
        try:
            for _ in range(count):
                held.append(self.attacker(source, timeout=PROMPTLY + 2))
        except BaseException:
            for c in held:
                c.close()
            raise
        return held

    async def assert_connection_limit(self, source: str, limit: int, other: str) -> None:
        """
        ``limit`` connections from ``source`` are accepted; the next is closed
        at accept, before the TLS handshake; ``other`` is still accepted and
        served; once one closes, ``source`` may connect again.
        """
        held = await deferToThread(self.hold_connections, source, limit)
        try:
            how = await deferToThread(refused_at_accept, self.srv.port, source)
            self.assertIn(how, ("eof", "reset"),
                          f"connection {limit + 1} from {source} was accepted and waits for its TLS handshake")
            await self.assert_served(other)
        finally:
            for c in held[1:]:
                c.close()
        held[0].close()

        def again() -> bool:
            deadline = time.monotonic() + PROMPTLY + 2
            while time.monotonic() < deadline:
                if refused_at_accept(self.srv.port, source, 0.5) is None:
                    return True
                time.sleep(0.1)
            return False

        self.assertTrue(await deferToThread(again), f"{source} still refused after its connections closed")
        await self.assert_served(source)

    async def assert_stream_limit(self, source: str, limit: int, other: str) -> None:
        """
        ``limit`` /llmchat streams from ``source`` (over two connections)
        run; one more /llmchat or /llmprompt gets 503 + retry-after + JSON
        and stores nothing; ``other`` is still served a stream.
        """
        emulator = await start_emulator(self)
        emulator.models["stall"] = Behaviour(reply=["Part", "ial"], stall_after=1)
        tag = uuid.uuid4().hex[:8]
        refused_text = f"refused {tag}"

        def attack() -> tuple[list[int | None], Received, Received, int, int, Received, int]:
            a, b = self.attacker(source), self.attacker(source)
            try:
                held = []
                for i in range(limit):
                    c = (a, b)[i % 2]
                    sid = post(c, "/llmchat", chat_body(f"held-{tag}-{i}", "stall"))
                    held.append(c.wait_response(sid, PROMPTLY + 2))
                chat = post(a, "/llmchat", chat_body(f"extra-{tag}", "stall", refused_text))
                if a.wait_response(chat, PROMPTLY) == 503:
                    a.wait_stream(chat, PROMPTLY)
                prompt = post(b, "/llmprompt", json.dumps({"model": "stall", "prompt": refused_text}).encode())
                if b.wait_response(prompt, PROMPTLY) == 503:
                    b.wait_stream(prompt, PROMPTLY)
                with self.attacker(other) as o:
                    sid = post(o, "/llmchat", chat_body(f"other-{tag}"))
                    o.wait_stream(sid, PROMPTLY + 5)
                    return held, a.received, b.received, chat, prompt, o.received, sid
            finally:
                a.close()
                b.close()

        held, ra, rb, chat, prompt, ro, osid = await deferToThread(attack)
        self.assertEqual(held, [200] * limit, f"the first {limit} streams: {ra.summary()}")
        for received, sid, route in ((ra, chat, "/llmchat"), (rb, prompt, "/llmprompt")):
            what = f"{route} stream {limit + 1} from {source}: {received.summary()}"
            self.assertEqual(received.status(sid), 503, what)
            self.assertTrue(received.header(sid, "retry-after"), what)
            self.assertEqual(received.header(sid, "content-type"), "application/json", what)
            self.assertIn("error", json.loads(received.body(sid)))
        reached = [r for r in emulator.requests if refused_text.encode() in r.body]
        self.assertFalse(reached, "a refused stream reached Ollama")
        rows = await deferToThread(query, self.srv.dsn, "SELECT count(*) FROM chatts WHERE message = %s",
                                   (refused_text,))
        self.assertEqual(rows, [(0,)], "a refused stream was stored")
        self.assertEqual(ro.status(osid), 200, f"the other address: {ro.summary()}")
        self.assertEqual(read_as_phone(ro.body(osid)).bubble, "Hello, world!")
        self.assertIn("POST /llmchat 503", self.srv.output())


class PerClientTests(_PerClientCase):
    """
    Item 3 with --max-client-connections 3 --max-client-streams 2.
    """

    name = "fair"
    options = FAIR
    with_metrics = True

    async def test_connections_beyond_the_limit_closed_at_accept(self) -> None:
        """
        The 4th connection from one address is closed at accept, before
        the TLS handshake; other addresses are accepted; the refusal is
        counted in the metrics and logged once (rate-limited).
        """
        before = self.srv.output()
        held = await deferToThread(self.hold_connections, "127.0.0.5", 3)
        try:
            refusals = [await deferToThread(refused_at_accept, self.srv.port, "127.0.0.5") for _ in range(5)]
            self.assertTrue(all(how in ("eof", "reset") for how in refusals),
                            f"connections 4-8 from 127.0.0.5: {refusals} (None: accepted, awaiting TLS)")
            await self.assert_served("127.0.0.8")
        finally:
            for c in held:
                c.close()
        text = await deferToThread(self.srv.metrics)
        self.assertGreaterEqual(metric(text, "chatterd_client_limit_refusals_total", 'limit="connections"'), 5)
        lines = [line for line in self.srv.output()[len(before):].splitlines()
                 if "127.0.0.5" in line and re.search(r"(?i)refus|limit|too many|max-client", line)]
        self.assertTrue(1 <= len(lines) <= 2, f"log lines about 127.0.0.5: {lines}")

    async def test_connection_freed_is_reusable(self) -> None:
        """
        Once one of its connections closes, the address may connect again.
        """
        await self.assert_connection_limit("127.0.0.9", 3, "127.0.0.10")

    async def test_streams_beyond_the_limit_get_503(self) -> None:
        """
        The 3rd concurrent /llmchat or /llmprompt stream from one address
        (over two connections) gets 503 + retry-after + JSON; nothing is
        stored or sent to Ollama; another address is served; counted in the
        metrics and in the access log.
        """
        await self.assert_stream_limit("127.0.0.6", 2, "127.0.0.7")
        text = await deferToThread(self.srv.metrics)
        self.assertGreaterEqual(metric(text, "chatterd_client_limit_refusals_total", 'limit="streams"'), 2)


class PerClientDefaultTests(_PerClientCase):
    """
    Item 3 with the defaults: a quarter of --max-streams (8 -> 2)
    and 1024 connections per address.
    """

    name = "defaults"
    options = DEFAULTS
    with_metrics = True

    async def test_default_stream_share_is_a_quarter(self) -> None:
        """With --max-streams 8, the 3rd stream from one address gets 503."""
        await self.assert_stream_limit("127.0.0.11", 2, "127.0.0.12")

    async def test_default_connection_limit_is_1024(self) -> None:
        """1024 connections from one address are accepted, the 1025th is not."""
        await self.assert_connection_limit("127.0.0.13", 1024, "127.0.0.14")


class PerClientOffTests(_EdgeCase):
    """
    ``0`` turns either per-client limit off.
    """

    name = "off"
    options = OFF

    async def test_no_connection_limit(self) -> None:
        """1100 connections from one address (more than the default 1024), and it is still served."""
        def attack() -> None:
            held: list[Attacker] = []
            try:
                for _ in range(1100):
                    held.append(self.attacker("127.0.0.15", handshake=False, timeout=PROMPTLY + 2))
                served(LOCAL, self.srv.port, self.srv.cafile, source="127.0.0.15", timeout=PROMPTLY + 2)
            finally:
                for c in held:
                    c.close()

        await deferToThread(attack)

    async def test_no_stream_limit(self) -> None:
        """Three streams from one address (more than a quarter of 8) all run."""
        emulator = await start_emulator(self)
        emulator.models["stall"] = Behaviour(reply=["Part", "ial"], stall_after=1)
        tag = uuid.uuid4().hex[:8]

        def attack() -> list[int | None]:
            with self.attacker("127.0.0.16") as c:
                sids = [post(c, "/llmchat", chat_body(f"off-{tag}-{i}", "stall")) for i in range(3)]
                return [c.wait_response(sid, PROMPTLY + 2) for sid in sids]

        self.assertEqual(await deferToThread(attack), [200, 200, 200])
