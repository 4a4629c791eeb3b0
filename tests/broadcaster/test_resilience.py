"""Failures: Redis restarts and half-open sockets, slow and silent clients, gaps, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.server import ServerProtocol

from broadcaster import stream
from broadcaster.connection import CLOSE_TIMEOUT, Connection
from broadcaster.heartbeat import Heartbeat
from broadcaster.inbox import Inbox
from broadcaster.metrics import Metrics
from broadcaster.server import serve_clients
from broadcaster.service import HEALTH_FRESH_FOR, build_hub
from broadcaster.session import Session
from devnet.redis_server import Redis
from tests.broadcaster.support import (
    WITHIN,
    EventProducer,
    RawClient,
    Running,
    WsClient,
    broadcaster_process,
    client_frame,
    envelope,
    settings_for,
    ws_client,
)
from tests.support.pm2 import BROADCASTER, kill_timeouts
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

Start = Callable[..., AbstractAsyncContextManager[Running]]


async def test_redis_restart_mid_stream(
    start: Start, own_producer: EventProducer, own_redis: Redis
) -> None:
    """Clients stay connected across a Redis restart and get every event once, in order."""
    producer = own_producer
    async with (
        start(redis_url=own_redis.url) as server,
        ws_client(server.url) as a,
        ws_client(server.url) as b,
    ):
        await a.subscribe("events:*")
        await b.subscribe("events:*")
        await producer.publish(count=5)
        own_redis.stop()
        await server.wait_health(redis="down")
        own_redis.start()
        await producer.publish(count=5)  # the producer's client reconnects by itself
        for client in (a, b):
            assert [e["seq"] for e in await client.events(10, within=10)] == list(range(1, 11))
        await server.wait_health(redis="up", seq=10)
        assert await server.metric("kektech_broadcaster_redis_reconnects_total") >= 1


async def test_resumes_right_after_a_redis_restart_are_answered(
    start: Start, own_producer: EventProducer, own_redis: Redis
) -> None:
    """Resumes read from the stream on pooled connections, which a Redis restart closes: the
    first command on each is tried again on a new connection, so resumes after the restart
    replay their history (recovered) rather than being told to reload."""
    producer = own_producer

    async def resume(server: Running) -> bool:
        async with ws_client(server.url) as client:
            ack = await client.subscribe("events:*", since=10)
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(11, producer.seq + 1))
            recovered = ack["recovered"]
            assert isinstance(recovered, bool)
            return recovered

    async with start(redis_url=own_redis.url, ws_history_size=5) as server:
        await producer.publish(count=50)
        await server.wait_health(seq=50)
        # Several pooled connections opened (resumes older than the history read Redis).
        assert await asyncio.gather(*(resume(server) for _ in range(8))) == [True] * 8
        own_redis.stop()
        await server.wait_health(redis="down")
        own_redis.start()
        await producer.publish(count=5)
        await server.wait_health(redis="up", seq=55, within=15)
        assert await asyncio.gather(*(resume(server) for _ in range(8))) == [True] * 8
        assert [await resume(server) for _ in range(3)] == [True] * 3


async def test_the_first_health_check_after_a_redis_restart_says_up(
    start: Start, own_redis: Redis
) -> None:
    """/healthz's own Redis connection, idle across a Redis restart, is closed by the server
    without redis-py noticing: its first command is tried again on a new connection, so the
    first check once Redis is back says up rather than down."""
    async with start(redis_url=own_redis.url) as server:
        await server.wait_health(redis="up")  # the monitor connection is open
        own_redis.stop()
        own_redis.start()

        async def reader_back() -> bool:
            return (
                await server.metric("kektech_broadcaster_redis_reconnects_total") >= 1
                and await server.metric("kektech_broadcaster_redis_up") == 1
            )

        await eventually(reader_back, within=WITHIN, what="the stream reader reconnected")
        # Past the reuse of the last reading, so that this check reads Redis.
        await asyncio.sleep(HEALTH_FRESH_FOR)
        assert (await server.health())["redis"] == "up"


@contextlib.asynccontextmanager
async def through_proxy(start: Start, redis: Redis) -> AsyncIterator[tuple[TcpProxy, Running]]:
    """A broadcaster whose Redis connections go through a TcpProxy (to freeze them), with
    BROADCASTER_REDIS_TIMEOUT=1 s so that it notices soon."""
    async with (
        TcpProxy(redis.port) as proxy,
        start(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0", broadcaster_redis_timeout=1.0
        ) as server,
    ):
        yield proxy, server


async def test_half_open_redis_socket_is_detected(
    start: Start, producer: EventProducer, redis_server: Redis
) -> None:
    """When the Redis connection goes silent without closing, the reader times out, reconnects
    and catches up: nothing is lost."""
    async with (
        through_proxy(start, redis_server) as (proxy, server),
        ws_client(server.url) as client,
    ):
        await client.subscribe("events:*")
        await producer.publish(count=2)
        assert [e["seq"] for e in await client.events(2)] == [1, 2]
        proxy.freeze()
        await producer.publish(count=3)
        events = await client.events(3, within=10)
        assert [e["seq"] for e in events] == [3, 4, 5]


async def test_a_connection_closed_during_a_resume_leaves_no_subscription_behind(
    start: Start, producer: EventProducer, redis_server: Redis
) -> None:
    """A resume still waiting on Redis when its client closes does not put the subscription
    back: once the connection is gone, the subscription count is zero, not negative."""
    await producer.publish(count=10)
    async with through_proxy(start, redis_server) as (proxy, server):
        await server.wait_health(seq=10)
        # The resume below asks Redis for the stream's top (a since past the position) on a
        # connection of the resumes' own, opened for it: that one gets no answer, and the
        # resume waits for its timeout. (Freezing the connections open now instead, as this
        # test once did, froze only the reader's and /healthz's: the resume was answered at once.)
        proxy.freeze_new = True
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            client.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":15}')
            client.send_frame(0x8, b"\x03\xe8")
            await client.until_close()

            async def resume_gave_up() -> bool:
                # The resume's Redis command ended: cancelled with the connection's work, or
                # timed out were it not; redis-py then drops its connection, and the resume
                # has ended by the time the proxy sees that (nothing in between awaits).
                return proxy.closed_while_frozen >= 1

            await eventually(resume_gave_up, within=15, what="the resume's Redis query ended")
        finally:
            client.close()
        await server.wait_health(connections=0)
        assert await server.metric("kektech_broadcaster_subscriptions") == 0
        assert (await server.health())["subscriptions"] == 0


async def test_slow_consumer_is_cut_off_while_others_keep_receiving(
    start: Start, producer: EventProducer
) -> None:
    """A client that stops reading is closed with 4008 past its buffer limit; a reading
    client gets every event meanwhile, in order, the first ones while the stalled client is
    still connected (the fan-out does not wait for it). The reading clients' latency is a
    figure of the slow-500 benchmark (bench/broadcaster)."""
    async with start(ws_send_buffer_bytes=65536) as server:
        slow = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            await slow.read_frame()  # connected
            slow.send_frame(0x1, b'{"type":"subscribe","channel":"events:*"}')
            await slow.read_frame()  # subscribed; from now on it reads nothing
            async with ws_client(server.url) as fast:
                await fast.subscribe("events:*")
                received: list[int] = []
                slow_open_at_first = False

                async def receive() -> None:
                    nonlocal slow_open_at_first
                    for _ in range(300):
                        received.append((await fast.expect("event"))["seq"])
                        if len(received) == 1:
                            slow_open_at_first = (
                                await server.metric(
                                    "kektech_broadcaster_slow_consumer_closes_total"
                                )
                                == 0
                            )

                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(receive())
                    for _ in range(30):
                        await producer.publish(count=10, pad=8192)
                        await asyncio.sleep(0.005)
            code, reason, texts = await slow.until_close(within=10)
        finally:
            slow.close()
        slow_closes = await server.metric("kektech_broadcaster_slow_consumer_closes_total")
    assert code == 4008
    assert "since" in reason
    assert 0 < len(texts) < 300
    assert received == list(range(1, 301))
    assert slow_open_at_first
    assert slow_closes == 1


async def test_a_client_that_pings_without_reading_is_cut_off(start: Start) -> None:
    """Pongs pile up for a client that sends pings and reads nothing: past
    WS_SEND_BUFFER_BYTES it is closed as a slow consumer, as when events pile up. (Here the
    rate limit, which closes a ping flood by itself, is set out of reach.)"""
    async with start(ws_send_buffer_bytes=65536, ws_rate_limit=1e9) as server:
        flooder = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        slow_closes = 0.0
        try:
            for _ in range(100):  # up to 13 MB of pings, far beyond what kernel buffers hold
                for _ in range(1000):
                    flooder.send_frame(0x9, b"p" * 125)
                await flooder.writer.drain()
                slow_closes = await server.metric("kektech_broadcaster_slow_consumer_closes_total")
                if slow_closes:
                    break
        except ConnectionError:
            pass  # cut off and aborted while still sending
        finally:
            flooder.close()
        if not slow_closes:
            slow_closes = await server.metric("kektech_broadcaster_slow_consumer_closes_total")
        await server.wait_health(connections=0)
    assert slow_closes == 1


async def test_a_resume_holding_messages_back_does_not_fail_the_heartbeat(
    start: Start, producer: EventProducer
) -> None:
    """While a long resume runs, messages sent after it wait and reading stops past a few:
    the client's pong is then among what is not read yet, which must not close it (1011)."""
    for _ in range(4):
        await producer.publish(count=500, pad=3000)
    async with start(
        ws_heartbeat_interval=0.5, ws_heartbeat_timeout=1.0, ws_send_buffer_bytes=65536
    ) as server:
        client = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            await client.read_frame()  # connected
            client.send_frame(
                0x1, orjson.dumps({"type": "subscribe", "channel": "events:*", "since": 0})
            )
            for i in range(20):  # held behind the resume: reading pauses
                channel = f"market:0x{i:040x}"
                client.send_frame(0x1, orjson.dumps({"type": "subscribe", "channel": channel}))
            events = acks = 0
            async with asyncio.timeout(60):
                while events < producer.seq or acks < 21:
                    opcode, payload = await client.read_frame()
                    if opcode == 0x9:
                        client.send_frame(0xA, payload)  # answered at once
                    elif opcode == 0x8:
                        pytest.fail(f"closed: {payload[:2].hex()} {payload[2:]!r}")
                    elif opcode == 0x1:
                        kind = orjson.loads(payload)["type"]
                        events += kind == "event"
                        acks += kind == "subscribed"
                    await asyncio.sleep(0.0005)  # a slow but steady reader
        finally:
            client.close()
    assert (events, acks) == (producer.seq, 21)


