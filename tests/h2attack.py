"""
A hostile HTTP/2-over-TLS client for the edge tests: raw frames, built with
``hyperframe`` and ``hpack`` and written straight to the socket, so it can
send what no well-behaved library would (a header block that never ends, a
frame that declares 16 MiB, WINDOW_UPDATE 0, ten thousand PINGs...).

- Frame builders: :func:`headers`, :func:`continuation`, :func:`data`,
  :func:`ping`, :func:`settings`, :func:`priority`, :func:`window_update`,
  :func:`rst_stream`, and :func:`frame_header` for any declared length.
- :class:`Attacker`: one connection (TLS with ALPN ``h2``, optionally bound
  to another source address such as ``127.0.0.2``), a reader that decodes
  what the server sends (GOAWAY, RST_STREAM, HEADERS via ``hpack``, DATA,
  SETTINGS, PING ACKs) and :meth:`Attacker.flood`, which streams a flood
  from a generator and stops as soon as the server closes.
- :func:`served`: is a normal client (the ``h2`` library, verifying the
  certificate) served at once?
- :func:`rss`, :class:`MemoryWatch`: the server process's memory, from
  ``/proc/<pid>/status``.

Everything here blocks: run it in a thread (``deferToThread``).
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
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
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.tlsclient import Reply, context

__all__ = [
    "INITIAL_WINDOW_SIZE", "MAX_WINDOW", "Attacker", "ErrorCodes", "GoAway", "MemoryWatch", "Received", "code_name",
    "continuation", "data", "frame_header", "header_block", "headers", "ping", "priority", "repeat", "rss",
    "rst_stream", "served", "settings", "window_update",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = SettingsFrame.INITIAL_WINDOW_SIZE
MAX_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1


# --- frames ----------------------------------------------------------------------


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """
    A 9-byte frame header declaring ``length`` (up to 2**24 - 1, whatever
    the payload that follows).
    """
    return struct.pack(">I", length)[1:] + struct.pack(">BBI", kind, flags, stream_id & 0x7FFFFFFF)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


def headers(stream_id: int, block: bytes, *, end_headers: bool = True, end_stream: bool = False) -> bytes:
    """
    A HEADERS frame carrying (part of) an encoded header ``block``.
    """
    return _frame(HEADERS, (END_HEADERS if end_headers else 0) | (END_STREAM if end_stream else 0), stream_id, block)


def continuation(stream_id: int, block: bytes, *, end_headers: bool = False) -> bytes:
    return _frame(CONTINUATION, END_HEADERS if end_headers else 0, stream_id, block)


def data(stream_id: int, payload: bytes = b"", *, end_stream: bool = False) -> bytes:
    return _frame(DATA, END_STREAM if end_stream else 0, stream_id, payload)


def ping(opaque: bytes = b"\0" * 8, *, ack: bool = False) -> bytes:
    return _frame(PING, ACK if ack else 0, 0, opaque)


def settings(values: dict[int, int] | None = None, *, ack: bool = False) -> bytes:
    """
    A SETTINGS frame (empty by default: a valid, useless one).
    """
    payload = b"".join(struct.pack(">HI", k, v) for k, v in (values or {}).items())
    return _frame(SETTINGS, ACK if ack else 0, 0, payload)


settings_frame = settings  # for where a parameter is called ``settings``


def priority(stream_id: int, depends_on: int = 0, weight: int = 16, *, exclusive: bool = False) -> bytes:
    dependency = depends_on | (0x80000000 if exclusive else 0)
    return _frame(PRIORITY, 0, stream_id, struct.pack(">IB", dependency, weight - 1))


def window_update(stream_id: int, increment: int) -> bytes:
    """
    A WINDOW_UPDATE; ``increment`` 0 is accepted (that is the point).
    """
    return _frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment & 0x7FFFFFFF))


def rst_stream(stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
    return _frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def header_block(
    method: str = "GET", path: str = "/", extra: Iterable[tuple[str, str]] = (), *,
    authority: str = "127.0.0.1", encoder: hpack.Encoder | None = None, huffman: bool = True,
) -> bytes:
    """
    A request's header block, HPACK-encoded (with a fresh encoder unless
    one is given: then the server's dynamic table must follow it).  Huffman
    coding of a 200 KB value takes seconds in pure Python: turn it off for those.
    """
    fields = [(":method", method), (":path", path), (":scheme", "https"), (":authority", authority), *extra]
    return (encoder or hpack.Encoder()).encode(fields, huffman=huffman)


# --- the attacking connection ----------------------------------------------------


def code_name(code: int | None) -> str:
    """An HTTP/2 error code's name (``"none"`` for ``None``)."""
    if code is None:
        return "none"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return hex(code)


