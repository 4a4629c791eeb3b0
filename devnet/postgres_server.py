"""A throwaway Postgres cluster on loopback, and PgBouncer in front of one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from devnet.process import (
    Process,
    Service,
    ServiceError,
    chown_tree,
    identity,
    port_open,
    run_as,
    wait_until,
)

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bin_dir() -> Path:
    """Locate the Postgres server binaries (POSTGRES_BIN overrides the search)."""
    override = os.environ.get("POSTGRES_BIN")
    candidates = [Path(override)] if override else sorted(Path("/").glob(POSTGRES_BIN_GLOB[1:]))
    for candidate in reversed(candidates):
        if (candidate / "postgres").exists():
            return candidate
    raise ServiceError(
        "Postgres binaries not found under /usr/lib/postgresql/*/bin; install the "
        "postgresql package or set POSTGRES_BIN"
    )


class Postgres(Service):
    """A throwaway Postgres cluster, run as an unprivileged user when we are root."""

    name = "postgres"
    user = "kektech"

    def __init__(self, *, port: int | None = None, durable: bool = False) -> None:
        super().__init__(port=port)
        self.durable = durable
        self._bin = postgres_bin_dir()
        self._run_as = run_as()

    def dsn(self, database: str = "kektech") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.dsn()

    def start(self) -> None:
        data = self.workdir / "data"
        if not data.exists():
            self._initdb(data)
        argv = [
            str(self._bin / "postgres"),
            "-D",
            str(data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.workdir}",
            "-c",
            "max_connections=200",
        ]
        if not self.durable:
            # Tests never survive a machine crash; skipping fsync keeps each test fast.
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self._process = Process(self.name, argv, self.workdir / "postgres.log", user=self._run_as)
        self._process.spawn()
        wait_until("postgres", self._accepts, self._process)
        self.create_database("kektech")

    def _initdb(self, data: Path) -> None:
        chown_tree(self.workdir, self._run_as)
        uid, gid, groups = identity(self._run_as)
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            user=uid,
            group=gid,
            extra_groups=groups,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stderr.decode(errors='replace')}")

    def _accepts(self) -> bool:
        result = subprocess.run(
            [str(self._bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return result.returncode == 0

    def _psql(self, sql: str) -> None:
        result = subprocess.run(
            [
                str(self._bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                sql,
            ],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"psql failed: {result.stderr.decode(errors='replace').strip()}")

    def create_database(self, name: str) -> str:
        """Create a database if it does not exist and return its DSN."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unsafe database name: {name!r}")
        try:
            self._psql(f'CREATE DATABASE "{name}"')
        except ServiceError as exc:
            if "already exists" not in str(exc):
                raise
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its sessions."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unsafe database name: {name!r}")
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self._process is not None:
            # SIGINT is Postgres's "fast" shutdown: roll back sessions, checkpoint, exit.
            self._process.terminate(signal.SIGINT)


class PgBouncer(Service):
    """PgBouncer in transaction mode in front of a Postgres: what Supabase's pooler does."""

    name = "pgbouncer"

    def __init__(self, upstream: Postgres, *, port: int | None = None) -> None:
        super().__init__(port=port)
        self.upstream = upstream
        self._run_as = run_as()

    def dsn(self, database: str = "kektech") -> str:
        return f"postgresql://{self.upstream.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise ServiceError("pgbouncer not found; install the Debian package pgbouncer")
        (self.workdir / "users.txt").write_text(f'"{self.upstream.user}" ""\n')
        (self.workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.workdir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 500\n"
            "default_pool_size = 20\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        chown_tree(self.workdir, self._run_as)
        argv = [binary, str(self.workdir / "pgbouncer.ini")]
        self._process = Process(self.name, argv, self.workdir / "pgbouncer.log", user=self._run_as)
        self._process.spawn()
        wait_until("pgbouncer", lambda: port_open(self.port), self._process)
