"""Child processes of the local services: free ports, spawning, readiness and the lifecycle.

Each service runs as a child process on a free 127.0.0.1 port with its files in a temporary
directory that is removed on stop. Children get a parent-death signal so a killed test run
leaves nothing behind (on SIGTERM and SIGHUP too in a program that calls
`interrupt_on_stop_signals`).
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

REPO_ROOT = Path(__file__).resolve().parent.parent
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL_BYTES = 4000
PR_SET_PDEATHSIG = 1
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
FIRST_PORT = 10_000  # free_port() picks at random from here to the ephemeral range
PORT_ATTEMPTS = 50
_PORT_PICKER = random.SystemRandom()  # not seeded alike in parallel test processes
# The ports this process handed out lately, not handed out again: two picked before either
# is bound (a broadcaster's two ports, an edge's four) could otherwise be the same one.
HANDED_OUT_KEPT = 4096
_HANDED_OUT: dict[int, None] = {}  # in the order handed out


class ServiceError(RuntimeError):
    """A local service failed to start or stop."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now, and that this process has not
    handed out among its last HANDED_OUT_KEPT.

    Taken below the kernel's ephemeral range: a port from bind(0) lies inside it, and until
    the service binds it the kernel may give it to any outgoing connection as its source
    port (a client connecting to Redis, say), so that the bind fails with EADDRINUSE.
    """
    below = ephemeral_low()
    for port in _PORT_PICKER.sample(range(FIRST_PORT, below), PORT_ATTEMPTS):
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _remember(port)
        return port
    raise ServiceError(f"no free port below {below} in {PORT_ATTEMPTS} attempts")


def _remember(port: int) -> None:
    _HANDED_OUT[port] = None
    if len(_HANDED_OUT) > HANDED_OUT_KEPT:
        del _HANDED_OUT[next(iter(_HANDED_OUT))]


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
    """Make SIGTERM and SIGHUP do what Ctrl-C does: raise KeyboardInterrupt; and SIGINT too
    when it came in ignored.

    The default action of SIGTERM and SIGHUP ends the process on the spot, running no
    `finally` block and no context manager's exit: the services' temp dirs were left behind,
    and so were children without a parent-death signal (a demo's broadcaster was seen running
    long after). SIGINT is ignored in a command a script starts with `&` (a shell without job
    control does so), and Python then leaves it ignored: `kill -INT`, PM2's stop signal, did
    nothing. For the main() of the demo and the benchmarks, which clean up on Ctrl-C already.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_as() -> str | None:
    """Return the user to drop to when running as root (Postgres refuses root)."""
    return UNPRIVILEGED_USER if os.geteuid() == 0 else None


def identity(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen's user, group and extra_groups to run a child as `user` (None: as we are).

    Popen's `user` alone changes only the uid: the child kept root's group 0 (and root's
    supplementary groups), so it could still read and write what group root may.
    """
    if user is None:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


def chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def which(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name} not found on PATH; {hint}")
    return found


@dataclass
class Process:
    """One child process with its log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    user: str | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def spawn(self) -> None:
        uid, gid, groups = identity(self.user)
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


def wait_until(what: str, ready: object, process: Process, timeout: float = START_TIMEOUT) -> None:
    assert callable(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise ServiceError(f"{what} did not become ready in {timeout:.0f}s:\n{process.log_tail()}")


class Service:
    """Common lifecycle: a temp directory, one process, context-manager stop."""

    name = "service"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"kektech-{self.name}-"))
        self._process: Process | None = None

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
