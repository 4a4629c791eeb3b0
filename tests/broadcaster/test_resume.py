"""Resume: subscribe with since replays what was missed, then continues live, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from broadcaster import replay, stream
from broadcaster.connection import READ_SLICE
from broadcaster.service import run
from devnet.redis_server import Redis
from tests.broadcaster.support import (
    MARKET,
    OTHER_MARKET,
    WITHIN,
    EventProducer,
    RawClient,
    Running,
    WsClient,
    client_frame,
    running,
    settings_for,
    ws_client,
)
from tests.support.tasks import background
from tests.support.tcp_proxy import TcpProxy

Start = Callable[..., AbstractAsyncContextManager[Running]]

# A second client address on loopback: limits shared per address do not reach it.
ANOTHER_ADDRESS: dict[str, Any] = {"host": "127.0.0.1", "local_addr": ("127.0.0.2", 0)}


async def test_resume_from_memory(server: Running, producer: EventProducer) -> None:
    """Events after since are replayed in order before the ack (recovered), then live."""
    await producer.publish(count=10)
    await server.wait_health(seq=10)
    async with ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=4)
        assert [e["seq"] for e in ack["replayedEvents"]] == [5, 6, 7, 8, 9, 10]
        assert ack["recovered"] is True
        assert ack["replayed"] == 6
        assert ack["seq"] == 10
        await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [11]


async def test_resume_from_redis(start: Start, producer: EventProducer) -> None:
    """Without history in memory the replay is read from the stream (XRANGE), same result."""
    async with start(ws_history_size=0) as server:
        await producer.publish(count=700)  # more than one XRANGE page
        await server.wait_health(seq=700)
        async with ws_client(server.url) as client:
            ack = await client.subscribe("events:*", since=3)
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(4, 701))
            assert ack["recovered"] is True


async def test_a_resume_as_soon_as_the_server_listens_is_answered(
    redis_server: Redis, stream_key: str, producer: EventProducer
) -> None:
    """A client that reconnects the moment a (re)started server accepts connections gets its
    replay: the server reads the stream's position and recent history before it listens."""
    await producer.publish(count=5000)
    settings = settings_for(redis_server.url, stream_key)
    task = asyncio.create_task(run(settings), name="broadcaster-under-test")
    try:
        url = f"ws://127.0.0.1:{settings.ws_port}{settings.ws_path}"
        async with asyncio.timeout(WITHIN):
            while True:
                try:
                    async with ws_client(url) as client:
                        ack = await client.subscribe("events:*", since=4990)
                        break
                except OSError:  # not listening yet
                    assert not task.done()
                    await asyncio.sleep(0.005)
        assert ack["recovered"] is True
        assert [e["seq"] for e in ack["replayedEvents"]] == list(range(4991, 5001))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_resume_that_could_not_replay_covers_nothing_before_its_ack(
    start: Start, producer: EventProducer
) -> None:
    """A subscription whose replay was refused (too far back) delivered nothing before its
    ack, so a later resume on an overlapping channel still replays those events."""
    async with start(ws_replay_limit=100) as server:
        await producer.publish(count=300)
        await server.wait_health(seq=300)
        async with ws_client(server.url) as client:
            refused = await client.subscribe(f"market:{MARKET}", since=0)
            assert (refused["recovered"], refused["replayed"]) == (False, 0)
            ack = await client.subscribe("events:*", since=290)
            assert ack["recovered"] is True
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(291, 301))


async def test_many_resumes_at_once_from_the_stream_are_all_answered(
    start: Start, producer: EventProducer
) -> None:
    """Clients resuming together from the stream (further back than the history in memory)
    take turns on the Redis connections: each one's reads are bounded, not its wait for a
    turn, so none is told to reload because the others were served first, and /healthz
    does not report Redis down meanwhile."""
    # The 60 resumes take 3-5 s together on the 2-core machine, each read a few ms: a bound
    # of 1.5 s is far above one read, even with the machine busy (0.5 s was seen to run out
    # under a parallel test run), and far below the wait for a turn. They all come from one
    # address, whose history budget (four times WS_REPLAY_LIMIT) must cover the 60 x 2000.
    async with start(
        ws_history_size=10,
        broadcaster_redis_timeout=1.5,
        ws_max_connections_per_ip=200,
        ws_replay_limit=30_000,
    ) as server:
        await producer.publish(count=2000)
        await server.wait_health(seq=2000)

        async def resume() -> dict[str, Any]:
            async with ws_client(server.url) as client:
                # A channel nothing matches: the replay reads all 2000 entries and sends none.
                return await client.subscribe(f"market:{OTHER_MARKET}", since=1, within=60)

        reports: list[object] = []

        async def watch_health() -> None:
            while True:
                reports.append((await server.health())["redis"])
                await asyncio.sleep(0.2)

        async with background(watch_health()):
            acks = await asyncio.gather(*(resume() for _ in range(60)))
    assert [(ack["recovered"], ack["replayed"]) for ack in acks] == [(True, 0)] * 60
    # /healthz reads Redis on a connection of its own: the storm does not make it say "down".
    assert reports
    assert set(reports) == {"up"}


@dataclass
class BootedWithoutRedis:
    """A broadcaster started while its Redis was down; a client connected to it meanwhile."""

    redis: Redis  # stopped: start() brings it back with the 10 events on MARKET it holds
    producer: EventProducer
    server: Running
    client: WsClient


@contextlib.asynccontextmanager
async def booted_without_redis(
    stream_key: str, tmp_path: Path
) -> AsyncIterator[BootedWithoutRedis]:
    """A private Redis with 10 events on MARKET, stopped; a broadcaster started on it then
    (reporting Redis down), and a client connected to it."""
    with Redis(workdir=tmp_path) as own:
        async with aioredis.Redis.from_url(own.url) as redis:
            producer = EventProducer(redis, stream_key)
            await producer.publish(count=10)
            own.stop()
            settings = settings_for(own.url, stream_key)
            async with (
                running(settings, ready=lambda health: health["redis"] == "down") as server,
                ws_client(server.url) as client,
            ):
                yield BootedWithoutRedis(own, producer, server, client)


