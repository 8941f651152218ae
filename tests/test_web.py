"""
The Chatter APIs over real HTTP: ``/``, ``/getchatts``, ``/postchatt``, JSON
errors, body limits, the access log.  On the in-memory store (the store's
contract is ``test_store_contract``'s), except what is about the database:
text kept verbatim through SQL, and a database that is down.
"""

from __future__ import annotations

import datetime
import json
import uuid

import treq
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from chatterd import web
from tests.harness import Chatterd, ChunkedBody
from tests.ollama_emulator import closed_port


class ChatterAPITests(TestCase):
    def setUp(self) -> Deferred[Chatterd]:
        self.server = Chatterd(self, ollama=f"http://127.0.0.1:{closed_port()}", memory=True)
        return Deferred.fromCoroutine(self.server.start())

    async def test_index(self) -> None:
        """
        ``GET /`` answers the JSON string "EECS Reactive chatterd".
        """
        response, body = await self.server.get("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body), "EECS Reactive chatterd")

    async def test_the_server_header_names_no_versions(self) -> None:
        """
        Every answer says ``Server: chatterd``, not Twisted's name and exact
        version, and tells browsers not to sniff content types.
        """
        for path in ("/", "/no/such/path", "/getchatts"):
            response, _ = await self.server.get(path)
            self.assertEqual(response.headers.getRawHeaders(b"server"), [b"chatterd"], path)
            self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"], path)

    async def test_post_then_get(self) -> None:
        """
        Posted chatts come back from ``/getchatts`` oldest first as
        ``[username, message, id, time]``, time in ISO 8601 with an offset.
        """
        before = datetime.datetime.now(datetime.timezone.utc)
        for i in range(3):
            response, body = await self.server.post("/postchatt", {"username": f"u{i}", "message": f"m{i}"})
            self.assertEqual((response.code, json.loads(body)), (200, {}))
        response, body = await self.server.get("/getchatts")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        chatts = json.loads(body)
        self.assertEqual([c[:2] for c in chatts], [["u0", "m0"], ["u1", "m1"], ["u2", "m2"]])
        for c in chatts:
            uuid.UUID(c[2])
            stamp = datetime.datetime.fromisoformat(c[3])
            self.assertIsNotNone(stamp.tzinfo)
            self.assertGreaterEqual(stamp, before - datetime.timedelta(seconds=5))

    async def test_getchatts_empty(self) -> None:
        """
        An empty table is an empty array.
        """
        response, body = await self.server.get("/getchatts")
        self.assertEqual((response.code, json.loads(body)), (200, []))

    async def test_getchatts_pages(self) -> None:
        """
        A table bigger than a page streams whole and in order.
        """
        self.patch(web, "PAGE_ROWS", 7)
        for i in range(23):
            await self.server.post("/postchatt", {"username": "u", "message": str(i)})
        _, body = await self.server.get("/getchatts")
        self.assertEqual([c[1] for c in json.loads(body)], [str(i) for i in range(23)])
        self.patch(web, "PAGE_ROWS", 23)
        _, body = await self.server.get("/getchatts")
        self.assertEqual(len(json.loads(body)), 23)

    async def test_trailing_slashes(self) -> None:
        """
        Paths answer with and without a trailing slash, without redirects.
        """
        response, _ = await self.server.post("/postchatt/", {"username": "a", "message": "b"})
        self.assertEqual(response.code, 200)
        response, body = await self.server.get("/getchatts/")
        self.assertEqual((response.code, len(json.loads(body))), (200, 1))

    async def assertRejected(self, body: bytes | object, status: int, words: str, path: str = "/postchatt") -> None:
        response, raw = await self.server.post(path, body)
        self.assertEqual(response.code, status, raw)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertIn(words, json.loads(raw)["error"])
        self.assertEqual(self.server.rows(), [])

    async def test_bad_postchatt(self) -> None:
        """
        Not JSON, missing or non-string fields: 422; a long username: 400;
        each with a JSON error, and nothing stored.
        """
        await self.assertRejected(b"not json", 422, "not JSON")
        await self.assertRejected([1, 2], 422, "JSON object")
        await self.assertRejected({"username": "u"}, 422, "message is missing")
        await self.assertRejected({"username": 5, "message": "m"}, 422, "username is a number")
        await self.assertRejected({"username": "u" * 256, "message": "m"}, 400, "longer than 255")
        await self.assertRejected({"username": "u", "message": "nul\u0000"}, 422, "NUL")

    async def test_body_too_large(self) -> None:
        """
        A body over --max-body is a 413 and stores nothing.
        """
        self.server.site.max_body = 1000
        await self.assertRejected({"username": "u", "message": "x" * 2000}, 413, "larger than 1000 bytes")
        response, _ = await self.server.post("/postchatt", {"username": "u", "message": "x" * 900})
        self.assertEqual(response.code, 200)

    async def test_chunked_body_too_large(self) -> None:
        """
        The limit holds for a chunked body with no Content-Length too.
        """
        self.server.site.max_body = 1000
        body = ChunkedBody([b'{"username": "u", "message": "', b"x" * 3000, b'"}'])
        response = await self.server.http.post(self.server.url + "/postchatt", data=body)
        raw = await treq.content(response)
        self.assertEqual(response.code, 413, raw)
        self.assertEqual(self.server.rows(), [])

    async def test_unknown_path_and_method(self) -> None:
        """
        Unknown paths are a JSON 404; wrong methods a JSON 405 with Allow.
        """
        response, body = await self.server.get("/nope")
        self.assertEqual(response.code, 404)
        self.assertIn("Not Found", json.loads(body)["error"])
        response, body = await self.server.get("/postchatt")
        self.assertEqual(response.code, 405)
        self.assertIn("Method Not Allowed", json.loads(body)["error"])
        self.assertIn(b"POST", response.headers.getRawHeaders(b"allow")[0])

    async def test_access_log(self) -> None:
        """
        Every request logs one line with method, path, status, bytes and duration.
        """
        observer = EventLoggingObserver()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await self.server.get("/")
        events = [e for e in observer if e.get("log_namespace") == "chatterd.site" and "status" in e]
        self.assertEqual(len(events), 1)
        event = events[0]
        self.assertEqual((event["method"], event["path"], event["status"]), ("GET", "/", 200))
        self.assertEqual(event["length"], len(b'"EECS Reactive chatterd"'))
        self.assertGreaterEqual(event["duration_ms"], 0)


class DatabaseTests(TestCase):
    """
    Through the real database.
    """

    async def test_message_kept_verbatim(self) -> None:
        """
        Whitespace, quotes, SQL and non-ASCII text are stored exactly.
        """
        server = await Chatterd(self, ollama=f"http://127.0.0.1:{closed_port()}").start()
        text = "  two\nlines\t'); DROP TABLE chatts;-- é 🐍  "
        await server.post("/postchatt", {"username": "O'Brien", "message": text})
        _, body = await server.get("/getchatts")
        self.assertEqual(json.loads(body)[0][:2], ["O'Brien", text])
        self.assertEqual(server.rows(), [("O'Brien", text, None)])


class DatabaseDownTests(TestCase):
    """
    A database that cannot be reached gives 503 JSON errors, not hangs or 500s.
    """

    async def test_503_when_the_database_is_unreachable(self) -> None:
        """
        With the database unreachable from the start, chatterd still serves
        ``/`` and answers database routes with 503 and a JSON error.
        """
        server = Chatterd(self, ollama="http://127.0.0.1:9", dsn="host=/nonexistent-chatterd port=1 dbname=x")
        await server.start()
        response, body = await server.get("/")
        self.assertEqual(response.code, 200)
        for method, path, payload in (
            ("GET", "/getchatts", None),
            ("POST", "/postchatt", {"username": "u", "message": "m"}),
            ("POST", "/llmchat", {"appID": "a", "model": "m", "messages": []}),
            ("POST", "/llmprep", {"appID": "a", "model": "m", "messages": []}),
        ):
            if method == "GET":
                response, body = await server.get(path)
            else:
                response, body = await server.post(path, payload)
            self.assertEqual(response.code, 503, path)
            self.assertIn("unavailable", json.loads(body)["error"])
            self.assertNotIn(b"nonexistent", body)  # never the DSN
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.flushLoggedErrors()