@dataclass
class GoAway:
    error_code: int
    last_stream_id: int
    debug: bytes

    def __str__(self) -> str:
        return f"GOAWAY {code_name(self.error_code)} (last stream {self.last_stream_id}, {self.debug!r})"


@dataclass
class Received:
    """
    What the server has sent on one connection, so far.

    :ivar closed: ``None`` while open, else how it ended: ``"eof"`` (TCP FIN
        or TLS close), ``"reset"`` (RST), or the error's text.
    """

    settings: dict[int, int] = field(default_factory=dict)
    goaway: GoAway | None = None
    resets: dict[int, int] = field(default_factory=dict)
    headers: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    bodies: dict[int, bytearray] = field(default_factory=dict)
    #: DATA bytes received per stream (kept even when bodies are not).
    data_bytes: Counter[int] = field(default_factory=Counter)
    ended: set[int] = field(default_factory=set)
    ping_acks: int = 0
    #: The opaque data of the last PING ACK.
    last_ping_ack: bytes = b""
    settings_acks: int = 0
    frames: Counter[str] = field(default_factory=Counter)
    closed: str | None = None
    #: A send timed out: the server stopped reading (the connection is unusable).
    stalled: bool = False

    def status(self, stream_id: int) -> int | None:
        for name, value in self.headers.get(stream_id, []):
            if name == ":status":
                return int(value)
        return None

    def header(self, stream_id: int, name: str) -> str | None:
        for key, value in self.headers.get(stream_id, []):
            if key == name:
                return value
        return None

    def body(self, stream_id: int) -> bytes:
        return bytes(self.bodies.get(stream_id, b""))

    def summary(self) -> str:
        """One line for assertion messages."""
        goaway = str(self.goaway) if self.goaway else "no GOAWAY"
        statuses = {s: self.status(s) for s in list(self.headers)[:5]}
        resets = {s: code_name(c) for s, c in list(self.resets.items())[:5]}
        closed = f"{self.closed}{' (a send stalled)' if self.stalled else ''}"
        return f"{goaway}; closed: {closed}; statuses: {statuses}; resets: {resets}; frames: {dict(self.frames)}"


