# -*- test-case-name: tests.test_web -*-
"""
The HTTP layer: Klein routes, JSON errors, request bodies and the access log.

Routes stay thin: validate (``chatterd.api``), call the store or the relay,
serialise.  Errors before anything is written are JSON ``{"error": ...}``
answers with a 4xx or 5xx status; errors inside ``/llmchat``'s stream are SSE
error frames (see ``chatterd.relay``).  Paths work with and without a trailing
slash, without redirects.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException

from chatterd import api
from chatterd.api import ClientError
from chatterd.balancer import Balancer
from chatterd.logs import Logger, info_line
from chatterd.metrics import Metrics
from chatterd.ollama import OllamaError
from chatterd.relay import (
    FAILED,
    ChatRelay,
    GenerateRelay,
    OllamaTimeout,
    RelayConfig,
    Relaying,
    detail,
    public_message,
)
from chatterd.site import json_body
from chatterd.store import IChattStore, StoreError
from chatterd.streams import Busy, Streams
from chatterd.writing import FlowControl, WriteBatcher, abort_response

log = Logger()

BANNER = "EECS Reactive chatterd"
#: Rows per ``/getchatts`` page: memory stays bounded whatever the table's size.
PAGE_ROWS = 500


# --- requests, bodies, access log ------------------------------------------------


def read_body(request: IRequest) -> bytes:
    """
    The request body.

    :raises ClientError: 413 if it was larger than the limit.
    """
    content = request.content
    if getattr(content, "too_large", False):
        raise ClientError(413, f"the body is larger than {content.limit} bytes")
    content.seek(0)
    return content.read()


def _servers_state(servers: dict[str, str]) -> str:
    """
    The Ollama servers in one word, for the public ``/readyz``.
    """
    up = sum(1 for state in servers.values() if state == "ok")
    return "ok" if up == len(servers) else "down" if not up else f"{up} of {len(servers)} up"


# --- the application -------------------------------------------------------------


class ChatterApp:
    """
    chatterd's routes.

    :param store: where chatts live.
    :param ollama: the Ollama servers.
    :param streams: admission, per-appID turns and shutdown of streams.
    :param clock: for heartbeats and timing.
    :param relay: timing of relayed streams.
    :param metrics: where streams are counted.
    :param log_content: log prompts and replies (users' conversations: off
        unless debugging).
    :param ready_timeout: seconds each ``/readyz`` check may take.
    """

    app = Klein()

    def __init__(
        self,
        *,
        store: IChattStore,
        ollama: Balancer,
        streams: Streams,
        clock: IReactorTime,
        relay: RelayConfig = RelayConfig(),
        metrics: Metrics | None = None,
        log_content: bool = False,
        ready_timeout: float = 2.0,
    ) -> None:
        self.store = store
        self.ollama = ollama
        self.streams = streams
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.log_content = log_content
        self.ready_timeout = ready_timeout
        self.relaying = Relaying(ollama, clock, relay, WriteBatcher(clock))
        self._readiness: dict[str, Any] | None = None

    def resource(self) -> Any:
        return self.app.resource()

    # Werkzeug would answer "/getchatts//" with a redirect to "/getchatts/";
    # chatterd never redirects: such a path is simply not found.
    app.url_map.merge_slashes = False

    # --- errors ---

    @app.handle_errors(ClientError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        return json_body(request, {"error": e.message}, e.status)

    @app.handle_errors(StoreError)
    def _store_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        if e.status == 503:
            request.setHeader(b"retry-after", b"5")
        return json_body(request, {"error": str(e)}, e.status)

    @app.handle_errors(Busy)
    def _busy(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        if e.limit is not None:  # a per-client limit
            self.metrics.client_limit_refusals.labels(e.limit).inc()
            request.note = f"per-client {e.limit} limit"  # type: ignore[attr-defined]
        request.setHeader(b"retry-after", str(e.retry_after).encode())
        return json_body(request, {"error": str(e)}, e.status)

    @app.handle_errors(OllamaError)
    def _ollama_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Ollama failing before anything was written (``/llmprompt`` only:
        ``/llmchat`` reports it in its stream).
        """
        status = 504 if failure.check(OllamaTimeout) else 502
        return json_body(request, {"error": public_message(failure.value)}, status)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        for name, value in e.get_headers():  # Allow: on a 405
            if name.lower() == "allow":
                request.setHeader(b"allow", value.encode())
        return json_body(request, {"error": f"{e.name}: {request.method.decode()} {request.path.decode()}"}, e.code)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes | None:
        log.failure("unexpected error on {path}", failure, path=request.path)
        if request.startedWriting:
            return None
        return json_body(request, {"error": "internal error (see chatterd's log)"}, 500)

    # --- health ---

    @app.route("/healthz", methods=["GET"], strict_slashes=False)
    def healthz(self, request: IRequest) -> bytes:
        """
        Liveness: the process answers.
        """
        return json_body(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"], strict_slashes=False)
    async def readyz(self, request: IRequest) -> bytes:
        """
        Readiness: the database answers a query and an Ollama server its
        version, each within ``ready_timeout``; 503 says which part is down,
        and nothing internal (the ``--metrics`` listener's ``/readyz`` and
        the log say why).
        """
        ready, details = await self.readiness()
        body = {
            "status": details["status"],
            "database": "ok" if details["database"] == "ok" else "down",
            "ollama": _servers_state(details["ollama"]),
        }
        return json_body(request, body, 200 if ready else 503)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """
        Whether chatterd is ready, and the whole story: each part's state
        and, for a part that is down, why (Ollama servers by address).  A
        change is logged.
        """
        try:
            await self.store.ping().addTimeout(self.ready_timeout, self.clock)
            database = "ok"
        except CancelledError:
            raise  # the client left: nothing was found down
        except Exception as e:
            database = f"down: {detail(e)}" if str(e) else "down: no answer"
        ollama = await self.ollama.check()
        ready = database == "ok" and "ok" in ollama.values()
        details = {"status": "ready" if ready else "not ready", "database": database, "ollama": ollama}
        if details != self._readiness:
            if self._readiness is not None or not ready:
                log.info("readiness: {status}; database {database}; Ollama {ollama}", status=details["status"],
                         database=database, ollama=", ".join(f"{u} {v}" for u, v in ollama.items()))
            self._readiness = details
        return ready, details

    # --- the Chatter APIs ---

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return json_body(request, BANNER)

    @app.route("/postchatt", methods=["POST"], strict_slashes=False)
    async def postchatt(self, request: IRequest) -> bytes:
        username, message = api.parse_chatt(read_body(request))
        await self.store.post_chatt(username, message)
        return json_body(request, {})

    @app.route("/getchatts", methods=["GET"], strict_slashes=False)
    async def getchatts(self, request: IRequest) -> None:
        """
        Every chatt as ``[username, message, id, time]``, oldest first, streamed
        page by page at the pace the client reads.
        """
        page = await self.store.chatts_page(0, PAGE_ROWS)  # failures here are JSON 5xx
        request.setHeader(b"content-type", b"application/json")
        flow = FlowControl(request)
        try:
            request.write(b"[")
            first = True
            while page:
                rows = (
                    json.dumps([c.username, c.message, c.id, None if c.time is None else c.time.isoformat()])
                    for c in page
                )
                text = ",".join(rows)
                request.write((text if first else "," + text).encode("utf-8"))
                first = False
                if len(page) < PAGE_ROWS:
                    break
                await flow.wait()
                page = await self.store.chatts_page(page[-1].seq, PAGE_ROWS)
            request.write(b"]")
        except StoreError as e:
            # The array is half sent: cut the connection so that the client
            # cannot mistake what it got for the whole table.
            log.error("getchatts broke off: {e}", e=e)
            abort_response(request)
        except CancelledError:
            raise  # the client left
        except Exception:
            log.failure("getchatts broke off")  # a bug: cut the array all the same
            abort_response(request)
        finally:
            flow.unregister()

    # --- the LLM APIs ---

    @app.route("/llmprep", methods=["POST"], strict_slashes=False)
    async def llmprep(self, request: IRequest) -> bytes:
        """
        Replace an appID's history, in its turn (not in the middle of a
        chat).  It may wait as long as a stream, so it counts as one: the
        same admission limits, and shutdown ends its wait.
        """
        chat = api.parse_chat(read_body(request), need_model=False)
        async with self.streams.admitted(request) as slot, self.streams.turn(chat.appid, slot):
            await slot.interruptible(self.store.replace_history(chat.appid, chat.messages, self.streams.lock_wait))
        return json_body(request, {})

    @app.route("/llmchat", methods=["POST"], strict_slashes=False)
    async def llmchat(self, request: IRequest) -> None:
        """
        Store the new messages, send the whole history to Ollama, and relay
        its answer as SSE.  Errors before the stream are JSON; after, frames.
        """
        chat = api.parse_chat(read_body(request))
        async with self.streams.admitted(request) as slot, self.streams.turn(chat.appid, slot):
            history = await slot.interruptible(self.store.begin_turn(chat.appid, chat.messages, self.streams.lock_wait))
            relay = ChatRelay(request, self.relaying, appid=chat.appid, model=chat.model, store=self.store)
            slot.stream = relay
            try:
                await relay.run(chat.ollama_body(history))  # ends the turn, however it goes
            finally:
                content = {"prompt": json.dumps(chat.messages), "reply": relay.reply} if self.log_content else {}
                self._stream_ended("/llmchat", relay, appid=chat.appid, model=chat.model, **content)

    @app.route("/llmprompt", methods=["POST"], strict_slashes=False)
    async def llmprompt(self, request: IRequest) -> bytes | None:
        """
        Ollama's ``/api/generate``, proxied: its NDJSON streamed back as it
        comes, or its error status and body passed through.
        """
        model, body = api.parse_generate(read_body(request))
        async with self.streams.admitted(request) as slot:
            relay = slot.stream = GenerateRelay(request, self.relaying, model=model)
            try:
                return await relay.run(body)
            finally:
                self._stream_ended("/llmprompt", relay, model=model)

    def _stream_ended(self, route: str, relay: Any, **fields: Any) -> None:
        """
        One log line and the metrics for a stream that ended, however it ended.
        """
        ending = relay.ending or FAILED  # none: an exception escaped the relay (a bug)
        self.metrics.stream_ended(route, relay, ending)
        duration_ms = (self.clock.seconds() - relay.started_at) * 1000
        text = f"{route} stream {ending.outcome}"
        if ending.kind:
            text += f" ({ending.kind}: {ending.detail})" if ending.detail else f" ({ending.kind})"
        text += ": "
        if "appid" in fields:
            text += f"appID {fields['appid']}, "
        text += f"model {fields['model']}, {relay.frames} frames, {relay.bytes}B, {duration_ms:.0f}ms"
        if self.log_content and "prompt" in fields:
            text += f", prompt {fields['prompt']}, reply {fields['reply']!r}"
        info_line(
            log,
            text,
            route=route,
            outcome=ending.outcome,
            error_kind=ending.kind,
            error=ending.detail,
            frames=relay.frames,
            bytes=relay.bytes,
            duration_ms=duration_ms,
            **fields,
        )


class ReadinessResource(Resource):
    """
    ``/readyz`` with the whole story (which Ollama server is down and why),
    for the ``--metrics`` listener, which only operators reach.
    """

    isLeaf = True

    def __init__(self, app: ChatterApp) -> None:
        super().__init__()
        self._app = app

    def render_GET(self, request: IRequest) -> int:
        def answer(result: tuple[bool, dict[str, Any]]) -> None:
            ready, details = result
            request.write(json_body(request, details, 200 if ready else 503))
            request.finish()

        Deferred.fromCoroutine(self._app.readiness()).addCallback(answer).addErrback(
            lambda f: None if f.check(CancelledError) else log.failure("readiness failed", f)
        )
        return NOT_DONE_YET
