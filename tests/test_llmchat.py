"""
``/llmchat``, ``/llmprep`` and ``/llmprompt`` end to end: chatterd on a real
port, its store on the test cluster, Ollama played by the emulator over TCP.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import psycopg2
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatterd.relay import MAX_OLLAMA_TEXT, RelayConfig
from chatterd.writing import WriteBatcher
from chatterd.store import MESSAGE_OVERHEAD, PostgresChattStore
from tests import harness
from tests.harness import Chatterd, Stream, query
from tests.ollama_emulator import Behaviour, OllamaEmulator, closed_port, start_emulator
from tests.phone import AppWouldChoke, read_as_phone

APP = "edu.umich.eecs.llmchat"


def chat(content: str = "Hi", *, appid: str = APP, model: str = "llama3.2", **extra: Any) -> dict[str, Any]:
    return {"appID": appid, "model": model, "messages": [{"role": "user", "content": content}], "stream": True, **extra}


def data_lines(body: bytes) -> list[bytes]:
    """
    The data of every normal (unnamed) event, in order.
    """
    return [
        frame[len(b"data: "):]
        for frame in body.split(b"\n\n")
        if frame.startswith(b"data: ")
    ]


class LLMTestCase(TestCase):
    heartbeat = 15.0
    relay: RelayConfig | None = None
    #: On the in-memory store: for tests not about SQL (turns, history cut,
    #: failing writes stay on PostgreSQL).
    memory = False

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.emulator: OllamaEmulator = await start_emulator(self)
        relay = self.relay or RelayConfig(heartbeat=self.heartbeat)
        self.server = await Chatterd(self, ollama=self.emulator.url, relay=relay, memory=self.memory).start()

    async def stream(self, body: Any, path: str = "/llmchat") -> Stream:
        """
        Open a stream and read it to its end, checking it as the phone would.
        """
        s = await self.server.open(path, body)
        await s.done
        if path == "/llmchat" and s.response.code == 200:
            read_as_phone(s.body)
        return s

    async def assertOneError(self, s: Stream, words: str) -> str:
        """
        The stream is a 200 that ends cleanly with exactly one error frame, last.
        """
        self.assertEqual(s.response.code, 200)
        view = read_as_phone(s.body)
        self.assertEqual(len(view.errors), 1, s.body)
        self.assertTrue(s.body.endswith(b"\n\n"))
        last = s.body.rsplit(b"event: error\n", 1)[1]
        self.assertTrue(last.startswith(b"data: {\"error\": "))
        message = json.loads(last[len(b"data: "):])["error"]
        self.assertIn(words, message)
        self.assertNotIn(b"Processing Failed", s.body)  # Twisted's HTML error page
        return message

    async def until(self, predicate: Any, what: str, timeout: float = 10.0) -> None:
        """
        Wait for ``predicate()`` to hold (polling; for effects in another process or table).
        """
        for _ in range(int(timeout / 0.02)):
            if predicate():
                return
            await deferLater(reactor, 0.02)
        self.fail(f"timed out waiting for {what}")


class ChatStreamTests(LLMTestCase):
    memory = True

    async def test_frames_are_ollamas_lines(self) -> None:
        """
        Each Ollama line becomes one ``data:`` frame, unchanged and in order,
        with the SSE headers and no Connection header.
        """
        s = await self.stream(chat())
        self.assertEqual(s.response.code, 200)
        headers = s.response.headers
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-cache, no-transform"])
        self.assertEqual(headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertFalse(headers.hasHeader(b"connection"))
        lines = data_lines(s.body)
        self.assertEqual(s.body, b"".join(b"data: " + line + b"\n\n" for line in lines))
        # the very bytes Ollama would send a direct client, but for created_at
        direct = await treq.post(self.emulator.url + "/api/chat", persistent=False,
                                 json={"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]})
        expected = (await treq.content(direct)).splitlines()

        def strip(line: bytes) -> dict[str, Any]:  # what varies from one answer to the next
            return {k: v for k, v in json.loads(line).items() if k != "created_at" and not k.endswith("duration")}

        self.assertEqual([strip(line) for line in lines], [strip(line) for line in expected])
        self.assertEqual([json.loads(line)["message"]["content"] for line in lines], ["Hello", ",", " world", "!", ""])
        self.assertIs(json.loads(lines[-1])["done"], True)

    async def test_reply_is_stored(self) -> None:
        """
        The prompt and then the assembled reply are stored for the appID.
        """
        await self.stream(chat("Hi"))
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP), ("assistant", "Hello, world!", APP)])

    async def test_history_goes_to_ollama(self) -> None:
        """
        A second request sends [user1, assistant1, user2] to Ollama, without
        appID and without other appIDs' messages; other keys pass untouched.
        """
        await self.stream(chat("one"))
        await self.stream(chat("elsewhere", appid="other.app"))
        await self.stream(chat("two", options={"temperature": 0}, keep_alive="5m"))
        sent = self.emulator.requests[-1].json
        self.assertEqual(sent["messages"], [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "Hello, world!"},
            {"role": "user", "content": "two"},
        ])
        self.assertNotIn("appID", sent)
        self.assertEqual((sent["options"], sent["keep_alive"], sent["stream"]), ({"temperature": 0}, "5m", True))

    async def test_frames_arrive_as_they_are_generated(self) -> None:
        """
        The first frame reaches the phone before Ollama writes its second line.
        """
        self.emulator.models["slow"] = Behaviour(reply=["a", "b", "c"], delay=0.5)
        s = await self.server.open("/llmchat", chat(model="slow"))
        await s.received(b"\n\n")
        self.assertEqual(self.emulator.requests[-1].lines_written, 1)
        self.assertEqual(len(data_lines(s.body)), 1)
        await s.done
        self.assertEqual(len(data_lines(s.body)), 4)

    async def test_split_and_coalesced_lines(self) -> None:
        """
        Lines split across reads, or several in one read, give the same frames.
        """
        self.emulator.models["split"] = Behaviour(reply=["é", "🐍", " ok"], split=True)
        self.emulator.models["lump"] = Behaviour(reply=["é", "🐍", " ok"], coalesce=True)
        for model in ("split", "lump"):
            s = await self.stream(chat(model=model, appid=model))
            self.assertEqual(read_as_phone(s.body).bubble, "é🐍 ok")
            self.assertEqual(self.server.rows(model)[-1], ("assistant", "é🐍 ok", model))

    async def test_stream_false(self) -> None:
        """
        ``stream: false`` gets Ollama's single object as one frame.
        """
        s = await self.stream(chat(stream=False))
        [line] = data_lines(s.body)
        self.assertEqual(json.loads(line)["message"]["content"], "Hello, world!")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "Hello, world!", APP))

    async def test_thinking_is_relayed_not_stored(self) -> None:
        """
        Thinking chunks are relayed; only message.content makes the stored reply.
        """
        self.emulator.models["thinker"] = Behaviour(thinking=["Hmm", "..."], reply=["Yes"])
        s = await self.stream(chat(model="thinker"))
        self.assertEqual(len(data_lines(s.body)), 4)
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "Yes", APP))

    async def test_prompt_kept_verbatim(self) -> None:
        """
        The user's prompt is stored and sent exactly as typed.
        """
        prompt = "  Two\n\nparagraphs, 'quoted'; DROP TABLE chatts;--  "
        await self.stream(chat(prompt))
        self.assertEqual(self.server.rows(APP)[0], ("user", prompt, APP))
        self.assertEqual(self.emulator.requests[-1].json["messages"][0]["content"], prompt)


class ChatFailureTests(LLMTestCase):
    async def test_ollama_unreachable(self) -> None:
        """
        Ollama refusing connections: one error frame that says so without
        its (internal) address; the prompt stays stored, no reply row.
        """
        url = f"http://127.0.0.1:{closed_port()}"
        self.server.ollama.servers[0].client.url = url
        s = await self.stream(chat())
        message = await self.assertOneError(s, "cannot reach Ollama")
        self.assertNotIn("127.0.0.1", message)
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])

    async def test_model_not_found(self) -> None:
        """
        A non-200 answer: Ollama's own error text in the frame.
        """
        s = await self.stream(chat(model="nonesuch"))
        await self.assertOneError(s, "model 'nonesuch' not found")
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])

    async def test_ollama_status_errors(self) -> None:
        """
        Ollama's 500 and 503 answers become error frames with their text.
        """
        self.emulator.models["busy"] = Behaviour(status=503, error="server busy, please try again.  maximum pending requests exceeded")
        s = await self.stream(chat(model="busy"))
        await self.assertOneError(s, "503: server busy")

    async def test_error_line_mid_stream(self) -> None:
        """
        An ``{"error": ...}`` line is not relayed as data: it becomes the
        error frame; what came before is relayed and stored.
        """
        self.emulator.models["fails"] = Behaviour(reply=["Par", "tial", "!"], error_after=2, error="CUDA error: out of memory")
        s = await self.stream(chat(model="fails"))
        await self.assertOneError(s, "CUDA error: out of memory")
        self.assertEqual(len(data_lines(s.body)), 2)
        self.assertEqual(read_as_phone(s.body).bubble.split("\n")[0], "Partial")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "Partial", APP))

    async def test_a_long_error_line_is_cut(self) -> None:
        """
        Ollama's error text mid-stream reaches the client cut to
        MAX_OLLAMA_TEXT characters, as that of an error answer does.
        """
        self.emulator.models["fails"] = Behaviour(reply=["Par", "tial"], error_after=1, error="é" * 5000)
        s = await self.stream(chat(model="fails"))
        message = await self.assertOneError(s, "Ollama: é")
        self.assertEqual(message, "Ollama: " + "é" * MAX_OLLAMA_TEXT)

    async def test_line_that_is_not_json(self) -> None:
        """
        A line that is not JSON ends the stream with an error frame.
        """
        self.emulator.models["garbage"] = Behaviour(not_json_after=1)
        s = await self.stream(chat(model="garbage"))
        await self.assertOneError(s, "not JSON")
        self.assertEqual(len(data_lines(s.body)), 1)

    async def test_truncated_stream(self) -> None:
        """
        Ollama closing before its done line never looks like a normal end.
        """
        self.emulator.models["cut"] = Behaviour(reply=["a", "b", "c"], truncate_after=2)
        s = await self.stream(chat(model="cut"))
        await self.assertOneError(s, "broke off")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "ab", APP))

    async def test_reset_connection(self) -> None:
        """
        A reset connection ends with one error frame and the partial reply stored.
        """
        self.emulator.models["rst"] = Behaviour(reply=["a", "b", "c"], reset_after=1)
        s = await self.stream(chat(model="rst"))
        await self.assertOneError(s, "broke off")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "a", APP))

    async def test_dropped_before_answering(self) -> None:
        """
        Ollama closing the connection without an answer is an error frame.
        """
        self.emulator.models["drop"] = Behaviour(drop_before_response=True)
        s = await self.stream(chat(model="drop"))
        await self.assertOneError(s, "cannot reach Ollama")
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])

    async def test_reply_insert_fails(self) -> None:
        """
        The course's own check: when storing the reply fails, the phone gets
        an error frame after the relayed frames.
        """
        query(self.server.dsn, """
            CREATE FUNCTION no_replies() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.username = 'assistant' THEN RAISE EXCEPTION 'replies are refused'; END IF;
                  RETURN NEW; END $$;
            CREATE TRIGGER no_replies BEFORE INSERT ON chatts FOR EACH ROW EXECUTE FUNCTION no_replies();
        """)
        s = await self.stream(chat())
        await self.assertOneError(s, "could not be stored")
        self.assertEqual(len(data_lines(s.body)), 5)
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])
        self.flushLoggedErrors()


class ReplyLimitTests(LLMTestCase):
    memory = True
    relay = RelayConfig(max_reply=1000)

    async def test_a_reply_past_the_limit_is_cut(self) -> None:
        """
        A reply past max_reply ends with one error frame; the connection to
        Ollama is closed and what came is stored.
        """
        self.emulator.models["long"] = Behaviour(reply=["é" * 100] * 50, delay=0.01)  # 200 bytes a line
        s = await self.stream(chat(model="long"))
        message = await self.assertOneError(s, "grew past 1000 bytes")
        self.assertLess(len(data_lines(s.body)), 50)
        stored = self.server.rows(APP)[-1]
        self.assertEqual(stored[0], "assistant")
        self.assertGreater(len(stored[1].encode()), 1000)
        self.assertLess(len(stored[1].encode()), 1400)
        self.assertEqual(await self.emulator.requests[0].ended(), "client_left")
        self.assertIn("(what came is stored)", message)

    async def test_a_reply_within_the_limit_is_whole(self) -> None:
        """
        A reply of exactly max_reply bytes is no error.
        """
        self.emulator.models["fits"] = Behaviour(reply=["x" * 100] * 10)
        s = await self.stream(chat(model="fits"))
        await s.done
        self.assertEqual(read_as_phone(s.body).errors, [])
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "x" * 1000, APP))


class HeartbeatTests(LLMTestCase):
    memory = True
    heartbeat = 0.1

    async def test_ping_during_a_stall(self) -> None:
        """
        While Ollama is silent, ``: ping`` comments keep the stream alive;
        they do not disturb the frames.
        """
        self.emulator.models["stall"] = Behaviour(reply=["a", "b"], stall_after=1)
        s = await self.server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        await s.received(b": ping\n\n: ping\n\n")
        self.emulator.release()
        await s.done
        view = read_as_phone(s.body)
        self.assertGreaterEqual(view.comments, 2)
        self.assertEqual((view.bubble, view.errors), ("ab", []))

    async def test_ping_while_the_model_loads(self) -> None:
        """
        Heartbeats flow before Ollama's first byte too (model loading).
        """
        self.emulator.models["loading"] = Behaviour(first_byte_delay=0.5)
        s = await self.stream(chat(model="loading"))
        self.assertTrue(s.body.startswith(b": ping\n\n"))
        self.assertEqual(read_as_phone(s.body).bubble, "Hello, world!")


class DisconnectTests(LLMTestCase):
    async def test_client_leaving_closes_upstream_and_keeps_partial(self) -> None:
        """
        When the phone hangs up, chatterd closes its Ollama connection at once
        and stores the part of the reply the user saw.
        """
        self.emulator.models["stall"] = Behaviour(reply=["Half", " a", " reply"], stall_after=2)
        s = await self.server.open("/llmchat", chat(model="stall"))
        record = await self.emulator.when_stalled()
        await s.received(b'" a"')
        s.close()
        self.assertEqual(await record.ended(), "client_left")
        await self.emulator.wait_for_idle()
        await self.until(lambda: len(self.server.rows(APP)) == 2, "the partial reply")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "Half a", APP))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_hanging_up_right_after_done_is_a_normal_end(self) -> None:
        """
        A phone that hangs up as soon as it has the "done" line, while the
        reply is still being stored (common): the reply is stored, and the
        stream is logged as done, not as a database failure.
        """
        self.emulator.models["stall"] = Behaviour(reply=["All", " of it"], stall_after=1)
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        s = await self.server.open("/llmchat", chat(model="stall"))
        await self.emulator.when_stalled()
        blocker = psycopg2.connect(self.server.dsn)  # inserts wait behind its lock
        self.addCleanup(blocker.close)
        blocker.cursor().execute("LOCK TABLE chatts IN SHARE MODE")
        self.emulator.release()
        await s.received(b'"done":true')
        s.close()
        await deferLater(reactor, 0.2)
        blocker.rollback()
        await self.until(lambda: len(self.server.rows(APP)) == 2, "the reply")
        self.assertEqual(self.server.rows(APP)[-1], ("assistant", "All of it", APP))
        [event] = [e for e in events if "outcome" in e]
        self.assertEqual((event["outcome"], event["error_kind"]), ("done", None))
        self.assertFalse([e for e in events if "could not store" in formatEvent(e)])
        self.assertIsNone(self.server.metrics.registry.get_sample_value(
            "chatterd_database_errors_total", {"kind": "reply_insert"}))

    async def test_client_leaving_while_ollama_loads(self) -> None:
        """
        A hang-up before Ollama's first byte closes the upstream connection too.
        """
        self.emulator.models["never"] = Behaviour(never_answer=True)
        s = await self.server.open("/llmchat", chat(model="never"))
        record = await self.emulator.next_request() if not self.emulator.requests else self.emulator.requests[-1]
        s.close()
        self.assertEqual(await record.ended(), "client_left")
        self.assertEqual(self.server.rows(APP), [("user", "Hi", APP)])


class ValidationTests(LLMTestCase):
    memory = True

    async def test_bad_requests_store_nothing(self) -> None:
        """
        Every malformed /llmchat or /llmprep body is a 422 JSON error, nothing
        is stored and nothing reaches Ollama.
        """
        bad: list[Any] = [
            b"not json", [], {"model": "m", "messages": []},
            {"appID": None, "model": "m", "messages": []}, {"appID": "", "model": "m", "messages": []},
            {"appID": 1, "model": "m", "messages": []}, {"appID": "a" * 156, "model": "m", "messages": []},
            {"appID": "a", "messages": []}, {"appID": "a", "model": 3, "messages": []},
            {"appID": "a", "model": "m"}, {"appID": "a", "model": "m", "messages": "hi"},
            {"appID": "a", "model": "m", "messages": [{"role": "user"}]},
            {"appID": "a", "model": "m", "messages": [{"role": "user", "content": "\u0000"}]},
        ]
        for path in ("/llmchat", "/llmprep"):
            for body in bad:
                response, raw = await self.server.post(path, body)
                self.assertEqual(response.code, 422, (path, body, raw))
                self.assertIsInstance(json.loads(raw)["error"], str)
        self.assertEqual(self.server.rows(), [])
        self.assertEqual(self.emulator.requests, [])

    async def test_body_too_large(self) -> None:
        """
        A body over --max-body is a 413 for every LLM route.
        """
        self.server.site.max_body = 100
        for path in ("/llmchat", "/llmprep", "/llmprompt"):
            response, raw = await self.server.post(path, chat("x" * 200))
            self.assertEqual(response.code, 413, path)
        self.assertEqual(self.server.rows(), [])
        self.assertEqual(self.emulator.requests, [])


class LLMPrepTests(LLMTestCase):
    async def test_prep_resets_the_history(self) -> None:
        """
        /llmprep replaces the appID's history with the system prompt; the next
        chat starts from it.
        """
        await self.stream(chat("old"))
        response, body = await self.server.post("/llmprep", {
            "appID": APP, "model": "llama3.2", "stream": False,
            "messages": [{"role": "system", "content": "Answer in French."}],
        })
        self.assertEqual((response.code, json.loads(body)), (200, {}))
        self.assertEqual(self.server.rows(APP), [("system", "Answer in French.", APP)])
        await self.stream(chat("new"))
        self.assertEqual(self.emulator.requests[-1].json["messages"], [
            {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "new"},
        ])


def size(role: str, content: str) -> int:
    """
    What a message costs of --max-history.
    """
    return MESSAGE_OVERHEAD + len(role.encode()) + len(content.encode())


SYSTEM = "Answer in French."
REPLY = "Hello, world!"  # the emulator's
#: Room for the system prompt, a new prompt of 2 characters, and one turn before it.
BOUND = size("system", SYSTEM) + 2 * size("user", "q1") + size("assistant", REPLY)


class HistoryCutTests(LLMTestCase):
    """
    What Ollama receives once an appID's history is past --max-history (here
    ``BOUND``): the system prompt while it fits on its own, the new messages
    whole, then the newest other messages that fit.
    """

    async def _setUp(self) -> None:
        self.patch(harness, "PostgresChattStore", functools.partial(PostgresChattStore, max_history=BOUND))
        await super()._setUp()

    async def prep(self, system: str, appid: str = APP) -> None:
        body = {"appID": appid, "model": "llama3.2", "messages": [{"role": "system", "content": system}]}
        response, _ = await self.server.post("/llmprep", body)
        self.assertEqual(response.code, 200)

    def sent(self) -> list[tuple[str, str]]:
        """
        The messages of Ollama's last request, as (role, content).
        """
        return [(m["role"], m["content"]) for m in self.emulator.requests[-1].json["messages"]]

    async def test_the_oldest_turns_are_left_out(self) -> None:
        """
        Past the bound, Ollama gets the system prompt, the newest turn that
        still fits and the new prompt; the older turns stay stored.
        """
        await self.prep(SYSTEM)
        await self.stream(chat("q1"))
        await self.stream(chat("q2"))
        self.assertEqual(self.sent(), [("system", SYSTEM), ("user", "q1"), ("assistant", REPLY), ("user", "q2")])
        await self.stream(chat("q3"))
        self.assertEqual(self.sent(), [("system", SYSTEM), ("user", "q2"), ("assistant", REPLY), ("user", "q3")])
        await self.stream(chat("q4"))
        self.assertEqual(self.sent(), [("system", SYSTEM), ("user", "q3"), ("assistant", REPLY), ("user", "q4")])
        self.assertEqual(len(self.server.rows(APP)), 9)

    async def test_a_new_prompt_is_sent_whole(self) -> None:
        """
        A new prompt larger than the bound on its own is sent whole, with
        the system prompt (which fits on its own), and nothing else.
        """
        await self.prep(SYSTEM)
        await self.stream(chat("q1"))
        long = "x" * BOUND
        await self.stream(chat(long))
        self.assertEqual(self.sent(), [("system", SYSTEM), ("user", long)])

    async def test_a_system_prompt_past_the_bound_is_left_out(self) -> None:
        """
        A system prompt that does not fit in the bound on its own is not
        sent at all (it stays stored): the system prompt is kept only while
        it fits, else a client could pass the bound with system messages.
        Another that fits, stored before it, is still sent.
        """
        big = "y" * BOUND
        await self.prep(big)
        await self.stream(chat("q1"))
        self.assertEqual(self.sent(), [("user", "q1")])
        response, _ = await self.server.post("/llmprep", {"appID": APP, "model": "llama3.2", "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "system", "content": big}]})
        self.assertEqual(response.code, 200)
        await self.stream(chat("q2"))
        self.assertEqual(self.sent(), [("system", SYSTEM), ("user", "q2")])
        self.assertEqual([m for _, m, _ in self.server.rows(APP)], [SYSTEM, big, "q2", REPLY])


class LLMPromptTests(LLMTestCase):
    memory = True

    async def test_passthrough(self) -> None:
        """
        /llmprompt streams Ollama's /api/generate NDJSON back unchanged.
        """
        body = {"model": "llama3.2", "prompt": "Hi", "stream": True}
        s = await self.stream(body, "/llmprompt")
        self.assertEqual(s.response.code, 200)
        self.assertEqual(s.response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        lines = [json.loads(line) for line in s.body.splitlines()]
        self.assertEqual("".join(line["response"] for line in lines), "Hello, world!")
        self.assertIs(lines[-1]["done"], True)
        self.assertEqual(self.emulator.requests[-1].path, "/api/generate")
        self.assertEqual(self.emulator.requests[-1].json, body)
        self.assertEqual(self.server.rows(), [])

    async def test_error_passthrough(self) -> None:
        """
        Ollama's error status and body pass through unchanged.
        """
        s = await self.stream({"model": "nonesuch", "prompt": "Hi"}, "/llmprompt")
        self.assertEqual(s.response.code, 404)
        self.assertEqual(json.loads(s.body), {"error": "model 'nonesuch' not found"})

    async def test_an_error_page_is_not_passed_through(self) -> None:
        """
        An error answer that is not Ollama's own JSON error (a proxy's HTML
        page) keeps its status but not its body: the client gets a JSON
        error saying only what happened; the page goes to the log.
        """
        page = b"<html><body><h1>502 Bad Gateway</h1><p>nginx/1.22 at 10.0.0.5</p></body></html>"
        self.emulator.models["proxied"] = Behaviour(status=502, error_page=page)
        response, body = await self.server.post("/llmprompt", {"model": "proxied", "prompt": "Hi"})
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body), {"error": "Ollama answered 502"})
        s = await self.stream(chat(model="proxied"))
        self.assertEqual([json.loads(e) for e in read_as_phone(s.body).errors], [{"error": "Ollama answered 502"}])

    async def test_unreachable(self) -> None:
        """
        No Ollama: a 502 JSON error naming it.
        """
        self.server.ollama.servers[0].client.url = f"http://127.0.0.1:{closed_port()}"
        s = await self.stream({"model": "llama3.2", "prompt": "Hi"}, "/llmprompt")
        self.assertEqual(s.response.code, 502)
        self.assertIn("cannot reach Ollama", json.loads(s.body)["error"])

    async def test_broken_stream_ends_with_an_error_line(self) -> None:
        """
        A stream that breaks off ends with an ``{"error": ...}`` line, as Ollama's own do.
        """
        self.emulator.models["cut"] = Behaviour(reply=["a", "b", "c"], truncate_after=2)
        s = await self.stream({"model": "cut", "prompt": "Hi"}, "/llmprompt")
        lines = [json.loads(line) for line in s.body.splitlines()]
        self.assertEqual(len(lines), 3)
        self.assertIn("broke off", lines[-1]["error"])

    async def test_client_leaving_closes_upstream(self) -> None:
        """
        A hang-up closes the connection to Ollama.
        """
        self.emulator.models["stall"] = Behaviour(stall_after=1)
        s = await self.server.open("/llmprompt", {"model": "stall", "prompt": "Hi"})
        record = await self.emulator.when_stalled()
        s.close()
        self.assertEqual(await record.ended(), "client_left")


class WriteBatcherTests(SynchronousTestCase):
    def test_one_failing_write_loses_no_other_streams_frames(self) -> None:
        """
        If one request's write raises (it was finished, say), the other
        streams' frames of that pass are still written.
        """

        class Request:
            def __init__(self, broken: bool = False) -> None:
                self.broken, self.written = broken, []

            def write(self, data: bytes) -> None:
                if self.broken:
                    raise RuntimeError("Request.write called on a request after Request.finish was called.")
                self.written.append(data)

        clock = Clock()
        batcher = WriteBatcher(clock)
        first, broken, last = Request(), Request(broken=True), Request()
        for request in (first, broken, last):
            batcher.write(request, b"a")
            batcher.write(request, b"b")
        clock.advance(0)
        self.assertEqual((first.written, last.written), ([b"ab"], [b"ab"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class PhoneParserTests(TestCase):
    def test_the_parser_catches_what_crashes_the_app(self) -> None:
        """
        The phone-rules reader fails on bare lines, lone CRs, [DONE] and
        unfinished streams, and accepts comments and error events.
        """
        for bad in (b"hello\n\n", b"data: x\r\n\n", b"data: [DONE]\n\n", b'data: {"model":"m","message":{"role":"a","content":"x"}}\n',
                    b"event: tool\ndata: {}\n\n"):
            self.assertRaises(AppWouldChoke, read_as_phone, bad)
        view = read_as_phone(b': ping\n\ndata: {"model":"m","message":{"role":"assistant","content":"Hi"}}\n\n'
                             b'event: error\ndata: {"error": "boom"}\n\n')
        self.assertEqual(view.bubble, 'Hi\n\n**llmChat Error**: {"error": "boom"}\n\n')
        self.assertEqual((view.errors, view.comments), (['{"error": "boom"}'], 1))


class EndingTests(SynchronousTestCase):
    """
    ``ending_of``: the one place that says how each failure ends a stream.
    """

    def test_each_failure_has_one_ending(self) -> None:
        from chatterd.ollama import OllamaHTTPError, OllamaUnreachable
        from chatterd.relay import OllamaTimeout, Truncated, ending_of
        from chatterd.sse import LineTooLong
        from chatterd.store import StoreUnavailable
        from chatterd.streams import ShuttingDown

        cases = {
            OllamaTimeout("Ollama did not answer for 300 s"): ("timeout", "ollama"),
            Truncated("Ollama's stream broke off", "connection reset"): ("truncated", "ollama"),
            OllamaUnreachable("cannot connect to 10.0.0.5:11434"): ("unreachable", "ollama"),
            OllamaHTTPError(500, b'{"error": "model crashed"}', b"application/json"): ("status", "ollama"),
            StoreUnavailable("the database is unavailable"): ("database", "database"),
            ShuttingDown("chatterd is shutting down"): ("shutdown", None),
            LineTooLong("a line over 4 MiB"): ("bad_line", "ollama"),
        }
        for error, (kind, counted) in cases.items():
            ending = ending_of(error)
            self.assertEqual((ending.outcome, ending.kind, ending.counted), ("error", kind, counted), error)
            self.assertTrue(ending.message and ending.detail, error)
        self.assertNotIn("10.0.0.5", ending_of(OllamaUnreachable("cannot connect to 10.0.0.5:11434")).message)
        self.assertIn("connection reset", ending_of(Truncated("broke off", "connection reset")).detail)

    def test_a_bug_is_internal_and_says_nothing_of_itself(self) -> None:
        from chatterd.relay import ending_of

        ending = ending_of(RuntimeError("secret internals"))
        self.assertEqual((ending.kind, ending.counted), ("internal", None))
        self.assertNotIn("secret", ending.message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged with its traceback


class _Upstream:
    """
    One Ollama server on a ``task.Clock``: ``post`` answers with a response
    whose body the test feeds line by line (``answer``, ``send``, ``end``).
    """

    url = "http://ollama.test:11434"

    def __init__(self) -> None:
        from twisted.internet.testing import StringTransport

        self.answered: Deferred[Any] = Deferred()
        self.body: Any = None
        self.transport = StringTransport()

    def post(self, path: str, body: bytes) -> Deferred[Any]:
        return self.answered

    def answer(self) -> None:
        upstream = self

        class Response:
            code = 200

            def deliverBody(self, protocol: Any) -> None:
                upstream.body = protocol
                protocol.makeConnection(upstream.transport)

        self.answered.callback(Response())

    def send(self, *contents: str, done: bool = False) -> None:
        for content in contents:
            self.body.dataReceived(json.dumps({"model": "m", "message": {"role": "assistant", "content": content},
                                               "done": False}).encode() + b"\n")
        if done:
            self.body.dataReceived(b'{"model": "m", "message": {"role": "assistant", "content": ""}, "done": true}\n')


class _Turns:
    """
    A store that records ``end_turn`` (all a relay asks of it).
    """

    def __init__(self) -> None:
        self.ended: list[tuple[str, str | None]] = []

    def end_turn(self, appid: str, reply: str | None) -> Deferred[None]:
        self.ended.append((appid, reply))
        return succeed(None)


class RelayTimingTests(SynchronousTestCase):
    """
    The relay's timers (first byte, stall, heartbeat) on a ``task.Clock``:
    no real time passes.
    """

    def setUp(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from chatterd.balancer import Balancer
        from chatterd.relay import ChatRelay, Relaying

        self.clock = Clock()
        self.upstream = _Upstream()
        self.store = _Turns()
        config = RelayConfig(heartbeat=15, first_byte_timeout=300, stall_timeout=120)
        relaying = Relaying(Balancer([self.upstream], clock=self.clock), self.clock, config, WriteBatcher(self.clock))
        self.request = DummyRequest([b"llmchat"])
        self.request.channel = None  # no connection to pace the reading by
        self.relay = ChatRelay(self.request, relaying, appid="app", model="m", store=self.store)
        self.running = Deferred.fromCoroutine(self.relay.run(b"{}"))

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.clock.advance(1)
        self.clock.advance(seconds - int(seconds))

    def phone(self) -> Any:
        self.clock.advance(0)  # the write batcher's pass
        return read_as_phone(b"".join(self.request.written))

    def test_a_first_byte_within_the_limit_is_waited_for(self) -> None:
        """
        Model loading just under ``first_byte_timeout``: heartbeats meanwhile,
        then every frame, and the whole reply stored.
        """
        self.advance(299)
        self.assertEqual(self.phone().comments, 19)  # one per 15 s of silence
        self.upstream.answer()
        self.upstream.send("Hello", " world", done=True)
        self.upstream.body.connectionLost(Failure(ResponseDone()))
        self.successResultOf(self.running)
        self.assertEqual((self.phone().bubble, self.phone().errors), ("Hello world", []))
        self.assertEqual(self.relay.ending.outcome, "done")
        self.assertEqual(self.store.ended, [("app", "Hello world")])

    def test_no_first_byte_in_time_ends_the_stream(self) -> None:
        """
        No first byte within ``first_byte_timeout``: one error frame, the
        request to Ollama cancelled, the turn ended with nothing to store.
        """
        self.advance(299.9)
        self.assertNoResult(self.running)
        self.advance(0.1)
        self.successResultOf(self.running)
        self.assertEqual(len(self.phone().errors), 1)
        self.assertIn("did not answer for 300 s", self.phone().errors[0])
        self.assertTrue(self.upstream.answered.called)  # cancelled
        self.assertEqual((self.relay.ending.outcome, self.relay.ending.kind), ("error", "timeout"))
        self.assertEqual(self.store.ended, [("app", None)])

    def test_silence_mid_stream_past_the_limit_ends_it(self) -> None:
        """
        Silence longer than ``stall_timeout`` once Ollama has started: one
        error frame, Ollama's connection closed, the partial reply stored;
        any line resets the count.
        """
        self.upstream.answer()
        self.upstream.send("Half")
        self.advance(119)
        self.upstream.send(" way")
        self.advance(119)
        self.assertNoResult(self.running)
        self.advance(1)
        self.successResultOf(self.running)
        self.assertIn("stopped sending for 120 s", self.phone().errors[0])
        self.assertTrue(self.upstream.transport.disconnecting or self.upstream.transport.producerState == "stopped")
        self.assertEqual(self.store.ended, [("app", "Half way")])
