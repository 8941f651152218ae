# -*- test-case-name: tests.test_balancer,tests.test_operations -*-
"""
Several Ollama servers behind one chatterd: which one takes a request.

Each request goes to the server with the fewest streams in flight among those
that have its model (learned from ``/api/tags``, refreshed periodically; a
server whose list is unknown is assumed to have every model).  If connecting
fails before Ollama's first byte, the next candidate is tried, so one dead
GPU box costs a request a retry, not an error; a server that failed is tried
last for ``cooldown`` seconds.  With one server this is exactly a single
client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.iweb import IResponse

from chatterd.logs import Logger
from chatterd.ollama import OllamaClient, OllamaError, OllamaUnreachable

log = Logger()


def model_key(name: str) -> str:
    """
    A model's name as Ollama resolves it: no tag means ``:latest``.
    """
    return name if ":" in name else name + ":latest"


@dataclass(eq=False)
class Server:
    """
    One Ollama server and what chatterd knows of it.

    :ivar models: the models it has, or ``None`` while unknown.
    """

    client: OllamaClient
    in_flight: int = 0
    models: set[str] | None = None
    failed_at: float | None = None

    @property
    def url(self) -> str:
        return self.client.url

    def has(self, model: str | None) -> bool:
        return self.models is None or model is None or model_key(model) in self.models

    def cooling(self, now: float, cooldown: float) -> bool:
        """
        Whether it failed less than ``cooldown`` seconds ago.
        """
        return self.failed_at is not None and now - self.failed_at < cooldown


class Lease:
    """
    One request's claim on a server, counted in its ``in_flight`` until released.
    """

    def __init__(self, candidates: Sequence[Server], clock: IReactorTime) -> None:
        self._candidates = candidates
        self._clock = clock
        self.server: Server | None = None

    async def post(self, path: str, body: bytes) -> IResponse:
        """
        POST to the best candidate, falling over to the next on a connection
        failure.

        :raises OllamaUnreachable: if no candidate answers.
        """
        errors: list[str] = []
        for server in self._candidates:
            self.release()
            self.server = server
            server.in_flight += 1
            try:
                response = await server.client.post(path, body)
            except OllamaUnreachable as e:
                server.failed_at = self._clock.seconds()
                errors.append(str(e))
                if len(self._candidates) > 1:
                    log.warn("{url} failed, trying the next server: {e}", url=server.url, e=e)
                continue
            server.failed_at = None
            return response
        self.release()
        raise OllamaUnreachable("; ".join(errors))

    def release(self) -> None:
        if self.server is not None:
            self.server.in_flight -= 1
            self.server = None


class Balancer(Service):
    """
    The Ollama servers, and the periodic refresh of their model lists.

    :param clients: one per ``--ollama``, in the order given.
    :param refresh: seconds between ``/api/tags`` refreshes.
    :param timeout: seconds a refresh or readiness check may take per server.
    :param cooldown: seconds a server that failed is tried only after the others.
    """

    name = "ollama"

    def __init__(
        self,
        clients: Sequence[OllamaClient],
        *,
        clock: IReactorTime,
        refresh: float = 60.0,
        timeout: float = 5.0,
        cooldown: float = 10.0,
    ) -> None:
        self.servers = [Server(c) for c in clients]
        self._clock = clock
        self._refresh = refresh
        self._timeout = timeout
        self._cooldown = cooldown
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = clock

    def lease(self, model: str | None) -> Lease:
        """
        Servers for ``model``, best first: those that have it, not failing
        lately, with the fewest streams in flight; the rest as a last resort.
        """
        now = self._clock.seconds()
        ranked = sorted(
            self.servers, key=lambda s: (not s.has(model), s.cooling(now, self._cooldown), s.in_flight)
        )
        return Lease(ranked, self._clock)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.servers)

    # --- model lists ---

    def startService(self) -> None:
        super().startService()
        if len(self.servers) > 1:  # with one server there is nothing to choose
            self._loop.start(self._refresh, now=True).addErrback(
                lambda f: log.failure("model refresh stopped", f)
            )

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> Deferred[Any]:
        """
        Ask every server for its models; a server that does not answer keeps
        its previous list.
        """
        return DeferredList([ensureDeferred(self._refresh_one(s)) for s in self.servers])

    async def _refresh_one(self, server: Server) -> None:
        try:
            tags = await server.client.get_json("/api/tags", self._timeout, self._clock)
            names = {model_key(m["name"]) for m in tags.get("models", []) if isinstance(m.get("name"), str)}
        except (OllamaError, AttributeError, TypeError) as e:
            server.failed_at = self._clock.seconds()
            log.warn("could not list the models of {url}: {e}", url=server.url, e=e)
            return
        if names != server.models:
            log.info("{url} has {n} models: {names}", url=server.url, n=len(names), names=", ".join(sorted(names)))
        server.models = names

    async def check(self) -> dict[str, str]:
        """
        Readiness: each server's ``/api/version``, as ``{url: "ok" | "down: why"}``.
        """

        async def one(server: Server) -> tuple[str, str]:
            try:
                await server.client.get_json("/api/version", self._timeout, self._clock)
                return server.url, "ok"
            except OllamaError as e:
                return server.url, f"down: {e}"

        results = await DeferredList([ensureDeferred(one(s)) for s in self.servers], consumeErrors=True)
        return dict(value for ok, value in results if ok)
