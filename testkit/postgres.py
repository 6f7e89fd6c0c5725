"""A throwaway PostgreSQL server for tests: ``initdb`` in a temp folder, loopback only, no fsync.

What this owns: one server process per ``PostgresServer``, its data folder and its log. Nothing
here knows about edgeproxy; tests get DSNs and use them as any client would (databases are
created with psycopg, raw checks go through ``psql``).

    with running_postgres() as server:
        dsn = server.create_database()      # a fresh, empty database
        server.restart()                    # e.g. to test that clients recover
    # leaving the block stops the server (pass or fail) and deletes its folder

For pytest, import the fixtures into the test module: ``postgres_server`` (one server per
session and importing module, skipped when the binaries are missing), ``postgres_database``
(a fresh database per test, with raw ``psql`` access) and ``postgres_dsn`` (just its DSN).

The server listens on 127.0.0.1 at a ``free_port()``, its unix socket inside the temp folder
(never in /var/run, so it cannot meet a system cluster), with ``trust`` authentication:
passwords in DSNs are accepted and ignored, which lets tests check that a password is never
logged without needing one to work. ``fsync``/``synchronous_commit`` are off: a crash loses
the database, which is exactly what a test database is for.

``initdb`` and ``postgres`` refuse to run as root. Under root the binaries run as the
``postgres`` system user (``runuser``) and the temp folder is handed to that user; the folder is
made with ``tempfile.mkdtemp`` in the system temp dir rather than pytest's ``tmp_path``, whose
parents are root-only (0700) and so unreachable for ``postgres``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from testkit.ports import free_port

__all__ = [
    "PG_BIN",
    "PostgresDatabase",
    "PostgresServer",
    "PostgresStartError",
    "postgres_available",
    "postgres_database",
    "postgres_dsn",
    "postgres_server",
    "running_postgres",
]

#: Debian's server binaries; ``EDGEPROXY_TEST_PG_BIN`` points elsewhere (another version/distro).
PG_BIN = Path(os.environ.get("EDGEPROXY_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: Bound on start and stop (real seconds); a safety net, not a timing assertion.
PG_CTL_TIMEOUT = 30
_SYSTEM_USER = "postgres"
_SUPERUSER = "postgres"

_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_connections": "off",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "timezone": "'UTC'",
}


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message carries the command's output and the log."""


def postgres_available() -> bool:
    return (PG_BIN / "initdb").is_file() and (PG_BIN / "pg_ctl").is_file()


