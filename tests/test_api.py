"""
Request validation: every bad body is a ClientError with the right status.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from chatterd import api
from chatterd.api import ClientError


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


GOOD = {"appID": "edu.umich.llmchat", "model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}], "stream": True}


class ParseJsonTests(SynchronousTestCase):
    def assertRejected(self, raw: bytes, status: int = 422, words: str = "") -> ClientError:
        e = self.assertRaises(ClientError, api.parse_chat, raw)
        self.assertEqual(e.status, status)
        self.assertIn(words, e.message)
        return e

    def test_not_json(self) -> None:
        """
        A body that is not JSON is a 422 that says so.
        """
        self.assertRejected(b"{nope", words="not JSON")

    def test_not_utf8(self) -> None:
        """
        Bytes that are not UTF-8 are a 422 (not a crash, not UTF-16 guessing).
        """
        self.assertRejected(b'{"appID": "\xff"}', words="not UTF-8")
        self.assertRejected('{"appID": "x"}'.encode("utf-16"), words="not UTF-8")

    def test_nan_is_not_json(self) -> None:
        """
        ``NaN`` and ``Infinity`` are refused: they are not JSON.
        """
        self.assertRejected(b'{"appID": "a", "model": "m", "messages": [], "x": NaN}')

    def test_deep_nesting(self) -> None:
        """
        Deeply nested JSON is a 422, not a RecursionError.
        """
        self.assertRejected(b"[" * 100000 + b"]" * 100000, words="nested too deeply")

    def test_huge_integer(self) -> None:
        """
        An integer longer than Python parses is a 422.
        """
        self.assertRejected(b'{"appID": "a", "n": ' + b"9" * 5000 + b"}")

    def test_not_an_object(self) -> None:
        """
        A JSON array, string or number is a 422.
        """
        for raw in (b"[]", b'"x"', b"3", b"null"):
            self.assertRejected(raw, words="JSON object")


class ParseChatTests(SynchronousTestCase):
    def assertRejected(self, change: dict, words: str, **kwargs: bool) -> None:
        obj = {**GOOD, **change}
        obj = {k: v for k, v in obj.items() if v is not ...}
        e = self.assertRaises(ClientError, api.parse_chat, body(obj), **kwargs)
        self.assertEqual(e.status, 422)
        self.assertIn(words, e.message)

    def test_good_request(self) -> None:
        """
        A good request gives appID, model, messages and the other fields.
        """
        chat = api.parse_chat(body({**GOOD, "options": {"seed": 1}}))
        self.assertEqual(chat.appid, "edu.umich.llmchat")
        self.assertEqual(chat.model, "llama3.2")
        self.assertEqual(chat.messages, [{"role": "user", "content": "Hi"}])
        self.assertNotIn("appID", chat.fields)
        self.assertEqual(chat.fields["options"], {"seed": 1})

    def test_ollama_body(self) -> None:
        """
        Ollama gets the request without appID, other keys untouched, and the
        stored history as its messages.
        """
        chat = api.parse_chat(body({**GOOD, "keep_alive": "5m", "think": False}))
        history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        self.assertEqual(
            json.loads(chat.ollama_body(history)),
            {"model": "llama3.2", "messages": history, "stream": True, "keep_alive": "5m", "think": False},
        )

    def test_appid(self) -> None:
        """
        appID missing, null, empty, not a string or over 155 characters: 422.
        """
        self.assertRejected({"appID": ...}, "appID is missing")
        self.assertRejected({"appID": None}, "appID is missing")
        self.assertRejected({"appID": ""}, "appID is empty")
        self.assertRejected({"appID": 7}, "appID is a number")
        self.assertRejected({"appID": "a" * 156}, "longer than 155")
        api.parse_chat(body({**GOOD, "appID": "a" * 155}))

    def test_model(self) -> None:
        """
        model missing or not a string: 422; empty only where Ollama needs it.
        """
        self.assertRejected({"model": ...}, "model is missing")
        self.assertRejected({"model": ["x"]}, "model is an array")
        self.assertRejected({"model": ""}, "model is empty")
        self.assertEqual(api.parse_chat(body({**GOOD, "model": ""}), need_model=False).model, "")

    def test_messages(self) -> None:
        """
        messages must be a list of {role: str, content: str}.
        """
        self.assertRejected({"messages": ...}, "messages must be a list")
        self.assertRejected({"messages": {"role": "user"}}, "messages must be a list")
        self.assertRejected({"messages": ["hi"]}, "messages[0] must be an object")
        self.assertRejected({"messages": [{"content": "x"}]}, "messages[0].role is missing")
        self.assertRejected({"messages": [{"role": "user", "content": 1}]}, "messages[0].content is a number")
        self.assertRejected({"messages": [{"role": "u" * 256, "content": ""}]}, "longer than 255")

    def test_empty_messages_and_content_are_fine(self) -> None:
        """
        No new message, or an empty content, is a valid request.
        """
        self.assertEqual(api.parse_chat(body({**GOOD, "messages": []})).messages, [])
        api.parse_chat(body({**GOOD, "messages": [{"role": "user", "content": ""}]}))

    def test_nul_is_refused(self) -> None:
        """
        PostgreSQL text cannot hold NUL, so a NUL anywhere is a 422.
        """
        self.assertRejected({"appID": "a\u0000b"}, "NUL")
        self.assertRejected({"messages": [{"role": "user", "content": "x\u0000"}]}, "NUL")

    def test_lone_surrogate_is_refused(self) -> None:
        """
        ``\\ud800`` decodes to a string that is not valid Unicode: 422.
        """
        raw = b'{"appID": "a", "model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'
        e = self.assertRaises(ClientError, api.parse_chat, raw)
        self.assertIn("surrogate", e.message)

    def test_content_is_kept_verbatim(self) -> None:
        """
        Whitespace, quotes and SQL in content are kept exactly.
        """
        text = "  line one\n\tline two  '); DROP TABLE chatts;--  "
        chat = api.parse_chat(body({**GOOD, "messages": [{"role": "user", "content": text}]}))
        self.assertEqual(chat.messages[0]["content"], text)


class ParseChattTests(SynchronousTestCase):
    def test_good(self) -> None:
        """
        username and message come back as given.
        """
        self.assertEqual(api.parse_chatt(body({"username": "u", "message": "m"})), ("u", "m"))

    def test_missing_or_mistyped(self) -> None:
        """
        Missing or non-string fields are 422.
        """
        for obj in ({"message": "m"}, {"username": "u"}, {"username": 1, "message": "m"}, {"username": "u", "message": None}):
            e = self.assertRaises(ClientError, api.parse_chatt, body(obj))
            self.assertEqual(e.status, 422)

    def test_long_username_is_400(self) -> None:
        """
        A username over 255 characters is a 400, as the course's servers answer.
        """
        e = self.assertRaises(ClientError, api.parse_chatt, body({"username": "u" * 256, "message": "m"}))
        self.assertEqual(e.status, 400)


class ParseGenerateTests(SynchronousTestCase):
    def test_body_passes_unchanged(self) -> None:
        """
        A JSON object goes to Ollama byte for byte.
        """
        raw = b'{"model": "m",   "prompt": "hi"}'
        model, body = api.parse_generate(raw)
        self.assertEqual(model, "m")
        self.assertIs(body, raw)

    def test_not_an_object(self) -> None:
        """
        Anything but a JSON object is a 422.
        """
        self.assertEqual(self.assertRaises(ClientError, api.parse_generate, b"[1]").status, 422)
