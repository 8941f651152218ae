"""
A lean Ollama emulator for benchmarks: asyncio, ``POST /api/chat`` only.

It speaks the same wire format as ``tests/ollama_emulator.py`` (Go-style
compact JSON lines, ``application/x-ndjson``, one chunk of chunked transfer
encoding per line, keep-alive) for the same ``bench-<frames>x<delay_ms>ms-<first_ms>ms``
model names, at a fraction of its cost per line (~15-25 µs instead of ~60 µs
on the reference VM, most of it the ``send`` system call): lines are
pre-encoded, plain-TCP sockets are driven straight from the selector (no
transport layer), and every stream due in the same millisecond is written by
one timer callback.
Line ``k`` (``k = 0 .. frames``, the last one being ``done``) is due at
``start + first + k * delay`` on an absolute schedule, so a late tick does not
push back the rest of the stream.

Run it as a process::

    python -m bench.emulator --port 0 --print-port [--tls-port 0 --cert C --key K]

It prints ``<port> <tls_port>`` on its first stdout line and exits after
``--max-seconds`` at the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable

BENCH_NAME = re.compile(r"^bench-(\d+)x(\d+)ms-(\d+)ms(?::latest)?$")
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
_HEAD_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_MAX_HEAD = 64 * 1024


def go_json(obj: object) -> bytes:
    """Compact JSON with UTF-8 text, as Go's ``json.Marshal`` (no HTML characters occur here)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_second = -1
_prefix = b""


def created_at() -> bytes:
    """The current UTC time as Go prints it: RFC 3339 with nanoseconds, trailing zeros trimmed."""
    global _second, _prefix
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    if second != _second:
        _second, _prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return _prefix + (b"." + (b"%09d" % nanos).rstrip(b"0") if nanos else b"") + b"Z"


