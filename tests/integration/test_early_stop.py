"""A stop signal that lands while a service is still starting (its imports take most of a
second) stops it cleanly: no KeyboardInterrupt traceback in PM2's logs, no lost stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devnet.process import REPO_ROOT, free_port

STOP_WITHIN = 10.0


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never answers (a database that hangs); yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def start(database_port: int, *args: str) -> subprocess.Popen[bytes]:
    """A service whose database hangs and whose other dependencies are down: it keeps
    starting and never finishes, so the signal is what ends it."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"postgresql://kektech@127.0.0.1:{database_port}/kektech",
        "RPC_PROVIDER_URL": f"http://127.0.0.1:{free_port()}",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "INDEXER_HTTP_PORT": str(free_port()),
        "WS_PORT": str(free_port()),
        "BROADCASTER_HTTP_PORT": str(free_port()),
        "LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for sig (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def loop_started(pid: int) -> bool:
    """Whether the service has reached its event loop: run_until_signalled imports uvloop
    only then, so its extension module is mapped from that moment on."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize(
    ("args", "code"),
    [(("indexer", "run"), 0), (("broadcaster",), 0), (("indexer", "status"), 130)],
    ids=["indexer", "broadcaster", "indexer-status"],
)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_starting_stops_it_cleanly(
    args: tuple[str, ...], code: int, sig: signal.Signals
) -> None:
    """The signal is sent as soon as the process catches SIGTERM, which it does only once
    stop_signals.hold() has run (Python itself catches SIGINT, not SIGTERM): past the
    service's first step and within the imports that follow, which the test checks."""
    with silent_server() as database_port:
        process = start(database_port, *args)
        deadline = time.monotonic() + STOP_WITHIN
        while not catches(process.pid, signal.SIGTERM):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "it never caught SIGTERM"
            time.sleep(0.001)
        assert not catches(process.pid, signal.SIGUSR1)  # a sanity check of the mask reading
        # Without hold() the first handler for SIGTERM is the loop's: the signal would then
        # not land in the imports, and the test would not test what it says.
        assert not loop_started(process.pid), "SIGTERM was first caught by the event loop"
        process.send_signal(sig)
        try:
            output, _ = process.communicate(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise AssertionError(f"running {STOP_WITHIN} s after {sig.name}:\n{output!r}") from None
    text = output.decode(errors="replace")
    assert "Traceback" not in text, text
    expected = code if code == 0 else 128 + sig
    assert process.returncode == expected, text
