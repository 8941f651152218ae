"""
The benchmark's world: a private PostgreSQL, the Ollama emulator and
chatterd, each a process of its own, pinned (server side: chatterd and
PostgreSQL; load side: the emulator and the load generator) and stopped at
the end whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import Spec
from tests import pgcluster

BENCH_ROOT = Path(__file__).resolve().parent.parent
#: Free space /dev/shm needs before the database goes there (1M rows take ~400 MB).
def scratch_dir(prefix: str) -> Path:
    """A short new directory, on /dev/shm when it is a roomy tmpfs (as the tests' own)."""
    return pgcluster.scratch_dir(prefix)


class Database:
    """A private, non-durable PostgreSQL cluster (``chatterd.pgembed``) on the server cores."""

    def __init__(self, cpus: set[int] | None) -> None:
        from chatterd.pgembed import EmbeddedPostgres

        self.base = scratch_dir("chb")
        self.pg = EmbeddedPostgres(self.base, durable=False)
        self.cpus = cpus
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.version = "?"

    def start(self, lifetime: float) -> None:
        running = self.pg.start()
        self.watchdog = procs.start_watchdog(running.pid, self.base, lifetime)
        procs.pin([running.pid, *procs.children(running.pid)], self.cpus)
        self.version = self.query("postgres", "SHOW server_version")[0][0]

    def create(self, name: str) -> str:
        """A new database owned by ``chatter``; its DSN."""
        return self.pg.ensure_database(name, "chatter")

    def query(self, dbname: str, sql: str) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(self.pg.dsn(dbname))
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def backends(self) -> list[int]:
        """Pids of the postmaster and its children (pin new backends with :func:`procs.pin`)."""
        state = self.pg.running()
        return [state.pid, *procs.children(state.pid)] if state else []

    def stop(self) -> None:
        try:
            self.pg.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            if self.watchdog is not None:
                self.watchdog.terminate()
                self.watchdog.wait(10)


class Emulator:
    """``python -m bench.emulator`` on the load cores, plain and TLS ports."""

    def __init__(self, work: Path, certs: Path, cpus: set[int] | None, lifetime: float) -> None:
        self.child = procs.Child(
            "emulator",
            [sys.executable, "-m", "bench.emulator", "--port", "0", "--tls-port", "0", "--print-port",
             "--cert", str(certs / "chatterd.crt"), "--key", str(certs / "chatterd.key"),
             "--max-seconds", str(int(lifetime))],
            work / "emulator.log", cpus=cpus, env=procs.python_env(str(BENCH_ROOT)),
        )
        text = self.child.wait_for("\n", 30)
        self.port, self.tls_port = (int(p) for p in text.split("\n")[0].split())
        self.pid = self.child.pid
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.child.stop()


def bench_limits(src: Path) -> list[str]:
    """
    Options that lift the limits a bench would measure instead of the
    server: ``--max-streams`` ((d) steps past its default of 1000), and the
    per-client limits for a chatterd that has them (the whole load comes
    from 127.0.0.1).
    """
    lifted = ["--max-streams", "100000"]
    tap = Path(src) / "chatterd" / "tap.py"
    if tap.exists() and "max-client-streams" in tap.read_text():
        lifted += ["--max-client-streams", "0", "--max-client-connections", "0"]
    return lifted


def workers_in(args: tuple[str, ...] | list[str]) -> int:
    """
    The worker processes that chatterd's options ask for (``--workers N``).
    """
    args = list(args)
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--workers=") else args[i + 1] if arg == "--workers" else None
        if value is not None:
            return (os.cpu_count() or 1) if value == "auto" else int(value)
    return 1


class Chatterd:
    """
    chatterd under ``twistd --nodaemon`` with a plain and a TLS listener on
    127.0.0.1, on the server cores, optionally profiled.
    """

    def __init__(self, env: Env, dsn: str, name: str = "chatterd", wait_for_schema: bool = False,
                 variant: Variant | None = None) -> None:
        self.variant = variant = variant or env.variant
        self.port, self.ssl_port = procs.free_port(), procs.free_port()
        self.log = env.work / f"{name}-{env.next_id()}.log"
        self.profile_out: Path | None = None
        twistd = ["--nodaemon", "--pidfile="]
        if env.profile == "cprofile":
            self.profile_out = env.work / f"{name}.{env.next_id()}.pstats"
            twistd += [f"--profile={self.profile_out}", "--profiler=cprofile", "--savestats"]
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *twistd, "chatterd",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--listen", f"ssl:{self.ssl_port}:interface=127.0.0.1",
                "--certs", str(env.certs), "--database", dsn, "--ollama", env.emulator.url,
                *bench_limits(variant.src), *variant.args]
        self.workers = workers_in(variant.args)
        # one process stays on the server cores; worker processes may use
        # every core (on 2 cores they share the load's, which a 15 ms cadence
        # leaves mostly free)
        cpus = env.server_cpus if self.workers == 1 else None
        self.child = procs.Child(name, argv, self.log, cpus=cpus,
                                 env=procs.python_env(str(variant.src)), cwd=str(env.work))
        self.pid = self.child.pid
        self.child.wait_for("listening on ssl", 60)
        deadline = time.monotonic() + 60
        while self.workers > 1 and len(re.findall(r"generation 1\) serving", self.child.wait_for("", 60))) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: its {self.workers} workers did not all start")
            time.sleep(0.05)
        if wait_for_schema:
            self.child.wait_for("database schema ready", 60)
        self.spy: procs.Child | None = None
        if env.profile == "py-spy":
            self.spy_out = env.work / f"{name}.{env.next_id()}.pyspy.txt"
            self.spy = procs.Child(
                "py-spy", [env.py_spy, "record", "--pid", str(self.pid), "--rate", "1000", "--nonblocking",
                           "--format", "raw", "--output", str(self.spy_out)],
                env.work / "py-spy.log", cpus=env.load_cpus)
            time.sleep(1.0)

    def stop(self) -> int | None:
        if self.spy is not None:
            self.spy.proc.send_signal(signal.SIGINT)
            try:
                self.spy.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            self.spy.stop()
        return self.child.stop(timeout=30)

    def problems(self) -> list[str]:
        """Error lines and tracebacks from chatterd's log."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if re.search(r"#(error|critical|failure)\]|Traceback|Unhandled", line):
                found.append(line[:300])
        return found


@dataclass(frozen=True)
class Variant:
    """
    One chatterd to measure: a source tree and extra options.  Several
    variants in one run are measured round by round, side by side.
    """

    label: str
    src: Path
    args: tuple[str, ...] = ()


class Env:
    """Everything a scenario needs; use as a context manager."""

    def __init__(self, src: Path, *, pin: bool = True, profile: str | None = None, lifetime: float = 1800,
                 keep: bool = False, variants: list[Variant] | None = None) -> None:
        self.src = src
        self.variants = variants or [Variant("chatterd", src)]
        self.variant = self.variants[0]
        self.chatterds: dict[str, Chatterd] = {}
        self.keep = keep or profile is not None
        self.profile = profile
        self.lifetime = lifetime
        self.server_cpus, self.load_cpus = procs.split_cores() if pin else (None, None)
        self.work = scratch_dir("chbw")
        self.certs = self.work / "certs"
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self._ids = 0
        self.db: Database | None = None
        self.emulator: Emulator = None  # type: ignore[assignment]
        self.chatterd: Chatterd = None  # type: ignore[assignment]
        self.dsn = ""
        self.problems: list[str] = []
        self.frames_relayed = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def __enter__(self) -> Env:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        from chatterd import tls

        procs.raise_nofile()
        tls.ensure_certificate(self.certs)
        # Profiled, the database runs on the load side: its work must not show up as chatterd's
        # (a backend woken on chatterd's CPU preempts it inside psycopg2's execute).
        self.db = Database(self.load_cpus if self.profile else self.server_cpus)
        self.db.start(self.lifetime)
        self.dsn = self.db.create("bench")
        self.emulator = Emulator(self.work, self.certs, self.load_cpus, self.lifetime)
        for variant in self.variants:
            self.chatterds[variant.label] = Chatterd(self, self.dsn, variant=variant)
        self.use(self.variants[0])

    def use(self, variant: Variant) -> None:
        """Measure ``variant`` from now on (its chatterd runs already)."""
        self.variant = variant
        self.src = variant.src
        self.chatterd = self.chatterds[variant.label]

    def restart_chatterd(self) -> None:
        """A fresh chatterd process (for memory figures that start from a clean heap)."""
        self.stop_chatterd(self.chatterd)
        self.chatterd = self.chatterds[self.variant.label] = Chatterd(self, self.dsn)

    def stop_chatterd(self, chatterd: Chatterd) -> None:
        self.problems += chatterd.problems()
        chatterd.stop()

    def close(self) -> None:
        for part in (*self.chatterds.values(), self.emulator):
            if part is None:
                continue
            try:
                if isinstance(part, Chatterd):
                    self.stop_chatterd(part)
                else:
                    part.stop()
            except Exception as e:  # keep cleaning up
                print(f"bench: stopping {type(part).__name__}: {e}", file=sys.stderr)
        if self.db is not None:
            self.db.stop()
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # --- running load ---

    def load(self, spec: Spec, *, direct: bool, chatterd: Chatterd | None = None) -> dict[str, Any]:
        """Run the load generator once on the load cores and return its result."""
        server = chatterd or self.chatterd
        spec.server_pids = [self.emulator.pid] if direct else [server.pid, *procs.children(server.pid)]
        spec.load_pids = [] if direct else [self.emulator.pid]
        limit = spec.timeout_s + spec.ramp_s + 60
        out = procs.run_json(
            [sys.executable, "-m", "bench.loadgen"], json.dumps(asdict(spec)).encode(),
            cpus=self.load_cpus, timeout=limit, env=procs.python_env(str(BENCH_ROOT), str(self.src)),
        )
        result = json.loads(out)
        if not direct:
            self.frames_relayed += result["frames"]
        load_cpu = result["load_cpu_s"] + (result["server_cpu_s"] if direct else 0.0)
        result["load_busy"] = load_cpu / max(result["measured_s"], 1e-9)
        return result
