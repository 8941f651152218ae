# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes behind one set of listening sockets
(``--workers N``), supervised by a small parent that does no request work.

The parent

- binds every ``--listen`` socket itself (so ports below 1024 work, and one
  socket serves every worker) and hands it down: each worker inherits the
  descriptor and takes it up with ``reactor.adoptStreamPort`` (Twisted's
  ``IReactorSocket``).  The kernel then gives each new connection to
  whichever worker accepts first: a busy worker takes fewer.  (One
  ``SO_REUSEPORT`` socket per worker spreads by a hash instead, blind to
  load, and a socket that closes drops the connections queued on it: a
  reload would refuse some.  ``python -m bench.spread`` measures both.)
- owns the embedded PostgreSQL (started before the workers, stopped after the
  last one ends: it is this service's parent);
- restarts a worker that dies, with a backoff, logging why it died;
- on SIGTERM (stopping), tells every worker to drain (each has ``--grace``,
  as a single chatterd does) and waits for them;
- on SIGHUP, reloads without dropping anything: a new generation of
  workers starts with the code as it is now, and only once every one of
  them is serving are the old ones told to *retire*: stop accepting, let
  each connection finish what it is doing, and exit (within
  ``--reload-grace``).  The sockets never close, so no connection is
  refused; no stream is cut.

Workers are ``python -m chatterd.worker`` (see :mod:`chatterd.worker`): the
same service as a single chatterd, with the parent's options, its listeners
adopted from the inherited descriptors, and metrics in prometheus_client's
multiprocess mode so that the parent's ``--metrics`` page adds them all up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.python.failure import Failure

from chatterd import tls
from chatterd.streams import default_client_streams
from chatterd.logs import Logger

log = Logger()

#: The worker's descriptor on which it says "ready" once it serves.
READY_FD = 3
#: Seconds a new worker may take to serve before a reload gives up on it.
START_TIMEOUT = 60.0
#: Restart backoff: the first wait, the longest, and how long a worker must
#: have lived for the backoff to start again from the first wait.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 1.0, 30.0, 60.0
#: Seconds past the drain's own deadline before a worker that has not ended is killed.
KILL_AFTER = 15.0


def worker_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    What each of ``--workers N`` workers is told: the parent's options, with
    ``--max-streams`` split between them (it stays a total; a per-client
    limit left to its default is a quarter of a worker's share), and no
    metrics listener (the parent serves one page for all).
    """
    count = options["workers"]
    share = -(-options["max-streams"] // count)
    mine = {**options, "workers": 1, "metrics": None, "max-streams": share}
    if getattr(options, "client_streams_derived", False):
        mine["max-client-streams"] = default_client_streams(share)
    return mine


def log_destination(options: Any) -> dict[str, Any]:
    """
    Where and how the workers log: as the parent does (twistd's
    ``--logfile``, else standard output), in ``--log-format``.
    """
    twistd = getattr(options, "parent", None) or {}
    logfile = twistd.get("logfile")
    if logfile in (None, "-"):
        logfile = None if twistd.get("nodaemon", True) else "twistd.log"
    return {"format": options["log-format"], "file": os.path.abspath(logfile) if logfile else None}


def metrics_site(directory: str) -> Any:
    """
    The parent's ``--metrics`` site: every worker's metrics added up, from
    the files prometheus_client's multiprocess mode has them write.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from chatterd import metrics

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return metrics.site(registry)


@dataclass
class Listener:
    """
    One ``--listen`` socket, bound and listening in the parent.
    """

    description: str
    sock: socket.socket

    @property
    def family(self) -> int:
        return int(self.sock.family)


def bind(description: str, backlog_default: int = tls.DEFAULT_BACKLOG) -> Listener:
    """
    Bind and listen for a ``tcp:`` or ``ssl:`` description (port,
    ``interface=``, IPv6 included, ``backlog=``), as Twisted's endpoint would.

    :raises ValueError: for a description that workers cannot share.
    """
    args, kwargs = tls.parse_description(description)
    if args[0] not in ("tcp", "ssl"):
        raise ValueError(f"with --workers, listeners must be tcp: or ssl:, not {args[0]}:")
    port = int(kwargs.get("port", args[1] if len(args) > 1 else 0))
    interface = kwargs.get("interface", "")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(int(kwargs.get("backlog", backlog_default)))
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return Listener(description, sock)


@dataclass(eq=False)
class Worker(protocol.ProcessProtocol):
    """
    One worker process, as its parent sees it.
    """

    number: int
    generation: int
    supervisor: Supervisor
    started_at: float = 0.0
    ready: Deferred[None] = field(default_factory=Deferred)
    ended: Deferred[None] = field(default_factory=Deferred)
    process: Any = None
    #: its process id (kept: Twisted forgets it once the process has ended)
    pid: int | None = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == READY_FD and b"ready" in data and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)

    def signal(self, number: int) -> None:
        if self.process is not None and not self.ended.called:
            try:
                self.process.signalProcess(number)
            except (OSError, ProcessExitedAlready):  # it just ended
                pass


def why_it_ended(reason: Failure) -> str:
    """
    A worker's end in words: its exit status or the signal that killed it.
    """
    e = reason.value
    if isinstance(e, TimeoutError):
        return f"did not say it serves within {START_TIMEOUT:g} s"
    if isinstance(e, ProcessDone):
        return "exited normally"
    if isinstance(e, ProcessTerminated):
        if e.signal is not None:
            return f"was killed by signal {e.signal} ({signal.Signals(e.signal).name})"
        return f"exited with status {e.exitCode}"
    return str(e)


class Supervisor(Service):
    """
    Starts ``count`` workers, keeps them running, stops and reloads them.

    :param options: the workers' options (every worker gets the same; see
        :func:`worker_options`).
    :param dsn: the database's DSN, or a callable that gives it once the
        embedded PostgreSQL has started.
    :param listen: the ``--listen`` descriptions to bind and hand down.
    :param grace: ``--grace``, for the kill deadline at shutdown.
    :param reload_grace: how long a retiring worker may take to finish.
    :param metrics_dir: prometheus_client's multiprocess directory, or None;
        the supervisor removes it at the end.
    :param log: where and how workers log (see :func:`log_destination`).
    """

    name = "workers"

    def __init__(
        self,
        *,
        count: int,
        options: dict[str, Any],
        dsn: str | Callable[[], str],
        listen: Sequence[str],
        reactor: Any,
        grace: float,
        reload_grace: float,
        metrics_dir: str | None = None,
        log: dict[str, Any] | None = None,
    ) -> None:
        self.count = count
        self._options = options
        self._dsn = dsn
        self._listen = list(listen)
        self._reactor = reactor
        self._grace = grace
        self._reload_grace = reload_grace
        self._metrics_dir = metrics_dir
        self._log = log or {"format": "text", "file": None}
        self.listeners: list[Listener] = []
        self.workers: dict[int, Worker] = {}  # by number, the current generation
        self.retiring: set[Worker] = set()
        self.live_workers: set[Worker] = set()  # every worker process not yet ended, of any generation
        self._devnull: int | None = os.open(os.devnull, os.O_RDONLY)  # each worker's standard input
        self.generation = 0
        self._backoff: dict[int, float] = {}
        self._stopping = False
        self._reloading = False
        self._again = False

    # --- sockets ---

    def privilegedStartService(self) -> None:
        """
        Bind every listener now, before twistd drops root (``--uid``).
        """
        super().privilegedStartService()
        if not self.listeners:
            self.listeners = [bind(description) for description in self._listen]

    # --- starting and stopping ---

    def startService(self) -> None:
        super().startService()
        if not self.listeners:
            self.privilegedStartService()
        self.generation = 1
        for number in range(1, self.count + 1):
            self.workers[number] = self._spawn(number)
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))
        log.info("{n} workers starting (pids {pids})", n=self.count,
                 pids=", ".join(str(w.pid) for w in self.workers.values()))

    def stopService(self) -> Deferred[Any]:
        """
        Tell every worker to drain (SIGTERM: each has ``--grace``), wait for
        all of them, kill those that outlive the deadline.
        """
        super().stopService()
        self._stopping = True
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        live = [w for w in self.live_workers if not w.ended.called]
        for w in live:
            w.signal(signal.SIGTERM)
        if not live:
            self._close()
            return succeed(None)
        deadline = self._reactor.callLater(self._grace + KILL_AFTER, self._kill, live)
        done = DeferredList([w.ended for w in live])

        def finished(result: object) -> None:
            if deadline.active():
                deadline.cancel()
            self._close()

        return done.addCallback(finished)

    def _close(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
        self.listeners = []
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _kill(self, workers: list[Worker]) -> None:
        for w in workers:
            if not w.ended.called:
                log.warn("worker {n} (pid {pid}) did not end in time: killed", n=w.number, pid=w.pid)
                w.signal(signal.SIGKILL)

    # --- reloading ---

    def reload(self) -> Deferred[None] | None:
        """
        SIGHUP: start a new generation; once all of it serves, retire the old.
        If the new generation fails to start, it is retired instead (it
        finishes whatever it had taken) and the old one kept.
        """
        if self._stopping:
            log.info("SIGHUP ignored: stopping")
            return None
        if self._reloading:  # a change made after this reload began must be picked up too
            log.info("SIGHUP during a reload: another reload follows it")
            self._again = True
            return None
        self._reloading = True
        self.generation += 1
        old = dict(self.workers)
        new = {number: self._spawn(number) for number in old}
        log.info("reloading: generation {g} starting ({n} workers)", g=self.generation, n=len(new))

        def serving(_: object) -> None:
            self.workers = new
            for number, w in new.items():
                if w.ended.called:  # it said ready, then died while the others started
                    log.error("worker {n} of generation {g} ended during the reload; starting another",
                              n=number, g=self.generation)
                    self.workers[number] = self._spawn(number)
            for w in old.values():
                if not w.ended.called:
                    self.retiring.add(w)
                    w.signal(signal.SIGUSR2)  # stop accepting, finish, exit
            log.info("reloaded: generation {g} serving; {n} old workers finishing their streams",
                     g=self.generation, n=len(old))

        def failed(f: Failure) -> None:
            log.error("reload failed, keeping the running workers: a new worker {why}", why=why_it_ended(f))
            for w in new.values():
                self.retiring.add(w)  # not restarted; it may have taken connections: it finishes them
                w.signal(signal.SIGUSR2)
            self.generation -= 1
            for number, w in old.items():
                if w.ended.called and not self._stopping:  # it died meanwhile
                    self.workers[number] = self._spawn(number)

        starting = [w.ready.addTimeout(START_TIMEOUT, self._reactor) for w in new.values()]
        everyone = DeferredList(starting, fireOnOneErrback=True, consumeErrors=True)
        everyone.addCallbacks(serving, lambda f: failed(f.value.subFailure))
        everyone.addErrback(lambda f: log.failure("reload failed", f))

        def over(_: object) -> None:
            self._reloading = False
            if self._again:
                self._again = False
                self.reload()

        return everyone.addBoth(over)

    # --- the workers ---

    def _spawn(self, number: int) -> Worker:
        worker = Worker(number, self.generation, self)
        fds: dict[int, Any] = {0: self._devnull, 1: 1, 2: 2, READY_FD: "r"}
        listeners = []
        for i, listener in enumerate(self.listeners):
            child = READY_FD + 1 + i
            fds[child] = listener.sock.fileno()
            listeners.append([child, listener.family, listener.description])
        dsn = self._dsn() if callable(self._dsn) else self._dsn
        env = {**os.environ, "CHATTERD_WORKER": json.dumps({
            "number": number, "generation": self.generation, "listeners": listeners, "ready_fd": READY_FD,
            "options": {**self._options, "database": dsn}, "reload_grace": self._reload_grace,
            "log": self._log,
        })}
        if self._metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        worker.started_at = self._reactor.seconds()
        worker.process = self._reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "chatterd.worker"], env=env, childFDs=fds,
        )
        worker.pid = worker.process.pid
        self.live_workers.add(worker)
        return worker

    def worker_ended(self, worker: Worker, reason: Failure) -> None:
        """
        A worker ended: expected when stopping or retiring; otherwise log
        why and start another, after a backoff that grows while they keep dying.
        """
        self.live_workers.discard(worker)
        if worker.pid is not None and self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, self._metrics_dir)  # its gauges no longer count
        if worker in self.retiring:
            self.retiring.discard(worker)
            log.info("worker {n} of generation {g} (pid {pid}) finished and {why}", n=worker.number,
                     g=worker.generation, pid=worker.pid, why=why_it_ended(reason))
            return
        if self._stopping or self.workers.get(worker.number) is not worker:
            return
        if self._reloading:  # the new generation takes its place; failed() restarts it if that fails
            log.error("worker {n} (pid {pid}) {why} during a reload", n=worker.number, pid=worker.pid,
                      why=why_it_ended(reason))
            return
        lived = self._reactor.seconds() - worker.started_at
        wait = BACKOFF_FIRST if lived > BACKOFF_RESET else min(self._backoff.get(worker.number, 0) * 2 or BACKOFF_FIRST, BACKOFF_MAX)
        self._backoff[worker.number] = wait
        log.error("worker {n} (pid {pid}) {why} after {lived:.1f} s; starting another in {wait:g} s",
                  n=worker.number, pid=worker.pid, why=why_it_ended(reason), lived=lived, wait=wait)
        self._reactor.callLater(wait, self._respawn, worker)

    def _respawn(self, dead: Worker) -> None:
        if self._stopping or self.workers.get(dead.number) is not dead:
            return
        self.workers[dead.number] = self._spawn(dead.number)