async def test_a_resume_while_redis_was_away_since_boot_claims_nothing(
    stream_key: str, tmp_path: Path
) -> None:
    """A subscription made before the server could read the stream (Redis away since start)
    covers only what comes after the position the server starts at: a later resume of an
    overlapping channel still replays the events before it."""
    async with booted_without_redis(stream_key, tmp_path) as boot:
        early = await boot.client.subscribe(f"market:{MARKET}", since=5)
        assert (early["recovered"], early["replayed"]) == (False, 0)
        boot.redis.start()
        await boot.server.wait_health(within=15, seq=10)
        ack = await boot.client.subscribe("events:*", since=5)
        assert [e["seq"] for e in ack["replayedEvents"]] == [6, 7, 8, 9, 10]
        assert ack["recovered"] is True


async def test_a_resume_past_the_stream_while_redis_was_away_claims_only_what_follows(
    stream_key: str, tmp_path: Path
) -> None:
    """A subscription made while Redis was away, with a `since` the stream never reached
    (Redis came back from an older copy), covers what follows the position the server starts
    at: a later resume of an overlapping channel does not deliver the live events again."""
    async with booted_without_redis(stream_key, tmp_path) as boot:
        early = await boot.client.subscribe(f"market:{MARKET}", since=500)
        assert early["recovered"] is False
        boot.redis.start()
        await boot.server.wait_health(within=15, seq=10)
        await boot.producer.publish(count=2)
        assert [e["seq"] for e in await boot.client.events(2)] == [11, 12]
        ack = await boot.client.subscribe("events:*", since=10)
        assert ack["replayedEvents"] == []
        assert ack["recovered"] is True
        await boot.producer.publish()
        assert [e["seq"] for e in await boot.client.events(1)] == [13]


async def test_messages_sent_during_a_resume_wait_for_it_in_order(
    start: Start, producer: EventProducer
) -> None:
    """Messages sent right after a resume are answered after its replay and ack, in order."""
    async with start(ws_history_size=0) as server:
        await producer.publish(count=700)  # replayed from Redis, in two XRANGE pages
        await server.wait_health(seq=700)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 100})
            await client.send({"type": "ping"})
            await client.send({"type": "subscribe", "channel": f"market:{MARKET}"})
            await client.send({"type": "unsubscribe", "channel": "events:*"})
            received = [await client.recv() for _ in range(600 + 4)]
    kinds = [message["type"] for message in received]
    assert kinds == ["event"] * 600 + ["subscribed", "pong", "subscribed", "unsubscribed"]
    assert [message["data"]["seq"] for message in received[:600]] == list(range(101, 701))
    assert received[600]["recovered"] is True
    assert received[602]["channel"] == f"market:{MARKET}"


async def test_a_burst_sent_during_a_resume_is_answered_in_full_and_in_order(
    start: Start, producer: EventProducer
) -> None:
    """Past the few messages a connection holds while it resumes, it stops reading the
    socket until the resume is done; then every held and unread message is answered, in
    the order sent."""
    async with start(ws_history_size=0, ws_rate_limit=1000) as server:
        await producer.publish(count=700)
        await server.wait_health(seq=700)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 0})
            channels = [f"events:kind_{index}" for index in range(60)]
            for channel in channels:
                await client.send({"type": "subscribe", "channel": channel})
            received = [await client.recv() for _ in range(700 + 1 + len(channels))]
            await client.send({"type": "ping"})  # and it reads the socket again
            await client.expect("pong")
    assert [message["type"] for message in received[:701]] == ["event"] * 700 + ["subscribed"]
    assert received[700]["recovered"] is True
    assert [(message["type"], message["channel"]) for message in received[701:]] == [
        ("subscribed", channel) for channel in channels
    ]


async def test_a_resume_and_a_burst_read_at_once_are_answered_in_full_and_in_order(
    start: Start, producer: EventProducer
) -> None:
    """The same when the resume and the burst come in one read longer than the slices the
    connection parses at a time: what the read holds past the point where messages are held
    back is parsed once the resume is done, and answered in order. The read is made by
    calling the server's protocol object as the loop would."""
    channels = [f"events:kind_{index}" for index in range(80)]
    resume = {"type": "subscribe", "channel": "events:*", "since": 0}
    read = b"".join(
        client_frame(0x1, orjson.dumps(message))
        for message in [resume, *({"type": "subscribe", "channel": c} for c in channels)]
    )
    assert len(read) > 2 * READ_SLICE
    async with start(ws_history_size=0, ws_rate_limit=1000) as server:
        await producer.publish(count=700)
        await server.wait_health(seq=700)
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            client.server_side().data_received(read)
            async with asyncio.timeout(WITHIN):
                received = [orjson.loads((await client.read_frame())[1]) for _ in range(781)]
        finally:
            client.close()
    assert [message["type"] for message in received[:701]] == ["event"] * 700 + ["subscribed"]
    assert [(message["type"], message["channel"]) for message in received[701:]] == [
        ("subscribed", channel) for channel in channels
    ]


async def test_history_read_at_boot(start: Start, producer: EventProducer) -> None:
    """A restarted broadcaster answers resumes for events published before it started."""
    await producer.publish(count=5)
    async with start() as server, ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=2)
        assert [e["seq"] for e in ack["replayedEvents"]] == [3, 4, 5]
        assert ack["recovered"] is True


async def test_resume_replays_only_matching_events(
    server: Running, producer: EventProducer
) -> None:
    """A resumed market subscription replays that market's events only."""
    for market in (MARKET, OTHER_MARKET, MARKET, OTHER_MARKET):
        await producer.publish(market=market)
    await server.wait_health(seq=4)
    async with ws_client(server.url) as client:
        ack = await client.subscribe("market:" + OTHER_MARKET, since=0)
        assert [e["seq"] for e in ack["replayedEvents"]] == [2, 4]
        assert {e["channel"] for e in ack["replayedEvents"]} == {"market:" + OTHER_MARKET}
        assert ack["recovered"] is True


