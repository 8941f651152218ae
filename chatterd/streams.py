# -*- test-case-name: tests.test_hardening -*-
"""
Admission, turns and shutdown for the streaming routes (``/llmchat``, ``/llmprompt``).

- **Admission**: at most ``max_streams`` streams at once; past that, and while
  shutting down, a request gets ``503`` with ``Retry-After`` before anything
  is stored.
- **Turns**: requests for one appID take turns, so two overlapping
  ``/llmchat`` requests cannot interleave their histories.  Inside this
  process a lock per appID serialises them (dropped as soon as nobody holds
  or waits for it); across processes sharing one database the store takes a
  PostgreSQL advisory lock in the statements that begin and end a turn
  (``begin_turn``/``end_turn``).
- **Shutdown**: stopping the service refuses new streams, lets running ones
  finish for ``grace`` seconds, then aborts the rest (each ends with an SSE
  error frame and stores its partial reply) and waits for them to wind up,
  for ``abort_wait`` seconds at most: then it logs what is left and ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest

from chatterd.clients import Counts, client_of
from chatterd.logs import Logger

log = Logger()
T = TypeVar("T")


def default_client_streams(max_streams: int) -> int:
    """
    ``--max-client-streams`` left to its default: a quarter of ``max_streams``.
    A class behind one NAT address still fits, and three other addresses
    still find room.
    """
    return max(1, max_streams // 4)


class Busy(Exception):
    """
    chatterd cannot take this stream now: too many running, or shutting down.

    :ivar limit: the per-client limit that refused it, if one did (for
        metrics and the access log).
    """

    status = 503

    def __init__(self, message: str, retry_after: int, limit: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit


class ShuttingDown(Exception):
    """
    The reason given to streams still running when the grace period ends.
    """


class Abortable(Protocol):
    """
    A running stream that can be ended early, with an error frame.
    """

    def abort(self, reason: BaseException) -> None: ...


class KeyedLock:
    """
    One ``DeferredLock`` per key, kept only while someone holds or waits for it.
    """

    def __init__(self) -> None:
        self._locks: dict[str, DeferredLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def acquire(self, key: str) -> Deferred[DeferredLock]:
        """
        Wait for ``key``'s turn; cancel the Deferred to stop waiting.
        """
        lock = self._locks.setdefault(key, DeferredLock())

        def gave_up(failure: Any) -> Any:
            self._forget(key, lock)
            return failure

        return lock.acquire().addErrback(gave_up)

    def release(self, key: str) -> None:
        lock = self._locks[key]
        lock.release()
        self._forget(key, lock)

    def _forget(self, key: str, lock: DeferredLock) -> None:
        if not lock.locked and not lock.waiting:
            del self._locks[key]


class Slot:
    """
    One admitted request's place: what shutdown ends when the grace period
    is over, whether it is still waiting for its turn or already streaming.

    :ivar what: the request, for the log (its method and path).
    """

    def __init__(self, what: str = "a request") -> None:
        self.what = what
        self.stream: Abortable | None = None
        self.waiting: Deferred[Any] | None = None
        self.aborted = False
        self.handled = False  # the handler has returned
        self.ended: Deferred[None] = Deferred()

    @property
    def doing(self) -> str:
        """
        What it is doing, for the log.
        """
        if self.handled:
            return "its answer not yet sent"
        if self.stream is not None:
            return "ending its stream" if self.aborted else "streaming"
        if self.waiting is not None:
            return "waiting"
        return "running"

    def abort(self, reason: BaseException) -> None:
        self.aborted = True
        if self.stream is not None:
            self.stream.abort(reason)
        elif self.waiting is not None:
            self.waiting.cancel()

    async def interruptible(self, d: Deferred[T]) -> T:
        """
        Await ``d`` (a wait for the database, say, or for another process's
        turn) such that shutdown ends the wait: then :class:`Busy`
        ("restarting"), and ``d`` is cancelled.
        """
        self.waiting = d
        try:
            return await d
        except CancelledError:
            if self.aborted:
                raise _restarting() from None
            raise
        finally:
            self.waiting = None


class Streams(Service):
    """
    Keeps count of running streams, gives each appID its turn, and drains
    them at shutdown.

    :param max_streams: the most streams at once.
    :param max_client_streams: the most streams at once of one client
        address (0: no such limit).
    :param grace: seconds running streams get to finish at shutdown.
    :param abort_wait: seconds the streams still running after ``grace``
        get to wind up once aborted (an error frame, the partial reply
        stored); then shutdown goes on without them.
    :param lock_wait: seconds a request waits for its appID's turn.
    """

    name = "streams"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        max_streams: int = 1000,
        max_client_streams: int = 0,
        grace: float = 30.0,
        abort_wait: float = 5.0,
        lock_wait: float = 300.0,
    ) -> None:
        self._clock = clock
        self.max_streams = max_streams
        self.per_client = Counts(max_client_streams)
        self.grace = grace
        self.abort_wait = abort_wait
        self.lock_wait = lock_wait
        self._slots: set[Slot] = set()
        self._turns = KeyedLock()
        self._draining = False

    @property
    def active(self) -> int:
        """
        Requests admitted and not yet ended (including those waiting for a turn).
        """
        return len(self._slots)

    @property
    def streams(self) -> list[Abortable]:
        """
        The streams running now.
        """
        return [slot.stream for slot in self._slots if slot.stream is not None]

    @property
    def waiting_appids(self) -> int:
        """
        appIDs with a lock entry (held or awaited); zero when idle.
        """
        return len(self._turns)

    # --- admission and turns ---

    @asynccontextmanager
    async def admitted(self, request: IRequest | None = None) -> AsyncIterator[Slot]:
        """
        Hold one of ``max_streams`` places for the duration; put the stream
        in the slot once it exists, so that shutdown can end it.

        :param request: the slot ends once this request has finished (its
            last bytes written), not merely when the handler returns.
        :raises Busy: if all are taken, or chatterd is shutting down.
        """
        if self._draining:
            raise _restarting()
        if len(self._slots) >= self.max_streams:
            raise Busy(f"chatterd is at its limit of {self.max_streams} streams, try again shortly", retry_after=2)
        client = client_of(request.getClientAddress()) if request is not None else None
        if not self.per_client.take(client):
            raise Busy(
                f"this address already has {self.per_client.limit} streams open, the most one client may "
                "hold at once; try again when one has ended", retry_after=5, limit="streams",
            )
        slot = Slot(_describe(request))
        self._slots.add(slot)
        # asked now: notifyFinish() asked after the request ended never fires
        finished = request.notifyFinish() if request is not None else succeed(None)
        finished.addErrback(lambda _: None)
        try:
            yield slot
        finally:
            slot.handled = True
            self._slots.discard(slot)
            self.per_client.give(client)
            finished.addCallback(lambda _: slot.ended.callback(None))

    @asynccontextmanager
    async def turn(self, appid: str, slot: Slot | None = None) -> AsyncIterator[None]:
        """
        Wait until no other stream of ``appid`` runs in this process, and
        keep the turn for the duration.  (The store's ``begin_turn`` then
        waits for other processes, up to ``lock_wait`` too.)

        :param slot: the request's slot, if admitted (shutdown ends the wait).
        :raises Busy: if the turn does not come within ``lock_wait`` seconds,
            or chatterd started shutting down meanwhile.
        """
        waiting = self._turns.acquire(appid)
        timer = self._clock.callLater(self.lock_wait, waiting.cancel)
        if slot is not None:
            slot.waiting = waiting
        try:
            await waiting
        except CancelledError:
            if slot is not None and slot.aborted:
                raise _restarting() from None
            if timer.active():
                raise  # the client left while waiting
            raise Busy("an earlier request for this appID is still streaming", retry_after=10) from None
        finally:
            if timer.active():
                timer.cancel()
            if slot is not None:
                slot.waiting = None
        try:
            if self._draining and slot is not None:
                raise _restarting()
            yield
        finally:
            self._turns.release(appid)

    # --- shutdown ---

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._draining = True
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        if not self._slots:
            return
        log.info("waiting up to {grace:g} s for {n} streams to finish", grace=self.grace, n=len(self._slots))
        slots = list(self._slots)
        ended = DeferredList([slot.ended for slot in slots])
        await _within(ended, self.grace, self._clock)
        if self._slots:
            log.warn("ending {n} streams still running after the grace period", n=len(self._slots))
            for slot in list(self._slots):
                slot.abort(ShuttingDown("chatterd is shutting down; the reply was cut short"))
        # A stream may be stuck where an abort cannot reach (storing its
        # reply, say), or its last bytes may not go: shutdown ends all the same.
        await _within(ended, self.abort_wait, self._clock)
        left = [slot for slot in slots if not slot.ended.called]
        if left:
            log.error(
                "shutting down without waiting any longer for {n} requests, {wait:g} s after the grace "
                "period: {which}", n=len(left), wait=self.abort_wait,
                which="; ".join(f"{slot.what} ({slot.doing})" for slot in left),
            )
        # The last frames are written but may sit in transport buffers, and
        # the reactor drops those when it stops: give them a moment to go.
        await deferLater(self._clock, 0.1, lambda: None)


def _describe(request: IRequest | None) -> str:
    if request is None:
        return "a request"
    method, path = request.method, request.path  # type: ignore[attr-defined]
    return f"{method.decode('ascii', 'replace')} {path.decode('ascii', 'replace')}"


def _restarting() -> Busy:
    return Busy("chatterd is restarting, try again shortly", retry_after=5)


def _within(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[None]:
    """
    Fires when ``d`` does or ``seconds`` pass, whichever is first; ``d`` is
    left alone either way.
    """
    first: Deferred[None] = Deferred()

    def fire(_: object = None) -> None:
        if not first.called:
            first.callback(None)
        if timer.active():
            timer.cancel()

    timer = clock.callLater(seconds, fire)
    d.addBoth(fire)
    return first
