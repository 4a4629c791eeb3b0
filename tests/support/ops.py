"""Helpers for tests of `kektech doctor` and `kektech check`: the CLI as a real subprocess, a
PM2 daemon under a temporary PM2_HOME, and a TLS server with a throwaway openssl certificate."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from devnet.anvil_node import Anvil
from devnet.chain import Deployment
from devnet.process import REPO_ROOT, free_port
from devnet.redis_server import Redis
from tests.support.indexer_process import indexer_env

PM2_BIN = REPO_ROOT / "node_modules" / ".bin" / "pm2"
COMMAND_TIMEOUT = 60.0
PM2_TIMEOUT = 30.0


@dataclass(frozen=True)
class Result:
    """How one `kektech` run ended."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    @property
    def checks(self) -> list[str]:
        """The check (or condition) each line is about: the field after the verdict."""
        return [line.split(None, 1)[1].split("  ")[0] for line in self.lines]

    def line(self, check: str) -> str:
        """The single output line of a check."""
        found = [line for line, name in zip(self.lines, self.checks, strict=True) if name == check]
        assert len(found) == 1, f"no single line for {check!r}:\n{self}"
        return found[0]

    def __str__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def base_env() -> dict[str, str]:
    """What the CLI needs from the test's own environment: PATH (node, nginx) and HOME."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}


async def run_kektech(*args: str, env: Mapping[str, str], cwd: Path) -> Result:
    """Run `python -m ops ARGS` (the `kektech` console script) in cwd, where there is no .env."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops",
        *args,
        cwd=cwd,
        env={**base_env(), "LOG_FORMAT": "json", **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


class Pm2:
    """The project's PM2 (from npm) with a PM2_HOME of its own; `kill()` stops the daemon."""

    def __init__(self) -> None:
        # Short path: PM2's Unix sockets live in PM2_HOME and paths are limited to 108 bytes.
        self.home = Path(tempfile.mkdtemp(prefix="kt-pm2-", dir="/tmp"))

    @property
    def env(self) -> dict[str, str]:
        return {"PM2_HOME": str(self.home), "OPS_PM2_BIN": str(PM2_BIN)}

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(PM2_BIN),
            *args,
            env={**base_env(), "PM2_HOME": str(self.home)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(PM2_TIMEOUT):
            out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"pm2 {' '.join(args)} failed:\n{text}"
        return text

    async def start(self, name: str, script: Path, *options: str) -> None:
        """Start a Python script as a PM2 app (PM2 restarts it whenever it exits)."""
        await self.run(
            "start", str(script), "--name", name, "--interpreter", sys.executable, *options
        )

    async def processes(self) -> list[dict[str, Any]]:
        text = await self.run("jlist")
        found = orjson.loads(text[text.index("[") :])
        assert isinstance(found, list)
        return found

    async def restarts(self, name: str) -> int:
        """restart_time of the app's first instance."""
        for process in await self.processes():
            if process["name"] == name:
                return int(process["pm2_env"]["restart_time"])
        raise AssertionError(f"{name} is not in pm2's list")

    async def kill(self) -> None:
        if (self.home / "pm2.pid").exists():
            await self.run("kill")
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.asynccontextmanager
async def pm2_daemon() -> AsyncIterator[Pm2]:
    """A PM2 daemon of the test's own, killed with its apps at the end."""
    pm2 = Pm2()
    try:
        yield pm2
    finally:
        await pm2.kill()


def write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def make_certificate(directory: Path, *, days: int) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for `days` days."""
    cert, key = directory / f"cert-{days}d.pem", directory / f"key-{days}d.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.asynccontextmanager
async def tls_server(cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 serving cert; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def other_http_server() -> AsyncIterator[int]:
    """Another program on a service's port: it answers every request with HTTP 200 and the
    body "ok"; yields its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def dead_port() -> int:
    """A loopback port where nothing listens."""
    return free_port()


def waiting_indexer_env(
    anvil: Anvil, deployment: Deployment, redis: Redis, **settings: str
) -> dict[str, str]:
    """The environment of an indexer whose database nobody listens on: it answers on its
    health port and waits for the database at start-up."""
    return indexer_env(
        database_url=f"postgresql://kektech@127.0.0.1:{dead_port()}/kektech",
        redis_url=redis.url,
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key="kektech:events",
        **settings,
    )