async def test_resume_with_trimmed_history(start: Start, producer: EventProducer) -> None:
    """When the stream no longer reaches back to since, the rest is replayed, recovered=false."""
    await producer.publish(count=20)
    await producer.trim_to(5)
    async with start(ws_history_size=0) as server, ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=3)
        assert [e["seq"] for e in ack["replayedEvents"]] == [16, 17, 18, 19, 20]
        assert ack["recovered"] is False
        ack = await client.subscribe("events:*", since=15)  # renewing reaches back no further
        assert ack["recovered"] is True
        assert ack["replayed"] == 0


async def test_resume_beyond_the_replay_limit(start: Start, producer: EventProducer) -> None:
    """A since older than WS_REPLAY_LIMIT events is a miss: nothing replayed, recovered=false."""
    await producer.publish(count=10)
    async with start(ws_replay_limit=5) as server, ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=2)
        assert ack["recovered"] is False
        assert ack["replayedEvents"] == []
        await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [11]


@pytest.mark.parametrize("keep", [0, 60], ids=["lost-whole", "lost-newest"])
async def test_a_resume_while_the_stream_is_refilled_waits_for_the_refill(
    start: Start, producer: EventProducer, keep: int
) -> None:
    """Redis lost the stream (or its newest entries) and the broadcaster waits for the
    indexer to write them again: a resume from further back than the history in memory waits
    for that refill too, then replays everything it missed (recovered), continuing from what
    the stream held before; a message sent meanwhile is answered after the ack, and live
    events follow with no gap and no repeat."""
    async with start(ws_history_size=10) as server:
        await producer.publish(count=100)
        await server.wait_health(seq=100)
        kept = await producer.lose()
        await producer.rewrite(kept[:keep])  # what an older snapshot held
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 50})
            await client.send({"type": "ping"})
            received: list[dict[str, Any]] = []
            while keep > 50 and (not received or received[-1]["seq"] < keep):
                received.append(await client.recv(within=WITHIN))
            await client.nothing(within=1.0)
            # Replayed: what the stream holds; the rest waits, and the ping behind it.
            assert [m["seq"] for m in received] == list(range(51, keep + 1))
            await producer.rewrite(kept[keep:])  # the indexer's refill from its outbox
            while len(received) < 50 + 2:
                received.append(await client.recv(within=WITHIN))
            assert [m["type"] for m in received] == ["event"] * 50 + ["subscribed", "pong"]
            assert [m["seq"] for m in received[:50]] == list(range(51, 101))
            assert (received[50]["recovered"], received[50]["replayed"]) == (True, 50)
            await producer.publish()
            assert [e["seq"] for e in await client.events(1)] == [101]
            await client.nothing()


async def test_messages_sent_within_the_rate_during_a_long_resume_are_all_answered(
    start: Start, producer: EventProducer
) -> None:
    """A client keeps within WS_RATE_LIMIT (here 5 a second, burst 10) while its resume
    waits for the indexer's refill: the server reads nothing meanwhile (16 messages wait,
    the rest stays in the socket), then takes them all at once. The time it held them is
    not the client's: every one is answered, and nobody is closed for a flood (past the
    burst, they were refused and the client closed with 1008)."""
    async with start(ws_history_size=10, ws_rate_limit=5, ws_max_subscriptions=10) as server:
        await producer.publish(count=100)
        await server.wait_health(seq=100)
        kept = await producer.lose()
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 50})
            pings = 24
            for _ in range(pings):  # 4 a second for 6 s
                await client.send({"type": "ping"})
                await asyncio.sleep(0.25)
            await producer.rewrite(kept)  # the indexer's refill from its outbox
            replayed = await client.events(50)
            ack = await client.expect("subscribed")
            replies = [await client.recv() for _ in range(pings)]
            assert [e["seq"] for e in replayed] == list(range(51, 101))
            assert ack["recovered"] is True
            assert [r["type"] for r in replies] == ["pong"] * pings
            await client.send({"type": "ping"})
            assert (await client.recv())["type"] == "pong"


async def test_a_flood_during_a_long_resume_is_still_cut_off(
    start: Start, producer: EventProducer
) -> None:
    """What a resume's hold allows beyond the rate is what the client could send at the rate
    meanwhile: 200 messages sent at once during a 2 s hold, at 5 a second, are a flood
    (1008) once reading resumes."""
    async with start(ws_history_size=10, ws_rate_limit=5, ws_max_subscriptions=10) as server:
        await producer.publish(count=100)
        await server.wait_health(seq=100)
        kept = await producer.lose()
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 50})
            for _ in range(200):
                await client.send({"type": "ping"})
            await asyncio.sleep(2.0)
            await producer.rewrite(kept)
            received, (code, reason) = await client.messages_until_closed(within=WITHIN)
    assert (code, reason) == (1008, "message rate limit exceeded")
    assert [m["type"] for m in received].count("pong") < 200


async def test_a_resume_past_the_position_while_the_stream_is_refilled_waits_for_it(
    server: Running, producer: EventProducer
) -> None:
    """A since past this instance's position (the client saw it through a faster instance)
    while the stream is waited for: the stream's top is asked once the refill is done, not
    while the stream misses entries, so the resume catches up (recovered) and goes live after
    its since."""
    await producer.publish(count=100)
    await server.wait_health(seq=100)
    kept = await producer.lose()
    await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
    async with ws_client(server.url) as client:
        await client.send({"type": "subscribe", "channel": "events:*", "since": 102})
        await client.nothing(within=1.0)
        await producer.rewrite(kept)  # the indexer's refill, then what it indexed since
        await producer.publish(count=3)
        ack = await client.expect("subscribed")
        assert (ack["recovered"], ack["replayed"]) == (True, 0)
        assert [e["seq"] for e in await client.events(1)] == [103]
        await client.nothing()


