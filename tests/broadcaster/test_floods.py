"""Floods of frames: a flooder is cut off a few dozen frames in and nothing it sends is
parsed after that, so the other clients are served meanwhile and a stop is honoured. Under
uvloop (the broadcaster as a process of its own, as PM2 runs it) one turn of the event loop
reads up to 32 times 256 KiB from a socket: parsed whole, that was 8-12 s without a turn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from broadcaster.connection import CLOSE_TIMEOUT, READ_SLICE
from devnet.redis_server import Redis
from tests.broadcaster.support import (
    WITHIN,
    EventProducer,
    RawClient,
    Running,
    broadcaster_process,
    client_frame,
    ws_client,
)
from tests.support.pm2 import BROADCASTER, kill_timeouts

Start = Callable[..., AbstractAsyncContextManager[Running]]

FLOOD_WRITE = 120_000  # bytes per write: 20,000 empty frames
FRAMES = {
    "pong": client_frame(0xA, b""),
    "text": client_frame(0x1, b'{"type":"ping"}'),
}


@contextlib.asynccontextmanager
async def flooding(port: int, frame: bytes, *, reconnect: bool = True) -> AsyncIterator[None]:
    """A client flooding `frame` (see flood) for the block, which starts once its first
    write went out."""
    started = asyncio.Event()
    task = asyncio.create_task(
        flood(port, frame, started=started, reconnect=reconnect), name="flooder"
    )
    try:
        async with asyncio.timeout(WITHIN):
            await started.wait()
        yield
    finally:
        await cancel_and_wait(task)


async def flood(port: int, frame: bytes, *, started: asyncio.Event, reconnect: bool) -> None:
    """Send `frame` over and over, as fast as the server takes it, answering its pings as a
    client's WebSocket stack does and ignoring its close frame, until the connection breaks;
    then open another (`reconnect`). Runs until cancelled, or the server refuses."""
    chunk = frame * (FLOOD_WRITE // len(frame))
    while True:
        try:
            client = await RawClient.open(port)
        except OSError:  # the server stopped listening
            return
        answering = asyncio.create_task(answer_pings(client), name="flooder-answers")
        try:
            while True:
                client.writer.write(chunk)
                await client.writer.drain()
                started.set()
        except ConnectionError:  # aborted by the server
            pass
        finally:
            await cancel_and_wait(answering)
            client.close()
        if not reconnect:
            return


async def answer_pings(client: RawClient) -> None:
    """Read until the server ends the connection, answering pings."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            opcode, payload = await client.read_frame()
            if opcode == 0x9:
                client.send_frame(0xA, payload)


async def keep_sending(client: RawClient, frame: bytes) -> None:
    """Write `frame` over and over until the server aborts the connection."""
    with contextlib.suppress(ConnectionError):
        while True:
            client.writer.write(frame * 1000)
            await client.writer.drain()


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_client_closed_for_flooding_is_not_read_any_more(start: Start) -> None:
    """A close for abuse (here 1008 for a flood of messages) fails the connection (RFC 6455
    7.1.7): the close frame is followed at once by the end of the stream, what the client
    sends after it is discarded unparsed, and the socket is aborted CLOSE_TIMEOUT later
    however much the client keeps sending. A closing handshake instead parsed every frame
    while looking for the client's close frame, until that timeout, which a loop stalled
    by the parsing could not fire in time."""
    async with start(ws_rate_limit=5, ws_max_subscriptions=5) as server:
        flooder = await RawClient.open(server.settings.ws_port)
        sending = asyncio.create_task(keep_sending(flooder, FRAMES["text"]), name="flooder")
        try:
            code, reason, _ = await flooder.until_close()
            async with asyncio.timeout(WITHIN):
                after_close = await flooder.reader.read()  # raises if reset, not ended
            async with asyncio.timeout(CLOSE_TIMEOUT + WITHIN):
                await sending
        finally:
            await cancel_and_wait(sending)
            flooder.close()
    assert (code, reason) == (1008, "message rate limit exceeded")
    assert after_close == b""