class Attacker:
    """
    One raw HTTP/2 connection over TLS to ``host:port``.

    :param source: the local address to bind (another "client"), e.g. ``127.0.0.2``.
    :param settings: our SETTINGS (e.g. ``{INITIAL_WINDOW_SIZE: 0}``).
    :param grant: send WINDOW_UPDATEs for DATA received (as a normal client
        does, once half a window is consumed); ``False`` keeps windows shut.
    :param rcvbuf: the socket's receive buffer, set before connecting (a
        small one makes a client that stops reading stall the server quickly).
    :param keep_bodies: keep DATA payloads (else only count them).
    """

    def __init__(
        self, host: str, port: int, *, source: str | None = None, settings: dict[int, int] | None = None,
        grant: bool = True, rcvbuf: int | None = None, keep_bodies: bool = True, timeout: float = 10.0,
        handshake: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.received = Received()
        self.grant = grant
        self.keep_bodies = keep_bodies
        self.encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._buffer = bytearray()
        self._block: tuple[int, int, bytearray] | None = None  # a header block being received
        self._streams = itertools.count(1, 2)
        self._pings = itertools.count(0x5359_4E43_0000_0000)  # "SYNC"
        self._local = dict(settings or {})
        self._window = 65535  # ours to send on, per connection
        self._initial = 65535  # ... and per stream, as the server set it
        self._windows: dict[int, int] = {}
        self._unacked: Counter[int] = Counter()
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        try:
            if source is not None:
                raw.bind((source, 0))
            raw.connect((host, port))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # an attacker trusts anything
            ctx.set_alpn_protocols(["h2"])
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        if self.sock.selected_alpn_protocol() != "h2":
            self.sock.close()
            raise AssertionError(f"ALPN chose {self.sock.selected_alpn_protocol()!r}, not h2")
        if handshake:
            self.send(PREFACE + settings_frame(self._local))
            if not self.read_until(lambda: self.received.frames["SETTINGS"] > 0, timeout):
                raise AssertionError(f"no SETTINGS from the server: {self.received.summary()}")

    # --- sending ---

    def next_stream(self) -> int:
        return next(self._streams)

    def send(self, payload: bytes) -> bool:
        """
        Send ``payload`` whole; ``False`` if the connection broke (then
        :attr:`received` ``.closed`` says how) or the server stopped reading
        for the whole timeout (``.stalled``).
        """
        if self.received.closed is not None or self.received.stalled:
            return False
        try:
            self.sock.sendall(payload)
            return True
        except TimeoutError:
            self.received.stalled = True
            return False
        except (OSError, ssl.SSLError) as e:
            self._closed(e)
            return False

    def request(
        self, method: str = "GET", path: str = "/", extra: Iterable[tuple[str, str]] = (), *,
        end_stream: bool = True, stream_id: int | None = None,
    ) -> int:
        """
        Open a stream with one HEADERS frame; returns its id.
        """
        stream_id = self.next_stream() if stream_id is None else stream_id
        self._windows.setdefault(stream_id, self._initial)
        block = header_block(method, path, extra, authority=f"{self.host}:{self.port}", encoder=self.encoder)
        self.send(headers(stream_id, block, end_stream=end_stream))
        return stream_id

    def send_body(self, stream_id: int, body: bytes, *, end_stream: bool = True, timeout: float = 10.0) -> int:
        """
        Send ``body`` on a stream in DATA frames as the windows allow, reading
        the server's frames meanwhile; returns how much was sent (less if the
        stream or the connection ended, or the windows stayed shut).
        """
        sent = 0
        deadline = time.monotonic() + timeout
        while sent < len(body) or end_stream:
            if self._stream_over(stream_id):
                break
            room = min(self._window, self._windows.get(stream_id, self._initial), MAX_FRAME_SIZE, len(body) - sent)
            if room <= 0 and sent < len(body):
                if time.monotonic() > deadline or not self.read_until(
                    lambda: self._stream_over(stream_id)
                    or min(self._window, self._windows.get(stream_id, self._initial)) > 0,
                    deadline - time.monotonic(),
                ):
                    break
                continue
            last = end_stream and sent + room >= len(body)
            if not self.send(data(stream_id, body[sent:sent + room], end_stream=last)):
                break
            sent += room
            self._window -= room
            self._windows[stream_id] = self._windows.get(stream_id, self._initial) - room
            self.poll()
            if last:
                break
        return sent

    def _stream_over(self, stream_id: int) -> bool:
        r = self.received
        return r.closed is not None or r.goaway is not None or stream_id in r.resets or stream_id in r.ended

    def flood(self, chunks: Iterable[bytes], *, timeout: float = 60.0, until_goaway: bool = False) -> int:
        """
        Send ``chunks`` one after another (a generator: the flood is never
        built whole), reading the server's frames between them; stop as soon
        as the server closes (or, with ``until_goaway``, sends GOAWAY), or
        after ``timeout``.  Returns the bytes sent.
        """
        sent = 0
        deadline = time.monotonic() + timeout
        for chunk in chunks:
            self.poll()
            if self.received.closed is not None or (until_goaway and self.received.goaway is not None):
                break
            view = memoryview(chunk)
            while view and self.received.closed is None:
                readable, writable = _ready(self.sock, 1.0, write=True)
                if readable or self.sock.pending():
                    self._read_some()
                if writable and self.received.closed is None:
                    try:
                        n = self.sock.send(view[:65536])
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, TimeoutError):
                        continue
                    except (OSError, ssl.SSLError) as e:
                        self._closed(e)
                        break
                    sent += n
                    view = view[n:]
                if time.monotonic() > deadline:
                    return sent
        return sent

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- receiving ---

    def poll(self) -> None:
        """Read whatever has arrived, without waiting."""
        while self.received.closed is None:
            readable, _ = _ready(self.sock, 0)
            if not (readable or self.sock.pending()):
                return
            self._read_some()

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """
        Read frames until ``done()`` holds (``True``), or the connection
        closes or ``timeout`` passes (``done()`` then).
        """
        deadline = time.monotonic() + max(timeout, 0)
        while not done() and self.received.closed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _ = _ready(self.sock, min(left, 0.5))
            if readable or self.sock.pending():
                self._read_some()
        return done()

    def sync(self, timeout: float) -> bool:
        """
        Send a PING and read until its ACK, a GOAWAY or a close: once the ACK
        is in, the server has processed everything sent before it.  ``True``
        if the ACK came.
        """
        opaque = next(self._pings).to_bytes(8, "big")
        self.send(ping(opaque))
        r = self.received
        self.read_until(lambda: r.last_ping_ack == opaque or r.goaway is not None, timeout)
        return r.last_ping_ack == opaque

    def wait_closed(self, timeout: float) -> bool:
        """Read (and answer nothing) until the server closes; ``True`` if it did."""
        return self.read_until(lambda: self.received.closed is not None, timeout)

    def wait_goaway(self, timeout: float) -> GoAway | None:
        """Read until a GOAWAY arrives (or a close): the GOAWAY, if any."""
        self.read_until(lambda: self.received.goaway is not None, timeout)
        return self.received.goaway

    def wait_stream(self, stream_id: int, timeout: float) -> bool:
        """Read until the stream ended (END_STREAM or RST_STREAM) or the connection did."""
        return self.read_until(lambda: self._stream_over(stream_id), timeout)

    def wait_response(self, stream_id: int, timeout: float) -> int | None:
        """Read until the stream's response headers (or its end): the status, if any."""
        self.read_until(lambda: self.received.status(stream_id) is not None or self._stream_over(stream_id), timeout)
        return self.received.status(stream_id)

    def _read_some(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ssl.SSLWantReadError, TimeoutError):
            return
        except ssl.SSLZeroReturnError:
            chunk = b""
        except (OSError, ssl.SSLError) as e:
            self._closed(e)
            return
        if not chunk:
            self._closed(None)
            return
        self._buffer += chunk
        self._parse()

    def _closed(self, error: BaseException | None) -> None:
        if self.received.closed is not None:
            return
        if error is None or isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            self.received.closed = "eof"
        elif isinstance(error, (ConnectionResetError, BrokenPipeError)):
            self.received.closed = "reset"
        else:
            self.received.closed = f"{type(error).__name__}: {error}"

    def _parse(self) -> None:
        out = bytearray()
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer)[:9])
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(self._buffer[9:9 + length])))
            del self._buffer[:9 + length]
            out += self._on_frame(frame, length)
        if out:
            self.send(bytes(out))

    def _on_frame(self, frame: Frame, length: int) -> bytes:
        r = self.received
        r.frames[type(frame).__name__.removesuffix("Frame").upper()] += 1
        answer = b""
        if isinstance(frame, SettingsFrame):
            if "ACK" in frame.flags:
                r.settings_acks += 1
            else:
                r.settings.update(frame.settings)
                if INITIAL_WINDOW_SIZE in frame.settings:
                    delta = frame.settings[INITIAL_WINDOW_SIZE] - self._initial
                    self._initial = frame.settings[INITIAL_WINDOW_SIZE]
                    for stream in self._windows:
                        self._windows[stream] += delta
                answer = settings(ack=True)
        elif isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                r.ping_acks += 1
                r.last_ping_ack = bytes(frame.opaque_data)
            else:
                answer = ping(frame.opaque_data, ack=True)
        elif isinstance(frame, GoAwayFrame):
            if r.goaway is None:  # the first says why; any later ones repeat or follow it
                r.goaway = GoAway(frame.error_code, frame.last_stream_id, bytes(frame.additional_data))
        elif isinstance(frame, RstStreamFrame):
            # the first says why; later ones answer frames the client sent after it (STREAM_CLOSED)
            r.resets.setdefault(frame.stream_id, frame.error_code)
        elif isinstance(frame, WindowUpdateFrame):
            if frame.stream_id:
                window = self._windows.get(frame.stream_id, self._initial)
                self._windows[frame.stream_id] = window + frame.window_increment
            else:
                self._window += frame.window_increment
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            if isinstance(frame, HeadersFrame):
                self._block = (frame.stream_id, "END_STREAM" in frame.flags, bytearray(frame.data))
            elif self._block is not None:
                self._block[2].extend(frame.data)
            if "END_HEADERS" in frame.flags and self._block is not None:
                stream, ends, block = self._block
                self._block = None
                fields = [(str(k), str(v)) for k, v in self._decoder.decode(bytes(block), raw=False)]
                r.headers.setdefault(stream, []).extend(fields)
                if ends:
                    r.ended.add(stream)
        elif isinstance(frame, DataFrame):
            r.data_bytes[frame.stream_id] += len(frame.data)
            if self.keep_bodies:
                r.bodies.setdefault(frame.stream_id, bytearray()).extend(frame.data)
            if "END_STREAM" in frame.flags:
                r.ended.add(frame.stream_id)
            if self.grant and length:
                answer = self._grant(frame.stream_id, length)
        return answer

    def _grant(self, stream_id: int, length: int) -> bytes:
        """WINDOW_UPDATEs once half the default window is consumed, as h2 does."""
        out = b""
        for key in (0, stream_id):
            self._unacked[key] += length
            if self._unacked[key] >= 32768:
                if key == 0 or stream_id not in self.received.ended:
                    out += window_update(key, self._unacked[key])
                self._unacked[key] = 0
        return out


