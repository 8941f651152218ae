"""
Log lines that a client cannot forge or break: what came from a client or
from Ollama is escaped in text and JSON, and every line can be written.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatterd import logs, tls
from tests.harness import Chatterd
from tests.ollama_emulator import OllamaEmulator, start_emulator
from tests.test_llmchat import chat

#: A line an attacker would like to see in chatterd's log.
FORGED = "2026-12-02T00:00:00+0000 [chatterd.web#info] POST /llmchat 200 99B 1.0ms"
#: Everything hostile at once: a newline, a carriage return, an ANSI colour
#: and cursor-up sequence, an 8-bit CSI, a line separator, a bidi override
#: and a lone surrogate (which cannot be encoded as UTF-8 at all).
HOSTILE = "x\n" + FORGED + "\r\x1b[31m\x1b[1A\x9b2J\u2028\u202e\ud800"


def assert_one_safe_line(case: SynchronousTestCase, line: str) -> None:
    """
    ``line`` is one line, without control characters, encodable as UTF-8.
    """
    body = line.rstrip("\n")
    case.assertNotIn("\n", body)
    case.assertFalse([c for c in body if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F], repr(body))
    case.assertNotIn("\u2028", body)
    case.assertNotIn("\u202e", body)
    body.encode("utf-8")  # raises on a lone surrogate


class EscapeTests(SynchronousTestCase):
    def test_plain_text_is_unchanged(self) -> None:
        """
        Text with nothing unsafe in it, non-ASCII letters included, is kept as it is.
        """
        for text in ["", "edu.umich.llmchat", "llama3.2:latest", "Grüße, 日本語 ✓"]:
            self.assertIs(logs.escape(text), text)

    def test_unsafe_characters_become_escapes(self) -> None:
        """
        Newlines, controls, ANSI escapes, separators, bidi overrides, lone
        surrogates and the backslash itself are written as escapes.
        """
        self.assertEqual(logs.escape("a\nb\r\tc"), "a\\nb\\r\\tc")
        self.assertEqual(logs.escape("\x1b[31m\x00\x7f\x9b"), "\\x1b[31m\\x00\\x7f\\x9b")
        self.assertEqual(logs.escape("\u2028\u2029\u202e\u2066"), "\\u2028\\u2029\\u202e\\u2066")
        self.assertEqual(logs.escape("\ud800\udfff"), "\\ud800\\udfff")
        self.assertEqual(logs.escape("C:\\n"), "C:\\\\n")  # not mistaken for an escaped newline

    def test_logger_escapes_string_and_exception_fields(self) -> None:
        """
        chatterd's Logger escapes every string or exception field, so that a
        format like ``{appid}`` or ``{e}`` can never write a second line.
        """
        events: list[dict[str, Any]] = []
        log = logs.Logger(observer=events.append)
        log.info("appID {appid}: {e} ({n})", appid=HOSTILE, e=ValueError(HOSTILE), n=3)
        [event] = events
        self.assertEqual(event["appid"], logs.escape(HOSTILE))
        self.assertEqual(event["e"], logs.escape(HOSTILE))
        self.assertEqual(event["n"], 3)
        assert_one_safe_line(self, formatEventAsClassicLogText(event) or "")
        assert_one_safe_line(self, logs.format_json(event))

    def test_preformatted_lines_are_escaped(self) -> None:
        """
        ``info_line`` text (built with f-strings from what a client sent) is
        escaped as a whole, braces still read as written.
        """
        events: list[dict[str, Any]] = []
        logs.info_line(logs.Logger(observer=events.append), "appID " + HOSTILE + " {x}", appid=HOSTILE)
        [event] = events
        text = formatEventAsClassicLogText(event) or ""
        assert_one_safe_line(self, text)
        self.assertIn("appID x\\n" + FORGED, text)
        self.assertIn("{x}", text)

    def test_json_lines_escape_every_field(self) -> None:
        """
        A JSON line carries escaped text even for an event that did not come
        through chatterd's Logger (Twisted's own), and always encodes.
        """
        event = {"log_format": "{what}", "what": HOSTILE, "log_time": 0, "other": HOSTILE.encode("utf-8", "surrogatepass")}
        line = logs.format_json(event)
        assert_one_safe_line(self, line)
        record = json.loads(line)
        self.assertEqual(record["what"], logs.escape(HOSTILE))
        self.assertNotIn("\n", record["message"])
        self.assertNotIn("\x1b", record["message"])

    def test_streams_that_never_fail_to_encode(self) -> None:
        """
        chatterd's standard output and error take any text: a lone surrogate
        from a third party's log line is written as an escape, not lost.
        """
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8")
        logs.never_fail_to_encode(out)
        out.write("before \ud800 after\n")
        out.flush()
        self.assertEqual(raw.getvalue(), b"before \\ud800 after\n")


class RequestLogTests(TestCase):
    """
    What reaches the log when a client sends hostile text.
    """

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        self.server = await Chatterd(self, ollama=self.emulator.url).start()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def lines(self) -> list[str]:
        return [formatEventAsClassicLogText(e) or "" for e in self.events]

    def assert_every_line_safe(self) -> None:
        self.assertTrue(self.events)
        for event in self.events:
            assert_one_safe_line(self, formatEventAsClassicLogText(event) or "")
            assert_one_safe_line(self, logs.format_json(event))

    async def test_an_appid_cannot_forge_a_line(self) -> None:
        """
        A ``/llmchat`` whose appID and model hold a newline and a forged line
        logs one line per event, with the newline escaped.
        """
        appid = "x\n" + FORGED
        s = await self.server.open("/llmchat", chat(appid=appid, model="llama3.2\n" + FORGED))
        await s.done
        self.assert_every_line_safe()
        stream_lines = [line for line in self.lines() if "/llmchat stream" in line]
        self.assertEqual(len(stream_lines), 1)
        self.assertIn("appID x\\n" + FORGED, stream_lines[0])

    async def test_a_lone_surrogate_is_logged_not_lost(self) -> None:
        """
        An ``/llmprompt`` model holding a lone surrogate (it is passed on to
        Ollama unchecked) still gets its stream line, escaped.
        """
        body = b'{"model": "bad\\ud800\\u001b[2J", "prompt": "hi"}'
        response, _ = await self.server.post("/llmprompt", body)
        self.assert_every_line_safe()
        [line] = [line for line in self.lines() if "/llmprompt stream" in line]
        self.assertIn("bad\\ud800\\x1b[2J", line)

    async def test_a_hostile_path_is_escaped(self) -> None:
        """
        The access line escapes control characters in the path.  (HTTP/1.1
        refuses them in the request line; HTTP/2's ``:path`` carries them.)
        """
        cert, key, _ = tls.ensure_certificate(self.mktemp())
        endpoint = tls.server_endpoint(reactor, "ssl:0:interface=127.0.0.1", cert, key)
        port = await endpoint.listen(self.server.site)
        self.addCleanup(port.stopListening)
        path = b"/\x1b[2J\x1b]0;owned\x07"

        def send() -> int:
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.set_alpn_protocols(["h2"])
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
                    conn = h2.connection.H2Connection(config)
                    conn.initiate_connection()
                    headers = [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"), (b":authority", b"x")]
                    conn.send_headers(1, headers, end_stream=True)
                    sock.sendall(conn.data_to_send())
                    while True:
                        for event in conn.receive_data(sock.recv(65536)):
                            if isinstance(event, h2.events.ResponseReceived):
                                return int(dict(event.headers)[b":status"])

        self.assertEqual(await deferToThread(send), 404)
        await deferLater(reactor, 0.1)  # the access line is written when the stream ends
        self.assert_every_line_safe()
        [line] = [line for line in self.lines() if " 404 " in line]
        self.assertIn("GET /\\x1b[2J\\x1b]0;owned\\x07 404", line)
