"""
The load generator: an asyncio process that opens streams, checks every frame
and times them, and samples the server's CPU and memory from ``/proc``.

It reads one JSON :class:`Spec` on stdin and writes one JSON result on stdout::

    echo '{"port": 8080, "streams": 10, ...}' | python -m bench.loadgen

Transports: ``h1`` (HTTP/1.1 over TCP), ``h1-tls`` (HTTP/1.1 over TLS, a new
connection per stream) and ``h2-tls`` (HTTP/2 over TLS with ALPN ``h2``, the
streams multiplexed over ``connections`` connections).  Formats: ``sse``
(chatterd's ``/llmchat``), ``ndjson`` (Ollama's ``/api/chat``, the direct
path) and ``json-array`` (``/getchatts``).

A stream passes if it got status 200, exactly ``frames + 1`` frames that are
JSON objects with a string ``model`` and an object ``message``, the last one
and only the last one ``"done": true``, no ``event: error`` and no
``{"error": ...}``, and a proper end of the response.
"""

from __future__ import annotations

import asyncio
import json
import resource
import selectors
import socket
import ssl
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.procs import cpu_seconds, raise_nofile, rss_bytes

now = time.perf_counter
_decode = json.JSONDecoder().decode  # json.loads minus its per-call checks


@dataclass
class Spec:
    """One load run."""

    port: int
    host: str = "127.0.0.1"
    transport: str = "h1"  # h1 | h1-tls | h2-tls
    format: str = "sse"  # sse | ndjson | json-array
    path: str = "/llmchat"
    method: str = "POST"
    cafile: str | None = None
    streams: int = 1
    concurrency: int = 0  # 0: all at once (after the ramp)
    ramp_s: float = 0.0  # spread the starts evenly over this long
    connections: int = 1  # h2 only
    model: str = "bench-10x0ms-0ms"
    frames: int = 10  # content frames per stream; one more "done" frame follows
    appid_prefix: str = "bench"
    history: int = 1  # messages sent per request
    server_pids: list[int] = field(default_factory=list)
    load_pids: list[int] = field(default_factory=list)
    sample_s: float = 0.05
    timeout_s: float = 60.0
    settle_s: float = 1.0  # wait at most this long for the server's CPU to go quiet at the end
    keep_body: bool = False  # json-array: parse the whole body (small tables only)
    poll_s: float = 0.0  # at most one poll of the sockets per this long (batches wakeups)


class Failed(Exception):
    """A stream broke one of the rules; the message is its error category."""


class Record:
    """What one stream saw."""

    __slots__ = ("t0", "t_conn", "t_first", "t_last", "t_end", "frames", "done", "error", "status",
                 "detail", "nbytes", "rows", "tail", "body")

    def __init__(self) -> None:
        self.t0 = self.t_conn = self.t_first = self.t_last = self.t_end = 0.0
        self.frames = 0
        self.done = False
        self.error: str | None = None
        self.status = 0
        self.detail = ""
        self.nbytes = 0
        self.rows = 0
        self.tail = b""
        self.body: list[bytes] | None = None


# --- frames ------------------------------------------------------------------


