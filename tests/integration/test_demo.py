"""The README's first command: `python -m devnet` runs the whole system on local defaults."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from devnet.services import free_port
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


@pytest.mark.timeout(180)
async def test_demo_streams_chain_events_to_a_websocket_client_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    """The demo indexes the simulated chain, serves its events over WebSocket; Ctrl-C stops it."""
    ws_port = free_port()
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "devnet", "--ws-port", str(ws_port), "--block-interval", "0.3"],
            cwd=tmp_path,  # no stray .env from the checkout
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        await eventually(lambda: port_open(ws_port), within=120, what="the demo's WebSocket port")
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
        demo.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                code = await demo.wait()
        except TimeoutError:
            demo.kill()
            await demo.wait()
            raise
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert not await port_open(ws_port), "the broadcaster stopped with the demo"
