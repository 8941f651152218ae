# -*- test-case-name: tests.test_workers -*-
"""
One of ``--workers N`` worker processes: ``python -m chatterd.worker``,
started by :class:`chatterd.workers.Supervisor` and told what to do by the
``CHATTERD_WORKER`` environment variable (JSON: its number, the options,
the listening sockets it inherited, where to log).

It is a single chatterd (:func:`chatterd.tap.makeService`) whose listeners
take up the inherited sockets, and which

- logs with its number: ``[worker N ...]`` in text, ``"worker": N`` in JSON;
- says ``ready`` on its descriptor ``ready_fd`` once it serves (its
  listeners are up and its store has tried its first connections);
- on SIGTERM or SIGINT, stops as chatterd does: listeners closed, streams
  given ``--grace``;
- on SIGUSR2, *retires* (a reload): stops accepting, asks every connection
  to go once what it is doing is done (HTTP/2: ``GOAWAY`` once no stream is open),
  waits for them up to the reload grace, then stops as above.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    LogLevelFilterPredicate,
    FilteringLogObserver,
    formatEventAsClassicLogText,
    globalLogBeginner,
)

from chatterd import logs, workers
from chatterd.logs import Logger

log = Logger()

#: Seconds between checks that a retiring worker's connections have gone.
RETIRE_POLL = 0.5
#: Seconds between checks that the parent is still there.
ORPHAN_CHECK = 1.0


def observer(out: IO[str], number: int, fmt: str) -> Any:
    """
    A log observer writing to ``out`` with the worker's number on each line.
    """
    if fmt == "json":
        def format(event: dict[str, Any]) -> str:
            return logs.format_json({**event, "worker": number})
    else:
        def format(event: dict[str, Any]) -> str | None:
            level = event.get("log_level")
            system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')}"
            return formatEventAsClassicLogText({**event, "log_system": f"worker {number} {system}"})
    return FilteringLogObserver(FileLogObserver(out, format), [LogLevelFilterPredicate()])


def services(tree: IService) -> Iterator[IService]:
    """
    Every service in a tree, the tree's root first.
    """
    yield tree
    if IServiceCollection.providedBy(tree):
        for child in tree:
            yield from services(child)


def listeners(tree: IService) -> list[StreamServerEndpointService]:
    """
    The public listeners in a service tree (those serving a ``ChatterSite``).
    """
    from chatterd.site import ChatterSite

    return [s for s in services(tree)
            if isinstance(s, StreamServerEndpointService) and isinstance(s.factory, ChatterSite)]


class Retirement:
    """
    A worker's retirement at a reload: stop accepting, let every connection
    finish, then stop (``stop``) once none is left or ``grace`` has passed.
    """

    def __init__(self, tree: IService, reactor: Any, grace: float, stop: Any) -> None:
        self._tree = tree
        self._reactor = reactor
        self._grace = grace
        self._stop = stop
        self.started = False

    def __call__(self) -> None:
        if self.started:
            return
        self.started = True
        ports = listeners(self._tree)
        sites = {port.factory for port in ports}
        closing = [port.disownServiceParent() for port in ports]
        log.info("retiring: no new connections; waiting up to {grace:g} s for {n} to finish",
                 grace=self._grace, n=sum(len(site.connections) for site in sites))

        def closed(_: object) -> None:
            for site in sites:
                site.retire()
            deadline = self._reactor.seconds() + self._grace
            self._wait(sites, deadline)

        DeferredList([d for d in closing if isinstance(d, Deferred)]).addCallback(closed)

    def _wait(self, sites: set[Any], deadline: float) -> None:
        left = sum(len(site.connections) for site in sites)
        if not left:
            log.info("retired: every connection has finished")
            self._stop()
        elif self._reactor.seconds() >= deadline:
            log.warn("retiring: {n} connections still open after the reload grace; stopping", n=left)
            self._stop()
        else:
            self._reactor.callLater(RETIRE_POLL, self._wait, sites, deadline)


def main() -> None:
    spec = json.loads(os.environ["CHATTERD_WORKER"])
    number = spec["number"]
    destination = spec["log"]
    out: IO[str] = open(destination["file"], "a", buffering=1) if destination["file"] else sys.stdout
    logs.never_fail_to_encode(out)
    globalLogBeginner.beginLoggingTo([observer(out, number, destination["format"])], redirectStandardIO=False)

    from twisted.internet import reactor

    from chatterd.tap import Options, makeService

    options = Options()
    options.update(spec["options"])
    inherited = {description: (fd, family) for fd, family, description in spec["listeners"]}
    tree = makeService(options, reactor, inherited=inherited)

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping

    parent = os.getppid()

    def orphaned() -> None:
        if os.getppid() != parent:  # the parent was killed: nobody supervises, drain and go
            log.error("worker {n}: the parent process has gone; stopping", n=number)
            orphan_check.stop()
            stop()

    orphan_check = LoopingCall(orphaned)

    def backstop() -> None:
        """
        However a stop goes, the worker is gone ``--grace`` plus a margin
        later (its parent would kill it then; an orphan has no parent).
        """
        def hard_exit() -> None:
            log.error("worker {n}: still stopping {t:g} s after it began; exiting", n=number, t=limit)
            out.flush()
            os._exit(1)

        limit = options["grace"] + workers.KILL_AFTER
        reactor.callLater(limit, hard_exit)

    retire = Retirement(tree, reactor, spec["reload_grace"], stop)
    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(retire))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent reloads (a terminal's hangup reaches all)

    def start() -> None:
        tree.privilegedStartService()
        tree.startService()
        reactor.addSystemEventTrigger("before", "shutdown", backstop)
        reactor.addSystemEventTrigger("before", "shutdown", tree.stopService)
        orphan_check.start(ORPHAN_CHECK, now=False)
        from chatterd.store import PostgresChattStore

        store = next((s for s in services(tree) if isinstance(s, PostgresChattStore)), None)

        def ready(result: object) -> object:
            _say_ready(spec["ready_fd"])
            log.info("worker {n} (pid {pid}, generation {g}) serving", n=number, pid=os.getpid(),
                     g=spec.get("generation", 1))
            return result  # left as it was for the store's other readers

        if store is not None and store.started is not None:
            store.started.addBoth(ready)
        else:
            ready(None)

    reactor.callWhenRunning(start)
    reactor.run()


def _say_ready(fd: int) -> None:
    try:
        os.write(fd, b"ready\n")
        os.close(fd)
    except OSError:
        pass  # the parent has gone; SIGTERM follows


if __name__ == "__main__":
    main()
