"""Throwaway local services on loopback: Postgres, Redis and anvil.

Used by the pytest fixtures, the demo (`python -m devnet`) and the benchmarks. Each service
runs as a child process on a free 127.0.0.1 port with its files in a temporary directory that
is removed on stop. Children get a parent-death signal so a killed test run leaves nothing
behind, and every service stops cleanly on Ctrl-C through the context managers (on SIGTERM
and SIGHUP too in a program that calls `interrupt_on_stop_signals`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL_BYTES = 4000
# Deterministic genesis time for the dev chain (2025-11-06T00:00:00Z, the mainnet deploy day).
ANVIL_GENESIS_TIMESTAMP = 1762387200
ANVIL_CHAIN_ID = 32323
PR_SET_PDEATHSIG = 1
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
FIRST_PORT = 10_000  # free_port() picks at random from here to the ephemeral range
PORT_ATTEMPTS = 50
_PORT_PICKER = random.SystemRandom()  # not seeded alike in parallel test processes


class ServiceError(RuntimeError):
    """A local service failed to start or stop."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    Taken below the kernel's ephemeral range: a port from bind(0) lies inside it, and until
    the service binds it the kernel may give it to any outgoing connection as its source
    port (a client connecting to Redis, say), so that the bind fails with EADDRINUSE.
    """
    below = ephemeral_low()
    for port in _PORT_PICKER.sample(range(FIRST_PORT, below), PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ServiceError(f"no free port below {below} in {PORT_ATTEMPTS} attempts")


def ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections."""
    try:
        return int(Path(EPHEMERAL_RANGE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this child when the process that started it dies.

    A `preexec_fn` for Popen (Linux). The signal comes when the *thread* that spawned the child
    ends: spawn from the main thread (or the event loop's), not from a worker thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def interrupt_on_stop_signals() -> None:
    """Make SIGTERM and SIGHUP do what Ctrl-C does: raise KeyboardInterrupt.

    Their default action ends the process on the spot, running no `finally` block and no
    context manager's exit: the services' temp dirs were left behind, and so were children
    without a parent-death signal (a demo's broadcaster was seen running long after). For the
    main() of the demo and the benchmarks, which clean up on Ctrl-C already.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _run_as() -> str | None:
    """Return the user to drop to when running as root (Postgres refuses root)."""
    return UNPRIVILEGED_USER if os.geteuid() == 0 else None


def _identity(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen's user, group and extra_groups to run a child as `user` (None: as we are).

    Popen's `user` alone changes only the uid: the child kept root's group 0 (and root's
    supplementary groups), so it could still read and write what group root may.
    """
    if user is None:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


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


def _which(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name} not found on PATH; {hint}")
    return found


def anvil_binary() -> str:
    """Return the anvil installed by npm in the repo (or one on PATH)."""
    local = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return str(local)
    return _which("anvil", "run `scripts/install.sh` (npm package @foundry-rs/anvil)")


@dataclass
class _Process:
    """One child process with its log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    user: str | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def spawn(self) -> None:
        uid, gid, groups = _identity(self.user)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=uid,
                group=gid,
                extra_groups=groups,
                env=self.env,
                # Own process group: a Ctrl-C in the terminal reaches only the parent, which then
                # stops the children in order instead of racing them.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-LOG_TAIL_BYTES:].decode("utf-8", "replace")

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail()}"
            )

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self.popen
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        proc = self.popen
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_until(
    what: str, ready: object, process: _Process, timeout: float = START_TIMEOUT
) -> None:
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise ServiceError(f"{what} did not become ready in {timeout:.0f}s:\n{process.log_tail()}")


class _Service:
    """Common lifecycle: a temp directory, one process, context-manager stop."""

    name = "service"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"kektech-{self.name}-"))
        self._process: _Process | None = None

    def __enter__(self) -> Self:
        # __exit__ runs only once __enter__ returned: a failed start (a port taken, a timeout)
        # must stop what it spawned and remove the temp dir itself.
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        proc = self._process.popen if self._process else None
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._process.popen if self._process else None
        return proc.pid if proc is not None else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the process but keep its files (it can be started again on the same port)."""
        if self._process is not None:
            self._process.terminate()

    def close(self) -> None:
        """Stop the process and remove its files."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Redis(_Service):
    """A redis-server with append-only persistence, so a restart keeps the data."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = _which("redis-server", "install the Debian package redis-server")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self._process = _Process(self.name, argv, self.workdir / "redis.log")
        self._process.spawn()
        _wait_until("redis", self._pong, self._process)

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self._process is not None:
            self._process.kill()


class Anvil(_Service):
    """A local chain with chain id 32323 that mines only when asked (`evm_mine`)."""

    name = "anvil"

    def __init__(
        self,
        *,
        port: int | None = None,
        automine: bool = False,
        block_time: float | None = None,
        timestamp: int = ANVIL_GENESIS_TIMESTAMP,
    ) -> None:
        super().__init__(port=port)
        self.automine = automine
        self.block_time = block_time
        self.timestamp = timestamp

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            anvil_binary(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(ANVIL_CHAIN_ID),
            "--timestamp",
            str(self.timestamp),
            "--order",
            "fifo",
            "--gas-limit",
            "1000000000",
            "--silent",
        ]
        if self.block_time is not None:
            argv += ["--block-time", str(self.block_time)]
        elif not self.automine:
            argv.append("--no-mining")
        # anvil keeps block states past its in-memory limit under $HOME/.foundry/anvil/tmp and
        # does not remove them when stopped: with HOME in the workdir, close() removes them.
        env = {**os.environ, "HOME": str(self.workdir)}
        self._process = _Process(self.name, argv, self.workdir / "anvil.log", env=env)
        self._process.spawn()
        _wait_until("anvil", self._answers, self._process)
        if self.block_time is None:
            # Each block one second after the previous, whatever the wall clock does: the same
            # transactions then give the same blocks, hashes included.
            self._rpc("anvil_setBlockTimestampInterval", [1])

    def _rpc(self, method: str, params: list[object]) -> object:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(  # noqa: S310 - loopback URL we built ourselves
            self.rpc_url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            reply = orjson.loads(response.read())
        if "error" in reply:
            raise ServiceError(f"anvil {method} failed: {reply['error']}")
        return reply.get("result")

    def _answers(self) -> bool:
        return int(str(self._rpc("eth_chainId", [])), 16) == ANVIL_CHAIN_ID


class Postgres(_Service):
    """A throwaway Postgres cluster, run as an unprivileged user when we are root."""

    name = "postgres"
    user = "kektech"

    def __init__(self, *, port: int | None = None, durable: bool = False) -> None:
        super().__init__(port=port)
        self.durable = durable
        self._bin = postgres_bin_dir()
        self._run_as = _run_as()

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
        self._process = _Process(self.name, argv, self.workdir / "postgres.log", user=self._run_as)
        self._process.spawn()
        _wait_until("postgres", self._accepts, self._process)
        self.create_database("kektech")

    def _initdb(self, data: Path) -> None:
        _chown_tree(self.workdir, self._run_as)
        uid, gid, groups = _identity(self._run_as)
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


class PgBouncer(_Service):
    """PgBouncer in transaction mode in front of a Postgres: what Supabase's pooler does."""

    name = "pgbouncer"

    def __init__(self, upstream: Postgres, *, port: int | None = None) -> None:
        super().__init__(port=port)
        self.upstream = upstream
        self._run_as = _run_as()

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
        _chown_tree(self.workdir, self._run_as)
        argv = [binary, str(self.workdir / "pgbouncer.ini")]
        self._process = _Process(self.name, argv, self.workdir / "pgbouncer.log", user=self._run_as)
        self._process.spawn()
        _wait_until("pgbouncer", lambda: _port_open(self.port), self._process)


@dataclass
class LocalServices:
    """Postgres, Redis and anvil started together and stopped together."""

    postgres: Postgres
    redis: Redis
    anvil: Anvil

    def close(self) -> None:
        for service in (self.anvil, self.redis, self.postgres):
            service.close()


@contextlib.contextmanager
def local_services(*, anvil_block_time: float | None = None) -> Iterator[LocalServices]:
    """Start Postgres, Redis and anvil; stop them all on exit, Ctrl-C included."""
    started: list[_Service] = []
    try:
        postgres = Postgres()
        started.append(postgres)
        postgres.start()
        redis = Redis()
        started.append(redis)
        redis.start()
        anvil = Anvil(block_time=anvil_block_time)
        started.append(anvil)
        anvil.start()
        yield LocalServices(postgres=postgres, redis=redis, anvil=anvil)
    finally:
        for service in reversed(started):
            service.close()
