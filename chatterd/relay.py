# -*- test-case-name: tests.test_llmchat -*-
"""
Relaying Ollama's streams: ``/llmchat`` (NDJSON in, SSE frames out, the reply
stored) and ``/llmprompt`` (NDJSON passed through).

Once the ``200`` is written no exception may reach Twisted (it would append an
HTML error page to the stream), so every failure becomes one error frame and
the response then ends cleanly.  A stream ends in one of three ways:

- ``done``: Ollama's ``"done": true`` line was relayed (and the reply stored);
- ``error``: an error frame was written (the partial reply, if any, is stored);
- ``client left``: the phone went away; the upstream connection is closed at
  once and the partial reply stored.

Upstream is watched the whole time: no first byte within
``first_byte_timeout`` (model loading included), or silence longer than
``stall_timeout`` mid-stream, ends the stream with an error.  The phone's
connection is the producer's consumer: a phone that reads slowly pauses the
reading from Ollama, so nothing piles up in chatterd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest, IResponse

from chatterd import sse
from chatterd.balancer import Balancer, Lease
from chatterd.logs import Logger
from chatterd.ollama import (
    BodyStream,
    OllamaBadLine,
    OllamaError,
    OllamaHTTPError,
    OllamaUnreachable,
    describe_failure,
    parse_chat_line,
    read_error,
)
from chatterd.store import IChattStore, StoreError
from chatterd.streams import ShuttingDown
from chatterd.writing import WriteBatcher

log = Logger()
T = TypeVar("T")

#: SSE response headers (and no ``Connection`` header: HTTP/2 forbids it).
SSE_HEADERS = {
    b"content-type": b"text/event-stream",
    b"cache-control": b"no-cache, no-transform",
    b"x-accel-buffering": b"no",
}


@dataclass(frozen=True)
class RelayConfig:
    """
    Timing of relayed streams, in seconds.

    :ivar heartbeat: silence towards the phone after which ``: ping`` is written.
    :ivar first_byte_timeout: the longest wait for Ollama's first byte.
    :ivar stall_timeout: the longest silence from Ollama once it has started.
    :ivar max_reply: the longest reply, in bytes of UTF-8, that a ``/llmchat``
        stream gathers; past it the stream ends with an error (what came is stored).
    """

    heartbeat: float = 15.0
    first_byte_timeout: float = 300.0
    stall_timeout: float = 120.0
    max_reply: int = 4 * 1024 * 1024


class Truncated(OllamaError):
    """
    Ollama's stream ended without its ``done`` line.

    :ivar detail: how the connection broke (for the log, not the client).
    """

    kind = "truncated"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ReplyTooLong(OllamaError):
    """
    A reply grew past ``max_reply``.
    """

    kind = "reply_too_long"


class OllamaTimeout(OllamaError):
    """
    Ollama was silent for too long.
    """

    kind = "timeout"


@dataclass(frozen=True)
class Ending:
    """
    How a stream ended: set once, by the relay, and only read after.

    :ivar outcome: ``done``, ``error`` or ``client left`` (the metrics' label).
    :ivar kind: for an error, a short name of what failed (metrics, logs).
    :ivar detail: for an error, the whole story, for chatterd's log only.
    :ivar message: for an error, what the client was told.
    :ivar counted: which error counter it adds to: ``ollama``, ``database``
        or ``None`` (shutting down, or chatterd's own fault).
    """

    outcome: str
    kind: str | None = None
    detail: str | None = None
    message: str | None = None
    counted: str | None = None


DONE = Ending("done")
CLIENT_LEFT = Ending("client left")


def ending_of(error: BaseException) -> Ending:
    """
    The ending of a stream that ``error`` ended: the one place that says what
    each kind of failure is called, counted as, and told to the client.
    """
    kind: str
    counted: str | None
    if isinstance(error, OllamaError):
        kind, counted = error.kind, "ollama"
    elif isinstance(error, StoreError):
        kind, counted = "database", "database"
    elif isinstance(error, ShuttingDown):
        kind, counted = "shutdown", None
    elif isinstance(error, ValueError):  # a line that cannot be read (LineTooLong)
        kind, counted = "bad_line", "ollama"
    else:
        kind, counted = "internal", None
    return Ending("error", kind, detail(error), public_message(error), counted)


#: How a stream that an exception escaped (a bug) is reported.
FAILED = Ending("error", "internal", counted=None)


@dataclass(frozen=True)
class Relaying:
    """
    What every relay works with: the Ollama servers, the clock, the timing,
    and the write batcher all streams share.
    """

    ollama: Balancer
    clock: IReactorTime
    config: RelayConfig
    writer: WriteBatcher


class _Relay:
    """
    What both relays share: waiting on upstream in a way that can be aborted,
    the upstream watchdog, flow control, and noticing a client that left.
    """

    #: how it ended, once it has (see :class:`Ending`)
    ending: Ending | None = None
    #: How a stream that stops short is reported (the two routes word it apart).
    _broke_off = "Ollama's stream broke off"
    _ended_early = "Ollama's stream ended before its last line (truncated)"

    def __init__(self, request: IRequest, relaying: Relaying, *, model: str | None) -> None:
        self._request = request
        self._model = model
        self._ollama = relaying.ollama
        self._writer = relaying.writer
        self._clock = clock = relaying.clock
        self._config = relaying.config
        self._lease: Lease | None = None
        self._current: Deferred[Any] | None = None
        self._abort_reason: BaseException | None = None
        self._body: BodyStream | None = None
        self._watchdog: IDelayedCall | None = None
        self._heard_from = 0.0
        self._started = False
        self.client_left = False
        self.frames = 0
        self.bytes = 0
        self.started_at = clock.seconds()
        self.first_byte_at: float | None = None
        self._splitter = sse.LineSplitter()
        self.done = False
        request.notifyFinish().addErrback(self._left)

    def _left(self, _: Failure) -> None:
        self.client_left = True

    def _finish(self, ending: Ending) -> Ending:
        """
        Say how the stream ended: once.
        """
        assert self.ending is None, f"{self.ending} already, then {ending}"
        self.ending = ending
        return ending

    # --- aborting ---

    async def _wait(self, d: Deferred[T]) -> T:
        """
        Await ``d`` such that :meth:`abort` can interrupt it.
        """
        self._current = d
        try:
            return await d
        finally:
            self._current = None

    def abort(self, reason: BaseException) -> None:
        """
        End the stream early: close the upstream connection and report
        ``reason`` to the client as the stream's error.
        """
        if self._abort_reason is None:
            self._abort_reason = reason
        if self._current is not None:
            self._current.cancel()

    def _check_abort(self) -> None:
        """
        After a ``CancelledError``: re-raise it if the client left, else turn
        it into the reason the stream was aborted for.
        """
        if self._abort_reason is None or self.client_left:
            raise CancelledError()
        raise self._abort_reason

    # --- upstream ---

    async def _open(self, path: str, body: bytes) -> IResponse:
        """
        POST to an Ollama server with the watchdog running; raise its error
        if it answers anything but 200.
        """
        self._heard_from = self._clock.seconds()
        self._watchdog = self._clock.callLater(self._config.first_byte_timeout, self._watch)
        self._lease = self._ollama.lease(self._model)
        response = await self._wait(ensureDeferred(self._lease.post(path, body)))
        if response.code != 200:
            raise await self._wait(ensureDeferred(read_error(response)))
        return response

    def _heard(self) -> None:
        self._heard_from = self._clock.seconds()
        if self.first_byte_at is None:
            self.first_byte_at = self._heard_from
            self._started = True
            # the watchdog was set for the first byte's limit: from now on the
            # stall limit counts (else a stream that stalls at once would be
            # ended only when the first byte's limit ran out)
            if self._watchdog is not None and self._watchdog.active():
                self._watchdog.reset(self._config.stall_timeout)

    def _watch(self) -> None:
        """
        Abort when Ollama was silent too long; else look again when it next could be.
        """
        limit = self._config.stall_timeout if self._started else self._config.first_byte_timeout
        silent = self._clock.seconds() - self._heard_from
        if silent >= limit:
            self._watchdog = None
            what = "stopped sending" if self._started else "did not answer"
            self.abort(OllamaTimeout(f"Ollama {what} for {limit:g} s (the stream was ended)"))
        else:
            self._watchdog = self._clock.callLater(limit - silent, self._watch)

    async def _read(self, response: IResponse, on_data: Any) -> None:
        """
        Read the body into ``on_data`` at the client's pace, until it ends.
        """
        self._body = BodyStream(on_data)
        response.deliverBody(self._body)
        flow = self._request.channel is not None  # type: ignore[attr-defined]
        if flow:
            self._request.registerProducer(self._body.transport, True)
        try:
            await self._wait(self._body.done)
        finally:
            if flow and self._request.channel is not None:  # type: ignore[attr-defined]
                self._request.unregisterProducer()

    def _pass_through(self, data: bytes) -> None:
        """
        What to do with the raw bytes of a read, before its lines (nothing).
        """

    def _on_line(self, line: bytes) -> None:
        raise NotImplementedError

    def _on_data(self, data: bytes) -> None:
        self._heard()
        self._pass_through(data)
        try:
            for line in self._splitter.feed(data):
                self._on_line(line)
        except Exception as e:  # OllamaError, LineTooLong: end the stream with it
            assert self._body is not None
            self._body.abort(e)

    async def _read_lines(self, response: IResponse) -> None:
        """
        Read Ollama's body to its end, line by line into ``_on_line``.

        :raises Truncated: if it breaks off, or ends before its ``done`` line
            (or, passed through, Ollama's own error line).
        """
        try:
            await self._read(response, self._on_data)
        except (CancelledError, OllamaError, ValueError):
            raise
        except Exception as e:  # the connection broke: ResponseFailed and kin
            if self.done:
                return
            raise Truncated(self._broke_off, describe_failure(e)) from None
        rest = self._splitter.flush()
        if rest:
            self._on_line(rest)  # a last line without "\n" (stream: false)
        if not (self.done or self._ollama_said_error):
            raise Truncated(self._ended_early)

    #: whether Ollama's own ``{"error": ...}`` line was passed through (``/llmprompt``)
    _ollama_said_error = False

    def _end(self) -> None:
        """
        Stop the watchdog and give the server back.
        """
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._lease is not None:
            self._lease.release()


class ChatRelay(_Relay):
    """
    Relays one Ollama chat stream to one request as SSE, and stores the reply.
    """

    _broke_off = "Ollama's stream broke off before its last message"
    _ended_early = "Ollama's stream ended before its last message (truncated)"

    def __init__(
        self, request: IRequest, relaying: Relaying, *, appid: str, model: str, store: IChattStore
    ) -> None:
        super().__init__(request, relaying, model=model)
        self._appid = appid
        self._store = store
        self._reply: list[str] = []
        self._reply_left = relaying.config.max_reply
        self._heartbeat: IDelayedCall | None = None
        self._last_write = 0.0
        self._turn_over = False

    # --- writing ---

    def _write(self, data: bytes) -> None:
        self._writer.write(self._request, data)
        self.bytes += len(data)
        self._last_write = self._clock.seconds()

    def _beat(self) -> None:
        """
        Write ``: ping`` if nothing was written for ``heartbeat`` seconds, and
        check again when that much silence could next have passed.  (Writes
        only note the time; no timer is touched per frame.)
        """
        idle = self._clock.seconds() - self._last_write
        if idle >= self._config.heartbeat:
            self._write(sse.HEARTBEAT)
            idle = 0.0
        self._heartbeat = self._clock.callLater(self._config.heartbeat - idle, self._beat)

    # --- reading Ollama's lines ---

    def _on_line(self, line: bytes) -> None:
        content, done = parse_chat_line(line)  # raises before an error line is relayed
        if self.done:
            return  # nothing follows "done" in Ollama's protocol; ignore stray lines
        self._write(sse.data_frame(line))
        self.frames += 1
        self._reply.append(content)
        self.done = done
        if content:
            self._reply_left -= len(content) if content.isascii() else len(content.encode("utf-8", "replace"))
            if self._reply_left < 0 and not done:
                raise ReplyTooLong(
                    f"the reply grew past {self._config.max_reply} bytes, the most chatterd keeps; "
                    "it was cut short (what came is stored)"
                )

    async def _relay(self, body: bytes) -> None:
        await self._read_lines(await self._open("/api/chat", body))

    # --- the whole stream ---

    async def run(self, body: bytes) -> None:
        """
        Write the SSE headers, relay Ollama's answer to ``body``, store the
        reply, end the appID's turn (``store.end_turn``) and return; on a
        client disconnect, re-raise ``CancelledError`` after storing what was
        received.
        """
        request = self._request
        try:
            request.setResponseCode(200)
            for name, value in SSE_HEADERS.items():
                request.setHeader(name, value)
            self._write(b"")  # send the headers now: the phone sees the 200 at once
            self._heartbeat = self._clock.callLater(self._config.heartbeat, self._beat)
            await self._stream(body)
        except BaseException:
            if self.ending is None:  # chatterd's own failure (a bug): the turn still ends
                self._stop_timers()
                await self._end_turn()
                self._finish(FAILED)
            raise
        finally:
            self._writer.flush(request)  # before Klein finishes the request

    async def _stream(self, body: bytes) -> None:
        """
        Relay, then end the appID's turn (storing what came) and say how the
        stream ended, whatever happens; a client that left is re-raised.
        """
        error: BaseException | None = None
        try:
            try:
                await self._relay(body)
            except CancelledError:
                self._check_abort()
        except CancelledError:
            self._stop_timers()
            await self._end_turn()
            self._finish(CLIENT_LEFT)
            raise
        except Exception as e:
            if not self.done:  # a failure after "done" changes nothing for the phone
                error = e
        self._stop_timers()
        ending = CLIENT_LEFT if self.client_left else DONE if error is None else ending_of(error)
        if ending.message is not None:
            self._write(sse.error_frame(ending.message))
        failed = await self._end_turn()
        if failed is not None and ending.outcome != "error":
            stored = ending_of(failed)
            ending = replace(stored, message=f"the reply could not be stored: {stored.message}")
            self._write(sse.error_frame(ending.message))
        self._finish(ending)

    async def _end_turn(self) -> BaseException | None:
        """
        Store the reply and end the appID's turn.  The reply is stored always
        after ``done``, otherwise only if some of it arrived (the history then
        shows what the user saw).

        :returns: why storing failed, or ``None``.
        """
        if self._turn_over:
            return None
        self._turn_over = True
        reply = self.reply if (self.done or self._reply) else None
        try:
            await self._store.end_turn(self._appid, reply)
        except CancelledError:
            # The phone hung up while the reply was being stored (common right
            # after "done"): the write goes on (the store shields it); nothing failed.
            return None
        except Exception as e:  # StoreError, or a bug: either way the stream must end cleanly
            log.error("could not store the reply for {appid}: {e}", appid=self._appid, e=detail(e))
            return e
        return None

    @property
    def reply(self) -> str:
        return "".join(self._reply)

    def _stop_timers(self) -> None:
        self._end()
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None


class GenerateRelay(_Relay):
    """
    Passes one Ollama ``/api/generate`` stream through, byte for byte.

    Lines are still read (for the counts, and to know how the stream ended),
    but never changed.  Ollama's own way to report a failure after the
    ``200`` is a last ``{"error": ...}`` line; this relay ends a stream that
    broke off, or ended without its ``done`` line, the same way.
    """

    def __init__(self, request: IRequest, relaying: Relaying, *, model: str | None) -> None:
        super().__init__(request, relaying, model=model)
        self._ended_line = True

    def _pass_through(self, data: bytes) -> None:
        self._writer.write(self._request, data)
        self.bytes += len(data)
        self._ended_line = data.endswith(b"\n")

    def _on_line(self, line: bytes) -> None:
        self.frames += 1
        try:
            obj = json.loads(line)
        except ValueError:
            return  # passed through as it came; the client parses it
        if isinstance(obj, dict):
            if "error" in obj:
                self._ollama_said_error = True  # already relayed
            self.done = self.done or obj.get("done") is True

    async def _relay(self, body: bytes) -> bytes | None:
        request = self._request
        try:
            response = await self._open("/api/generate", body)
        except OllamaHTTPError as error:
            self._finish(ending_of(error))
            request.setResponseCode(error.status)
            if ollama_said(error) is None:  # not Ollama's own words: say only what happened
                request.setHeader(b"content-type", b"application/json")
                return json.dumps({"error": public_message(error)}).encode()
            request.setHeader(b"content-type", error.content_type)
            return error.body
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.write(b"")
        await self._read_lines(response)
        return None

    async def run(self, body: bytes) -> bytes | None:
        """
        Relay Ollama's answer to ``body``.

        :returns: a body for Klein to write when Ollama answered an error
            (its status and content type are set), else ``None``.
        """
        request = self._request
        try:
            try:
                answer = await self._relay(body)
            except CancelledError:
                self._check_abort()
            finally:
                self._writer.flush(request)
        except CancelledError:
            self._finish(CLIENT_LEFT)
            raise
        except Exception as e:
            ending = self._finish(ending_of(e))
            if not request.startedWriting:  # type: ignore[attr-defined]
                raise
            line = json.dumps({"error": ending.message}).encode()
            request.write((b"" if self._ended_line else b"\n") + line + b"\n")
            return None
        except BaseException:
            self._finish(FAILED)
            raise
        finally:
            self._end()
        if self.ending is None:  # not Ollama's error answer
            self._finish(Ending("error", "error", "Ollama's own error line", counted="ollama")
                         if self._ollama_said_error else DONE)
        return answer


def ollama_said(error: OllamaHTTPError) -> str | None:
    """
    Ollama's own error message in an error answer (``{"error": "..."}``, the
    words Ollama means for its clients), or ``None`` if the body is anything
    else (a proxy's HTML page, a stack trace): that stays in chatterd's log.
    """
    try:
        obj = json.loads(error.body)
    except ValueError:
        return None
    text = obj.get("error") if isinstance(obj, dict) else None
    return text[:MAX_OLLAMA_TEXT] if isinstance(text, str) else None


#: The most of Ollama's own error text passed on to a client.
MAX_OLLAMA_TEXT = 500
#: How :func:`chatterd.ollama.parse_chat_line` words an error line: this, then Ollama's text.
_OLLAMA_SAID = "Ollama: "


def public_message(error: BaseException) -> str:
    """
    What a client is told about ``error`` (in an error frame or a JSON
    error): what failed, in words meant for the app's user and developer,
    and nothing internal: no Ollama address, no socket error, no text that
    did not come from Ollama's own error messages.  :func:`detail` is the
    whole story, for the log.
    """
    if isinstance(error, OllamaHTTPError):
        said = ollama_said(error)
        return f"Ollama answered {error.status}" + (f": {said}" if said else "")
    if isinstance(error, OllamaUnreachable):
        return "cannot reach Ollama (see chatterd's log)"
    if isinstance(error, OllamaBadLine):
        return error.public
    if type(error) is OllamaError:
        # Ollama's own {"error": ...} line mid-stream, "Ollama: <its text>":
        # the text is passed on, as much of it as of an error answer
        return str(error)[:len(_OLLAMA_SAID) + MAX_OLLAMA_TEXT]
    if isinstance(error, (OllamaError, StoreError, ValueError, ShuttingDown)):
        return str(error)
    log.failure("unexpected error in a stream", Failure(error))
    return "chatterd failed while relaying the reply (see its log)"


def detail(error: BaseException) -> str:
    """
    Everything known about ``error``, for chatterd's log.
    """
    text = str(error) or type(error).__name__
    more = getattr(error, "detail", "")
    return f"{text}: {more}" if more else text