class Frames:
    """
    Splits a body into frames (SSE events or NDJSON lines), checks and times
    each, and calls ``on_end`` when the stream is over.
    """

    def __init__(self, rec: Record, fmt: str, expect: int, gaps: array, on_end: Callable[[], None]) -> None:
        self.rec = rec
        self.fmt = fmt
        self.expect = expect
        self.gaps = gaps
        self.buf = b""
        self.on_end = on_end
        self.ended = False
        self._sep = b"\n\n" if fmt == "sse" else b"\n"

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        if self.fmt == "json-array":
            self._array(data)
            return
        if not self.buf and data.endswith(self._sep) and data.count(self._sep) == 1:
            parts = [data[:-len(self._sep)]]  # the usual case: one whole frame per read
        else:
            buf = self.buf + data if self.buf else data
            parts = buf.split(self._sep)
            self.buf = parts.pop()
        try:
            for part in parts:
                if self.fmt == "ndjson":
                    self._frame(part)
                elif part.startswith(b"data: ") and b"\n" not in part:
                    self._frame(part[6:])
                else:
                    self._event(part)
        except Failed as e:
            self.fail(str(e), part[:200])

    def _event(self, event: bytes) -> None:
        data, name = [], b""
        for line in event.split(b"\n"):
            if line.startswith(b":"):
                continue  # a comment: ": ping"
            key, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if key == b"event":
                name = value
            elif key == b"data":
                data.append(value)
            elif line:
                raise Failed("bad SSE line")
        if name == b"error":
            raise Failed("error event")
        if name not in (b"", b"message"):
            raise Failed("unknown event")
        if data:
            self._frame(b"\n".join(data))

    def _frame(self, payload: bytes) -> None:
        t = now()
        rec = self.rec
        try:
            obj = _decode(payload.decode())
        except ValueError:  # UnicodeDecodeError included
            raise Failed("frame not JSON") from None
        if type(obj) is not dict:
            raise Failed("frame not an object")
        if "error" in obj:
            raise Failed("error frame")
        if type(obj.get("model")) is not str or type(obj.get("message")) is not dict:
            raise Failed("frame without model/message")
        if rec.done:
            raise Failed("frame after done")
        if rec.frames:
            self.gaps.append(t - rec.t_last)
        else:
            rec.t_first = t
        rec.t_last = t
        rec.frames += 1
        rec.done = obj.get("done") is True

    def _array(self, data: bytes) -> None:
        rec = self.rec
        if not rec.nbytes:
            rec.t_first = now()
            if not data.startswith(b"["):
                self.fail("not a JSON array", data[:200])
                return
        rec.nbytes += len(data)
        joined = rec.tail + data
        rec.rows += joined.count(b"],[")
        rec.tail = joined[-2:]
        if rec.body is not None:
            rec.body.append(data)

    def end(self) -> None:
        """The response ended properly: check what came."""
        if self.ended:
            return
        rec = self.rec
        rec.t_end = now()
        if self.fmt == "json-array":
            self._end_array()
        elif self.buf.strip():
            self.fail("unterminated frame", self.buf[:200])
            return
        elif not rec.done:
            self.fail("no done frame")
            return
        elif rec.frames != self.expect:
            self.fail("wrong frame count", f"{rec.frames} != {self.expect}")
            return
        self.ended = True
        self.on_end()

    def _end_array(self) -> None:
        rec = self.rec
        if rec.nbytes:
            rec.rows += 1 if rec.tail != b"[]" else 0
        if rec.tail[-1:] != b"]":
            self.fail("array not closed")
        elif rec.body is not None:
            try:
                rows = json.loads(b"".join(rec.body))
            except ValueError:
                self.fail("body not JSON")
                return
            if len(rows) != rec.rows or not all(isinstance(r, list) and len(r) == 4 for r in rows):
                self.fail("bad rows", f"{len(rows)} parsed, {rec.rows} counted")

    def fail(self, error: str, detail: object = "") -> None:
        if self.ended:
            return
        self.ended = True
        self.rec.error = error
        self.rec.detail = str(detail)[:300]
        self.rec.t_end = now()
        self.on_end()


# --- HTTP/1.1 ----------------------------------------------------------------


