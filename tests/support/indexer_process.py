"""Run `python -m indexer` as a real subprocess for end-to-end tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from devnet.chain import Deployment
from devnet.process import REPO_ROOT, die_with_parent, free_port
from shared.config_types import url_host

STOP_TIMEOUT = 15.0


def indexer_env(
    *,
    database_url: str,
    redis_url: str,
    rpc_url: str,
    deployment: Deployment,
    stream_key: str,
    **extra: str,
) -> dict[str, str]:
    """The environment of an indexer pointed at local services and a test deployment."""
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "RPC_PROVIDER_URL": rpc_url,
        "REDIS_STREAM_KEY": stream_key,
        "POLL_INTERVAL": "0.1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "INDEXER_HTTP_PORT": str(free_port()),
        "RPC_TIMEOUT": "5",
        "LEASE_TTL": "5",
        **deployment.as_env(),
    }
    env.update(extra)
    return env


class IndexerProcess:
    """One indexer subprocess with its own log file; restartable with the same environment."""

    def __init__(self, env: Mapping[str, str], *args: str, log_dir: Path | None = None) -> None:
        self.env = dict(env)
        self.args = args or ("run",)
        # Tests pass their tmp_path (pytest removes old ones); a benchmark gets a temp dir.
        directory = log_dir or Path(tempfile.mkdtemp(prefix="kektech-indexer-"))
        handle, name = tempfile.mkstemp(prefix="indexer-", suffix=".log", dir=directory)
        os.close(handle)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None
        # The highest VmHWM (peak resident set, KiB) seen by wait_exit; 0 before it runs.
        self.peak_rss_kib = 0

    @property
    def http_url(self) -> str:
        host = url_host(self.env.get("INDEXER_HTTP_HOST", "127.0.0.1"))
        return f"http://{host}:{self.env['INDEXER_HTTP_PORT']}"

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "indexer", *self.args],
                cwd=REPO_ROOT,
                env={**base, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A killed test run or benchmark leaves no indexer behind.
                preexec_fn=die_with_parent,
            )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Send `sig` (PM2 stops with SIGINT) and return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"indexer ignored {sig.name} for {STOP_TIMEOUT}s:\n{self.log_text()[-4000:]}"
            ) from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_exit(self, within: float) -> int:
        """Wait for the process to exit by itself and return its code."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.proc.poll() is None:
            if loop.time() > deadline:
                raise TimeoutError(f"indexer still running after {within}s:\n{self.log_text()}")
            self._note_peak_rss()
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def _note_peak_rss(self) -> None:
        assert self.proc is not None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return  # it has just exited
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))

    async def get(self, path: str) -> tuple[int, dict[str, object]]:
        """GET one of the indexer's HTTP endpoints."""
        async with aiohttp.ClientSession() as session, session.get(self.http_url + path) as resp:
            body = await resp.json(content_type=None) if path != "/metrics" else {}
            return resp.status, body

    async def metric(self, name: str) -> float | None:
        """The value of one unlabelled series on /metrics, None if it is not there."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.http_url + "/metrics") as resp,
        ):
            text = await resp.text()
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == name:
                return float(value)
        return None

    async def wait_ready(self, within: float = 30.0) -> dict[str, object]:
        """Wait until /ready answers 200 (leader and caught up with the chain)."""
        return await self._wait_for("/ready", lambda status, _: status == 200, within, "ready")

    async def wait_waiting_for(self, what: str = "", within: float = 30.0) -> str:
        """Wait until start-up says (on /healthz, answering 200) that it waits for something
        naming `what`; return that reason."""

        def waits(status: int, body: dict[str, object]) -> bool:
            reason = body.get("waiting_for")
            return status == 200 and isinstance(reason, str) and what in reason

        body = await self._wait_for("/healthz", waits, within, f"start-up waiting for {what!r}")
        return str(body["waiting_for"])

    async def wait_cursor(self, block: int, within: float = 60.0) -> dict[str, object]:
        """Wait until the indexer has stored every block up to `block`."""

        def reached(_: int, body: dict[str, object]) -> bool:
            cursor = body.get("cursor")
            return isinstance(cursor, int) and cursor >= block

        return await self._wait_for("/healthz", reached, within, f"cursor at {block}")

    async def _wait_for(
        self,
        path: str,
        done: Callable[[int, dict[str, object]], bool],
        within: float,
        what: str,
    ) -> dict[str, object]:
        """Poll `path` until `done(status, body)`; fail at once if the indexer exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if not self.running:
                raise RuntimeError(f"indexer exited:\n{self.log_text()[-4000:]}")
            try:
                status, body = await self.get(path)
                if done(status, body):
                    return body
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"no {what} after {within}s:\n{self.log_text()[-4000:]}")
            await asyncio.sleep(0.05)