@pytest.mark.parametrize("since", [50, 102], ids=["from-the-stream", "past-the-position"])
async def test_a_resume_finding_the_stream_lost_before_the_reader_does_waits_for_the_refill(
    start: Start, producer: EventProducer, since: int
) -> None:
    """Redis lost the stream and a resume reads it before the stream reader noticed (the
    reader was in a blocking read, or in its reconnect back-off after a restart, for up to
    seconds): the stream's top, below what was relayed, says entries were lost, not trimmed,
    so the resume waits for the indexer's refill (recovered) rather than being told to reload
    at once."""
    async with (
        start(ws_history_size=10) as server,
        ws_client(server.url) as live,
    ):
        await live.subscribe("events:*")
        await producer.publish(count=100)
        await live.events(100)  # relayed: the reader has just begun a blocking read (1 s)
        kept = await producer.lose()
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": since})
            await client.nothing(within=0.5)
            await producer.rewrite(kept)  # the indexer's refill from its outbox
            await producer.publish(count=3)
            replayed = [e["seq"] for e in await client.events(max(0, 100 - since))]
            ack = await client.expect("subscribed", within=WITHIN)
            assert replayed == list(range(since + 1, 101))
            assert ack["recovered"] is True
            assert [e["seq"] for e in await client.events(103 - max(since, 100))] == list(
                range(max(since, 100) + 1, 104)
            )
            await client.nothing()


async def test_a_resume_waits_for_a_refill_for_a_bounded_time(
    start: Start, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that stays missing is waited for by the broadcaster (nothing refills it
    while the key is away), but a resume waits for it only REFILL_WAIT (here 1 s): then it
    is answered recovered=false, as a miss."""
    monkeypatch.setattr(replay, "REFILL_WAIT", 1.0)
    async with start(ws_history_size=10) as server:
        await producer.publish(count=100)
        await server.wait_health(seq=100)
        await producer.lose()
        await asyncio.sleep(2.5)  # idle reads meanwhile (BROADCASTER_REDIS_TIMEOUT=2 s)
        async with ws_client(server.url) as client:
            await client.send({"type": "subscribe", "channel": "events:*", "since": 0})
            await client.nothing(within=0.5)
            ack = await client.expect("subscribed", within=WITHIN)
            assert (ack["recovered"], ack["replayed"]) == (False, 0)


async def test_a_resume_waiting_for_a_refill_that_does_not_come_is_closed_for_reload(
    start: Start, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that stays short of what was relayed for REFILL_GRACE (here 3 s) is taken
    as a new one: a resume waiting for its refill, having replayed what the stream held, is
    closed with 4009 (reload) with the other subscribers, not acknowledged."""
    monkeypatch.setattr(stream, "REFILL_GRACE", 3.0)
    async with start(ws_history_size=10) as server:
        await producer.publish(count=100)
        await server.wait_health(seq=100)
        kept = await producer.lose()
        await producer.rewrite(kept[:60])  # an older snapshot, and no refill
        async with ws_client(server.url) as client:
            await asyncio.sleep(1.5)  # seen short by now (idle reads block for 1 s)
            await client.send({"type": "subscribe", "channel": "events:*", "since": 0})
            received, (code, _) = await client.messages_until_closed(within=10)
        assert code == 4009
        assert [m["data"]["seq"] for m in received if m["type"] == "event"] == list(range(1, 61))
        assert [m["type"] for m in received if m["type"] != "event"] == []


async def test_resume_at_the_head_and_beyond(server: Running, producer: EventProducer) -> None:
    """since = the newest seq replays nothing (recovered); a since never published is a miss."""
    await producer.publish(count=3)
    await server.wait_health(seq=3)
    async with ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=3)
        assert ack["recovered"] is True
        assert ack["replayed"] == 0
    async with ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=1000)
        assert ack["recovered"] is False
        assert ack["replayed"] == 0
        await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [4]


async def test_reconnect_and_resume(server: Running, producer: EventProducer) -> None:
    """A client that reconnects with the last seq it saw gets exactly what it missed."""
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish(count=3)
        last = (await client.events(3))[-1]["seq"]
    await producer.publish(count=4)
    async with ws_client(server.url) as client:
        ack = await client.subscribe("events:*", since=last)
        assert [e["seq"] for e in ack["replayedEvents"]] == [4, 5, 6, 7]
        await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [8]


@pytest.mark.parametrize(
    "older", ["market:" + MARKET, "market:" + MARKET[:6] + "*", "market:" + MARKET[:-1] + "?"]
)
async def test_resume_next_to_a_live_subscription(
    older: str, server: Running, producer: EventProducer
) -> None:
    """A resume skips what an existing subscription (a channel, or a pattern matching the
    same market) already delivered: nothing twice."""
    async with ws_client(server.url) as client:
        await client.subscribe(older)
        for market in (MARKET, OTHER_MARKET, MARKET, OTHER_MARKET):
            await producer.publish(market=market)
        assert [e["seq"] for e in await client.events(2)] == [1, 3]
        ack = await client.subscribe("events:*", since=0)
        assert [e["seq"] for e in ack["replayedEvents"]] == [2, 4]
        await producer.publish(market=OTHER_MARKET)
        await producer.publish(market=MARKET)
        live = await client.events(2)
        assert [(e["seq"], e["channel"]) for e in live] == [
            (5, "events:bet_placed"),
            (6, "events:bet_placed"),
        ]


