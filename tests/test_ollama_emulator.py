"""
Tests of the Ollama emulator itself, with real treq/Agent requests over TCP.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    ProcessDone,
    ProcessTerminated,
)
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from tests.ollama_emulator import (
    DEFAULT_ERROR,
    Behaviour,
    OllamaEmulator,
    closed_port,
    go_json,
    start_emulator,
)

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Say hello"}]}
GENERATE = {"model": "llama3.2", "prompt": "Say hello", "stream": True}
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
FINAL_CHAT_KEYS = [
    "model",
    "created_at",
    "message",
    "done_reason",
    "done",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]
METRICS = FINAL_CHAT_KEYS[5:]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sleep(seconds: float) -> Deferred[None]:
    """:return: a Deferred that fires after ``seconds`` on the global reactor."""
    return deferLater(reactor, seconds, lambda: None)


class BodyReader(Protocol):
    """Collects a response body read by read, and the reason it ended."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.reason: Failure | None = None
        self._ended: Deferred[None] = Deferred()
        self._line_waiters: list[tuple[int, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        """Keep each read separately."""
        self.reads.append(data)
        count = self.body().count(b"\n")
        ready = [d for n, d in self._line_waiters if count >= n]
        self._line_waiters = [(n, d) for n, d in self._line_waiters if count < n]
        for d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        """Record how the body ended (``ResponseDone`` when complete)."""
        self.reason = reason
        self._ended.callback(None)

    async def ended(self) -> Failure:
        """:return: once the body has ended, why (a ``Failure`` of ``ResponseDone`` when complete)."""
        await self._ended
        assert self.reason is not None
        return self.reason

    def body(self) -> bytes:
        """:return: all bytes read so far."""
        return b"".join(self.reads)

    def lines(self) -> list[bytes]:
        """:return: the complete lines read so far, without their ``\\n``."""
        return self.body().split(b"\n")[:-1]

    def objects(self) -> list[dict[str, Any]]:
        """:return: the complete lines read so far, parsed as JSON."""
        return [json.loads(line) for line in self.lines()]

    def wait_lines(self, n: int) -> Deferred[None]:
        """:return: a Deferred that fires once ``n`` complete lines have been read."""
        d: Deferred[None] = Deferred()
        if self.body().count(b"\n") >= n:
            d.callback(None)
        else:
            self._line_waiters.append((n, d))
        return d


class EmulatorTestCase(TestCase):
    """Starts an emulator and a non-persistent connection pool for each test."""

    async def setUp(self) -> None:
        """Start the emulator; clean up the pool after the emulator has stopped."""
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.emu = await start_emulator(self)

    def post(self, path: str, payload: Any, **kwargs: Any) -> Deferred[IResponse]:
        """POST ``payload`` as JSON to the emulator, unbuffered."""
        return treq.post(self.emu.url + path, json=payload, unbuffered=True, pool=self.pool, **kwargs)

    def read(self, response: IResponse) -> BodyReader:
        """Start reading ``response``'s body, read by read."""
        reader = BodyReader()
        response.deliverBody(reader)
        return reader

    async def stream(self, path: str, payload: Any) -> tuple[IResponse, BodyReader, Failure]:
        """POST and read the whole body: :return: the response, the reader and how the body ended."""
        response = await self.post(path, payload)
        reader = self.read(response)
        reason = await reader.ended()
        return response, reader, reason

    def assert_data_loss(self, reason: Failure) -> None:
        """Assert the body ended with a ``ResponseFailed`` (not ``ResponseDone``)."""
        self.assertIsInstance(reason.value, ResponseFailed, reason)


class NormalStreamTests(EmulatorTestCase):
    """Streams without faults."""

    async def test_chat_stream(self) -> None:
        """A chat streams one chunk per reply piece then a final line with every done field."""
        response, reader, reason = await self.stream("/api/chat", CHAT)
        self.assertIsInstance(reason.value, ResponseDone)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        self.assertIs(response.length, UNKNOWN_LENGTH)  # chunked
        self.assertTrue(reader.body().endswith(b"\n"))
        objects = reader.objects()
        self.assertEqual(len(objects), 5)
        for line, obj in zip(reader.lines(), objects):
            self.assertEqual(line, go_json(obj))  # compact, as Go encodes it
            self.assertRegex(obj["created_at"], CREATED_AT)
        for piece, obj in zip(["Hello", ",", " world", "!"], objects):
            self.assertEqual(list(obj), ["model", "created_at", "message", "done"])
            self.assertEqual(obj["model"], "llama3.2")
            self.assertEqual(obj["message"], {"role": "assistant", "content": piece})
            self.assertIs(obj["done"], False)
        final = objects[-1]
        self.assertEqual(list(final), FINAL_CHAT_KEYS)
        self.assertEqual(final["message"], {"role": "assistant", "content": ""})
        self.assertEqual((final["done_reason"], final["done"], final["eval_count"]), ("stop", True, 4))
        for key in METRICS:
            self.assertIsInstance(final[key], int)
            self.assertGreater(final[key], 0)
        record = self.emu.requests[-1]
        self.assertEqual((record.method, record.path, record.json), ("POST", "/api/chat", CHAT))
        self.assertEqual(record.headers["content-type"], "application/json; charset=UTF-8")
        self.assertEqual(json.loads(record.body), CHAT)
        self.assertEqual((record.lines_written, record.outcome), (5, "finished"))
        self.assertEqual(self.emu.lines_written(), 5)

    async def test_generate_stream(self) -> None:
        """/api/generate chunks carry ``response``; the final one carries done fields and ``context``."""
        _, reader, reason = await self.stream("/api/generate", GENERATE)
        self.assertIsInstance(reason.value, ResponseDone)
        objects = reader.objects()
        self.assertEqual([list(o) for o in objects[:-1]], [["model", "created_at", "response", "done"]] * 4)
        self.assertEqual("".join(o["response"] for o in objects), "Hello, world!")
        final = objects[-1]
        head = ["model", "created_at", "response", "done", "done_reason", "context"]
        self.assertEqual(list(final)[:6], head)
        self.assertEqual(list(final)[6:], METRICS)
        self.assertEqual((final["response"], final["done"]), ("", True))
        self.assertTrue(all(isinstance(t, int) for t in final["context"]))

    async def test_stream_false(self) -> None:
        """``stream: false`` answers one application/json object with the whole content."""
        response = await self.post("/api/chat", {**CHAT, "stream": False})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        body = await treq.content(response)
        obj = json.loads(body)
        self.assertEqual(body, go_json(obj))
        self.assertEqual(list(obj), FINAL_CHAT_KEYS)
        self.assertEqual(obj["message"], {"role": "assistant", "content": "Hello, world!"})

    async def test_stream_false_generate_faults(self) -> None:
        """``stream: false`` generate: a stall holds the answer until release; truncation cuts the body."""
        self.emu.models["stall"] = Behaviour(stall_after=1)
        answer = self.post("/api/generate", {**GENERATE, "model": "stall", "stream": False})
        await self.emu.when_stalled()
        self.emu.release()
        obj = await treq.json_content(await answer)
        self.assertEqual((obj["response"], obj["done"]), ("Hello, world!", True))
        self.emu.models["cut"] = Behaviour(truncate_after=1)
        response = await self.post("/api/generate", {**GENERATE, "model": "cut", "stream": False})
        reader = self.read(response)
        self.assert_data_loss(await reader.ended())
        self.assertEqual(len(reader.body()), response.length // 2)

    async def test_model_tag_and_custom_reply(self) -> None:
        """``name:latest`` finds ``name``; content is escaped like Go (``<`` as ``\\u003c``), UTF-8 kept."""
        self.emu.models["custom"] = Behaviour(reply=["<b>&", "é", "a\nb"])
        _, reader, _ = await self.stream("/api/chat", {**CHAT, "model": "custom:latest"})
        self.assertIn(b'"content":"\\u003cb\\u003e\\u0026"', reader.body())
        self.assertIn('"content":"é"'.encode(), reader.body())
        self.assertEqual([o["message"]["content"] for o in reader.objects()], ["<b>&", "é", "a\nb", ""])
        self.assertEqual(reader.objects()[0]["model"], "custom:latest")

    async def test_thinking(self) -> None:
        """Thinking pieces stream as ``message.thinking`` before the content."""
        self.emu.models["think"] = Behaviour(thinking=["Hmm"], reply=["Hi"])
        _, reader, _ = await self.stream("/api/chat", {**CHAT, "model": "think"})
        messages = [o["message"] for o in reader.objects()]
        self.assertEqual(messages[0], {"role": "assistant", "content": "", "thinking": "Hmm"})
        self.assertEqual(messages[1], {"role": "assistant", "content": "Hi"})

    async def test_load_request(self) -> None:
        """Empty ``messages`` loads the model: one JSON object with ``done_reason: load``."""
        response = await self.post("/api/chat", {"model": "llama3.2", "messages": []})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        obj = await treq.json_content(response)
        self.assertEqual((obj["done_reason"], obj["done"], obj["message"]["content"]), ("load", True, ""))

    async def test_delays(self) -> None:
        """``first_byte_delay`` holds back headers and the first chunk; ``delay`` spaces the lines."""
        self.emu.models["slow"] = Behaviour(reply=["a", "b"], first_byte_delay=0.2, delay=0.05)
        start = time.monotonic()
        response = await self.post("/api/chat", {**CHAT, "model": "slow"})
        self.assertGreaterEqual(time.monotonic() - start, 0.19)
        reader = self.read(response)
        await reader.ended()
        self.assertGreaterEqual(time.monotonic() - start, 0.29)
        self.assertEqual(reader.objects()[-1]["load_duration"], 200_000_000)

    async def test_headers_first(self) -> None:
        """``headers_first`` sends the 200 headers before ``first_byte_delay`` ends."""
        self.emu.models["h"] = Behaviour(first_byte_delay=0.3, headers_first=True)
        start = time.monotonic()
        response = await self.post("/api/chat", {**CHAT, "model": "h"})
        self.assertLess(time.monotonic() - start, 0.25)
        reader = self.read(response)
        await reader.ended()
        self.assertEqual(len(reader.lines()), 5)

    async def test_bench_model(self) -> None:
        """``bench-<frames>x<delay>ms-<first>ms`` streams that many chunks then the done line."""
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "bench-30x1ms-0ms"})
        self.assertIsInstance(reason.value, ResponseDone)
        objects = reader.objects()
        self.assertEqual(len(objects), 31)
        self.assertEqual(objects[-1]["eval_count"], 30)
        self.assertNotIn("bench-30x1ms-0ms", self.emu.models)


class ErrorAnswerTests(EmulatorTestCase):
    """Errors answered with a status before any byte is streamed."""

    async def assert_error(self, path: str, body: bytes, status: int, text: str) -> None:
        """POST raw ``body`` and check the status and the exact ``{"error": text}`` body."""
        response = await treq.post(self.emu.url + path, data=body, pool=self.pool)
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        self.assertEqual(await treq.content(response), go_json({"error": text}))

    async def test_unknown_model(self) -> None:
        """An unknown model gets 404 with Ollama's exact text."""
        chat = json.dumps({**CHAT, "model": "nope"}).encode()
        await self.assert_error("/api/chat", chat, 404, "model 'nope' not found")
        generate = b'{"model":"nope","prompt":"x"}'
        await self.assert_error("/api/generate", generate, 404, "model 'nope' not found")

    async def test_missing_model(self) -> None:
        """A chat without a model gets 400 ``model is required``."""
        await self.assert_error("/api/chat", b'{"messages":[]}', 400, "model is required")

    async def test_bad_json(self) -> None:
        """Bad bodies get 400 with Go's decoder messages."""
        text = "invalid character 'h' looking for beginning of value"
        await self.assert_error("/api/chat", b"hello", 400, text)
        await self.assert_error("/api/chat", b'{"model":"llama3.2"', 400, "unexpected EOF")
        await self.assert_error("/api/chat", b"", 400, "missing request body")
        await self.assert_error(
            "/api/chat", b"[1]", 400, "json: cannot unmarshal array into Go value of type api.ChatRequest"
        )

    async def test_status(self) -> None:
        """``status`` answers that HTTP status with ``{"error": error}``."""
        busy = "server busy, please try again.  maximum pending requests exceeded"
        self.emu.models["busy"] = Behaviour(status=503, error=busy)
        body = json.dumps({**CHAT, "model": "busy"}).encode()
        await self.assert_error("/api/chat", body, 503, busy)

    async def test_stream_false_error(self) -> None:
        """With ``stream: false`` a mid-generation error becomes a 500 status."""
        self.emu.models["bad"] = Behaviour(error_after=2)
        body = json.dumps({**CHAT, "model": "bad", "stream": False}).encode()
        await self.assert_error("/api/chat", body, 500, DEFAULT_ERROR)


class FaultTests(EmulatorTestCase):
    """Scripted faults in the middle of a stream."""

    async def test_error_after(self) -> None:
        """``error_after`` writes N chunks, an error line without ``done``, and ends the response cleanly."""
        self.emu.models["bad"] = Behaviour(error_after=2)
        response, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "bad"})
        self.assertEqual(response.code, 200)
        self.assertIsInstance(reason.value, ResponseDone)
        objects = reader.objects()
        self.assertEqual(len(objects), 3)
        self.assertEqual(objects[-1], {"error": DEFAULT_ERROR})
        self.assertEqual(reader.lines()[-1], b'{"error":"an error was encountered while running the model"}')

    async def test_not_json_after(self) -> None:
        """``not_json_after`` writes a non-JSON line after N chunks, then carries on to the done line."""
        self.emu.models["html"] = Behaviour(not_json_after=1, not_json_line=b"<html>oops")
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "html"})
        self.assertIsInstance(reason.value, ResponseDone)
        lines = reader.lines()
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[1], b"<html>oops")
        self.assertIs(json.loads(lines[-1])["done"], True)

    async def test_truncate_after(self) -> None:
        """``truncate_after`` closes the connection mid-body: the client sees data loss, no done line."""
        self.emu.models["cut"] = Behaviour(truncate_after=2)
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "cut"})
        self.assert_data_loss(reason)
        self.assertEqual(len(reader.lines()), 2)
        self.assertEqual(self.emu.requests[-1].outcome, "truncated")

    async def test_reset_after(self) -> None:
        """``reset_after`` aborts the connection (RST) after N chunks have been delivered."""
        self.emu.models["rst"] = Behaviour(reset_after=2)
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "rst"})
        self.assert_data_loss(reason)
        self.assertTrue(any(f.check(ConnectionLost) for f in reason.value.reasons), reason.value.reasons)
        self.assertEqual(len(reader.lines()), 2)
        self.assertEqual(self.emu.requests[-1].outcome, "reset")

    async def test_stall_then_release(self) -> None:
        """``stall_after`` stops writing after N chunks until ``release()``, then the stream completes."""
        self.emu.models["stall"] = Behaviour(stall_after=2)
        response = await self.post("/api/chat", {**CHAT, "model": "stall"})
        reader = self.read(response)
        record = await self.emu.when_stalled()
        await reader.wait_lines(2)
        await sleep(0.05)
        self.assertEqual((len(reader.lines()), record.lines_written, record.outcome), (2, 2, None))
        self.emu.release()
        reason = await reader.ended()
        self.assertIsInstance(reason.value, ResponseDone)
        self.assertEqual(len(reader.lines()), 5)
        self.assertEqual(record.outcome, "finished")

    async def test_stall_then_client_leaves(self) -> None:
        """A client leaving a stalled stream closes the server side and leaves no timers."""
        self.emu.models["stall"] = Behaviour(stall_after=1)
        response = await self.post("/api/chat", {**CHAT, "model": "stall"})
        reader = self.read(response)
        await reader.wait_lines(1)
        record = await self.emu.when_stalled()
        self.assertEqual(self.emu.open_connections, 1)
        closed = self.emu.connection_closed()
        reader.transport.stopProducing()  # type: ignore[union-attr]
        await closed
        self.assertEqual(await record.ended(), "client_left")
        self.assertEqual((self.emu.open_connections, self.emu.active_responses), (0, 0))
        self.emu.release()  # nothing left to release
        self.assertEqual(record.lines_written, 1)
        self.assert_data_loss(await reader.ended())

    async def test_client_leaves_mid_stream(self) -> None:
        """When the client leaves mid-stream the emulator notices and stops writing (timers cancelled)."""
        self.emu.models["long"] = Behaviour(reply=["x"] * 50, delay=0.02)
        response = await self.post("/api/chat", {**CHAT, "model": "long"})
        reader = self.read(response)
        await reader.wait_lines(3)
        reader.transport.stopProducing()  # type: ignore[union-attr]
        await self.emu.wait_for_idle()
        record = self.emu.requests[-1]
        self.assertEqual(await record.ended(), "client_left")
        written = record.lines_written
        self.assertLess(written, 10)
        await sleep(0.1)
        self.assertEqual((record.lines_written, self.emu.lines_written()), (written, written))
        self.assertEqual(self.emu.active_responses, 0)

    async def test_split(self) -> None:
        """``split`` writes each line in two pieces that arrive in separate reads."""
        self.emu.models["split"] = Behaviour(split=True)
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "split"})
        self.assertIsInstance(reason.value, ResponseDone)
        self.assertEqual(len(reader.objects()), 5)
        boundaries, offset = set(), 0
        for read in reader.reads:
            offset += len(read)
            boundaries.add(offset)
        start = 0
        for line in reader.lines():
            end = start + len(line) + 1
            self.assertTrue(any(start < b < end for b in boundaries), (line, reader.reads))
            start = end

    async def test_coalesce(self) -> None:
        """``coalesce`` writes every line at once: all of them arrive in a single read."""
        self.emu.models["lump"] = Behaviour(coalesce=True, delay=0.5)
        _, reader, reason = await self.stream("/api/chat", {**CHAT, "model": "lump"})
        self.assertIsInstance(reason.value, ResponseDone)
        self.assertEqual(len(reader.reads), 1)
        self.assertEqual(reader.reads[0].count(b"\n"), 5)

    async def test_drop_before_response(self) -> None:
        """``drop_before_response`` reads the request and closes without a response byte."""
        self.emu.models["drop"] = Behaviour(drop_before_response=True)
        with self.assertRaises(ResponseNeverReceived):
            await self.post("/api/chat", {**CHAT, "model": "drop"})
        self.assertEqual(self.emu.requests[-1].json["model"], "drop")
        self.assertEqual(self.emu.requests[-1].outcome, "dropped")

    async def test_never_answer(self) -> None:
        """``never_answer`` holds the request until the client gives up; the emulator sees it leave."""
        self.emu.models["mute"] = Behaviour(never_answer=True)
        requested = self.emu.next_request()
        answer = self.post("/api/chat", {**CHAT, "model": "mute"})
        answered: list[object] = []
        answer.addBoth(lambda result: answered.append(result) or result)
        record = await requested
        await sleep(0.1)
        self.assertEqual(answered, [])  # (Deferred.called is already true: it is chained, waiting)
        answer.cancel()
        with self.assertRaises((CancelledError, ResponseNeverReceived)):
            await answer
        self.assertEqual(await record.ended(), "client_left")
        await self.emu.wait_for_idle()

    async def test_stop_with_open_stream(self) -> None:
        """``stop()`` aborts open streams and fires once every connection is closed."""
        self.emu.models["stall"] = Behaviour(stall_after=1)
        response = await self.post("/api/chat", {**CHAT, "model": "stall"})
        reader = self.read(response)
        record = await self.emu.when_stalled()
        await self.emu.stop()
        self.assertEqual((self.emu.open_connections, record.outcome), (0, "stopped"))
        self.assert_data_loss(await reader.ended())
        with self.assertRaises(ConnectionRefusedError):
            await treq.get(self.emu.url + "/", pool=self.pool)