def _as_server_user() -> list[str]:
    """Prefix that runs a command as the ``postgres`` user when we are root, else nothing."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresStartError("running as root but `runuser` is missing (util-linux)")
    return [runuser, "-u", _SYSTEM_USER, "--"]


class PostgresServer:
    """One PostgreSQL server in ``workdir``; ``start``/``stop``/``restart`` keep the same port."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.socket_dir = workdir / "sock"
        self.log_path = workdir / "server.log"
        self.host = "127.0.0.1"
        self.port = port
        self.user = _SUPERUSER

    # -- addresses ----------------------------------------------------------------------------

    def dsn_for(self, dbname: str, **extra: str) -> str:
        """libpq key/value DSN over TCP to ``dbname``; ``extra`` adds parameters verbatim."""
        params = {"host": self.host, "port": str(self.port), "user": self.user, "dbname": dbname}
        params.update(extra)
        return " ".join(f"{key}={value}" for key, value in params.items())

    @property
    def dsn(self) -> str:
        """The maintenance database ``postgres`` (where databases are created and dropped)."""
        return self.dsn_for("postgres")

    # -- lifecycle ----------------------------------------------------------------------------

    def initdb(self) -> None:
        self._run(
            PG_BIN / "initdb",
            "-D", str(self.data_dir),
            "-U", _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        lines = [f"{key} = {value}" for key, value in _SETTINGS.items()]
        lines += [f"port = {self.port}", f"unix_socket_directories = '{self.socket_dir}'"]
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as out:
            out.write("\n# testkit/postgres.py\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            PG_BIN / "pg_ctl",
            "-D", str(self.data_dir),
            "-l", str(self.log_path),
            "-w", "-t", str(PG_CTL_TIMEOUT),
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; ``fast`` disconnects clients, ``immediate`` is a crash.

        Never raises for a server that is already down. If ``pg_ctl`` cannot stop it, the
        postmaster is SIGKILLed (its children exit when they notice it is gone).
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            self._run(
                PG_BIN / "pg_ctl",
                "-D", str(self.data_dir),
                "-m", mode,
                "-w", "-t", str(PG_CTL_TIMEOUT),
                "stop",
            )  # fmt: skip
        except PostgresStartError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, from ``postmaster.pid``; None when it is down."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- databases ----------------------------------------------------------------------------

    def psql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (no Python driver involved); returns unaligned output."""
        return self._run(
            PG_BIN / "psql",
            "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1",
            "-d", self.dsn_for(dbname),
            "-c", sql,
            as_server_user=False,  # a client like any other: it connects over TCP
        )  # fmt: skip

    def admin(self, sql: str) -> None:
        """Run ``sql`` on the maintenance database in-process (cheaper than a ``psql``)."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a random name by default) and return its DSN."""
        name = name or f"t_{secrets.token_hex(6)}"
        # FILE_COPY: with fsync off it is several times faster than the default WAL_LOG.
        self.admin(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting any client still on it."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, *cmd: str | Path, as_server_user: bool = True) -> str:
        argv = [*(_as_server_user() if as_server_user else []), *map(str, cmd)]
        try:
            done = subprocess.run(
                argv,
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=PG_CTL_TIMEOUT + 10,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresStartError(f"{argv[-1]!r} timed out: {exc}\n{self.logs()}") from exc
        if done.returncode != 0:
            raise PostgresStartError(
                f"{' '.join(argv)} exited {done.returncode}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}\nserver log:\n{self.logs()}"
            )
        return done.stdout


def _make_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-pg-"))
    (workdir / "sock").mkdir(mode=0o700)
    if os.geteuid() == 0:
        user = pwd.getpwnam(_SYSTEM_USER)
        for path in (workdir, workdir / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
    return workdir


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server; on exit it is stopped (pass or fail) and its folder removed."""
    if not postgres_available():
        raise PostgresStartError(f"PostgreSQL server binaries not found in {PG_BIN}")
    workdir = _make_workdir()
    server = PostgresServer(workdir, free_port())
    try:
        server.initdb()
        for attempt in range(3):
            try:
                server.start()
                break
            except PostgresStartError as exc:
                # The port was free when chosen but another process may have taken it since.
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
                server.port = free_port()
                _set_port(server)
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _set_port(server: PostgresServer) -> None:
    conf = server.data_dir / "postgresql.auto.conf"
    existing = conf.read_text() if conf.exists() else ""
    kept = [line for line in existing.splitlines() if not line.startswith("port =")]
    conf.write_text("\n".join([*kept, f"port = {server.port}"]) + "\n")
    if os.geteuid() == 0:
        user = pwd.getpwnam(_SYSTEM_USER)
        os.chown(conf, user.pw_uid, user.pw_gid)


# -- pytest fixtures (import them into a test module to use them) ------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the whole session (per importing module); stopped at the end."""
    if not postgres_available():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (apt install postgresql)")
    with running_postgres() as server:
        yield server


@dataclass(frozen=True)
class PostgresDatabase:
    """One database on a test server: its DSN, and raw SQL through ``psql`` for checks."""

    server: PostgresServer
    name: str

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.name)

    def sql(self, query: str) -> str:
        """Unaligned ``psql`` output (``|`` between columns), bypassing every Python driver."""
        return self.server.psql(query, dbname=self.name).strip()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database for one test; dropped afterwards (its clients disconnected)."""
    if not postgres_server.is_running():
        postgres_server.start()  # an earlier test stopped it and failed before restarting it
    name = f"t_{secrets.token_hex(6)}"
    postgres_server.create_database(name)
    yield PostgresDatabase(postgres_server, name)
    if postgres_server.is_running():
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_dsn(postgres_database: PostgresDatabase) -> str:
    """The DSN of a fresh database for one test."""
    return postgres_database.dsn
