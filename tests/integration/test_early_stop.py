"""A stop signal that lands while a service is still starting (interpreter, imports,
settings) stops it cleanly: no KeyboardInterrupt traceback in PM2's logs, no lost stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from devnet.services import REPO_ROOT, free_port

STOP_WITHIN = 10.0


def start(*args: str) -> subprocess.Popen[bytes]:
    """A service pointed at ports where nothing listens: it keeps starting, never fails."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"postgresql://kektech@127.0.0.1:{free_port()}/kektech",
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


@pytest.mark.parametrize(
    ("args", "code"),
    [(("indexer", "run"), 0), (("broadcaster",), 0), (("indexer", "status"), 130)],
    ids=["indexer", "broadcaster", "indexer-status"],
)
@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_a_stop_signal_while_starting_stops_it_cleanly(
    args: tuple[str, ...], code: int, delay: float
) -> None:
    process = start(*args)
    time.sleep(delay)  # lands in the imports (about a second here) or just after
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"still running {STOP_WITHIN} s after SIGINT:\n{output!r}") from None
    text = output.decode(errors="replace")
    assert "Traceback" not in text, text
    assert process.returncode == code, text