async def test_no_gap_no_duplicate_under_concurrent_publishing(
    start: Start, producer: EventProducer
) -> None:
    """Clients resuming at random points while events pour in get every event once, in order."""
    rng = random.Random(7)
    total = 600
    async with start() as memory, start(ws_history_size=0) as redis_only:
        done = asyncio.Event()
        markets: dict[int, str | None] = {}

        async def publish() -> None:
            while producer.seq < total:
                market = rng.choice((MARKET, OTHER_MARKET))
                count = min(rng.randint(1, 4), total - producer.seq)
                for env in await producer.publish(market=market, count=count):
                    markets[env.seq or 0] = env.market_address
                await asyncio.sleep(0.002)
            done.set()

        async def follow(server: Running, channel: str, since: int) -> tuple[list[int], Any]:
            async with ws_client(server.url) as client:
                ack = await client.subscribe(channel, since=since)
                seqs = [e["seq"] for e in ack["replayedEvents"]]
                await collect(client, channel, since, seqs)
                return seqs, ack

        def last_on(channel: str) -> int:
            """The last seq published on the channel (once the producer is done)."""
            on = [s for s, m in markets.items() if channel == "events:*" or m == MARKET]
            return max(on, default=0)

        async def collect(client: WsClient, channel: str, since: int, seqs: list[int]) -> None:
            """Gather live events up to the last one published on the channel, then see that
            nothing follows it. Not "until the flow pauses": a loaded machine may pause it."""
            async with asyncio.timeout(60):
                while not (done.is_set() and max(seqs, default=since) >= last_on(channel)):
                    try:
                        event = await client.expect("event", within=0.5)
                    except TimeoutError:
                        continue  # has the producer finished meanwhile?
                    seqs.append(event["seq"])
            await client.nothing()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(publish())
            followers = []
            for i in range(24):
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                server = memory if i % 2 else redis_only
                channel = "events:*" if i % 3 else "market:" + MARKET
                since = rng.randint(0, producer.seq)
                followers.append(
                    (channel, since, tasks.create_task(follow(server, channel, since)))
                )
    for channel, since, task in followers:
        seqs, ack = task.result()
        wanted = [
            seq
            for seq in range(since + 1, total + 1)
            if channel == "events:*" or markets.get(seq) == MARKET
        ]
        assert ack["recovered"] is True
        assert seqs == wanted, (channel, since)


async def test_resumes_are_limited_by_the_history_they_read(
    start: Start, producer: EventProducer
) -> None:
    """A resume costs the server the history it reads, even when it sends nothing: once a
    client address has read four times WS_REPLAY_LIMIT entries from Redis, its resumes read
    nothing and are answered recovered: false (no error), while a resume that needs no
    history, and other clients, go on as usual."""
    await producer.publish(count=150)
    absent = "market:0x" + "00" * 20
    async with (
        start(ws_replay_limit=100, ws_history_size=0) as server,
        ws_client(server.url) as abuser,
        ws_client(server.url, **ANOTHER_ADDRESS) as other,
    ):
        for _ in range(4):
            ack = await abuser.subscribe(absent, since=50)  # reads 100 entries, sends none
            assert (ack["recovered"], ack["replayedEvents"]) == (True, [])
        ack = await abuser.subscribe("events:*", since=140)
        assert (ack["recovered"], ack["replayedEvents"]) == (False, [])
        assert (await abuser.subscribe("events:bet_placed", since=150))["recovered"] is True
        ack = await other.subscribe("events:*", since=140)
        assert [e["seq"] for e in ack["replayedEvents"]] == list(range(141, 151))
        await producer.publish()
        assert [e["seq"] for e in await abuser.events(1)] == [151]


async def test_a_reconnect_resuming_each_of_its_channels_from_memory_recovers_them_all(
    start: Start, producer: EventProducer
) -> None:
    """A client's reconnect sends every subscription again with its last seq (docs: Resume):
    events:* and 25 market pages, 2,000 events missed, all in memory. Reading memory costs a
    sixteenth of reading Redis (about 1 us an entry against 25-43 us), so the 26 resumes
    (52,000 entries, over the 40,000 Redis entries an address may read at once) all recover;
    charged as Redis reads, the last five were told to reload."""
    await producer.publish(count=2000)
    async with start() as server, ws_client(server.url) as client:
        await server.wait_health(seq=2000)
        channels = ["events:*"] + [f"market:0x{i:040x}" for i in range(1, 26)]
        acks = [await client.subscribe(channel, since=0) for channel in channels]
    assert [a["channel"] for a in acks if a["recovered"] is not True] == []


async def test_resumes_from_memory_in_flight_at_once_are_reserved_at_memory_price(
    start: Start, producer: EventProducer
) -> None:
    """26 connections of one address (a NAT, or a frontend's reconnects) resume at once over
    2,000 events in memory: each is reserved what it may read as it begins, and reserved at
    Redis's price, the later ones found the budget spent although all of them together read
    a tenth of it at memory's price."""
    await producer.publish(count=2000)
    async with start() as server, contextlib.AsyncExitStack() as stack:
        await server.wait_health(seq=2000)
        clients = [await stack.enter_async_context(ws_client(server.url)) for _ in range(26)]
        acks = await asyncio.gather(*(c.subscribe("events:*", since=0) for c in clients))
    assert [a["recovered"] for a in acks] == [True] * 26


async def test_new_connections_of_one_address_share_its_history_budget(
    start: Start, producer: EventProducer
) -> None:
    """Connecting again buys no more history: the budget belongs to the client address, all
    its connections together, so reconnecting to resume once more is answered recovered:
    false like a further resume on the same connection."""
    await producer.publish(count=150)
    absent = "market:0x" + "00" * 20
    async with start(ws_replay_limit=100, ws_history_size=0) as server:
        for _ in range(4):
            async with ws_client(server.url) as abuser:
                ack = await abuser.subscribe(absent, since=50)  # reads 100 entries
                assert ack["recovered"] is True
        async with ws_client(server.url) as abuser:
            ack = await abuser.subscribe("events:*", since=140)
            assert (ack["recovered"], ack["replayedEvents"]) == (False, [])
        async with ws_client(server.url, **ANOTHER_ADDRESS) as other:
            ack = await other.subscribe("events:*", since=140)
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(141, 151))


