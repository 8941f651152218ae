"""
An Ollama emulator for the test suite: Ollama's wire format over real TCP, with scripted faults.

It answers ``POST /api/chat`` and ``POST /api/generate`` the way Ollama's ``server/routes.go`` does
(NDJSON lines encoded like Go's ``json.Marshal``, ``application/x-ndjson``, chunked transfer
encoding, ``{"error": ...}`` bodies with real statuses before the first byte and an ``{"error": ...}``
line after it), plus ``GET /``, ``GET /api/version`` and ``GET /api/tags`` (which
:attr:`OllamaEmulator.stalled_gets` can make stall after their headers).  Each model name maps to
a :class:`Behaviour` that scripts timing and faults (errors, garbage lines, truncation, resets,
stalls, dropped or unanswered requests, split or coalesced writes).

Use it in a trial test::

    emu = await start_emulator(self)             # listens on 127.0.0.1:<random>, stops in cleanup
    emu.models["slow"] = Behaviour(delay=0.2)
    ... point chatterd at emu.url ...

Run it as a process (for benchmarks)::

    python -m tests.ollama_emulator --port 0 --print-port

Model names ``bench-<frames>x<delay_ms>ms-<first_ms>ms`` (e.g. ``bench-200x15ms-0ms``) stream
``<frames>`` content chunks, ``<delay_ms>`` apart, after ``<first_ms>`` of silence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "Behaviour",
    "OllamaEmulator",
    "Recorded",
    "closed_port",
    "go_json",
    "start_emulator",
]

OLLAMA_VERSION = "0.12.0"
DEFAULT_MODEL = "llama3.2"
DEFAULT_ERROR = "an error was encountered while running the model"
NDJSON = b"application/x-ndjson"
JSON_UTF8 = b"application/json; charset=utf-8"
TEXT_UTF8 = b"text/plain; charset=utf-8"

#: Gap between the two halves of a ``split`` line: long enough that loopback reads cannot merge them.
SPLIT_GAP = 0.01
#: Minimum gap between the last write and a ``reset``, so the peer reads the data before the RST
#: (a RST can make the peer's kernel discard data it has not read yet).
RESET_GAP = 0.05

_BENCH_NAME = re.compile(r"^bench-(\d+)x(\d+)ms-(\d+)ms(?::latest)?$")
_BENCH_WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


# --------------------------------------------------------------------------------------------
# Encoding helpers


def go_json(obj: Any) -> bytes:
    """
    Encode ``obj`` as Go's ``json.Marshal`` does: compact, UTF-8 (not ``\\uXXXX``), and with
    ``<``, ``>``, ``&``, U+2028 and U+2029 escaped (Go's default HTML-safe escaping).
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (
            text.replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: Go writes U+FFFD for invalid UTF-8
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode("utf-8")


class _Clock:
    """RFC 3339 nanosecond UTC timestamps as Go prints them (trailing zeros trimmed), cheaply."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def created_at(self) -> bytes:
        """:return: the current time, e.g. ``b"2026-11-25T15:47:11.123456789Z"``."""
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        if not nanos:
            return self._prefix + b"Z"
        return self._prefix + b"." + (b"%09d" % nanos).rstrip(b"0") + b"Z"


_clock = _Clock()


class _BadRequest(Exception):
    """A request Ollama rejects before streaming: ``status`` and the ``{"error": ...}`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_GO_KINDS = {dict: "object", list: "array", str: "string", bool: "bool", int: "number", float: "number"}


def _go_kind(value: Any) -> str:
    return _GO_KINDS.get(type(value), "number")


def _go_quote_char(c: str) -> str:
    if c == "'":
        return "'\\''"
    if c == '"':
        return "'\"'"
    if c.isprintable():
        return f"'{c}'"
    return "'" + json.dumps(c)[1:-1] + "'"


def _innermost_container(text: str, pos: int) -> str:
    """:return: ``"{"`` or ``"["``: the innermost open container at ``pos`` (outside strings)."""
    stack: list[str] = []
    in_string = escaped = False
    for c in text[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append(c)
        elif c in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else "{"


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _decode_body(body: bytes, go_type: str) -> dict[str, Any]:
    """
    Decode a request body as gin's ``ShouldBindJSON`` into ``go_type`` would, raising
    :class:`_BadRequest` with Go's error text (``missing request body``, ``unexpected EOF``,
    ``invalid character 'x' looking for beginning of value``, ``json: cannot unmarshal ...``).
    Like Go's ``json.Decoder``, anything after the first value is ignored.
    """
    text = body.decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise _BadRequest(400, "missing request body")
    try:
        value, _ = _decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text) or e.msg.startswith("Unterminated string"):
            raise _BadRequest(400, "unexpected EOF") from None
        char = _go_quote_char(text[e.pos])
        if e.msg.startswith("Expecting property name"):
            where = "looking for beginning of object key string"
        elif e.msg.startswith("Expecting ':'"):
            where = "after object key"
        elif e.msg.startswith("Expecting ',' delimiter"):
            inner = _innermost_container(text, e.pos)
            where = "after object key:value pair" if inner == "{" else "after array element"
        elif e.msg.startswith("Invalid control character"):
            where = "in string literal"
        else:
            where = "looking for beginning of value"
        raise _BadRequest(400, f"invalid character {char} {where}") from None
    except ValueError as e:  # NaN / Infinity, which Go rejects
        char = _go_quote_char(str(e)[0])
        raise _BadRequest(400, f"invalid character {char} looking for beginning of value") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        kind = _go_kind(value)
        raise _BadRequest(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}")
    for key, want, go_field_type in (
        ("model", str, "string"),
        ("prompt", str, "string"),
        ("messages", list, "[]api.Message"),
        ("stream", bool, "bool"),
    ):
        got = value.get(key)
        if got is not None and not isinstance(got, want):
            raise _BadRequest(
                400,
                f"json: cannot unmarshal {_go_kind(got)} into Go struct field {go_type}.{key}"
                f" of type {go_field_type}",
            )
    return value


# --------------------------------------------------------------------------------------------
# Public data types


def _default_reply() -> list[str]:
    return ["Hello", ",", " world", "!"]


@dataclass(eq=False)
class Behaviour:
    """
    How the emulator answers one model.

    Fault counts are in *content chunks* (``thinking`` then ``reply`` pieces) written before the
    fault; a count larger than the number of chunks means "after the last chunk, before the done
    line".  Every line after the first waits ``delay`` seconds (``coalesce`` ignores ``delay``).

    With ``stream: false`` the answer comes after ``first_byte_delay`` plus ``delay`` per chunk;
    ``status`` works as usual, ``error_after`` gives Ollama's 500, ``stall_after`` holds the answer
    until :meth:`OllamaEmulator.release`, ``truncate_after``/``reset_after`` send half of a
    ``Content-Length`` body then FIN/RST, and ``not_json_after`` sends ``not_json_line`` as the body.
    """

    #: Content pieces, one per chunk.
    reply: list[str] = field(default_factory=_default_reply)
    #: Seconds between lines.
    delay: float = 0.0
    #: Seconds of silence before the response headers and first chunk (model loading).
    first_byte_delay: float = 0.0
    #: Write every line in two pieces, :data:`SPLIT_GAP` apart, cut at its middle byte (mid-JSON,
    #: possibly mid-UTF-8 character), so they arrive in separate reads.
    split: bool = False
    #: Write all lines in a single write (several lines per read).
    coalesce: bool = False
    #: Answer this HTTP status with ``{"error": error}`` instead of streaming.
    status: int | None = None
    #: Error text for ``status``, ``error_after`` and ``stream: false`` failures.
    error: str = DEFAULT_ERROR
    #: With ``status``: answer this body (as ``text/html``) instead of Ollama's
    #: ``{"error": error}``, as a proxy in front of Ollama would.
    error_page: bytes | None = None
    #: After N chunks, write an ``{"error": error}`` line (no ``done``) and end the response normally.
    error_after: int | None = None
    #: After N chunks, write ``not_json_line`` then carry on to the normal end.
    not_json_after: int | None = None
    #: The line ``not_json_after`` writes (without its ``\n``).
    not_json_line: bytes = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    #: After N chunks, close the TCP connection cleanly (FIN) mid-body: no done line, no final chunk.
    truncate_after: int | None = None
    #: After N chunks, abort the TCP connection (RST), at least :data:`RESET_GAP` after the last write.
    reset_after: int | None = None
    #: After N chunks, stop writing (connection open) until :meth:`OllamaEmulator.release` or the
    #: client leaves.
    stall_after: int | None = None
    #: Read the request, then close the connection without any response bytes.
    drop_before_response: bool = False
    #: Read the request and never answer (until the client leaves or the emulator stops).
    never_answer: bool = False
    #: Send the 200 headers at once, before ``first_byte_delay`` (real Ollama sends them with the
    #: first chunk).
    headers_first: bool = False
    #: Thinking pieces, streamed (as ``message.thinking`` / ``thinking``) before the reply.
    thinking: list[str] = field(default_factory=list)
    #: The final chunk's ``done_reason``.
    done_reason: str = "stop"
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)


@dataclass(eq=False)
class Recorded:
    """One request the emulator received, and how its response ended."""

    method: str
    path: str
    #: Lower-cased header names; repeated headers joined with ``", "``.
    headers: dict[str, str]
    body: bytes
    #: The parsed JSON body, or ``None`` (no body, or not JSON).
    json: Any
    #: Complete NDJSON lines written so far (content, done, error and not-JSON lines).
    lines_written: int = 0
    #: ``None`` while answering, then one of ``"finished"`` (the emulator finished the response,
    #: whatever it held), ``"client_left"``, ``"truncated"``, ``"reset"``, ``"dropped"``,
    #: ``"stopped"`` (by :meth:`OllamaEmulator.stop`).
    outcome: str | None = None
    _waiters: list[Deferred[str]] = field(default_factory=list, init=False, repr=False)

    def ended(self) -> Deferred[str]:
        """:return: a Deferred that fires with :attr:`outcome` once the response has ended."""
        if self.outcome is not None:
            return succeed(self.outcome)
        d: Deferred[str] = Deferred()
        self._waiters.append(d)
        return d

    def _end(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(outcome)


def closed_port() -> int:
    """:return: a TCP port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------
# Streaming one response

_CHUNK, _DONE, _LINE, _STALL, _TRUNCATE, _RESET, _FINISH = range(7)


def _tails(behaviour: Behaviour, kind: str) -> list[bytes]:
    """Pre-encoded chunk endings (everything after ``created_at``'s value), cached per behaviour."""
    key = (kind, tuple(behaviour.thinking), tuple(behaviour.reply))
    cached = behaviour._cache.get(kind)
    if cached is not None and cached[0] == key:
        return cached[1]
    if kind == "chat":
        say = b'","message":{"role":"assistant","content":'
        think, end = say + b'"","thinking":', b'},"done":false}\n'
    else:
        think, say, end = b'","response":"","thinking":', b'","response":', b',"done":false}\n'
    tails = [think + go_json(piece) + end for piece in behaviour.thinking]
    tails += [say + go_json(piece) + end for piece in behaviour.reply]
    behaviour._cache[kind] = (key, tails)
    return tails


def _plan(behaviour: Behaviour, tails: list[bytes], error_line: bytes) -> list[tuple[int, bytes]]:
    """The steps of a streamed response: chunks with the faults inserted where they fall."""
    n = len(tails)

    def at(count: int | None) -> int | None:
        return None if count is None else max(0, min(count, n))

    not_json, stall = at(behaviour.not_json_after), at(behaviour.stall_after)
    error, truncate, reset = at(behaviour.error_after), at(behaviour.truncate_after), at(behaviour.reset_after)
    if all(at is None for at in (not_json, stall, error, truncate, reset)):
        steps = [(_CHUNK, t) for t in tails]
        steps.append((_DONE, b""))
        steps.append((_FINISH, b""))
        return steps
    steps = []
    for i in range(n + 1):
        if not_json == i:
            steps.append((_LINE, behaviour.not_json_line + b"\n"))
        if stall == i:
            steps.append((_STALL, b""))
        if error == i:
            steps.append((_LINE, error_line))
            steps.append((_FINISH, b""))
            return steps
        if truncate == i:
            steps.append((_TRUNCATE, b""))
            return steps
        if reset == i:
            steps.append((_RESET, b""))
            return steps
        if i < n:
            steps.append((_CHUNK, tails[i]))
    steps.append((_DONE, b""))
    steps.append((_FINISH, b""))
    return steps


class _Response:
    """Answers one ``/api/chat`` or ``/api/generate`` request according to its :class:`Behaviour`."""

    def __init__(
        self,
        emulator: OllamaEmulator,
        request: Request,
        record: Recorded,
        behaviour: Behaviour,
        kind: str,
        payload: dict[str, Any],
    ) -> None:
        self._emu = emulator
        self._reactor = emulator._reactor
        self._request = request
        self.record = record
        self._b = behaviour
        self._kind = kind
        self._payload = payload
        self._model: str = payload.get("model", "")
        self._start_ns = time.monotonic_ns()
        self._pending: IDelayedCall | None = None
        self._active = True
        self._steps: list[tuple[int, bytes]] = []
        self._i = 0
        self._chunks = 0
        self._buffer: list[bytes] = []
        self._second_half = b""
        self._head = b""
        self._stalled_once = False
        self._after_stall: Callable[[], None] = self._step
        emulator._responses.add(self)
        request.notifyFinish().addBoth(self._request_done)

    # -- lifecycle

    def start(self) -> None:
        """Begin answering (after ``first_byte_delay``)."""
        b = self._b
        if b.never_answer:
            return
        if b.headers_first and b.status is None and not b.drop_before_response:
            self._request.setResponseCode(200)
            self._request.setHeader(b"content-type", NDJSON if self._streaming() else JSON_UTF8)
            self._request.write(b"")
        self._pending = self._reactor.callLater(b.first_byte_delay, self._begin)

    def _streaming(self) -> bool:
        return self._payload.get("stream") is not False

    def _request_done(self, result: object) -> None:
        """``notifyFinish`` fired: finished normally, or the connection went away."""
        if isinstance(result, Failure):
            self._close("client_left")
        else:
            self._close("finished")

    def _close(self, outcome: str) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._active = False
        self._emu._responses.discard(self)
        self._emu._stalled.discard(self)
        self.record._end(outcome)

    def stop(self) -> None:
        """Stop for :meth:`OllamaEmulator.stop` (the connection is about to be aborted)."""
        self._close("stopped")

    def resume(self) -> None:
        """Continue a stalled stream."""
        if self._active and self._pending is None:
            delay = 0.0 if self._b.coalesce else self._b.delay
            self._pending = self._reactor.callLater(delay, self._after_stall)

    # -- writing

    def _write(self, data: bytes, lines: int) -> None:
        self._request.write(data)
        if lines:
            self.record.lines_written += lines
            self._emu._lines_written += lines

    def _flush(self) -> None:
        if self._buffer:
            data, count = b"".join(self._buffer), len(self._buffer)
            self._buffer = []
            self._write(data, count)

    def _metrics(self, eval_count: int) -> dict[str, int]:
        total = max(time.monotonic_ns() - self._start_ns, 3)
        load = min(int(self._b.first_byte_delay * 1e9) or total // 20, total - 2) or 1
        rest = total - load
        prompt_eval = max(rest // 10, 1)
        return {
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": self._prompt_tokens(),
            "prompt_eval_duration": prompt_eval,
            "eval_count": max(eval_count, 1),
            "eval_duration": max(rest - prompt_eval, 1),
        }

    def _prompt_tokens(self) -> int:
        if self._kind == "chat":
            texts = [m.get("content") for m in self._payload.get("messages") or [] if isinstance(m, dict)]
        else:
            texts = [self._payload.get("prompt"), self._payload.get("system")]
        return 10 + sum(len(t.split()) for t in texts if isinstance(t, str))

    def _final(self, content: str, thinking: str) -> dict[str, Any]:
        """The ``done: true`` object (``content``/``thinking`` are empty when streaming)."""
        b = self._b
        created_at = _clock.created_at().decode()
        metrics = self._metrics(self._chunks if self._streaming() else len(b.thinking) + len(b.reply))
        obj: dict[str, Any] = {"model": self._model, "created_at": created_at}
        if self._kind == "chat":
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            obj["message"] = message
            obj["done_reason"] = b.done_reason
            obj["done"] = True
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
            obj["done"] = True
            obj["done_reason"] = b.done_reason
            if not self._payload.get("raw"):
                tokens = metrics["prompt_eval_count"] + metrics["eval_count"]
                obj["context"] = [128006 + (i * 7919) % 1000 for i in range(tokens)]
        obj.update(metrics)
        return obj

    # -- the response

    def _begin(self) -> None:
        self._pending = None
        b, request = self._b, self._request
        if b.drop_before_response:
            self._close("dropped")
            self._request.channel.loseConnection()
            return
        if b.status is not None:
            if b.error_page is not None:
                self._emu._send_whole(request, b.status, b"text/html", b.error_page)
            else:
                self._emu._send_whole(request, b.status, JSON_UTF8, go_json({"error": b.error}))
            return
        if not self._streaming():
            self._answer_whole()
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", NDJSON)
        self._head = b'{"model":' + go_json(self._model) + b',"created_at":"'
        error_line = go_json({"error": b.error}) + b"\n"
        self._steps = _plan(b, _tails(b, self._kind), error_line)
        self._step()

    def _step(self) -> None:
        """Run steps until one needs to wait."""
        self._pending = None
        b = self._b
        while self._active:
            kind, data = self._steps[self._i]
            self._i += 1
            if kind in (_CHUNK, _DONE, _LINE):
                if kind == _CHUNK:
                    self._chunks += 1
                    line = self._head + _clock.created_at() + data
                elif kind == _DONE:
                    line = go_json(self._final("", "")) + b"\n"
                else:
                    line = data
                if b.coalesce:
                    self._buffer.append(line)
                    continue
                if b.split and len(line) > 1:
                    half = len(line) // 2
                    self._write(line[:half], 0)
                    self._second_half = line[half:]
                    self._pending = self._reactor.callLater(SPLIT_GAP, self._write_second_half)
                    return
                self._write(line, 1)
                if self._steps[self._i][0] == _FINISH:
                    continue
                if b.delay > 0:
                    self._pending = self._reactor.callLater(b.delay, self._step)
                    return
            elif kind == _FINISH:
                self._flush()
                self._request.finish()  # notifyFinish -> _close("finished")
                return
            elif kind == _STALL:
                self._flush()
                self._emu._stall(self)
                return
            elif kind == _TRUNCATE:
                self._flush()
                self._close("truncated")
                self._request.channel.loseConnection()
                return
            elif kind == _RESET:
                self._flush()
                gap = RESET_GAP if b.coalesce else max(b.delay, RESET_GAP)
                self._pending = self._reactor.callLater(gap, self._reset)
                return

    def _write_second_half(self) -> None:
        self._pending = None
        self._write(self._second_half, 1)
        self._second_half = b""
        if self._steps[self._i][0] == _FINISH:
            self._step()
        else:
            self._pending = self._reactor.callLater(self._b.delay, self._step)

    def _reset(self) -> None:
        self._pending = None
        self._close("reset")
        self._request.channel.transport.abortConnection()

    def _answer_whole(self) -> None:
        """``stream: false``: one JSON object (faults map to what Ollama does without streaming)."""
        b = self._b
        wait = 0.0 if b.coalesce else b.delay * (len(b.thinking) + len(b.reply))
        self._pending = self._reactor.callLater(wait, self._whole_ready)

    def _whole_ready(self) -> None:
        self._pending = None
        b, request = self._b, self._request
        if b.stall_after is not None and not self._stalled_once:
            self._stalled_once = True
            self._after_stall = self._whole_ready
            self._emu._stall(self)
            return
        if b.error_after is not None:
            self._emu._send_whole(request, 500, JSON_UTF8, go_json({"error": b.error}))
            return
        if b.not_json_after is not None:
            body = b.not_json_line
        else:
            body = go_json(self._final("".join(b.reply), "".join(b.thinking)))
        cut = b.truncate_after is not None or b.reset_after is not None
        request.setResponseCode(200)
        request.setHeader(b"content-type", JSON_UTF8)
        request.setHeader(b"content-length", b"%d" % len(body))
        if not cut:
            self._write(body, 1)
            request.finish()
            return
        self._write(body[: len(body) // 2], 0)
        if b.truncate_after is not None:
            self._close("truncated")
            self._request.channel.loseConnection()
        else:
            self._pending = self._reactor.callLater(RESET_GAP, self._reset)


class _StalledAnswer:
    """
    A whole answer (a ``GET`` listed in :attr:`OllamaEmulator.stalled_gets`) whose status,
    headers (with the full ``Content-Length``) and first half of the body are sent at once; the
    rest waits for :meth:`OllamaEmulator.release`, or for ever if the client does not leave.
    """

    def __init__(
        self, emulator: OllamaEmulator, request: Request, record: Recorded, content_type: bytes, body: bytes
    ) -> None:
        self._emu = emulator
        self._request = request
        self.record = record
        self._rest = body[len(body) // 2 :]
        emulator._responses.add(self)  # type: ignore[arg-type]
        request.notifyFinish().addBoth(lambda _: self._close())
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body[: len(body) // 2])
        emulator._stall(self)  # type: ignore[arg-type]

    def _close(self) -> None:
        self._emu._responses.discard(self)  # type: ignore[arg-type]
        self._emu._stalled.discard(self)  # type: ignore[arg-type]

    def resume(self) -> None:
        """Send the rest of the body and finish."""
        if self._request.finished or self._request.channel is None:
            return
        self._request.write(self._rest)
        self._request.finish()

    def stop(self) -> None:
        """Stop for :meth:`OllamaEmulator.stop` (the connection is about to be aborted)."""
        self._close()
        self.record._end("stopped")


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _OllamaResource(Resource):
    """The single leaf resource: dispatches on method and path like Ollama's gin router."""

    isLeaf = True

    def __init__(self, emulator: OllamaEmulator) -> None:
        super().__init__()
        self._emu = emulator

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        return self._emu._handle(request)


class _QuietSite(Site):
    """A Site with no access log."""

    noisy = False

    def log(self, request: Request) -> None:
        """Do not log requests."""


class _TrackedConnection(ProtocolWrapper):
    """Unregisters *after* the HTTP channel (and so its requests) has seen the connection go."""

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        try:
            wrapped.connectionLost(reason)
        finally:
            self.factory.unregisterProtocol(self)


class _ConnectionTracker(WrappingFactory):
    """Counts open connections and tells waiters when they close."""

    noisy = False
    protocol = _TrackedConnection

    def __init__(self, site: Site, emulator: OllamaEmulator) -> None:
        super().__init__(site)
        self._emu = emulator

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self._emu._connections_made += 1

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self._emu._connection_lost()


def _fire_all(waiters: list[Deferred[Any]], value: Any) -> None:
    for d in waiters:
        d.callback(value)


class OllamaEmulator:
    """
    A fake Ollama server on 127.0.0.1 (real TCP, Ollama's wire format, scripted faults).

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``; the global reactor by default.
    :param host: interface to listen on.
    :param port: port to listen on (0: any free port).
    :param record: keep every request in :attr:`requests` (turn off for long benchmarks).
    """

    def __init__(
        self, reactor: Any = None, *, host: str = "127.0.0.1", port: int = 0, record: bool = True
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self._host = host
        self._wanted_port = port
        self._record = record
        #: Model name -> behaviour.  Names without a tag also answer ``name:latest``.
        self.models: dict[str, Behaviour] = {DEFAULT_MODEL: Behaviour()}
        #: Every request received, in order.
        self.requests: list[Recorded] = []
        #: Paths whose ``GET`` (``/api/tags``, ``/api/version``, ``/``) gets its status, headers
        #: and half its body, then stalls until :meth:`release` or the client leaves.
        self.stalled_gets: set[str] = set()
        self._listening: IListeningPort | None = None
        self._tracker = _ConnectionTracker(_QuietSite(_OllamaResource(self), reactor=reactor), self)
        self._responses: set[_Response] = set()
        self._stalled: set[_Response] = set()
        self._lines_written = 0
        self._connections_made = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._request_waiters: list[Deferred[Recorded]] = []
        self._stall_waiters: list[Deferred[Recorded]] = []
        self._bench: dict[str, Behaviour] = {}
        self.port = 0
        self.url = ""

    # -- lifecycle

    async def start(self) -> None:
        """Listen on ``host:port``; then :attr:`port` and :attr:`url` are set."""
        self._listening = self._reactor.listenTCP(
            self._wanted_port, self._tracker, backlog=1024, interface=self._host
        )
        self.port = self._listening.getHost().port
        self.url = f"http://{self._host}:{self.port}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening, stop every response's timers and abort every open connection.

        :return: a Deferred that fires once every connection has closed (safe to call twice).
        """

        async def stopping() -> None:
            if self._listening is not None:
                listening, self._listening = self._listening, None
                await maybeDeferred(listening.stopListening)
            for response in list(self._responses):
                response.stop()
            for wrapper in list(self._tracker.protocols):
                wrapper.transport.abortConnection()
            await self.wait_for_idle()

        return Deferred.fromCoroutine(stopping())

    # -- observing

    @property
    def open_connections(self) -> int:
        """Currently open TCP connections."""
        return len(self._tracker.protocols)

    @property
    def connections_made(self) -> int:
        """TCP connections accepted since start."""
        return self._connections_made

    @property
    def active_responses(self) -> int:
        """Responses in progress (each has at most one pending timer; none once this is 0)."""
        return len(self._responses)

    def lines_written(self) -> int:
        """:return: complete NDJSON lines written, over all requests (see :attr:`Recorded.lines_written`)."""
        return self._lines_written

    def wait_for_idle(self) -> Deferred[None]:
        """:return: a Deferred that fires when no connection is open (at once if none is)."""
        if not self._tracker.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def connection_closed(self) -> Deferred[None]:
        """:return: a Deferred that fires the next time any open connection closes."""
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    def next_request(self) -> Deferred[Recorded]:
        """:return: a Deferred that fires with the next request received."""
        d: Deferred[Recorded] = Deferred()
        self._request_waiters.append(d)
        return d

    def when_stalled(self) -> Deferred[Recorded]:
        """:return: a Deferred that fires with a stalled request (at once if one is stalled now)."""
        for response in self._stalled:
            return succeed(response.record)
        d: Deferred[Recorded] = Deferred()
        self._stall_waiters.append(d)
        return d

    def release(self) -> None:
        """Let every currently stalled stream continue to its normal end."""
        stalled, self._stalled = self._stalled, set()
        for response in stalled:
            response.resume()

    # -- internals

    def _connection_lost(self) -> None:
        waiters, self._close_waiters = self._close_waiters, []
        _fire_all(waiters, None)
        if not self._tracker.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            _fire_all(waiters, None)

    def _stall(self, response: _Response) -> None:
        self._stalled.add(response)
        waiters, self._stall_waiters = self._stall_waiters, []
        _fire_all(waiters, response.record)

    def behaviour_for(self, name: str) -> Behaviour | None:
        """:return: the behaviour answering model ``name`` (tag ``:latest`` optional), or ``None``."""
        models = self.models
        found = models.get(name)
        if found is None:
            if ":" not in name:
                found = models.get(name + ":latest")
            elif name.endswith(":latest"):
                found = models.get(name[: -len(":latest")])
        if found is None:
            found = self._bench.get(name)
            if found is None:
                match = _BENCH_NAME.match(name)
                if match is not None:
                    frames, delay_ms, first_ms = (int(g) for g in match.groups())
                    found = Behaviour(
                        reply=[_BENCH_WORDS[i % len(_BENCH_WORDS)] for i in range(frames)],
                        delay=delay_ms / 1000,
                        first_byte_delay=first_ms / 1000,
                    )
                    self._bench[name] = found
        return found

    def _send_whole(self, request: Request, status: int, content_type: bytes, body: bytes) -> int:
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
        return NOT_DONE_YET

    def _handle(self, request: Request) -> int:
        request.responseHeaders.removeHeader(b"server")
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        body = request.content.read() if request.content is not None else b""
        record = Recorded(
            method=method,
            path=path,
            headers={
                k.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in vs)
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            body=body,
            json=None,
        )
        try:
            record.json = json.loads(body) if body else None
        except ValueError:
            pass
        if self._record:
            self.requests.append(record)
        waiters, self._request_waiters = self._request_waiters, []
        _fire_all(waiters, record)
        request.notifyFinish().addBoth(
            lambda result: record._end("client_left" if isinstance(result, Failure) else "finished")
        )

        if method in ("GET", "HEAD"):
            answer = None
            if path == "/":
                answer = TEXT_UTF8, b"Ollama is running"
            elif path == "/api/version":
                answer = JSON_UTF8, go_json({"version": OLLAMA_VERSION})
            elif path == "/api/tags":
                answer = JSON_UTF8, go_json({"models": self._tags()})
            if answer is not None:
                if method == "GET" and path in self.stalled_gets:
                    _StalledAnswer(self, request, record, *answer)
                    return NOT_DONE_YET
                return self._send_whole(request, 200, *answer)
        elif method == "POST" and path in ("/api/chat", "/api/generate"):
            kind = "chat" if path == "/api/chat" else "generate"
            try:
                payload, behaviour = self._validate(kind, body)
            except _BadRequest as e:
                return self._send_whole(request, e.status, JSON_UTF8, go_json({"error": e.message}))
            if self._is_load_request(kind, payload):
                return self._answer_load(request, kind, payload, behaviour)
            _Response(self, request, record, behaviour, kind, payload).start()
            return NOT_DONE_YET
        return self._send_whole(request, 404, TEXT_UTF8, b"404 page not found")

    def _validate(self, kind: str, body: bytes) -> tuple[dict[str, Any], Behaviour]:
        payload = _decode_body(body, "ChatRequest" if kind == "chat" else "GenerateRequest")
        model = payload.get("model") or ""
        if not model:
            if kind == "chat":
                raise _BadRequest(400, "model is required")
            raise _BadRequest(404, "model '' not found")
        behaviour = self.behaviour_for(model)
        if behaviour is None:
            raise _BadRequest(404, f"model '{model}' not found")
        return payload, behaviour

    @staticmethod
    def _is_load_request(kind: str, payload: dict[str, Any]) -> bool:
        if kind == "chat":
            return not payload.get("messages")
        return not payload.get("prompt")

    def _answer_load(self, request: Request, kind: str, payload: dict[str, Any], behaviour: Behaviour) -> int:
        """Empty ``messages``/``prompt``: Ollama loads (or, with ``keep_alive: 0``, unloads) the model."""
        if behaviour.status is not None:
            return self._send_whole(request, behaviour.status, JSON_UTF8, go_json({"error": behaviour.error}))
        keep_alive = payload.get("keep_alive")
        reason = "unload" if keep_alive in (0, "0", "0s") else "load"
        obj: dict[str, Any] = {"model": payload["model"], "created_at": _clock.created_at().decode()}
        if kind == "chat":
            obj.update(message={"role": "assistant", "content": ""}, done_reason=reason, done=True)
        else:
            obj.update(response="", done=True, done_reason=reason)
        return self._send_whole(request, 200, JSON_UTF8, go_json(obj))

    def _tags(self) -> list[dict[str, Any]]:
        models = []
        for name in self.models:
            full = name if ":" in name else name + ":latest"
            models.append(
                {
                    "name": full,
                    "model": full,
                    "modified_at": "2026-11-20T09:30:00.123456789Z",
                    "size": 2019393189,
                    "digest": hashlib.sha256(full.encode()).hexdigest(),
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "llama",
                        "families": ["llama"],
                        "parameter_size": "3.2B",
                        "quantization_level": "Q4_K_M",
                    },
                }
            )
        return models


async def start_emulator(case: Any, reactor: Any = None) -> OllamaEmulator:
    """
    Start an emulator for a trial test and stop it in the test's cleanup.

    :param case: the ``TestCase`` (anything with ``addCleanup``).
    """
    emulator = OllamaEmulator(reactor)
    await emulator.start()
    case.addCleanup(emulator.stop)
    return emulator


# --------------------------------------------------------------------------------------------
# Running as a process


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.ollama_emulator [--host H] [--port P] [--print-port]``: serve until killed."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.ollama_emulator", description="Serve the Ollama emulator until killed."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--print-port", action="store_true", help="print the bound port on stdout line 1")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    emulator = OllamaEmulator(reactor, host=args.host, port=args.port, record=False)

    async def run() -> None:
        await emulator.start()
        if args.print_port:
            print(emulator.port, flush=True)

    def failed(failure: Failure) -> None:
        sys.stderr.write(failure.getTraceback())
        reactor.stop()  # type: ignore[attr-defined]

    def begin() -> None:
        Deferred.fromCoroutine(run()).addErrback(failed)

    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