async def test_a_client_reading_a_replay_steadily_is_not_failed_by_the_heartbeat(
    start: Start, producer: EventProducer
) -> None:
    """The server's ping waits behind what it queued before it, a replay of megabytes here:
    a client that reads steadily (~300 KB/s, every ping answered at once) but needs longer
    than WS_HEARTBEAT_TIMEOUT to reach the ping must not be failed (1011) for it, neither
    while the replay is written nor while the client reads down what it left. (Scaled down:
    pings every 0.5 s, 1 s to answer; with the defaults, 30 s and 20 s, a reader slower than
    ~75 KB/s was failed in a replay of a few MB.)"""
    await producer.publish(count=2000, pad=1000)  # 5.9 MB, more than the socket buffers hold
    async with start(ws_heartbeat_interval=0.5, ws_heartbeat_timeout=1.0) as server:
        await server.wait_health(seq=producer.seq)
        client = await RawClient.open(server.settings.ws_port, rcvbuf=16384)
        events = taken = pings = 0
        acked = False
        began = time.monotonic()
        try:
            await client.read_frame()  # connected
            client.send_frame(
                0x1, orjson.dumps({"type": "subscribe", "channel": "events:*", "since": 0})
            )
            async with asyncio.timeout(60):
                while True:
                    opcode, payload = await client.read_frame()
                    taken += len(payload)
                    if opcode == 0x9:
                        pings += 1
                        client.send_frame(0xA, payload)
                    elif opcode == 0x8:
                        pytest.fail(f"closed: {payload[:2].hex()} {payload[2:]!r}, {events} read")
                    elif opcode == 0x1:
                        message = orjson.loads(payload)
                        acked = acked or message["type"] == "subscribed"
                        events += message["type"] == "event"
                    if acked and pings:  # a ping after the ack too: the heartbeat goes on
                        break
                    ahead = taken / 300_000 - (time.monotonic() - began)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            client.close()
    assert events == producer.seq