async def test_resumes_in_flight_at_once_share_their_address_history_budget(
    start: Start, producer: EventProducer
) -> None:
    """Resumes that the connections of one address send at once, all reading Redis, read
    together no more than four times WS_REPLAY_LIMIT (plus one that the refill lets through):
    each is charged as it begins, not once it has read, when all would have passed."""
    await producer.publish(count=150)
    absent = "market:0x" + "00" * 20
    async with (
        start(ws_replay_limit=100, ws_history_size=0) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = [await stack.enter_async_context(ws_client(server.url)) for _ in range(20)]
        acks = await asyncio.gather(*(c.subscribe(absent, since=50) for c in clients))
    assert 4 <= sum(ack["recovered"] for ack in acks) <= 5


async def test_an_address_history_budget_survives_the_forgetting_of_refilled_ones(
    start: Start, producer: EventProducer
) -> None:
    """Refilled budgets are forgotten as other addresses come, an idle connection's too:
    its later resumes and those of a new connection of its address then draw on one budget,
    not two."""
    await producer.publish(count=150)
    absent = "market:0x" + "00" * 20
    async with (
        start(ws_replay_limit=100, ws_history_size=0) as server,
        ws_client(server.url) as first,
    ):
        assert (await first.subscribe(absent, since=150))["recovered"] is True  # reads none
        addresses = [f"10.0.0.{index}" for index in range(1, 51)]
        await asyncio.gather(
            *(resume_as(server.settings.ws_port, address, 150) for address in addresses)
        )
        async with ws_client(server.url) as second:
            acks = [await c.subscribe(absent, since=50) for c in (first, second) for _ in range(5)]
    assert 4 <= sum(ack["recovered"] for ack in acks) <= 5


async def resume_as(port: int, address: str, since: int) -> None:
    """Resume once as a client at `address` behind the local proxy (X-Forwarded-For)."""
    client = await RawClient.open(port, headers={"X-Forwarded-For": address})
    try:
        request = {"type": "subscribe", "channel": "events:*", "since": since}
        client.send_frame(0x1, orjson.dumps(request))
        async with asyncio.timeout(WITHIN):
            while b'"subscribed"' not in (await client.read_frame())[1]:
                pass
    finally:
        client.close()


def via(ip: str) -> dict[str, Any]:
    """ws_client options for a client at ip, as the trusted local proxy forwards it."""
    return {"additional_headers": {"X-Forwarded-For": ip}}


async def test_resumes_from_the_stream_share_a_server_wide_budget(
    start: Start, producer: EventProducer
) -> None:
    """All client addresses together may read WS_REPLAY_STREAM_BUDGET entries (here 250)
    from the Redis Stream before it refills: past it, a resume that memory cannot answer
    reads nothing and is answered recovered: false (no error), while one that memory
    answers goes on as usual."""
    await producer.publish(count=150)
    async with start(
        ws_replay_limit=100, ws_history_size=20, ws_replay_stream_budget=250
    ) as server:
        outcomes = []
        for index in range(4):
            async with ws_client(server.url, **via(f"203.0.113.{index + 1}")) as client:
                ack = await client.subscribe("events:*", since=50)  # 100 entries from Redis
                outcomes.append((ack["recovered"], len(ack["replayedEvents"])))
        assert outcomes == [(True, 100)] * 3 + [(False, 0)]
        async with ws_client(server.url, **via("203.0.113.9")) as client:
            ack = await client.subscribe("events:*", since=140)  # from memory
            assert ack["recovered"] is True
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(141, 151))
        refusals = await server.metric("kektech_broadcaster_replay_stream_refusals_total")
        assert refusals == 1


async def test_resumes_from_the_stream_in_flight_at_once_share_the_server_wide_budget(
    start: Start, producer: EventProducer
) -> None:
    """Resumes that many addresses send at once, all reading Redis, read together no more
    than WS_REPLAY_STREAM_BUDGET entries (plus one resume that the refill lets through):
    each page is charged the most it may hold before it is read, not once it has been,
    when all would have passed."""
    await producer.publish(count=150)
    absent = "market:0x" + "00" * 20
    async with (
        start(ws_replay_limit=100, ws_history_size=0, ws_replay_stream_budget=250) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = [
            await stack.enter_async_context(ws_client(server.url, **via(f"198.51.100.{index}")))
            for index in range(1, 11)
        ]
        acks = await asyncio.gather(*(c.subscribe(absent, since=50) for c in clients))
    assert 3 <= sum(ack["recovered"] for ack in acks) <= 4


async def test_resumes_stalled_on_clients_that_read_nothing_hold_no_more_than_a_page(
    start: Start, producer: EventProducer
) -> None:
    """A resume is charged the server-wide budget page by page, before each read, not all
    it may read as it begins: one stalled on a client that reads nothing (closed only after
    30 s) holds the page it read, and others' resumes still get their history. Here two
    resumes of 1,000 entries stall after their first page of 500 under a budget of 1,500:
    charged 1,000 each, they would leave nothing for a third address's 5 entries."""
    await producer.publish(count=1000, pad=16384)
    async with start(
        ws_replay_limit=1000,
        ws_history_size=0,
        ws_send_buffer_bytes=65536,
        ws_replay_stream_budget=1500,
    ) as server:
        await server.wait_health(seq=1000)
        stalled: list[RawClient] = []
        try:
            for address in ("203.0.113.1", "203.0.113.2"):
                client = await RawClient.open(
                    server.settings.ws_port, rcvbuf=4096, headers={"X-Forwarded-For": address}
                )
                stalled.append(client)
                await client.read_frame()  # connected
                client.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":0}')
                await client.read_frame()  # the replay has begun, and waits for the client
            async with ws_client(server.url, **via("203.0.113.3")) as other:
                ack = await other.subscribe("events:*", since=995)
                assert [e["seq"] for e in ack["replayedEvents"]] == list(range(996, 1001))
                assert ack["recovered"] is True
        finally:
            for client in stalled:
                client.close()


async def test_asking_redis_for_the_stream_top_costs_the_server_wide_budget_one_entry(
    start: Start, producer: EventProducer
) -> None:
    """A since past this instance's position makes it ask Redis for the stream's top: one
    round trip, charged one entry of the server-wide budget (a page's worth, 500, let six
    addresses asking 80 times each spend all of the default budget): here six such
    resumes from three addresses leave a budget of 1,500 for a fourth address's resume."""
    await producer.publish(count=150)
    async with start(
        ws_replay_limit=1000, ws_history_size=0, ws_replay_stream_budget=1500
    ) as server:
        for index in range(1, 4):
            async with ws_client(server.url, **via(f"203.0.113.{index}")) as asking:
                for _ in range(2):
                    ack = await asking.subscribe("events:*", since=10_000)
                    assert ack["recovered"] is False  # a seq the stream never had
        async with ws_client(server.url, **via("203.0.113.9")) as other:
            ack = await other.subscribe("events:*", since=140)
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(141, 151))
            assert ack["recovered"] is True
        assert await server.metric("kektech_broadcaster_replay_stream_refusals_total") == 0