class OtherEndpointTests(EmulatorTestCase):
    """Health-check endpoints and connection errors."""

    async def test_root(self) -> None:
        """``GET /`` and ``HEAD /`` answer ``Ollama is running``."""
        response = await treq.get(self.emu.url + "/", pool=self.pool)
        self.assertEqual((response.code, await treq.content(response)), (200, b"Ollama is running"))
        response = await treq.head(self.emu.url + "/", pool=self.pool)
        self.assertEqual((response.code, await treq.content(response)), (200, b""))

    async def test_version(self) -> None:
        """``GET /api/version`` answers the version."""
        response = await treq.get(self.emu.url + "/api/version", pool=self.pool)
        self.assertEqual(await treq.content(response), b'{"version":"0.12.0"}')

    async def test_tags(self) -> None:
        """``GET /api/tags`` lists the configured models with a ``:latest`` tag."""
        self.emu.models["qwen3:8b"] = Behaviour()
        response = await treq.get(self.emu.url + "/api/tags", pool=self.pool)
        models = (await treq.json_content(response))["models"]
        self.assertEqual([m["name"] for m in models], ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual([m["model"] for m in models], ["llama3.2:latest", "qwen3:8b"])
        self.assertEqual(list(models[0]), ["name", "model", "modified_at", "size", "digest", "details"])

    async def test_stalled_get_then_release(self) -> None:
        """
        A path in ``stalled_gets`` gets its headers and half its body, then nothing until
        ``release()``, which sends the rest.
        """
        self.emu.stalled_gets.add("/api/version")
        response = await treq.get(self.emu.url + "/api/version", unbuffered=True, pool=self.pool)
        self.assertEqual((response.code, response.length), (200, len(b'{"version":"0.12.0"}')))
        reader = self.read(response)
        record = await self.emu.when_stalled()
        await sleep(0.05)
        self.assertEqual((reader.body(), record.outcome), (b'{"version"', None))
        self.emu.release()
        self.assertIsInstance((await reader.ended()).value, ResponseDone)
        self.assertEqual((reader.body(), record.outcome), (b'{"version":"0.12.0"}', "finished"))

    async def test_stalled_get_then_client_leaves(self) -> None:
        """A client leaving a stalled GET closes the connection and leaves nothing behind."""
        self.emu.stalled_gets.add("/api/tags")
        response = await treq.get(self.emu.url + "/api/tags", unbuffered=True, pool=self.pool)
        reader = self.read(response)
        record = await self.emu.when_stalled()
        closed = self.emu.connection_closed()
        reader.transport.stopProducing()  # type: ignore[union-attr]
        await closed
        self.assertEqual(await record.ended(), "client_left")
        self.assertEqual((self.emu.open_connections, self.emu.active_responses), (0, 0))
        self.assert_data_loss(await reader.ended())

    async def test_unknown_path(self) -> None:
        """Unknown paths get gin's plain-text 404."""
        response = await treq.get(self.emu.url + "/api/nothing", pool=self.pool)
        self.assertEqual((response.code, await treq.content(response)), (404, b"404 page not found"))

    async def test_closed_port_refuses(self) -> None:
        """``closed_port()`` gives a port that refuses connections."""
        with self.assertRaises(ConnectionRefusedError):
            await treq.get(f"http://127.0.0.1:{closed_port()}/", pool=self.pool)

    async def test_connection_counting(self) -> None:
        """``open_connections`` counts live connections and ``wait_for_idle`` waits for them to close."""
        self.assertEqual(self.emu.open_connections, 0)
        self.emu.models["stall"] = Behaviour(stall_after=0, headers_first=True)
        response = await self.post("/api/chat", {**CHAT, "model": "stall"})
        self.assertEqual((self.emu.open_connections, self.emu.connections_made), (1, 1))
        reader = self.read(response)
        await self.emu.when_stalled()
        self.emu.release()
        await reader.ended()
        await self.emu.wait_for_idle()
        self.assertEqual(self.emu.open_connections, 0)


class _FirstLine(ProcessProtocol):
    """Captures the first stdout line of a child process and when it ends."""

    def __init__(self) -> None:
        self.out = b""
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        """Fire ``first_line`` once a newline arrives."""
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n")[0])

    def processEnded(self, reason: Failure) -> None:
        """Fire ``ended``."""
        self.reason = reason
        if not self.first_line.called:
            self.first_line.errback(reason)
        self.ended.callback(None)


class ProcessModeTests(TestCase):
    """The emulator run as a separate process, as benchmarks use it."""

    async def test_print_port(self) -> None:
        """``python -m tests.ollama_emulator --port 0 --print-port`` prints its port, serves bench models."""
        proto = _FirstLine()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            proto,
            sys.executable,
            [sys.executable, "-m", "tests.ollama_emulator", "--port", "0", "--print-port"],
            env={**os.environ, "PYTHONPATH": REPO},
            path=REPO,
        )
        try:
            port = int(await proto.first_line)
            pool = HTTPConnectionPool(reactor, persistent=False)
            response = await treq.post(
                f"http://127.0.0.1:{port}/api/chat", json={**CHAT, "model": "bench-5x1ms-0ms"}, pool=pool
            )
            lines = (await treq.content(response)).splitlines()
            self.assertEqual(len(lines), 6)
            self.assertIs(json.loads(lines[-1])["done"], True)
        finally:
            process.signalProcess("TERM")
            await proto.ended
        assert proto.reason is not None
        self.assertTrue(proto.reason.check(ProcessDone, ProcessTerminated))


class InjectedReactorTests(TestCase):
    """Construction details."""

    async def test_explicit_reactor(self) -> None:
        """An explicitly passed reactor is used, and ``stop()`` may be called twice."""
        emu = OllamaEmulator(reactor)
        await emu.start()
        self.assertTrue(emu.url.startswith("http://127.0.0.1:"))
        await emu.stop()
        await emu.stop()