async def test_a_client_reading_a_trickle_is_failed_by_the_heartbeat(
    start: Start, producer: EventProducer
) -> None:
    """Reading down a backlog earns more time for the ping's answer only at a useful pace:
    a client taking a few hundred bytes a second (slowloris) would otherwise hold its
    connection and buffers for as long as it likes."""
    async with start(ws_heartbeat_interval=0.5, ws_heartbeat_timeout=1.0) as server:
        # A small receive buffer, so that the trickle shows at each look as what the server
        # sends more (the window opens by ~1 KB), not in 64 KB steps as loopback's would.
        client = await RawClient.open(server.settings.ws_port, rcvbuf=1024)
        try:
            await client.read_frame()  # connected
            client.send_frame(0x1, orjson.dumps({"type": "subscribe", "channel": "events:*"}))
            await client.read_frame()  # subscribed
            await producer.publish(count=200, pad=3000)  # ~700 KB behind the next ping

            async def failed() -> bool:
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    await client.reader.read(600)  # ~2.4 KB/s
                await asyncio.sleep(0.25)
                closes = await server.metric('kektech_broadcaster_server_closes_total{code="1011"}')
                return closes == 1

            await eventually(failed, within=20, what="the trickling client failed (1011)")
        finally:
            client.close()


async def test_a_slow_redis_after_a_restart_is_read_again(
    start: Start, own_producer: EventProducer, own_redis: Redis
) -> None:
    """Redis answering every command well within BROADCASTER_REDIS_TIMEOUT (here 2 s, round
    trips of 0.36 s): after a restart, the reconnect, the look at the stream and the read
    each have that timeout, and relaying goes on. Under one timeout for all three (some six
    round trips), the read never began, at every attempt."""
    producer = own_producer
    async with TcpProxy(own_redis.port) as proxy:
        settings = {"redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
        async with (
            start(**settings, broadcaster_redis_timeout=2.0) as server,
            ws_client(server.url) as client,
        ):
            await client.subscribe("events:*")
            await producer.publish(count=2)
            assert [e["seq"] for e in await client.events(2)] == [1, 2]
            proxy.delay = 0.36
            own_redis.stop()
            await server.wait_health(redis="down")
            own_redis.start()
            await producer.publish(count=3)  # the producer's client reconnects by itself
            assert [e["seq"] for e in await client.events(3, within=30)] == [3, 4, 5]


async def test_health_says_degraded_while_the_stream_cannot_be_read(
    start: Start, own_producer: EventProducer, own_redis: Redis
) -> None:
    """A Redis too slow for BROADCASTER_REDIS_TIMEOUT's blocking read (round trips of 0.6 s,
    a 1 s timeout) still answers /healthz's own look at the stream: the status is degraded
    all the same, as nothing is relayed."""
    producer = own_producer
    await producer.publish()
    async with TcpProxy(own_redis.port) as proxy:
        settings = {"redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
        async with start(**settings, broadcaster_redis_timeout=1.0) as server:
            proxy.delay = 0.6
            # The stream is there ("up"): it is the reading that fails.
            await server.wait_health(status="degraded", redis="up", within=30)
            proxy.delay = 0.0
            await server.wait_health(status="ok", within=30)


async def test_unresponsive_client_is_closed_by_the_heartbeat(start: Start) -> None:
    """A client that never answers pings is closed (1011); a live one stays connected.
    (The live one shares this event loop: a stall as long as the timeout between its read
    of a ping and the server's read of its pong would close it too.)"""
    async with start(ws_heartbeat_interval=0.2, ws_heartbeat_timeout=1.0) as server:
        silent = await RawClient.open(server.settings.ws_port)
        try:
            async with ws_client(server.url) as alive:
                code, reason, _ = await silent.until_close(within=5)
                await alive.send({"type": "ping"})
                await alive.expect("pong")
        finally:
            silent.close()
    assert code == 1011
    assert "ping" in reason


async def test_a_handshake_left_unfinished_is_dropped(start: Start) -> None:
    """A socket that starts a handshake and never completes it (slowloris) is closed after
    WS_HANDSHAKE_TIMEOUT, while a real client connects meanwhile as usual."""
    async with start(ws_handshake_timeout=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.ws_port)
        try:
            writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websock")
            async with ws_client(server.url) as client:
                assert client.hello["type"] == "connected"
            assert not reader.at_eof()  # still given its time
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed, and nothing was answered
        finally:
            writer.close()


async def test_ended_connections_are_freed_without_the_cycle_collector(
    server: Running, producer: EventProducer
) -> None:
    """However a connection ends, its objects are freed by reference counting when it ends.

    Left in reference cycles, each would wait for the collector's full pass: with many clients
    that pass is rare (closed connections pile up in memory) and long (it stalls every client).
    """
    await producer.publish()
    server_side = (Connection, Inbox, Heartbeat, ServerProtocol, Session)
    gc.collect()
    gc.disable()
    try:
        async with ws_client(server.url) as client:  # closing handshake started by the client
            await client.subscribe("events:*", since=0)  # a resume ran as a task
        abrupt = await RawClient.open(server.settings.ws_port)
        abrupt.close()  # the socket ends without a close frame
        refused = await RawClient.open(server.settings.ws_port)
        refused.send_frame(0x2, b"binary")  # the server closes (1003)
        await refused.until_close()
        refused.close()
        await server.get("/healthz", base=server.public_http)  # an HTTP answer on the WS port
        await server.get("/nowhere", base=server.public_http)
        for request in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"):  # ended before the handshake
            _, writer = await asyncio.open_connection("127.0.0.1", server.settings.ws_port)
            writer.write(request)
            writer.close()
            await writer.wait_closed()
        upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        for refused_head in (
            b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade asked: 426
            b"GET /ws HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Sec-WebSocket-Key: bad\r\n\r\n",  # 400
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.ws_port)
            writer.write(refused_head)
            async with asyncio.timeout(WITHIN):
                assert (await reader.read()).startswith((b"HTTP/1.1 426", b"HTTP/1.1 400"))
            writer.close()
            await writer.wait_closed()
        await server.wait_health(connections=0)
        left: list[str] = []
        async with asyncio.timeout(WITHIN):
            while True:
                left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, server_side)]
                if not left:
                    break
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"still in memory after their connections ended: {sorted(left)}")
    finally:
        gc.enable()


