"""
How evenly worker processes share one port's connections, for each way to
share it (issue 14): ``python -m bench.spread [--workers 2] [--connections 4000]``.

- ``inherit``: the parent binds and listens, the workers inherit the socket
  and take it up with ``reactor.adoptStreamPort`` (Twisted's accept loop
  takes up to ~100 connections per wake-up);
- ``inherit-1``: the same, accepting one connection per wake-up, as
  chatterd's workers do;
- ``reuseport``: each worker binds a socket of its own with
  ``SO_REUSEPORT`` and the kernel spreads connections by a hash.

Each worker answers a line per connection after ``--work-ms`` of CPU, as a
request would cost; the load keeps ``--concurrency`` connections going.
Prints connections per worker and their spread (max ÷ mean) per method.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter


def child(method: str, fd: int, port: int, work_ms: float, name: str, busy: float) -> None:
    """
    A worker: count connections, answer each after some CPU; ``busy`` is the
    share of its time it spends on other work (streams already held, say).
    """
    from twisted.internet import protocol, reactor, task, tcp

    if busy:
        def other_work() -> None:
            end = time.perf_counter() + busy * 0.1
            while time.perf_counter() < end:
                pass

        task.LoopingCall(other_work).start(0.1)

    class One(tcp.Port):
        numberAccepts = 1

        def doRead(self) -> None:
            self.numberAccepts = 1  # Twisted raises it by 20 after a full batch
            super().doRead()

    class Answer(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            end = time.perf_counter() + work_ms / 1000
            while time.perf_counter() < end:
                pass
            self.transport.write(name.encode() + b"\n")
            self.transport.loseConnection()

    factory = protocol.ServerFactory.forProtocol(Answer)
    if method == "reuseport":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1024)
        s.setblocking(False)
        fd = s.fileno()
    port_class = One if method == "inherit-1" else tcp.Port
    p = port_class._fromListeningDescriptor(reactor, fd, socket.AF_INET, factory)
    p.startListening()
    print("ready", flush=True)
    reactor.run()


def load(port: int, connections: int, concurrency: int, hold: bool) -> Counter[str]:
    """
    ``connections`` connections, ``concurrency`` at a time; with ``hold``,
    every connection stays open to the end (a burst of long streams).
    """
    counts: Counter[str] = Counter()
    left = [connections]
    lock = threading.Lock()
    held: list[socket.socket] = []

    def run() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"hi\n")
            name = c.makefile().readline().strip()
            with lock:
                counts[name] += 1
                if hold:
                    held.append(c)
            if not hold:
                c.close()

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in held:
        c.close()
    return counts


def measure(method: str, workers: int, connections: int, concurrency: int, work_ms: float,
            hold: bool = False, busy: float = 0.0) -> dict[str, object]:
    listener = None
    fd = -1
    if method == "reuseport":
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        os.set_inheritable(fd, True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.spread", "--child", method, str(fd), str(port), str(work_ms), f"w{i}",
             str(busy if i == 0 else 0.0)],
            stdout=subprocess.PIPE, text=True, pass_fds=(fd,) if fd >= 0 else (),
        )
        for i in range(workers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        started = time.monotonic()
        counts = load(port, connections, concurrency, hold)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if listener is not None:
            listener.close()
    per = [counts.get(f"w{i}", 0) for i in range(workers)]
    mean = sum(per) / workers
    return {"method": method, "per_worker": per, "max_over_mean": max(per) / mean if mean else 0.0,
            "connections_per_s": sum(per) / elapsed}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        child(args[1], int(args[2]), int(args[3]), float(args[4]), args[5], float(args[6]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--work-ms", type=float, default=0.5)
    p.add_argument("--methods", default="inherit,inherit-1,reuseport")
    p.add_argument("--hold", action="store_true", help="keep every connection open (a burst of long streams)")
    p.add_argument("--busy", type=float, default=0.0,
                   help="share of its time the first worker spends on other work (0-1)")
    o = p.parse_args(args)
    for method in o.methods.split(","):
        result = measure(method, o.workers, o.connections, o.concurrency, o.work_ms, o.hold, o.busy)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