async def test_asking_redis_for_the_stream_top_is_refused_once_the_budget_is_spent(
    start: Start, producer: EventProducer
) -> None:
    """Asking Redis for the stream's top is still charged to the server-wide budget, one
    entry each: under a budget of 3 (refilling 0.05 a second), the fourth is refused."""
    await producer.publish(count=150)
    async with (
        start(ws_replay_limit=1000, ws_replay_stream_budget=3) as server,
        ws_client(server.url) as client,
    ):
        for _ in range(4):
            assert (await client.subscribe("events:*", since=10_000))["recovered"] is False
        assert await server.metric("kektech_broadcaster_replay_stream_refusals_total") == 1


async def test_resumes_from_beyond_the_position_are_charged_for_asking_redis(
    start: Start, producer: EventProducer
) -> None:
    """A `since` past this instance's position makes it ask Redis for the stream's top,
    which costs as much as reading a page of history: such resumes spend the address's
    history budget like any other, so repeating them cannot keep Redis busy for free."""
    await producer.publish(count=150)
    async with start(ws_replay_limit=1000) as server, ws_client(server.url) as client:
        for _ in range(8):  # four times the limit: 4,000 entries' worth, 500 each
            ack = await client.subscribe("events:*", since=10_000)
            assert ack["recovered"] is False  # a seq the stream never had
        ack = await client.subscribe("events:*", since=140)
        assert (ack["recovered"], ack["replayedEvents"]) == (False, [])
        ack = await client.subscribe("events:*", since=10_000)
        assert ack["recovered"] is False


async def test_resumes_beyond_the_history_cost_nothing(
    start: Start, producer: EventProducer
) -> None:
    """A client back after longer than WS_REPLAY_LIMIT resumes each of its channels: each is a
    miss that reads nothing, so none is refused however many channels it has."""
    await producer.publish(count=150)
    async with start(ws_replay_limit=100) as server, ws_client(server.url) as client:
        for index in range(20):
            ack = await client.subscribe(f"market:0x{index:040x}", since=10)
            assert ack["recovered"] is False


async def test_deliveries_count_replayed_and_held_events(
    start: Start, producer: EventProducer
) -> None:
    """deliveries_total counts every event frame written to a client: those a resume replays
    and the live ones held back while it replays (sent when it goes live), not only live
    fan-out. Here the replay stalls on a client that does not read while live events come."""
    async with start(ws_send_buffer_bytes=65536) as server:
        await producer.publish(count=200, pad=32768)
        await server.wait_health(seq=200)
        client = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            await client.read_frame()  # connected
            client.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":0}')
            # The replay has begun; it then waits for the client to read.
            opcode, payload = await client.read_frame()
            kinds = [orjson.loads(payload)["type"]]
            await producer.publish(count=3)  # held back meanwhile
            await server.wait_health(seq=203)
            async with asyncio.timeout(WITHIN):
                while kinds.count("event") < 203:
                    opcode, payload = await client.read_frame()
                    kinds.append(orjson.loads(payload)["type"])
            assert opcode == 0x1
            assert kinds == ["event"] * 200 + ["subscribed"] + ["event"] * 3
            assert await server.metric("kektech_broadcaster_deliveries_total") == 203
        finally:
            client.close()


async def test_a_resume_cut_short_by_its_connection_end_pays_only_what_it_read(
    start: Start, producer: EventProducer
) -> None:
    """A resume is charged its most before it reads and refunded the unread part after, also
    when its connection closes midway: the address then keeps the history it did not read.
    Here the first resume (1,000 entries' worth) stalls on a client that does not read,
    after reading the first page of 500, and its connection is closed."""
    await producer.publish(count=1000, pad=16384)
    absent = "market:0x" + "00" * 20
    async with start(ws_replay_limit=1000, ws_history_size=0, ws_send_buffer_bytes=65536) as server:
        await server.wait_health(seq=1000)
        stalled = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            await stalled.read_frame()  # connected
            stalled.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":0}')
            await stalled.read_frame()  # the replay has begun, and waits for the client
        finally:
            stalled.close()
        await server.wait_metric("kektech_broadcaster_connections", 0)
        # The budget is four times WS_REPLAY_LIMIT, 4,000: 3,500 left if the unread 500 came
        # back. Three resumes of 1,000 and one of 200 leave 300 (without the refund, -200,
        # which takes 12 s to refill to one entry): the next resume may still read.
        async with ws_client(server.url) as client:
            for since in (0, 0, 0, 800):
                assert (await client.subscribe(absent, since=since))["recovered"] is True
            ack = await client.subscribe("events:*", since=990)
            assert [e["seq"] for e in ack["replayedEvents"]] == list(range(991, 1001))
            assert ack["recovered"] is True
            # 290 left, and one more of 500 leaves -210: the 500 read before the close were
            # paid for (refunded too, 290 would be left now).
            assert (await client.subscribe(absent, since=500))["recovered"] is True
            ack = await client.subscribe("events:*", since=995)
            assert (ack["recovered"], ack["replayedEvents"]) == (False, [])


@contextlib.asynccontextmanager
async def publishing(
    producer: EventProducer, *, count: int = 1, pad: int = 0, every: float
) -> AsyncIterator[None]:
    """Publish `count` events every `every` seconds for the block. Stopped between two
    publishes, not cancelled: a publish cancelled midway could leave the test waiting on
    redis-py's connection for minutes."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            await producer.publish(count=count, pad=pad)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def _read_until(client: RawClient, done: Callable[[dict[str, Any]], bool]) -> list[Any]:
    """The client's messages up to the first that `done` accepts (included); fails on a close."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(WITHIN):
        while not messages or not done(messages[-1]):
            opcode, payload = await client.read_frame()
            assert opcode == 0x1, (opcode, payload)
            messages.append(orjson.loads(payload))
    return messages