async def test_a_resume_read_together_with_the_close_routes_nothing_to_the_closed_client(
    server: Running, producer: EventProducer
) -> None:
    """uvloop may hand a connection two reads in one poll, before any task runs (a client can
    arrange it: 256,000 bytes ending with a resume, then a close frame). The resume then
    runs after the close: it must not route the closed connection again, or the next event
    written to it (past its end of stream) raised in the fan-out and stopped the server.
    The two reads are made here by calling the server's protocol object as the loop would."""
    await producer.publish()
    raw = await RawClient.open(server.settings.ws_port)
    try:
        connection = raw.server_side()
        resume = {"type": "subscribe", "channel": "*", "since": 0}
        connection.data_received(client_frame(0x1, orjson.dumps(resume)))
        connection.data_received(client_frame(0x8, struct.pack("!H", 1000)))
        await asyncio.sleep(0.1)  # the resume's task runs
        async with ws_client(server.url) as other:
            await other.subscribe("events:*")
            await producer.publish()
            assert [e["seq"] for e in await other.events(1)] == [2]
        assert not server.task.done()
        await server.wait_health(subscriptions=0)
    finally:
        raw.close()


async def test_stream_gap_closes_subscribers_with_4009(
    server: Running, producer: EventProducer
) -> None:
    """Missing seqs (trimmed before they were read) close subscribers with 4009; their
    resume then reports recovered=false. Clients without subscriptions stay."""
    async with ws_client(server.url) as subscriber, ws_client(server.url) as idle:
        await subscriber.subscribe("events:*")
        await producer.publish(count=3)
        await subscriber.events(3)
        # The channels field left out: the broadcaster derives it from the envelope.
        await producer.publish_raw({"seq": 10, "event": envelope(10).to_json_bytes()}, seq=10)
        assert (await subscriber.closed())[0] == 4009
        await idle.send({"type": "ping"})
        await idle.expect("pong")
    async with ws_client(server.url) as again:
        ack = await again.subscribe("events:*", since=3)
        assert ack["recovered"] is False
        assert [e["seq"] for e in ack["replayedEvents"]] == [10]
    assert await server.metric("kektech_broadcaster_stream_gap_entries_total") == 6