async def test_a_flood_after_the_servers_own_close_frame_is_cut_off(start: Start) -> None:
    """While the server waits for the client's answer to a close it started (here 1012 at a
    stop), the frames before that answer are charged like any other: a client that floods
    instead of answering is cut off (the end of the stream, nothing more parsed) rather than
    read and answered until the stop gives up on it."""
    async with start(ws_rate_limit=5, ws_max_subscriptions=5) as server:
        flooder = await RawClient.open(server.settings.ws_port)
        try:
            await flooder.read_frame()  # connected
            server.task.cancel()  # a stop: every client gets 1012
            code, _, _ = await flooder.until_close()
            pings = client_frame(0x9, b"")
            sending = asyncio.create_task(keep_sending(flooder, pings), name="flooder")
            try:
                async with asyncio.timeout(WITHIN):
                    await flooder.reader.read()  # pongs for what was parsed, then the end
            finally:
                await cancel_and_wait(sending)
        finally:
            flooder.close()
    assert code == 1012


async def test_a_read_is_parsed_only_until_a_flood_in_it_is_stopped(start: Start) -> None:
    """One read may hold tens of thousands of frames (uvloop reads up to 256 KiB at once).
    It is parsed a slice at a time, and each slice's frames are charged before the next is
    parsed, so a flood in it is stopped a slice in: of 10,000 pings in one read, only the
    first slice's are answered, where parsing the read whole answered them all before the
    limits saw the first. The read is made by calling the server's protocol object as the
    loop would."""
    ping = client_frame(0x9, b"")
    async with start(ws_rate_limit=5, ws_max_subscriptions=5) as server:
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            client.server_side().data_received(ping * 10_000)
            pongs = 0
            async with asyncio.timeout(WITHIN):
                while (frame := await client.read_frame())[0] == 0xA:
                    pongs += 1
        finally:
            client.close()
    assert frame[0] == 0x8  # the close frame
    assert 0 < pongs <= READ_SLICE // len(ping)


@pytest.mark.parametrize("kind", FRAMES)
async def test_other_clients_are_served_while_a_client_floods(
    redis_server: Redis,
    stream_key: str,
    producer: EventProducer,
    tmp_path: Path,
    kind: str,
) -> None:
    """Under uvloop, while a client keeps flooding (reconnecting whenever it is cut off), a
    subscribed client gets every event published meanwhile, in order, and is not closed by
    a heartbeat that a stalled server would miss (a pong that waits 2 s to be read)."""
    async with (
        broadcaster_process(
            redis_server,
            stream_key,
            tmp_path,
            WS_HEARTBEAT_INTERVAL="0.5",
            WS_HEARTBEAT_TIMEOUT="2",
        ) as server,
        ws_client(server.url) as reader,
    ):
        await reader.subscribe("events:*")
        received: list[int] = []
        async with flooding(server.port, FRAMES[kind]):
            for _ in range(20):
                await producer.publish()
                received += [event["seq"] for event in await reader.events(1)]
                await asyncio.sleep(0.05)
    assert received == list(range(1, 21))


async def test_a_stop_during_a_flood_closes_clients_with_1012_in_time(
    redis_server: Redis, stream_key: str, tmp_path: Path
) -> None:
    """SIGINT while a client floods pong frames: the reading clients get 1012 and the
    process exits 0 well within PM2's kill timeout, as without the flood
    (test_graceful_stop). Parsing the flood left the loop no turn to handle the signal: the
    process was still running 40 s after it."""
    kill_timeout = kill_timeouts()[BROADCASTER]
    async with (
        broadcaster_process(redis_server, stream_key, tmp_path) as server,
        ws_client(server.url) as reader,
    ):
        await reader.subscribe("events:*")
        async with flooding(server.port, FRAMES["pong"], reconnect=False):
            stopped_at = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            code, _ = await reader.closed(within=kill_timeout)
            async with asyncio.timeout(kill_timeout):
                await server.proc.wait()
            elapsed = time.monotonic() - stopped_at
    output = server.log_path.read_text()
    assert server.proc.returncode == 0, output
    assert code == 1012
    assert elapsed < kill_timeout / 2, f"{elapsed:.1f} s"