# --- floods --------------------------------------------------------------------------


def _ready(sock: socket.socket, timeout: float, *, write: bool = False) -> tuple[bool, bool]:
    """
    Whether ``sock`` is readable (and, with ``write``, writable) within
    ``timeout`` seconds: ``poll``, as ``select`` takes no descriptor over 1023
    (a test holding a thousand connections has such).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN | (select.POLLOUT if write else 0))
    events = 0
    for _, mask in poller.poll(timeout * 1000):
        events |= mask
    return bool(events & (select.POLLIN | select.POLLERR | select.POLLHUP)), bool(events & select.POLLOUT)


def repeat(frame: bytes, count: int, *, batch: int = 65536) -> Iterator[bytes]:
    """
    ``count`` copies of ``frame``, yielded about ``batch`` bytes at a time.
    """
    per = max(1, batch // len(frame))
    whole = frame * per
    full, rest = divmod(count, per)
    for _ in range(full):
        yield whole
    if rest:
        yield frame * rest


# --- a normal client ---------------------------------------------------------------


def served(
    host: str, port: int, cafile: str, *, source: str | None = None, path: str = "/", timeout: float = 5.0,
) -> Reply:
    """
    One ordinary HTTP/2 request (the ``h2`` library, certificate verified)
    from ``source``; raises if it is not answered within ``timeout``.
    """
    ctx = context(cafile, alpn=["h2"])
    with socket.create_connection((host, port), timeout=timeout, source_address=(source or "", 0)) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "GET"), (":path", path), (":scheme", "https"),
                                       (":authority", f"{host}:{port}")], end_stream=True)
            sock.sendall(conn.data_to_send())
            reply = Reply(0, {}, b"", sock.selected_alpn_protocol(), "HTTP/2")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        fields = {k.decode(): v.decode() for k, v in event.headers}
                        reply.status = int(fields.pop(":status"))
                        reply.headers = fields
                    elif isinstance(event, h2.events.DataReceived):
                        reply.chunks.append(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        reply.body = b"".join(reply.chunks)
                        return reply
                sock.sendall(conn.data_to_send())
            raise TimeoutError(f"GET {path} not answered within {timeout} s")


# --- the server's memory --------------------------------------------------------------


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{name} not in /proc/{pid}/status")


def rss(pid: int) -> int:
    """The process's resident set size now, in bytes."""
    return _status_field(pid, "VmRSS")


class MemoryWatch:
    """
    How much a process's resident memory grew while the ``with`` block ran:
    its peak (``VmHWM``, reset at the start by writing 5 to ``clear_refs``)
    minus what it was at the start.  Where the peak cannot be reset, the
    growth is measured at the end instead.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.after = 0
        self.peak_known = False

    def __enter__(self) -> MemoryWatch:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.peak_known = True
        except OSError:
            self.peak_known = False
        self.before = rss(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.after = _status_field(self.pid, "VmHWM") if self.peak_known else rss(self.pid)

    @property
    def growth(self) -> int:
        return max(0, self.after - self.before)

    def __str__(self) -> str:
        return f"RSS grew {self.growth / 2**20:.1f} MiB ({'peak' if self.peak_known else 'at the end'})"