async def test_recreated_stream_is_followed_again(
    server: Running,
    producer: EventProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the stream is deleted and restarts at seq 1, and stays short of the entry relayed
    last for REFILL_GRACE (here 1 s), subscribers get 4009 and the new stream is relayed."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 1.0)
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish(count=5)
        await client.events(5)
        await producer.recreate()
        await producer.publish(count=2)
        assert (await client.closed(within=10))[0] == 4009
    await server.wait_health(seq=2)
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [3]


async def test_a_stream_recreated_past_the_position_while_redis_was_away_is_noticed(
    start: Start, producer: EventProducer, redis_server: Redis
) -> None:
    """The stream is deleted and refilled past the relayed position while the broadcaster's
    path to Redis is dead: once back, it sees that the entry it relayed last is another one
    now, closes subscribers with 4009 (reload) and follows the new stream from its top,
    instead of relaying the new stream's later events as if they followed the old ones."""
    async with (
        through_proxy(start, redis_server) as (proxy, server),
        ws_client(server.url) as client,
    ):
        await relaying(client, producer)
        proxy.freeze()
        await producer.recreate()
        await producer.publish("MarketCreated", count=8)
        assert (await client.closed(within=10))[0] == 4009
        await server.wait_health(seq=8)
        async with ws_client(server.url) as resumed:
            # Its seq 5 was the old stream's: nothing after it can be replayed as continuing.
            ack = await resumed.subscribe("events:*", since=5)
            assert (ack["recovered"], ack["replayed"]) == (False, 0)
        async with ws_client(server.url) as fresh:
            await fresh.subscribe("events:*")
            await producer.publish()
            assert [e["seq"] for e in await fresh.events(1)] == [9]


async def relaying(client: WsClient, producer: EventProducer) -> None:
    """Subscribe the client to every event, and see it get the stream's first five."""
    await client.subscribe("events:*")
    await producer.publish(count=5)
    assert [e["seq"] for e in await client.events(5)] == [1, 2, 3, 4, 5]


async def relays_only_the_next(client: WsClient, producer: EventProducer) -> None:
    """Publish one event and see the client get it, and nothing else (no entry twice)."""
    await producer.publish()
    assert [e["seq"] for e in await client.events(1)] == [producer.seq]
    await client.nothing()


async def relays_what_follows_with_no_gap(server: Running, producer: EventProducer) -> None:
    """A new subscriber gets the next event only, and no gap was counted on the way."""
    async with ws_client(server.url) as later:
        await later.subscribe("events:*")
        await relays_only_the_next(later, producer)
    assert await server.metric("kektech_broadcaster_stream_gap_entries_total") == 0


async def closed_for_reload_without_events(client: WsClient, within: float) -> None:
    """See the client closed with 4009 (reload) without having got any event."""
    received, (code, _) = await client.messages_until_closed(within=within)
    assert code == 4009
    assert [m["data"]["seq"] for m in received if m["type"] == "event"] == []


async def test_a_stream_lost_and_written_again_as_it_was_is_followed_without_a_reset(
    server: Running, producer: EventProducer
) -> None:
    """Redis back without the stream (restarted without persistence): while the key is
    missing, nothing is concluded; when the indexer writes the same entries again from its
    outbox, the stream is the same one, so clients stay connected, get nothing twice, and get
    what follows."""
    async with ws_client(server.url) as client:
        await relaying(client, producer)
        kept = await producer.lose()
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        await producer.rewrite(kept)  # the publisher's refill from the outbox
        await relays_only_the_next(client, producer)


async def test_a_stream_trimmed_empty_after_everything_was_relayed_is_no_new_stream(
    server: Running, producer: EventProducer
) -> None:
    """XTRIM MAXLEN 0 (an operator freeing memory, Redis out of it) empties the stream but
    keeps its last id, the entry relayed last: nothing is missed, so clients stay connected
    and resume recovered, rather than all being told to reload."""
    async with ws_client(server.url) as client:
        await relaying(client, producer)
        await producer.redis.xtrim(producer.key, maxlen=0, approximate=False)
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as resumed:
            ack = await resumed.subscribe("events:*", since=5)
            assert ack["recovered"] is True
        await relays_only_the_next(client, producer)
    assert await server.metric("kektech_broadcaster_stream_gap_entries_total") == 0


async def test_a_refill_awaited_shows_in_health_and_metrics(
    server: Running, producer: EventProducer
) -> None:
    """While the stream lacks entries already relayed (Redis lost it, the indexer has not
    written them again), /healthz says so with the stream's real top and a degraded status,
    and a gauge is 1; both clear once the refill reaches the entry relayed last."""
    async with ws_client(server.url) as client:
        await relaying(client, producer)
        kept = await producer.lose()
        body = await server.wait_health(status="degraded", within=10)
        assert (body["redis"], body["streamSeq"], body["seq"]) == ("up", 0, 5)
        assert body["refillAwaited"] is True
        assert await server.metric("kektech_broadcaster_stream_refill_awaited") == 1
        await producer.rewrite(kept)
        body = await server.wait_health(status="ok", within=10)
        assert (body["streamSeq"], body["refillAwaited"]) == (5, False)
        assert await server.metric("kektech_broadcaster_stream_refill_awaited") == 0
        await relays_only_the_next(client, producer)


async def test_a_short_stream_that_keeps_growing_is_taken_as_new_after_the_limit(
    server: Running,
    producer: EventProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream recreated from seq 1 that keeps growing (re-indexed from scratch) restarts the
    refill grace at each growth, but is taken as a new one after REFILL_LIMIT (here 3 s),
    not only once it outgrows the old position: until then nothing would be relayed."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 2.0)
    monkeypatch.setattr(stream, "REFILL_LIMIT", 3.0)
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish(count=50)
        await client.events(50)
        await producer.recreate()

        async def regrow() -> None:
            for _ in range(40):  # 10 s of growth, every 0.25 s, staying below seq 50
                await producer.publish("MarketCreated")
                await asyncio.sleep(0.25)

        growing = asyncio.create_task(regrow())
        try:
            assert (await client.closed(within=7))[0] == 4009
        finally:
            growing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await growing


@pytest.mark.parametrize("keep", [0, 3], ids=["lost-whole", "lost-newest"])
async def test_a_stream_written_again_in_steps_is_followed_without_a_reset(
    server: Running, producer: EventProducer, keep: int
) -> None:
    """Redis back without its newest entries (an older snapshot), or empty, and the indexer
    writes them again from its outbox, in steps, a few seconds later: a stream that ends
    before the entry relayed last is waited for, so clients stay connected, get nothing
    twice, and get what follows."""
    async with ws_client(server.url) as client:
        await relaying(client, producer)
        kept = await producer.lose()
        await producer.rewrite(kept[:keep])  # what the older snapshot held
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        await producer.rewrite(kept[keep:], pause=0.3)  # the refill, one entry at a time
        await relays_only_the_next(client, producer)


async def test_the_refill_grace_counts_from_the_streams_last_growth(
    server: Running,
    producer: EventProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refill that takes longer in all than REFILL_GRACE (here 2.5 s) but grows more often
    than that is waited for to its end: clients stay connected and get nothing twice."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 2.5)
    async with ws_client(server.url) as client:
        await relaying(client, producer)
        kept = await producer.lose()
        await producer.rewrite(kept, pause=1.0)  # 4 s from the first entry to the last
        await relays_only_the_next(client, producer)


async def test_a_redis_outage_during_a_refill_does_not_use_up_its_grace(
    start: Start,
    own_producer: EventProducer,
    own_redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis back from an older snapshot, then away again for longer than REFILL_GRACE (here
    2 s) before the indexer could write the lost entries: the grace counts again once Redis
    is back, so the refill that follows keeps clients connected, and nothing comes twice."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 2.0)
    producer = own_producer
    async with start(redis_url=own_redis.url) as server, ws_client(server.url) as client:
        await relaying(client, producer)
        kept = await producer.lose()
        await producer.rewrite(kept[:2])  # what the older snapshot held
        await asyncio.sleep(1.5)  # seen short by now (idle reads block for 1 s)
        own_redis.stop()
        await server.wait_health(redis="down")
        await asyncio.sleep(3.0)
        own_redis.start()
        await server.wait_metric("kektech_broadcaster_redis_up", 1)  # read again
        await producer.redis.connection_pool.disconnect()  # its connection died with Redis
        await producer.rewrite(kept[2:])  # the indexer's refill, once Redis is back
        await relays_only_the_next(client, producer)


async def test_a_stream_refilled_from_its_middle_after_a_boot_without_it_is_not_relayed(
    server: Running, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started while Redis had lost the stream (restarted without persistence), a broadcaster
    sees it come back, after some idle reads, written from its middle in steps: the indexer's
    refill of entries relayed long ago. They are history, not news: none reaches a client
    as an event; it waits for the refill to settle (REFILL_SETTLE, here 3 s), closes the
    clients subscribed meanwhile with 4009 (reload), and relays what comes next."""
    monkeypatch.setattr(stream, "REFILL_SETTLE", 3.0)
    await asyncio.sleep(2.5)  # idle reads on the missing stream (BROADCASTER_REDIS_TIMEOUT=2 s)
    async with ws_client(server.url) as before, ws_client(server.url) as meanwhile:
        await before.subscribe("events:*")
        producer.seq = 4_000  # the refill's first batch: seqs the stream held before
        await producer.publish(count=2)
        await asyncio.sleep(0.3)
        await meanwhile.subscribe("events:*")
        await producer.publish(count=2)  # the refill's next batch
        for client in (before, meanwhile):
            await closed_for_reload_without_events(client, within=15)
    async with ws_client(server.url) as later:
        await later.subscribe("events:*")
        await relays_only_the_next(later, producer)  # seq 4,005


async def test_entries_lost_again_before_anything_new_after_a_refill_are_waited_for(
    server: Running, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Followed from its top after a boot without it, the refilled stream loses its newest
    entries again (Redis back from an older snapshot) before any new event was relayed: the
    entry at the top it was followed from is the one to wait for, as for any entry relayed,
    so clients stay connected and the second refill is not relayed as news."""
    monkeypatch.setattr(stream, "REFILL_SETTLE", 1.0)
    await asyncio.sleep(2.5)  # idle reads on the missing stream (BROADCASTER_REDIS_TIMEOUT=2 s)
    producer.seq = 4_000  # the indexer's refill: seqs the stream held before
    await producer.publish(count=4)
    await server.wait_health(seq=4_004)  # settled, followed from its top
    kept = await producer.lose()
    await producer.rewrite(kept[:2])  # what the older snapshot held
    await asyncio.sleep(2.5)  # idle reads meanwhile
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.rewrite(kept[2:])  # the indexer's refill, again
        await relays_only_the_next(client, producer)  # seq 4,005
    assert await server.metric("kektech_broadcaster_stream_gap_entries_total") == 0


async def test_a_stream_gone_again_while_its_refill_settles_is_no_gap(
    server: Running, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started without the stream, a broadcaster sees the indexer's refill and waits for it to
    settle (REFILL_SETTLE, here 2 s); meanwhile the key goes away again (deleted, evicted)
    for two of those waits, and is then refilled: it is the same refill of history, not a
    new stream at seq 0 with 4,000 entries missing, so no gap is counted and none of it is
    relayed."""
    monkeypatch.setattr(stream, "REFILL_SETTLE", 2.0)
    await asyncio.sleep(2.5)  # idle reads on the missing stream (BROADCASTER_REDIS_TIMEOUT=2 s)
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        producer.seq = 4_000
        await producer.publish(count=2)
        await asyncio.sleep(0.5)  # read, and waiting for the refill to settle
        kept = await producer.lose()
        await asyncio.sleep(5.0)  # two settle waits see the stream missing
        await producer.rewrite(kept)
        await producer.publish(count=2)  # the rest of the refill
        await closed_for_reload_without_events(client, within=15)
    await relays_what_follows_with_no_gap(server, producer)  # seq 4,005


async def test_a_redis_outage_while_a_refill_settles_does_not_let_it_through(
    start: Start,
    own_producer: EventProducer,
    own_redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Started without the stream, a broadcaster waiting for the indexer's refill to settle
    (REFILL_SETTLE, here 3 s) loses Redis meanwhile: once back it still takes the refill as
    history, relays none of it, closes its subscribers with 4009, and relays what follows.
    It is no gap either: no false alarm of entries trimmed before they were read."""
    monkeypatch.setattr(stream, "REFILL_SETTLE", 3.0)
    producer = own_producer
    async with start(redis_url=own_redis.url) as server:
        await asyncio.sleep(2.5)  # idle reads on the missing stream (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as client:
            await client.subscribe("events:*")
            producer.seq = 4_000  # the refill's first batch: seqs the stream held before
            await producer.publish(count=2)
            await asyncio.sleep(1.0)  # read, and waiting for the refill to settle
            own_redis.stop()
            await server.wait_health(redis="down")
            await asyncio.sleep(2.5)  # past the settle wait: its next read fails
            own_redis.start()
            await producer.publish(count=2)  # the refill's next batch
            await closed_for_reload_without_events(client, within=20)
        await relays_what_follows_with_no_gap(server, producer)  # seq 4,005


async def test_a_client_without_subscriptions_follows_a_recreated_stream(
    server: Running,
    producer: EventProducer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that held no subscription when the stream restarted at seq 1 (so it was not
    closed) gets the new stream's events once it subscribes, though it saw higher seqs."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 1.0)
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish(count=5)
        await client.events(5)
        await client.send({"type": "unsubscribe", "channel": "events:*"})
        await client.expect("unsubscribed")
        await producer.recreate()
        await producer.publish(count=2)
        await server.wait_health(seq=2)
        await client.subscribe("events:*")
        await producer.publish(count=2)
        assert [e["seq"] for e in await client.events(2)] == [3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_stop(
    redis_server: Redis, stream_key: str, sig: signal.Signals, tmp_path: Path
) -> None:
    """On SIGTERM/SIGINT `python -m broadcaster` closes clients with 1012 and exits 0 well
    within PM2's kill timeout (kill_timeout in ecosystem.config.js), after which PM2 would
    SIGKILL it: with three clients, in less than half of it."""
    kill_timeout = kill_timeouts()[BROADCASTER]
    async with (
        broadcaster_process(redis_server, stream_key, tmp_path) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        proc = server.proc
        clients = [await stack.enter_async_context(ws_client(server.url)) for _ in range(3)]
        for client in clients:
            await client.subscribe("events:*")
        started = time.monotonic()
        proc.send_signal(sig)
        codes = [await client.closed(within=kill_timeout) for client in clients]
        async with asyncio.timeout(kill_timeout):
            await proc.wait()
        elapsed = time.monotonic() - started
    log_path = server.log_path
    output = log_path.read_text()
    assert proc.returncode == 0, output
    assert elapsed < kill_timeout / 2, f"{elapsed:.1f} s"
    assert {code for code, _ in codes} == {1012}
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(line["event"] == "stopped by signal" for line in lines)


async def test_a_stop_counts_1012_only_for_the_clients_it_closes(stream_key: str) -> None:
    """At a stop, server_closes_total counts 1012 for each client the stop closed, not for a
    connection already closing with another code (here 1003, its client not answering).
    The edge is served here without Redis, which it does not use, to read the metrics once
    it has stopped."""
    settings = settings_for("redis://127.0.0.1:1/0", stream_key)
    metrics = Metrics()
    hub = build_hub(settings, metrics)

    async def status() -> dict[str, Any]:
        raise AssertionError("not asked")

    async with contextlib.AsyncExitStack() as clients:
        async with serve_clients(settings, hub=hub, metrics=metrics, status=status):
            url = f"ws://127.0.0.1:{settings.ws_port}{settings.ws_path}"
            readers = [await clients.enter_async_context(ws_client(url)) for _ in range(2)]
            closing = await RawClient.open(settings.ws_port)
            clients.callback(closing.close)
            await closing.read_frame()  # connected
            closing.send_frame(0x2, b"binary")
            assert (await closing.until_close())[0] == 1003
        codes = [(await reader.closed())[0] for reader in readers]

    def closes(code: int) -> float | None:
        labels = {"code": str(code)}
        return metrics.registry.get_sample_value("kektech_broadcaster_server_closes_total", labels)

    assert codes == [1012, 1012]
    assert (closes(1003), closes(1012)) == (1, 2)


LOW_OPEN_FILES = 64  # what the process is started with: fewer than the clients below
CLIENTS_PAST_THE_LIMIT = 100


def _low_open_files_limit() -> None:
    """In the child before exec: the soft limit of a login shell's PM2 daemon, scaled down."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_OPEN_FILES, hard))


async def test_connections_are_not_bounded_by_an_inherited_soft_open_files_limit(
    redis_server: Redis, stream_key: str, tmp_path: Path
) -> None:
    """A broadcaster started with a low soft limit of open files (a PM2 daemon started from a
    login shell passes on its 1024) raises it to the hard limit, so clients past the soft
    limit still connect."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * CLIENTS_PAST_THE_LIMIT:
        pytest.fail(f"this machine's hard limit of open files ({hard}) is too low for the test")
    async with (
        broadcaster_process(
            redis_server,
            stream_key,
            tmp_path,
            _low_open_files_limit,
            WS_MAX_CONNECTIONS_PER_IP=str(2 * CLIENTS_PAST_THE_LIMIT),
        ) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = [
            await stack.enter_async_context(ws_client(server.url))
            for _ in range(CLIENTS_PAST_THE_LIMIT)
        ]
        for client in clients[-3:]:
            await client.send({"type": "ping"})
            await client.expect("pong")
        assert server.proc.returncode is None


OPEN_FILES_CAP = 160  # soft and hard: fewer than the clients the test tries to connect
CLIENTS_PAST_THE_CAP = 200


def _capped_open_files() -> None:
    """In the child before exec: a hard limit of open files a storm of clients can reach."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_CAP, OPEN_FILES_CAP))


async def _try_connect(url: str, stack: contextlib.AsyncExitStack) -> bool:
    """Open a client and keep it open until the stack closes; False if it was refused."""
    try:
        async with asyncio.timeout(3):
            await stack.enter_async_context(ws_client(url))
    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
        return False
    return True


async def test_a_full_server_keeps_descriptors_to_reconnect_to_redis(
    own_redis: Redis, own_producer: EventProducer, stream_key: str, tmp_path: Path
) -> None:
    """With clients at the open files limit, the broadcaster still has the descriptors it needs
    for itself: it reconnects to Redis after a restart, while clients keep knocking, and
    delivers to the clients it holds; clients past its capacity are refused, not left hanging."""
    async with (
        broadcaster_process(
            own_redis,
            stream_key,
            tmp_path,
            _capped_open_files,
            WS_MAX_CONNECTIONS_PER_IP=str(10 * CLIENTS_PAST_THE_CAP),
        ) as server,
        contextlib.AsyncExitStack() as stack,
        ws_client(server.url) as first,
    ):
        await first.subscribe("events:*")
        admitted = [await _try_connect(server.url, stack) for _ in range(CLIENTS_PAST_THE_CAP)]
        assert not all(admitted)  # some were past the server's capacity
        own_redis.stop()
        await asyncio.sleep(1)
        # Clients that keep knocking while Redis is away must not take its descriptors.
        await asyncio.gather(*(_try_connect(server.url, stack) for _ in range(20)))
        own_redis.start()
        await own_producer.publish(count=3)
        assert [e["seq"] for e in await first.events(3, within=15)] == [1, 2, 3]


async def slot_freed(server: Running) -> None:
    """Wait until a client gets the only per-IP slot (WS_MAX_CONNECTIONS_PER_IP=1) that a
    connection of this address held: that connection's socket has ended on the server."""

    async def free() -> bool:
        try:
            async with ws_client(server.url):
                return True
        except InvalidStatus as refused:
            if refused.response.status_code != 429:  # refused for another reason
                raise
            return False

    await eventually(free, within=CLOSE_TIMEOUT + WITHIN, what="the per-IP slot is free")


async def stall(server: Running, producer: EventProducer) -> RawClient:
    """A client subscribed to every event that reads nothing more, once the kernel's buffers
    towards it are full and some of what was sent waits in the server's own."""
    stalled = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
    try:
        await stalled.read_frame()  # connected
        stalled.send_frame(0x1, orjson.dumps({"type": "subscribe", "channel": "events:*"}))
        await server.wait_health(subscriptions=1)
        connection = stalled.server_side()
        async with asyncio.timeout(WITHIN):
            while connection.buffered() == 0:
                await producer.publish(count=4, pad=8192)
    except BaseException:
        stalled.close()
        raise
    return stalled


async def test_a_client_that_ends_its_side_without_reading_is_cut_off_in_time(
    start: Start, producer: EventProducer
) -> None:
    """A client that ends its side of the TCP connection (no close frame) while what was
    sent to it waits unread loses its socket CLOSE_TIMEOUT later, and with it its per-IP
    slot: the socket's end waits for that data to be read, which such a client never does."""
    async with start(ws_max_connections_per_ip=1) as server:
        stalled = await stall(server, producer)
        try:
            stalled.writer.write_eof()
            await server.wait_health(connections=0)  # no longer open: its end was read
            await slot_freed(server)
        finally:
            stalled.close()


async def test_a_slow_consumer_loses_its_socket_though_its_close_frame_is_not_read(
    start: Start, producer: EventProducer
) -> None:
    """A client closed with 4008 that reads nothing loses its socket CLOSE_TIMEOUT after its
    close frame was queued, behind what it did not read: counted from when that frame is
    sent instead, the wait would never end."""
    async with start(ws_max_connections_per_ip=1, ws_send_buffer_bytes=65536) as server:
        stalled = await stall(server, producer)
        try:
            async with asyncio.timeout(WITHIN):
                while not await server.metric("kektech_broadcaster_slow_consumer_closes_total"):
                    await producer.publish(count=4, pad=8192)
            await slot_freed(server)
        finally:
            stalled.close()