class H1Client(asyncio.Protocol):
    """One request over one HTTP/1.1 connection, read through :class:`Frames`."""

    def __init__(self, request: bytes, frames: Frames, done: asyncio.Future[None]) -> None:
        self.request = request
        self.frames = frames
        self.done = done
        self.head: bytes | None = b""
        self.chunked = False
        self.length = -1
        self.cbuf = b""
        self.need = 0  # bytes of chunk data still to come; -1: the CRLF after a chunk
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.frames.rec.t_conn = now()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self.head[:end])
            data, self.head = self.head[end + 4:], None
            if self.frames.ended:
                return
        if self.chunked:
            self._dechunk(data)
        else:
            self.frames.feed(data)
            if self.length >= 0:
                self.length -= len(data)
                if self.length <= 0:
                    self.frames.end()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        self.frames.rec.status = status
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
        self.length = int(headers.get(b"content-length", b"-1"))
        if status != 200:
            self.frames.fail(f"HTTP {status}")

    def _dechunk(self, data: bytes) -> None:
        buf = self.cbuf + data if self.cbuf else data
        pos, size = 0, len(buf)
        feed = self.frames.feed
        while pos < size:
            if self.need > 0:
                take = min(self.need, size - pos)
                feed(buf[pos:pos + take])
                pos += take
                self.need -= take
                if self.need:
                    break
                self.need = -1
            if self.need == -1:
                if size - pos < 2:
                    break
                pos += 2
                self.need = 0
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            n = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if n == 0:
                self.frames.end()
                return
            self.need = n
        self.cbuf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chunked and self.length < 0 and self.head is None and exc is None:
            self.frames.end()  # a body delimited by the close
        self.frames.fail("connection closed early" if exc is None else f"connection lost: {type(exc).__name__}")


class RawH1:
    """
    :class:`H1Client` on a plain non-blocking socket read straight from the
    selector (``add_reader``): no transport layer on the hot path.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: H1Client) -> None:
        self.loop = loop
        self.client = client
        self.sock: socket.socket | None = None

    async def open(self, host: str, port: int) -> None:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await self.loop.sock_connect(sock, (host, port))
        self.client.frames.rec.t_conn = now()
        await self.loop.sock_sendall(sock, self.client.request)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)  # type: ignore[union-attr]  (256 KiB would cost mmap+munmap per read)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close()
            self.client.connection_lost(e)
            return
        if data:
            self.client.data_received(data)
        else:
            self.close()
            self.client.connection_lost(None)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.loop.remove_reader(self.sock.fileno())
            except ValueError:
                pass
            self.sock.close()
            self.sock = None


# --- HTTP/2 ------------------------------------------------------------------


class H2Client(asyncio.Protocol):
    """One HTTP/2 connection carrying many streams, each read through :class:`Frames`."""

    def __init__(self, authority: str, ready: asyncio.Future[None]) -> None:
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.authority = authority.encode()
        self.ready = ready
        self.streams: dict[int, Frames] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from h2.settings import SettingCodes

        self.transport = transport  # type: ignore[assignment]
        alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != "h2":
            self.ready.set_exception(RuntimeError(f"ALPN gave {alpn!r}, not h2"))
            transport.close()
            return
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24, SettingCodes.ENABLE_PUSH: 0})
        self.conn.increment_flow_control_window(1 << 30)
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
        self.ready.set_result(None)

    def open(self, method: str, path: str, body: bytes, frames: Frames) -> None:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = frames
        headers = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"https"),
                   (b":authority", self.authority), (b"content-type", b"application/json"),
                   (b"accept", b"text/event-stream")]
        if body:
            headers.append((b"content-length", b"%d" % len(body)))
        self.conn.send_headers(sid, headers, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        frames.rec.t_conn = now()
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        import h2.events as ev
        import h2.exceptions

        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._fail_all(f"h2 protocol error: {type(e).__name__}")
            self.transport.close()  # type: ignore[union-attr]
            return
        for event in events:
            frames = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, ev.DataReceived):
                if frames is not None:
                    frames.feed(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ev.ResponseReceived) and frames is not None:
                status = int(dict(event.headers)[b":status"])
                frames.rec.status = status
                if status != 200:
                    frames.fail(f"HTTP {status}")
            elif isinstance(event, ev.StreamEnded) and frames is not None:
                frames.end()
                del self.streams[event.stream_id]
            elif isinstance(event, ev.StreamReset) and frames is not None:
                frames.fail("stream reset")
                del self.streams[event.stream_id]
            elif isinstance(event, ev.ConnectionTerminated):
                self._fail_all("GOAWAY")
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]

    def _fail_all(self, error: str) -> None:
        for frames in self.streams.values():
            frames.fail(error)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all("connection lost")
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the h2 preface"))


# --- the run -----------------------------------------------------------------


class Sampler:
    """Samples the server's memory every ``sample_s`` and notes its peak."""

    def __init__(self, pids: list[int], period: float) -> None:
        self.pids = pids
        self.period = period
        self.peak = self.start = self.rss()
        self.peak_at_open = 0
        self.open = 0

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            rss = self.rss()
            if rss > self.peak:
                self.peak = rss
                self.peak_at_open = self.open


