"""The README's first command: `python -m devnet` runs the whole system on local defaults."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect

from devnet.process import free_port
from tests.support.processes import descendants, kill_all, running, wait_ended
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def ignore_sigint() -> None:
    """What a shell without job control does to a command started with `&`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def start_demo(
    tmp_path: Path,
    ws_port: int,
    env: dict[str, str] | None = None,
    *,
    in_background: bool = False,
) -> asyncio.subprocess.Process:
    """`python -m devnet` with its output in tmp_path/demo.log; `in_background`: started as
    `python -m devnet &` in a script is, with SIGINT ignored."""
    with (tmp_path / "demo.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "devnet", "--ws-port", str(ws_port), "--block-interval", "0.3"],
            cwd=tmp_path,  # no stray .env from the checkout
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=ignore_sigint if in_background else None,
        )


@pytest.mark.timeout(180)
async def test_demo_streams_chain_events_to_a_websocket_client_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """The demo indexes the simulated chain, serves its events over WebSocket; Ctrl-C stops it."""
    ws_port = free_port()
    demo = await start_demo(tmp_path, ws_port)
    try:
        # Each address announced answers when it is printed: health, readiness and metrics of
        # both services, and the WebSocket.
        addresses = await announced(tmp_path / "demo.log")
        assert f"ws://127.0.0.1:{ws_port}/ws" in addresses
        paths = sorted(a.rsplit("/", 1)[1] for a in addresses if a.startswith("http"))
        assert paths == ["healthz", "healthz", "metrics", "metrics", "ready"]
        async with aiohttp.ClientSession() as http:
            for address in addresses:
                if address.startswith("http"):
                    async with http.get(address) as answer:
                        assert answer.status in (200, 503), address  # /ready: 503 until caught up
                        if address.endswith("/metrics"):
                            assert "# TYPE" in await answer.text()
        received: list[dict[str, object]] = []
        async with connect(f"ws://127.0.0.1:{ws_port}/ws") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            subscribe = {"type": "subscribe", "channel": "events:*", "since": 0}
            await ws.send(orjson.dumps(subscribe).decode())
            async with asyncio.timeout(60):
                while not any(m["data"]["type"] == "BetPlaced" for m in received):  # type: ignore[index]
                    message = orjson.loads(await ws.recv())
                    if message["type"] == "event":
                        received.append(message)
        created = [m["data"] for m in received if m["data"]["type"] == "MarketCreated"]  # type: ignore[index]
        assert created, "the replay from seq 0 starts with the markets the demo created"
        assert all(d["data"]["question"] for d in created)  # type: ignore[index]
    finally:
        code = await stopped(demo, signal.SIGINT, within=30)
    output = (tmp_path / "demo.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert not await port_open(ws_port), "the broadcaster stopped with the demo"


ANNOUNCED = "services answering:"


async def announced(log: Path) -> list[str]:
    """The addresses the demo prints once its services answer."""
    await eventually(lambda: _said(log, ANNOUNCED), within=120, what="the demo's services")
    text = _text(log)
    return re.findall(r"(?:http|ws)://127\.0\.0\.1:\d+/\w+", text[text.index(ANNOUNCED) :])


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _said(log: Path, line: str) -> bool:
    return line in _text(log)


async def stopped(demo: asyncio.subprocess.Process, sig: signal.Signals, *, within: float) -> int:
    """Send `sig` to the demo and return its exit code; killed if it has not ended `within`."""
    demo.send_signal(sig)
    try:
        async with asyncio.timeout(within):
            return await demo.wait()
    except TimeoutError:
        demo.kill()
        await demo.wait()
        raise


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def start_whole_demo(
    tmp_path: Path, services_tmpdir: Path, *, in_background: bool = False
) -> tuple[asyncio.subprocess.Process, dict[int, str]]:
    """The demo with every process up; returns it and the processes it started."""
    ws_port = free_port()
    demo = await start_demo(
        tmp_path, ws_port, {"TMPDIR": str(services_tmpdir)}, in_background=in_background
    )
    try:
        # The broadcaster is started last: everything is up once it listens.
        await eventually(lambda: port_open(ws_port), within=120, what="the demo's WebSocket")
    except BaseException:
        demo.kill()
        await demo.wait()
        raise
    children = descendants(demo.pid)
    commands = " ".join(running(children).values())
    for name in ("postgres", "redis-server", "anvil", "-m indexer", "-m broadcaster"):
        assert name in commands, commands
    # Postgres, Redis, anvil, and the services' working directory (no .env there).
    assert len(entries(services_tmpdir)) == 4
    return demo, children


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_stops_the_demo_and_everything_it_started(
    tmp_path: Path, services_tmpdir: Path, sig: signal.Signals
) -> None:
    """SIGTERM (`kill`, a supervisor) or SIGHUP (its terminal closed) stops the demo as Ctrl-C
    does: the indexer, the broadcaster and the local services end with it, and the services'
    temp dirs are removed."""
    demo, children = await start_whole_demo(tmp_path, services_tmpdir)
    try:
        code = await stopped(demo, sig, within=60)
        output = (tmp_path / "demo.log").read_text(errors="replace")
        assert code == 0, output[-3000:]
        # A moment for a grandchild to follow its parent (anvil's binary, under npm's wrapper).
        assert await wait_ended(children, within=5) == {}
        assert entries(services_tmpdir) == []
    finally:
        kill_all(children)


@pytest.mark.timeout(180)
async def test_sigint_stops_a_demo_started_in_the_background_of_a_script(
    tmp_path: Path, services_tmpdir: Path
) -> None:
    """`python -m devnet &` in a script starts it with SIGINT ignored; `kill -INT` (PM2's
    stop signal) still stops it and everything it started, as Ctrl-C does in a terminal."""
    demo, children = await start_whole_demo(tmp_path, services_tmpdir, in_background=True)
    try:
        code = await stopped(demo, signal.SIGINT, within=60)
        output = (tmp_path / "demo.log").read_text(errors="replace")
        assert code == 0, output[-3000:]
        assert await wait_ended(children, within=5) == {}
        assert entries(services_tmpdir) == []
    finally:
        kill_all(children)


@pytest.mark.timeout(180)
async def test_a_killed_demo_takes_its_processes_with_it(
    tmp_path: Path, services_tmpdir: Path
) -> None:
    """SIGKILL leaves the demo no chance to clean up (its temp dirs stay), but every process
    it started gets a parent-death signal and stops."""
    demo, children = await start_whole_demo(tmp_path, services_tmpdir)
    try:
        demo.kill()
        await demo.wait()
        # The indexer and the broadcaster stop cleanly on that SIGTERM: seconds, not 10.
        assert await wait_ended(children, within=10) == {}
    finally:
        kill_all(children)


@pytest.mark.timeout(180)
async def test_the_demo_runs_its_services_on_its_own_settings_not_a_checkout_env(
    tmp_path: Path,
) -> None:
    """A .env where the demo is started (the checkout's, made for a server) is not read by
    its services: a setting there (another WS_PATH) would move them off what the demo
    announces, and a typo there would stop them."""
    (tmp_path / ".env").write_text("WS_PATH=/elsewhere\nCONFIRMATION=2\n")
    ws_port = free_port()
    demo = await start_demo(tmp_path, ws_port)
    try:
        await eventually(lambda: port_open(ws_port), within=120, what="the demo's WebSocket port")
        async with connect(f"ws://127.0.0.1:{ws_port}/ws") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
    finally:
        code = await stopped(demo, signal.SIGINT, within=30)
    output = (tmp_path / "demo.log").read_text(errors="replace")
    assert code == 0, output[-3000:]


@pytest.mark.timeout(180)
async def test_the_demo_stops_when_one_of_its_services_ends(tmp_path: Path) -> None:
    """A service that ends (here the indexer, refusing a setting of the environment) stops
    the demo with its name and exit code, exit 1, rather than leave it generating blocks
    for a system that no longer runs."""
    ws_port = free_port()
    demo = await start_demo(tmp_path, ws_port, {"CONFIRMATIONS": "-1"})
    try:
        async with asyncio.timeout(120):
            code = await demo.wait()
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    output = (tmp_path / "demo.log").read_text(errors="replace")
    assert code == 1, output[-3000:]
    assert "devnet: the indexer exited with code 2" in output, output[-3000:]