def chunk(line: bytes) -> bytes:
    """One line as one chunk of chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(line), line)


class Model:
    """The pre-encoded pieces of one ``bench-...`` model's answer."""

    def __init__(self, name: str, frames: int, delay: float, first: float) -> None:
        self.name = name
        self.frames = frames
        self.delay = delay
        self.first = first
        self.head = b'{"model":' + go_json(name) + b',"created_at":"'
        say = b'","message":{"role":"assistant","content":'
        self.tails = [say + go_json(WORDS[i % len(WORDS)]) + b'},"done":false}\n' for i in range(frames)]

    @classmethod
    def parse(cls, name: str) -> Model | None:
        match = BENCH_NAME.match(name)
        if match is None:
            return None
        frames, delay_ms, first_ms = (int(g) for g in match.groups())
        return cls(name, frames, delay_ms / 1000, first_ms / 1000)

    def line(self, k: int, started_ns: int, prompt_tokens: int) -> bytes:
        """Line ``k``: a content chunk for ``k < frames``, else the ``done`` line."""
        if k < self.frames:
            return self.head + created_at() + self.tails[k]
        total = max(time.monotonic_ns() - started_ns, 100)
        load = max(min(int(self.first * 1e9) or total // 20, total - 2), 1)
        prompt = max((total - load) // 10, 1)
        final = (
            b'","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,'
            b'"total_duration":%d,"load_duration":%d,"prompt_eval_count":%d,'
            b'"prompt_eval_duration":%d,"eval_count":%d,"eval_duration":%d}\n'
            % (total, load, prompt_tokens, prompt, max(self.frames, 1), max(total - load - prompt, 1))
        )
        return self.head + created_at() + final


class Ticker:
    """Runs callbacks at absolute loop times, batched per millisecond (one timer per batch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[int, list[Callable[[], None]]] = {}

    def at(self, when: float, fn: Callable[[], None]) -> None:
        key = math.ceil(when * 1000)
        batch = self._due.get(key)
        if batch is None:
            batch = self._due[key] = []
            self._loop.call_at(key / 1000, self._fire, key)
        batch.append(fn)

    def _fire(self, key: int) -> None:
        for fn in self._due.pop(key, ()):
            fn()


class Emulator:
    """Shared state: models by name, the ticker, and counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ticker = Ticker(loop)
        self.models: dict[str, Model | None] = {}
        self.lines = 0

    def model(self, name: str) -> Model | None:
        if name not in self.models:
            self.models[name] = Model.parse(name)
        return self.models[name]


class Stream:
    """One streamed answer on one connection."""

    def __init__(self, conn: Connection, model: Model, prompt_tokens: int) -> None:
        self.conn = conn
        self.model = model
        self.tokens = prompt_tokens
        self.k = 0
        self.started_ns = time.monotonic_ns()
        self.t0 = conn.loop.time() + model.first
        self.active = True

    def start(self) -> None:
        self.conn.write(_HEAD_200)
        m = self.model
        if m.delay == 0 and not m.first:
            self.burst()
        elif m.delay == 0:
            self.conn.emu.ticker.at(self.t0, self.burst)
        else:
            self.conn.emu.ticker.at(self.t0, self.step)

    def burst(self) -> None:
        """No delay: every line at once (one write; the kernel coalesces anyway)."""
        if not self.active:
            return
        m = self.model
        lines = [chunk(m.line(k, self.started_ns, self.tokens)) for k in range(m.frames + 1)]
        self.conn.emu.lines += len(lines)
        self.conn.write(b"".join(lines) + _LAST_CHUNK)
        self.finish()

    def step(self) -> None:
        if not self.active:
            return
        m = self.model
        data = chunk(m.line(self.k, self.started_ns, self.tokens))
        self.conn.emu.lines += 1
        if self.k == m.frames:
            self.conn.write(data + _LAST_CHUNK)
            self.finish()
            return
        self.conn.write(data)
        self.k += 1
        self.conn.emu.ticker.at(self.t0 + self.k * m.delay, self.step)

    def finish(self) -> None:
        self.active = False
        self.conn.stream = None
        self.conn.next_request()


class Connection:
    """
    An HTTP/1.1 server connection: keep-alive, Content-Length or chunked
    request bodies.  Subclasses move the bytes (:meth:`write`, :meth:`close`).
    """

    def __init__(self, emu: Emulator, loop: asyncio.AbstractEventLoop) -> None:
        self.emu = emu
        self.loop = loop
        self.buf = b""
        self.stream: Stream | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def lost(self) -> None:
        """The peer went away: stop the stream."""
        self.closed = True
        if self.stream is not None:
            self.stream.active = False
            self.stream = None

    def received(self, data: bytes) -> None:
        self.buf += data
        if self.stream is None:
            self.next_request()

    def next_request(self) -> None:
        """Answer the next complete request in the buffer, if any."""
        while self.stream is None and not self.closed:
            parsed = self._parse()
            if parsed is None:
                return
            self._answer(*parsed)

    def _parse(self) -> tuple[str, str, bytes] | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._send(431, b'{"error":"request header too large"}', close=True)
            return None
        head = self.buf[:end].decode("latin-1").split("\r\n")
        method, path, _ = (head[0].split(" ") + ["", ""])[:3]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self.buf[end + 4:]
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, used = _dechunk(rest)
            if body is None:
                return None
        else:
            used = int(headers.get("content-length") or 0)
            if len(rest) < used:
                return None
            body = rest[:used]
        self.buf = rest[used:]
        return method, path, body

    def _answer(self, method: str, path: str, body: bytes) -> None:
        if method in ("GET", "HEAD") and path == "/":
            self._send(200, b"Ollama is running", ctype=b"text/plain; charset=utf-8")
            return
        if method != "POST" or path != "/api/chat":
            self._send(404, b"404 page not found", ctype=b"text/plain; charset=utf-8")
            return
        try:
            payload = json.loads(body)
            name = payload["model"]
        except (ValueError, KeyError, TypeError):
            self._send(400, b'{"error":"invalid request"}')
            return
        model = self.emu.model(str(name))
        if model is None:
            self._send(404, go_json({"error": f"model '{name}' not found"}))
            return
        messages = payload.get("messages") or []
        tokens = 10 + sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        self.stream = Stream(self, model, tokens)
        self.stream.start()

    def _send(self, status: int, body: bytes, ctype: bytes = b"application/json; charset=utf-8",
              close: bool = False) -> None:
        self.write(
            b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, ctype, len(body), body)
        )
        if close:
            self.close()


class SocketConnection(Connection):
    """
    A plain TCP connection driven straight from the selector: ``send`` is
    tried at once and only what the kernel refuses is buffered (no transport
    layer: this is the hot path of every benchmark).
    """

    def __init__(self, emu: Emulator, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        super().__init__(emu, loop)
        self.sock = sock
        self.fd = sock.fileno()
        self.out = b""
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.received(data)
        else:
            self.close()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.out = data[sent:]
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        self.loop.remove_reader(self.fd)
        if self.out:
            self.loop.remove_writer(self.fd)
        self.sock.close()
        self.lost()


class ProtocolConnection(Connection, asyncio.Protocol):
    """A connection through an asyncio transport (the TLS listener)."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.transport.close()
        self.lost()


def listen(loop: asyncio.AbstractEventLoop, emu: Emulator, host: str, port: int) -> socket.socket:
    """A plain listener whose connections are :class:`SocketConnection`."""
    server = socket.create_server((host, port), backlog=4096)
    server.setblocking(False)

    def accept() -> None:
        for _ in range(256):
            try:
                sock, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and kin: try again on the next wakeup
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            SocketConnection(emu, loop, sock)

    loop.add_reader(server.fileno(), accept)
    return server


def _dechunk(data: bytes) -> tuple[bytes | None, int]:
    """A complete chunked body from ``data`` and the bytes it used, or ``(None, 0)``."""
    parts, pos = [], 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(data[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            trailer = data.find(b"\r\n", start)
            return (b"".join(parts), trailer + 2) if trailer >= 0 else (None, 0)
        if len(data) < start + size + 2:
            return None, 0
        parts.append(data[start:start + size])
        pos = start + size + 2


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    emu = Emulator(loop)
    server = listen(loop, emu, args.host, args.port)
    ports = [server.getsockname()[1], 0]
    if args.tls_port is not None:
        tls = await loop.create_server(
            lambda: ProtocolConnection(emu, loop), args.host, args.tls_port, backlog=4096,
            ssl=server_tls(args.cert, args.key),
        )
        ports[1] = tls.sockets[0].getsockname()[1]
    if args.print_port:
        print(*ports, flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    loop.call_later(args.max_seconds, lambda: stop.done() or stop.set_result(None))
    await stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=None)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--print-port", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("bench.emulator listens on loopback only")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