def client_tls(cafile: str | None, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    ctx.set_alpn_protocols(alpn)
    return ctx


class Runner:
    """Runs one :class:`Spec`."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.records = [Record() for _ in range(spec.streams)]
        self.gaps: array = array("d")
        self.open = 0
        self.max_open = 0
        self.h2: list[H2Client] = []
        self.sampler = Sampler(spec.server_pids, spec.sample_s)
        tls = spec.transport.endswith("tls")
        self.ctx = client_tls(spec.cafile, ["h2"] if spec.transport == "h2-tls" else ["http/1.1"]) if tls else None

    def body(self, i: int) -> bytes:
        s = self.spec
        if s.method == "GET":
            return b""
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"Hello {k}, tell me a story."}
                    for k in range(s.history)]
        obj: dict[str, Any] = {"model": s.model, "messages": messages, "stream": True}
        if s.format == "sse":
            obj["appID"] = f"{s.appid_prefix}.{i}"
        return json.dumps(obj, separators=(",", ":")).encode()

    def request(self, body: bytes) -> bytes:
        s = self.spec
        head = (f"{s.method} {s.path} HTTP/1.1\r\nHost: {s.host}:{s.port}\r\n"
                f"Accept: text/event-stream, application/x-ndjson, application/json\r\n")
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def one(self, i: int, sem: asyncio.Semaphore | None) -> None:
        s = self.spec
        delay = self.t_base + (i * s.ramp_s / s.streams if s.streams else 0) - now()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            async with sem:
                await self.stream(i)
        else:
            await self.stream(i)

    async def stream(self, i: int) -> None:
        s, rec = self.spec, self.records[i]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        frames = Frames(rec, s.format, s.frames + 1, self.gaps, lambda: done.done() or done.set_result(None))
        if s.format == "json-array" and s.keep_body:
            rec.body = []
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.sampler.open = self.open
        rec.t0 = now()
        transport: Any = None
        try:
            body = self.body(i)
            if s.transport == "h2-tls":
                self.h2[i % len(self.h2)].open(s.method, s.path, body, frames)
            elif s.transport == "h1":
                transport = RawH1(loop, H1Client(self.request(body), frames, done))
                await transport.open(s.host, s.port)
            else:
                transport, _ = await loop.create_connection(
                    lambda: H1Client(self.request(body), frames, done), s.host, s.port,
                    ssl=self.ctx, server_hostname=s.host if self.ctx else None,
                )
            await asyncio.wait_for(done, s.timeout_s)
        except asyncio.TimeoutError:
            frames.fail("timeout", f"{rec.frames} frames after {s.timeout_s:g} s")
        except (OSError, ssl.SSLError) as e:
            frames.fail(f"connect: {type(e).__name__}", e)
        finally:
            self.open -= 1
            self.sampler.open = self.open
            if transport is not None:
                transport.close()

    async def connect_h2(self) -> None:
        s = self.spec
        loop = asyncio.get_running_loop()
        for _ in range(s.connections):
            ready: asyncio.Future[None] = loop.create_future()
            proto = H2Client(f"{s.host}:{s.port}", ready)
            await loop.create_connection(lambda p=proto: p, s.host, s.port, ssl=self.ctx, server_hostname=s.host)
            await ready
            self.h2.append(proto)

    async def run(self) -> dict[str, Any]:
        s = self.spec
        if s.transport == "h2-tls":
            await self.connect_h2()
        sampler = asyncio.create_task(self.sampler.run())
        cpu0 = self.cpu()
        sem = asyncio.Semaphore(s.concurrency) if 0 < s.concurrency < s.streams else None
        self.t_base = now() + 0.02
        await asyncio.gather(*(self.one(i, sem) for i in range(s.streams)))
        t_end = max((r.t_end for r in self.records), default=now())
        await self.settle()
        cpu1 = self.cpu()
        sampler.cancel()
        for proto in self.h2:
            proto.transport.close()  # type: ignore[union-attr]
        return self.result(cpu0, cpu1, t_end)

    def cpu(self) -> dict[str, float]:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "server": sum(cpu_seconds(p) for p in self.spec.server_pids),
            "load": sum(cpu_seconds(p) for p in self.spec.load_pids) + use.ru_utime + use.ru_stime,
            "self_user": use.ru_utime, "self_sys": use.ru_stime,
            "wall": now(),
        }

    async def settle(self) -> None:
        """Wait (briefly) until the server stops using CPU: it stores replies after the last frame."""
        deadline = now() + self.spec.settle_s
        last = sum(cpu_seconds(p) for p in self.spec.server_pids)
        while now() < deadline:
            await asyncio.sleep(0.05)
            cur = sum(cpu_seconds(p) for p in self.spec.server_pids)
            if cur - last < 0.002:
                return
            last = cur

    def result(self, cpu0: dict[str, float], cpu1: dict[str, float], t_end: float) -> dict[str, Any]:
        recs = self.records
        ok = [r for r in recs if r.error is None]
        errors = Counter(r.error for r in recs if r.error is not None)
        samples = [f"{r.error}: {r.detail}" for r in recs if r.error is not None][:5]
        t_start = min((r.t0 for r in recs), default=t_end)
        wall = max(t_end - t_start, 1e-9)
        frames = sum(r.frames for r in recs)
        gaps = sorted(self.gaps)
        return {
            "streams": len(recs),
            "ok": len(ok),
            "errors": dict(errors),
            "error_samples": samples,
            "frames": frames,
            "wall_s": wall,
            "fps": frames / wall,
            "max_open": self.max_open,
            "ttff": [r.t_first - r.t0 for r in ok],
            "total": [r.t_end - r.t0 for r in ok],
            "connect": [r.t_conn - r.t0 for r in ok if r.t_conn],
            "gap_p50": _pct(gaps, 50),
            "gap_p99": _pct(gaps, 99),
            "gap_max": gaps[-1] if gaps else 0.0,
            "rows": sum(r.rows for r in ok),
            "bytes": sum(r.nbytes for r in ok),
            "server_cpu_s": cpu1["server"] - cpu0["server"],
            "load_cpu_s": cpu1["load"] - cpu0["load"],
            "measured_s": cpu1["wall"] - cpu0["wall"],
            "self_user_s": cpu1["self_user"] - cpu0["self_user"],
            "self_sys_s": cpu1["self_sys"] - cpu0["self_sys"],
            "rss_start": self.sampler.start,
            "rss_peak": self.sampler.peak,
            "rss_end": self.sampler.rss(),
            "open_at_peak": self.sampler.peak_at_open,
        }


def _pct(sorted_values: Any, p: float) -> float:
    if not len(sorted_values):
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


class PacedSelector(selectors.EpollSelector):
    """
    An epoll selector that polls at most once per ``period``: with hundreds of
    slow streams, one wakeup then serves many sockets instead of one each
    (timestamps get ``period`` coarser, equally for both paths).
    """

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period = period
        self.last = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        wait = self.last + self.period - now()
        if wait > 0 and (timeout is None or timeout > 0):
            time.sleep(wait if timeout is None else min(wait, timeout))
        self.last = now()
        return super().select(timeout if timeout is None else max(0.0, timeout - max(wait, 0.0)))


def run(spec: Spec) -> dict[str, Any]:
    """Run ``spec`` in a new event loop and return the result."""
    raise_nofile()
    if spec.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("the load generator only talks to loopback")
    if spec.poll_s > 0:
        loop = asyncio.SelectorEventLoop(PacedSelector(spec.poll_s))
        try:
            return loop.run_until_complete(Runner(spec).run())
        finally:
            loop.close()
    return asyncio.run(Runner(spec).run())


def main() -> None:
    spec = Spec(**json.loads(sys.stdin.read()))
    json.dump(run(spec), sys.stdout)


if __name__ == "__main__":
    main()

