# -*- test-case-name: tests.test_llmchat -*-
"""
One ``/llmchat`` stream: Ollama's NDJSON in, SSE frames out, the reply stored.

Once the ``200`` is written no exception may reach Twisted (it would append an
HTML error page to the stream), so every failure becomes one SSE error frame
and the response then ends cleanly.  A stream ends in one of three ways:

- ``done``: Ollama's ``"done": true`` line was relayed and the reply stored;
- ``error``: an error frame was written (the partial reply, if any, is stored);
- ``client left``: the phone went away; the upstream connection is closed at
  once and the partial reply stored.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from chatterd import sse
from chatterd.ollama import (
    BodyStream,
    OllamaClient,
    OllamaError,
    describe_failure,
    parse_chat_line,
)
from chatterd.store import IChattStore, StoreError

log = Logger()

#: SSE response headers (and no ``Connection`` header: HTTP/2 forbids it).
SSE_HEADERS = {
    b"content-type": b"text/event-stream",
    b"cache-control": b"no-cache, no-transform",
    b"x-accel-buffering": b"no",
}


class Truncated(OllamaError):
    """
    Ollama's stream ended without its ``done`` line.
    """


class ChatRelay:
    """
    Relays one Ollama chat stream to one request.

    :param heartbeat: seconds of silence after which ``: ping`` is written.
    """

    def __init__(
        self,
        request: IRequest,
        *,
        appid: str,
        store: IChattStore,
        ollama: OllamaClient,
        clock: IReactorTime,
        heartbeat: float,
    ) -> None:
        self._request = request
        self._appid = appid
        self._store = store
        self._ollama = ollama
        self._clock = clock
        self._heartbeat = heartbeat
        self._splitter = sse.LineSplitter()
        self._reply: list[str] = []
        self._body: BodyStream | None = None
        self._timer: IDelayedCall | None = None
        self._last_write = 0.0
        self.done = False
        self.frames = 0
        self.outcome = "running"

    # --- writing ---

    def _write(self, data: bytes) -> None:
        self._request.write(data)
        self._last_write = self._clock.seconds()

    def _beat(self) -> None:
        """
        Write ``: ping`` if nothing was written for ``heartbeat`` seconds, and
        check again when that much silence could next have passed.  (Writes
        only note the time; no timer is touched per frame.)
        """
        idle = self._clock.seconds() - self._last_write
        if idle >= self._heartbeat:
            self._write(sse.HEARTBEAT)
            idle = 0.0
        self._timer = self._clock.callLater(self._heartbeat - idle, self._beat)

    # --- reading Ollama's lines ---

    def _on_line(self, line: bytes) -> None:
        content, done = parse_chat_line(line)  # raises before an error line is relayed
        if self.done:
            return  # nothing follows "done" in Ollama's protocol; ignore stray lines
        self._write(sse.data_frame(line))
        self.frames += 1
        self._reply.append(content)
        self.done = done

    def _on_data(self, data: bytes) -> None:
        try:
            for line in self._splitter.feed(data):
                self._on_line(line)
        except Exception as e:  # OllamaError, LineTooLong: end the stream with it
            assert self._body is not None
            self._body.abort(e)

    async def _relay(self, body: bytes) -> None:
        response = await self._ollama.post("/api/chat", body)
        if response.code != 200:
            raise await self._ollama.read_error(response)
        self._body = BodyStream(self._on_data)
        response.deliverBody(self._body)
        try:
            await self._body.done
        except (CancelledError, OllamaError, ValueError):
            raise
        except Exception as e:  # the connection broke: ResponseFailed and kin
            if self.done:
                return
            raise Truncated(f"Ollama's stream broke off before its last message: {describe_failure(e)}") from None
        rest = self._splitter.flush()
        if rest:
            self._on_line(rest)  # a last line without "\n" (stream: false)
        if not self.done:
            raise Truncated("Ollama's stream ended before its last message (truncated)")

    # --- the whole stream ---

    async def run(self, body: bytes) -> None:
        """
        Write the SSE headers, relay Ollama's answer to ``body``, store the
        reply and return; on a client disconnect, re-raise ``CancelledError``
        after storing what was received.
        """
        request = self._request
        request.setResponseCode(200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        self._write(b"")  # send the headers now: the phone sees the 200 at once
        self._timer = self._clock.callLater(self._heartbeat, self._beat)
        error: BaseException | None = None
        try:
            await self._relay(body)
        except CancelledError:
            self.outcome = "client left"
            self._stop_heartbeat()
            await self._store_reply(report=False)
            raise
        except Exception as e:
            if not self.done:  # a failure after "done" changes nothing for the phone
                error = e
        self._stop_heartbeat()
        if error is not None:
            self.outcome = "error"
            self._write(sse.error_frame(_describe(error)))
        else:
            self.outcome = "done"
        await self._store_reply(report=error is None)

    async def _store_reply(self, *, report: bool) -> None:
        """
        Store the reply: always after ``done``, otherwise only if some of it
        arrived (the history then shows what the user saw).

        :param report: write an error frame if storing fails.
        """
        if not (self.done or self._reply):
            return
        try:
            await self._store.add_reply(self._appid, "".join(self._reply))
        except Exception as e:  # StoreError, or a bug: either way the stream must end cleanly
            log.error("could not store the reply for {appid}: {e}", appid=self._appid, e=e)
            if report:
                self.outcome = "error"
                self._write(sse.error_frame(f"the reply could not be stored: {_describe(e)}"))

    def _stop_heartbeat(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _describe(error: BaseException) -> str:
    """
    The message of an error frame: an Ollama or store error's own words,
    never a traceback.
    """
    if isinstance(error, (OllamaError, StoreError, ValueError)):
        return str(error)
    log.failure("unexpected error in a chat stream", Failure(error))
    return "chatterd failed while relaying the reply (see its log)"