async def _spill_during_replay(
    client: RawClient, server: Running, producer: EventProducer
) -> list[Any]:
    """Resume `events:*` from 0 over the 300 events published, and while the replay waits for
    the client to read, publish 40 events of about 2 KiB (more than a 64 KiB buffer holds
    back); returns the messages read so far (the replay's first)."""
    await client.read_frame()  # connected
    client.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":0}')
    messages = await _read_until(client, lambda m: True)  # the replay has begun
    await producer.publish(count=40, pad=2048)
    await server.wait_health(seq=340)
    return messages


@pytest.mark.parametrize("history_size", [5000, 0], ids=["memory", "stream"])
async def test_events_piling_up_during_a_long_replay_do_not_cut_a_client_reading_it(
    start: Start, producer: EventProducer, history_size: int
) -> None:
    """Live events held back during a replay beyond WS_SEND_BUFFER_BYTES are sent from the
    history after it, not a reason for 4008: a client reading a replay longer than the buffer
    divided by the live rate was cut every time it resumed, and never got its ack. Here 4.8 MB
    of history; 40 live events (about 80 KiB, more than the 64 KiB buffer) come while the
    replay waits for the client to read."""
    await producer.publish(count=300, pad=16384)
    async with start(ws_send_buffer_bytes=65536, ws_history_size=history_size) as server:
        await server.wait_health(seq=300)
        client = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            messages = await _spill_during_replay(client, server, producer)
            messages += await _read_until(client, lambda m: m["type"] == "subscribed")
            await producer.publish(count=2)
            messages += await _read_until(client, lambda m: m.get("seq") == 342)
            ack = messages[-3]  # the two live events follow it
            assert ack["type"] == "subscribed"
            assert ack["recovered"] is True
            assert ack["seq"] == 340
            assert ack["replayed"] == 340
            assert [m["seq"] for m in messages if m["type"] == "event"] == list(range(1, 343))
            assert await server.metric("kektech_broadcaster_slow_consumer_closes_total") == 0
        finally:
            client.close()


async def test_a_client_reading_its_replay_slower_than_events_come_is_closed_with_4008(
    start: Start, producer: EventProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending what came during a replay from the history goes on for CATCH_UP_WITHIN (here
    1 s) at most: a client that reads slower than events come would never be live, and is
    closed with 4008 before any ack, as a held-back backlog over the buffer was. Here it reads
    a frame every 10 ms (16 KiB each) while 200 a second come."""
    monkeypatch.setattr(replay, "CATCH_UP_WITHIN", 1.0)
    await producer.publish(count=300, pad=16384)
    async with start(ws_send_buffer_bytes=65536) as server:
        await server.wait_health(seq=300)
        client = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            await client.read_frame()  # connected
            client.send_frame(0x1, b'{"type":"subscribe","channel":"events:*","since":0}')
            kinds: list[str] = []
            async with publishing(producer, count=2, pad=16384, every=0.01):
                # Some 380 frames read 10 ms apart at least: 4.5 s on an idle machine.
                async with asyncio.timeout(30):
                    while True:
                        opcode, payload = await client.read_frame()
                        if opcode == 0x8:
                            break
                        kinds.append(orjson.loads(payload)["type"])
                        await asyncio.sleep(0.01)
            assert int.from_bytes(payload[:2], "big") == 4008
            assert set(kinds) == {"event"}
            assert len(kinds) > 300  # past the replay, into the rounds
        finally:
            client.close()


async def test_a_resume_from_ahead_of_this_instance_is_not_cut_for_what_it_waited_for(
    start: Start, producer: EventProducer, redis_server: Redis
) -> None:
    """A `since` this instance has not reached yet (the client came from a faster one) waits
    for it; the events that come meanwhile, all at or below `since`, are never sent to the
    client, so their piling up past the buffer is no reason for 4008. Here Redis is 200 ms
    away, and 100 events of 5 KiB (more than the 64 KiB buffer) come during the wait."""
    async with (
        TcpProxy(redis_server.port, delay=0.2) as proxy,
        start(redis_url=f"redis://127.0.0.1:{proxy.port}/0", ws_send_buffer_bytes=65536) as server,
        ws_client(server.url) as client,
    ):
        await producer.publish(count=100, pad=5120)
        ack = await client.subscribe("events:*", since=producer.seq)
        assert ack["recovered"] is True
        assert ack["replayedEvents"] == []
        await producer.publish()
        [event] = await client.events(1)
        assert event["seq"] == 101
        assert await server.metric("kektech_broadcaster_slow_consumer_closes_total") == 0


async def test_events_coming_while_a_catch_up_reads_the_stream_are_held(
    start: Start, producer: EventProducer, redis_server: Redis
) -> None:
    """A round sending from the stream (no history in memory) holds what comes while it reads:
    nothing between the round's end and the held events is lost. Here Redis is 20 ms away
    and events keep coming every 5 ms while the client reads its replay."""
    await producer.publish(count=300, pad=16384)
    async with (
        TcpProxy(redis_server.port, delay=0.02) as proxy,
        start(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            ws_history_size=0,
            ws_send_buffer_bytes=65536,
        ) as server,
    ):
        await server.wait_health(seq=300)
        client = await RawClient.open(server.settings.ws_port, rcvbuf=4096)
        try:
            messages = await _spill_during_replay(client, server, producer)
            async with publishing(producer, every=0.005):
                messages += await _read_until(client, lambda m: m["type"] == "subscribed")
            last = producer.seq
            messages += await _read_until(client, lambda m: m.get("seq") == last)
            assert [m["seq"] for m in messages if m["type"] == "event"] == list(range(1, last + 1))
        finally:
            client.close()
