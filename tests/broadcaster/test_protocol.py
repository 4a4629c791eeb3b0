"""The client protocol, message by message, with every error path and close code."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import os
import struct
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from broadcaster import server as server_module
from tests.broadcaster.support import (
    MARKET,
    WITHIN,
    EventProducer,
    RawClient,
    Running,
    client_frame,
    ws_client,
)
from tests.support.handshake import handshake_request
from tests.support.waiting import eventually

Start = Callable[..., AbstractAsyncContextManager[Running]]


def via(ip: str) -> dict[str, Any]:
    """ws_client options for a client at ip, as the trusted local proxy forwards it."""
    return {"additional_headers": {"X-Forwarded-For": ip}}


async def test_greeting(server: Running) -> None:
    """A client is greeted with connected, its clientId, a millisecond timestamp and the seq."""
    async with ws_client(server.url) as client:
        hello = client.hello
    assert hello["type"] == "connected"
    assert isinstance(hello["clientId"], str)
    assert hello["clientId"]
    assert abs(hello["timestamp"] - time.time() * 1000) < 5000
    assert hello["seq"] == 0


async def test_subscribe_unsubscribe_and_ping(server: Running, producer: EventProducer) -> None:
    """subscribe/unsubscribe are acked with channel and timestamp; ping gets pong."""
    async with ws_client(server.url) as client:
        ack = await client.subscribe("events:*")
        assert ack["channel"] == "events:*"
        assert isinstance(ack["timestamp"], int)
        assert "recovered" not in ack
        await client.send({"type": "ping"})
        assert isinstance((await client.expect("pong"))["timestamp"], int)
        await producer.publish()
        assert (await client.events(1))[0]["seq"] == 1
        await client.send({"type": "unsubscribe", "channel": "events:*"})
        ack = await client.expect("unsubscribed")
        assert ack["channel"] == "events:*"
        assert isinstance(ack["timestamp"], int)
        await producer.publish()
        await client.send({"type": "ping"})
        await client.expect("pong")  # and no event before it
        # Unsubscribing what is not subscribed is acknowledged too.
        await client.send({"type": "unsubscribe", "channel": "events:never"})
        await client.expect("unsubscribed")


async def test_patterns_that_differ_only_in_repeated_stars_are_one_subscription(
    server: Running, producer: EventProducer
) -> None:
    """`events:**` is `events:*` (acked in that form): holding both and dropping one must not
    leave a subscription that no longer receives anything."""
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        ack = await client.subscribe("events:**")
        assert ack["channel"] == "events:*"
        await client.send({"type": "unsubscribe", "channel": "events:**"})
        assert (await client.expect("unsubscribed"))["channel"] == "events:*"
        await client.subscribe("market:0x31d2**")
        await producer.publish(market=MARKET)
        assert [e["seq"] for e in await client.events(1)] == [1]
        assert (await server.health())["subscriptions"] == 1


async def test_market_channel_is_normalized(server: Running) -> None:
    """A market subscription is acknowledged in lowercase, however it was written."""
    async with ws_client(server.url) as client:
        ack = await client.subscribe("market:" + MARKET.upper().replace("0X", "0x"))
    assert ack["channel"] == "market:" + MARKET


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{oops", "invalid_json"),
        ("[]", "invalid_message"),
        ('{"channel":"events:*"}', "invalid_message"),
        ('{"type":"hello"}', "unknown_type"),
        ('{"type":"subscribe","channel":"foo"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"events:BetPlaced"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"market:0xzz"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"events:' + "x" * 200 + '"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"events:*","since":-5}', "invalid_since"),
    ],
)
async def test_errors_are_answered_and_the_connection_stays(
    server: Running, message: str, code: str
) -> None:
    """Invalid JSON, unknown types, invalid or too-long channels get an error, not a close."""
    async with ws_client(server.url) as client:
        await client.send(message)
        error = await client.expect("error")
        assert error["code"] == code
        assert isinstance(error["message"], str)
        assert error["message"]
        await client.send({"type": "ping"})
        await client.expect("pong")


async def test_too_many_subscriptions(start: Start) -> None:
    """Past WS_MAX_SUBSCRIPTIONS a subscribe is refused; renewing one is still fine."""
    async with start(ws_max_subscriptions=2) as server, ws_client(server.url) as client:
        await client.subscribe("events:bet_placed")
        await client.subscribe("market:" + MARKET)
        await client.send({"type": "subscribe", "channel": "events:*"})
        error = await client.expect("error")
        assert error["code"] == "too_many_subscriptions"
        assert error["channel"] == "events:*"
        await client.subscribe("events:bet_placed")
        await client.send({"type": "unsubscribe", "channel": "events:bet_placed"})
        await client.expect("unsubscribed")
        await client.subscribe("events:*")


async def test_distinct_wildcard_patterns_are_capped(start: Start) -> None:
    """Globs other than a trailing * are limited server-wide; prefix patterns are not."""
    async with (
        start(ws_max_glob_patterns=1) as server,
        ws_client(server.url) as a,
        ws_client(server.url) as b,
    ):
        await a.subscribe("events:*_placed")
        await b.subscribe("events:*_placed")  # the same pattern costs nothing more
        await b.send({"type": "subscribe", "channel": "events:market_?reated"})
        assert (await b.expect("error"))["code"] == "too_many_patterns"
        await b.subscribe("market:0x31*")


async def test_one_client_address_cannot_take_every_wildcard_pattern(start: Start) -> None:
    """The connections of one client IP together hold at most WS_MAX_GLOB_PATTERNS_PER_IP
    (here 2) wildcard subscriptions other than a trailing *, so that one client cannot use up
    the server-wide cap for everyone; another address still gets its share, and a share
    comes back when a subscription or a connection ends."""
    one, other = via("203.0.113.5"), via("203.0.113.6")
    async with (
        start(ws_max_glob_patterns_per_ip=2) as server,
        ws_client(server.url, **one) as a,
        ws_client(server.url, **one) as b,
        ws_client(server.url, **other) as c,
    ):
        await a.subscribe("events:*_placed")
        await b.subscribe("events:market_?reated")
        for client in (a, b):
            await client.send({"type": "subscribe", "channel": "events:*_claimed"})
            error = await client.expect("error")
            assert (error["code"], error["channel"]) == ("too_many_patterns", "events:*_claimed")
        await b.subscribe("market:0x31*")  # a prefix pattern costs no share
        await c.subscribe("events:*_claimed")
        await a.send({"type": "unsubscribe", "channel": "events:*_placed"})
        await a.expect("unsubscribed")
        await b.subscribe("events:*_placed")
        await b.send({"type": "subscribe", "channel": "events:*_resolved"})
        assert (await b.expect("error"))["code"] == "too_many_patterns"
    async with start(ws_max_glob_patterns_per_ip=1) as server:
        async with ws_client(server.url, **one) as a:
            await a.subscribe("events:*_placed")
        async with ws_client(server.url, **one) as b:  # the closed connection's share is back
            await b.subscribe("events:*_placed")


async def test_a_few_addresses_cannot_take_the_whole_wildcard_pool(start: Start) -> None:
    """One client address may bring at most WS_MAX_GLOB_PATTERNS // 64 (here 4 of 256)
    wildcard patterns that no one holds into the server-wide pool: 16 addresses each
    subscribing to 16 distinct ones (their per-IP limit) would otherwise take all 256, and
    no other client could subscribe to a new pattern. Subscribing to a pattern already in
    the pool stays allowed, up to the per-IP limit."""
    async with start() as server, contextlib.AsyncExitStack() as stack:
        for index in range(16):
            # Two connections of the address, so that neither earns ten errors (1008).
            for half in range(2):
                client = await stack.enter_async_context(
                    ws_client(server.url, **via(f"203.0.113.{index + 1}"))
                )
                outcomes = []
                for number in range(8 * half, 8 * half + 8):
                    await client.send(
                        {"type": "subscribe", "channel": f"events:*_a{index}_{number}"}
                    )
                    reply = await client.recv()
                    outcomes.append(reply.get("code", reply["type"]))
                brought = 4 if half == 0 else 0
                assert outcomes == ["subscribed"] * brought + ["too_many_patterns"] * (8 - brought)
        newcomer = await stack.enter_async_context(ws_client(server.url, **via("203.0.113.99")))
        for number in range(4):
            await newcomer.subscribe(f"events:*_new{number}")
        await newcomer.send({"type": "subscribe", "channel": "events:*_new4"})
        assert (await newcomer.expect("error"))["code"] == "too_many_patterns"
        for index in range(12):  # in the pool already: only the per-IP limit of 16 counts
            await newcomer.subscribe(f"events:*_a{index}_0")
        await newcomer.send({"type": "subscribe", "channel": "events:*_a12_0"})
        assert (await newcomer.expect("error"))["code"] == "too_many_patterns"


async def test_a_wildcard_pattern_counts_against_the_address_that_brought_it(
    start: Start,
) -> None:
    """A pattern counts against the share of the address that brought it into the pool (here
    1 of 64) for as long as anyone holds it, that address or another: its share comes back
    once no one does."""
    async with (
        start(ws_max_glob_patterns=64) as server,
        ws_client(server.url, **via("203.0.113.5")) as a,
        ws_client(server.url, **via("203.0.113.6")) as b,
    ):
        await a.subscribe("events:*_placed")
        await b.subscribe("events:*_placed")
        await a.send({"type": "unsubscribe", "channel": "events:*_placed"})
        await a.expect("unsubscribed")
        await a.send({"type": "subscribe", "channel": "events:*_claimed"})
        error = await a.expect("error")
        assert (error["code"], error["channel"]) == ("too_many_patterns", "events:*_claimed")
        await b.send({"type": "unsubscribe", "channel": "events:*_placed"})
        await b.expect("unsubscribed")
        await a.subscribe("events:*_claimed")


async def test_repeated_invalid_messages_close_with_1008(server: Running) -> None:
    """After a burst of invalid messages the server closes with 1008 (policy violation)."""
    async with ws_client(server.url) as client:
        for _ in range(11):
            await client.send("not json")
        errors = [await client.expect("error") for _ in range(11)]
        assert {error["code"] for error in errors} == {"invalid_json"}
        assert await client.closed() == (1008, "too many invalid messages")


async def test_flooding_closes_with_1008(start: Start) -> None:
    """A client that sends faster than WS_RATE_LIMIT gets errors, then a 1008 close."""
    async with (
        start(ws_rate_limit=5, ws_max_subscriptions=5) as server,
        ws_client(server.url) as client,
    ):
        for _ in range(40):
            await client.send({"type": "ping"})
        code, reason = await client.closed()
    assert (code, reason) == (1008, "message rate limit exceeded")


async def test_new_wildcard_patterns_of_one_address_are_rate_limited(start: Start) -> None:
    """A wildcard pattern new to the server is compiled, which costs far more than a message:
    churning distinct ones (subscribe, unsubscribe, the next) gets rate_limited past a burst
    of 16 per client address, while another address is not affected."""
    async with (
        start(ws_rate_limit=1000) as server,
        ws_client(server.url, **via("203.0.113.7")) as a,
        ws_client(server.url, **via("203.0.113.8")) as c,
    ):
        outcomes = []
        for index in range(21):
            channel = f"events:*_x{index}"
            await a.send({"type": "subscribe", "channel": channel})
            reply = await a.recv()
            outcomes.append(reply.get("code", reply["type"]))
            if reply["type"] == "subscribed":
                await a.send({"type": "unsubscribe", "channel": channel})
                await a.expect("unsubscribed")
        assert outcomes[:16] == ["subscribed"] * 16
        assert "rate_limited" in outcomes[16:]
        await c.subscribe("events:*_x20")


async def test_a_flood_of_ping_frames_closes_with_1008(start: Start) -> None:
    """WebSocket ping frames, which the protocol answers by itself, count against
    WS_RATE_LIMIT like messages: a flood of them ends with 1008, instead of costing the
    server a pong each for as long as the client keeps sending."""
    async with (
        start(ws_rate_limit=5, ws_max_subscriptions=5) as server,
        ws_client(server.url) as client,
    ):
        for index in range(40):
            await client.ws.ping(b"%d" % index)
        code, reason = await client.closed()
    assert (code, reason) == (1008, "ping rate limit exceeded")


async def test_a_flood_of_unsolicited_pong_frames_closes_with_1008(start: Start) -> None:
    """The answers to the server's heartbeat cost nothing, however many; any other pong
    frame costs a message like a ping frame, so a flood of them ends with 1008 instead of
    being parsed for as long as the client keeps sending. The rate (0.05 a second, the least
    allowed: a burst of 1, then 10 errors) would not let 11 charged frames through."""
    async with start(
        ws_rate_limit=0.05, ws_max_subscriptions=1, ws_heartbeat_interval=0.02
    ) as server:
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            answered = 0
            async with asyncio.timeout(WITHIN):
                while answered < 20:
                    opcode, payload = await client.read_frame()
                    assert opcode == 0x9, (opcode, payload)
                    client.send_frame(0xA, payload)
                    answered += 1
            for _ in range(12):
                client.send_frame(0xA, b"unsolicited")
            code, reason, _ = await client.until_close()
        finally:
            client.close()
    assert (code, reason) == (1008, "pong rate limit exceeded")


async def test_a_flood_of_message_fragments_closes_with_1008(start: Start) -> None:
    """Each fragment of a message but its last costs a message too (the message itself
    costs one when complete): a client cannot send up to 64 times as many frames as the
    rate allows by splitting each message into fragments. With a burst of 10 and 10 errors,
    the first message's 32 frames are already too many."""
    async with start(ws_rate_limit=5, ws_max_subscriptions=5) as server:
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            for _ in range(40):
                client.send_frame(0x1, b'{"type":', fin=False)
                for _ in range(30):
                    client.send_frame(0x0, b"", fin=False)
                client.send_frame(0x0, b'"ping"}')
            code, reason, answers = await client.until_close()
        finally:
            client.close()
    assert (code, reason) == (1008, "fragment rate limit exceeded")
    assert answers == []


async def test_pings_within_the_rate_are_answered(start: Start) -> None:
    """A client's own heartbeat pings, at the message rate or below, get their pongs and
    leave the connection open."""
    async with (
        start(ws_rate_limit=5, ws_max_subscriptions=5) as server,
        ws_client(server.url) as client,
    ):
        for index in range(3):
            pong = await client.ws.ping(b"%d" % index)
            async with asyncio.timeout(WITHIN):
                await pong
        await client.send({"type": "ping"})
        assert (await client.expect("pong"))["type"] == "pong"


async def test_flood_answers_pongs_then_rate_limited_errors(start: Start) -> None:
    """Within the burst every ping is answered; past it, rate_limited errors. The burst is
    10 (WS_MAX_SUBSCRIPTIONS, above twice the rate); at 0.05 messages a second, the least
    allowed, no token comes back unless the test stalls for 20 s (at 5 a second, a 200 ms
    stall gave one back)."""
    async with (
        start(ws_rate_limit=0.05, ws_max_subscriptions=10) as server,
        ws_client(server.url) as client,
    ):
        for _ in range(12):
            await client.send({"type": "ping"})
        replies = [await client.recv() for _ in range(12)]
    assert [r["type"] for r in replies[:10]] == ["pong"] * 10
    assert [r.get("code") for r in replies[10:]] == ["rate_limited"] * 2


async def test_binary_frame_closes_with_1003(server: Running) -> None:
    """Binary frames are not part of the protocol: close 1003 (unsupported data)."""
    async with ws_client(server.url) as client:
        await client.send(b'{"type":"ping"}')
        assert (await client.closed())[0] == 1003


async def test_oversized_frame_closes_with_1009(start: Start) -> None:
    """A message over WS_MAX_MESSAGE_BYTES closes the connection with 1009 (too big)."""
    async with start(ws_max_message_bytes=1024) as server, ws_client(server.url) as client:
        await client.send('{"type":"ping","pad":"' + "x" * 2000 + '"}')
        assert (await client.closed())[0] == 1009


async def test_a_message_in_too_many_frames_closes_with_1009(server: Running) -> None:
    """Empty continuation frames add nothing to a message's size: one still unfinished after
    64 frames is refused with 1009, instead of growing the server's memory for ever."""
    client = await RawClient.open(server.settings.ws_port)
    try:
        client.send_frame(0x1, b'{"type":', fin=False)
        for _ in range(200):
            client.send_frame(0x0, b"", fin=False)
        code, reason, _ = await client.until_close()
    finally:
        client.close()
    assert code == 1009
    assert "frames" in reason


async def test_invalid_utf8_closes_with_1007(server: Running) -> None:
    """A text frame that is not UTF-8 closes the connection with 1007 (invalid data)."""
    raw = await RawClient.open(server.settings.ws_port)
    try:
        await raw.read_frame()  # connected
        raw.send_frame(0x1, b'{"type":"\xff"}')
        code, _, _ = await raw.until_close()
    finally:
        raw.close()
    assert code == 1007


# What a client sends, the settings, and the code the server closes it with.
CLOSES: dict[str, tuple[bytes, dict[str, float], int]] = {
    "missed ping": (b"", {"ws_heartbeat_interval": 0.2, "ws_heartbeat_timeout": 0.2}, 1011),
    "oversized": (client_frame(0x1, b"x" * 2000), {"ws_max_message_bytes": 1024}, 1009),
    "64 fragments": (
        client_frame(0x1, b"{", fin=False) + client_frame(0x0, b"", fin=False) * 70,
        {},
        1009,
    ),
    "invalid UTF-8": (client_frame(0x1, b'{"type":"\xff"}'), {}, 1007),
    "protocol error": (client_frame(0x0, b"continues nothing"), {}, 1002),
    "binary": (client_frame(0x2, b"x"), {}, 1003),
    "invalid messages": (client_frame(0x1, b"not json") * 11, {}, 1008),
}


@pytest.mark.parametrize("case", CLOSES)
async def test_every_close_the_server_makes_is_counted_once_by_its_code(
    start: Start, case: str
) -> None:
    """server_closes_total{code} counts each connection the server closed, whoever decided
    it: the session (1003, 1008), the connection (a missed ping, too many fragments,
    invalid UTF-8) or websockets itself (a protocol error, an oversized frame)."""
    data, settings, expected = CLOSES[case]
    async with start(**settings) as server:
        client = await RawClient.open(server.settings.ws_port)
        try:
            await client.read_frame()  # connected
            client.writer.write(data)
            code, _, _ = await client.until_close()
        finally:
            client.close()
        label = f'kektech_broadcaster_server_closes_total{{code="{expected}"}}'
        counted = (await server.metric(label), await server.metric(label.partition("{")[0]))
    assert code == expected
    assert counted == (1, 1)


async def test_a_message_sent_in_fragments_is_answered_whole(server: Running) -> None:
    """A text message split over a frame and two continuations is one message (RFC 6455 5.4);
    a ping frame between the fragments is answered in the middle."""
    raw = await RawClient.open(server.settings.ws_port)
    try:
        await raw.read_frame()  # connected
        raw.send_frame(0x1, b'{"type":"subscribe",', fin=False)
        raw.send_frame(0x9, b"beat")  # a control frame may come between fragments
        raw.send_frame(0x0, b'"channel":"events:bet', fin=False)
        raw.send_frame(0x0, b'_placed"}')
        async with asyncio.timeout(WITHIN):
            assert await raw.read_frame() == (0xA, b"beat")
            opcode, payload = await raw.read_frame()
    finally:
        raw.close()
    assert opcode == 0x1
    ack = orjson.loads(payload)
    assert (ack["type"], ack["channel"]) == ("subscribed", "events:bet_placed")


async def test_nothing_follows_the_close_frame(server: Running, producer: EventProducer) -> None:
    """Once the server has sent its close frame, no event frame follows it, although events
    keep coming while it waits for the client's answer (which this client never sends)."""
    raw = await RawClient.open(server.settings.ws_port)
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        # Stopped, not cancelled: a Redis command cancelled midway leaks its connection.
        while not stop.is_set():
            await producer.publish()
            await asyncio.sleep(0.005)

    publishing = asyncio.create_task(keep_publishing())
    try:
        await raw.read_frame()  # connected
        raw.send_frame(0x1, b'{"type":"subscribe","channel":"events:*"}')
        while True:  # the ack, then events as they come
            _, payload = await raw.read_frame()
            if orjson.loads(payload)["type"] == "event":
                break
        raw.send_frame(0x2, b"\x00")  # binary: the server closes with 1003
        code, _, _ = await raw.until_close()
        async with asyncio.timeout(WITHIN):  # the server gives up on the answer after 2 s
            after_close = await raw.reader.read()
    finally:
        stop.set()
        await publishing
        raw.close()
    assert code == 1003
    assert after_close == b""


async def test_other_clients_are_unaffected_by_a_misbehaving_one(
    server: Running, producer: EventProducer
) -> None:
    """While one client is closed for abuse, another keeps receiving events."""
    async with ws_client(server.url) as good, ws_client(server.url) as bad:
        await good.subscribe("events:*")
        await bad.send(b"\x00\x01")
        assert (await bad.closed())[0] == 1003
        await producer.publish()
        assert len(await good.events(1)) == 1


async def test_closing_handshake_started_by_the_client(server: Running) -> None:
    """A client's close frame is echoed at once and the server ends the TCP connection; the
    server forgets the client."""
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        async with asyncio.timeout(2):  # well under the client's own 10 s close timeout
            await client.ws.close(4000, "bye")
        echoed = client.ws.protocol.close_rcvd
    assert echoed is not None
    assert (echoed.code, echoed.reason) == (4000, "bye")
    health = await server.wait_health(connections=0)
    assert health["subscriptions"] == 0
    assert await server.metric("kektech_broadcaster_server_closes_total") == 0  # not ours


async def test_messages_read_with_the_clients_close_frame_are_not_answered(
    server: Running,
) -> None:
    """Messages that come with the client's close frame (here a ping in the same write) are
    not answered: the close is echoed at once (RFC 6455 5.5.1: "as soon as practical"), as
    websockets' own server does, and a browser drops whatever arrives after its close()."""
    raw = await RawClient.open(server.settings.ws_port)
    try:
        await raw.read_frame()  # connected
        ping = client_frame(0x1, b'{"type":"ping"}')
        raw.writer.write(ping + client_frame(0x8, struct.pack("!H", 1000) + b"bye"))
        code, reason, texts = await raw.until_close()
    finally:
        raw.close()
    assert (code, reason, texts) == (1000, "bye", [])


async def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """Send a raw HTTP request; return the status and headers of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(WITHIN):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    status_line, *lines = head.decode().strip().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), fields


async def test_handshake_answer_and_refusals(start: Start) -> None:
    """A valid handshake gets 101 with the RFC 6455 accept key, a current Date and the Server
    name; invalid ones get the matching HTTP refusal, and none of them keeps a per-IP slot."""
    key = base64.b64encode(os.urandom(16)).decode()

    def handshake(key: str, method: str = "GET", **headers: str) -> bytes:
        return handshake_request("127.0.0.1", key=key, method=method, headers=headers)

    async with start(ws_max_connections_per_ip=1) as server:
        port = server.settings.ws_port
        assert (await http_exchange(port, handshake(key, Upgrade="")))[0] == 426
        old_version = handshake(key, **{"Sec-WebSocket-Version": "8"})
        assert (await http_exchange(port, old_version))[0] == 400
        assert (await http_exchange(port, handshake("short")))[0] == 400
        assert (await http_exchange(port, handshake(key, method="POST")))[0] == 405
        status, fields = await http_exchange(port, handshake(key))
        assert status == 101
        guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
        digest = hashlib.sha1((key + guid).encode(), usedforsecurity=False).digest()
        assert fields["Sec-WebSocket-Accept"] == base64.b64encode(digest).decode()
        assert fields["Server"] == "kektech-broadcaster"
        date = email.utils.parsedate_to_datetime(fields["Date"]).timestamp()
        assert abs(date - time.time()) < 5
        # The refused attempts and the closed socket above left the one slot free.
        await server.wait_health(connections=0)
        async with ws_client(server.url) as client:
            assert client.hello["type"] == "connected"


async def test_requests_it_cannot_take_get_a_400_not_a_dropped_connection(
    start: Start,
) -> None:
    """A request with a body, a byte that is not ASCII in its target, or two Origin or
    X-Real-IP fields gets 400, never a connection ended without an answer: behind Nginx,
    three of those within 10 s marked every instance down for everyone (502s)."""
    key = base64.b64encode(os.urandom(16)).decode()
    good = handshake_request("127.0.0.1", key=key).decode()
    with_body = good.replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello")
    not_ascii = good.encode().replace(b"GET /ws ", b"GET /ws?\xc3\xa9 ")
    two_origins = good.replace(
        "\r\n\r\n", "\r\nOrigin: https://a.example\r\nOrigin: https://b.example\r\n\r\n"
    )
    two_ips = good.replace("\r\n\r\n", "\r\nX-Real-IP: 10.0.0.1\r\nX-Real-IP: 10.0.0.2\r\n\r\n")
    health_with_body = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    async with start(ws_max_connections_per_ip=1) as server:
        port = server.settings.ws_port
        for request in (with_body.encode(), not_ascii, two_origins.encode(), two_ips.encode()):
            assert (await http_exchange(port, request))[0] == 400, request
        assert (await http_exchange(port, health_with_body))[0] == 400
        await server.wait_health(connections=0)
        async with ws_client(server.url) as client:  # and no per-IP slot was kept
            assert client.hello["type"] == "connected"


async def test_wrong_path_is_404(server: Running) -> None:
    """Only WS_PATH upgrades; other paths are 404."""
    with pytest.raises(InvalidStatus) as caught:
        async with ws_client(f"ws://127.0.0.1:{server.settings.ws_port}/other"):
            pass
    assert caught.value.response.status_code == 404


async def test_http_answer_reaches_a_client_that_closed_its_sending_side(
    server: Running, producer: EventProducer
) -> None:
    """A request followed by the end of the client's stream (`nc -N`, some probes) still gets
    its answer, on both ports, before the server ends the connection."""
    await producer.publish()
    for port in (server.settings.ws_port, server.settings.broadcaster_http_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            writer.write_eof()
            async with asyncio.timeout(WITHIN):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"redis":"up"' in answer


async def exchange_all(port: int, data: bytes) -> bytes:
    """Send raw bytes in one write; return everything the server sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(WITHIN):
            return await reader.read()
    finally:
        writer.close()


async def test_bytes_after_an_http_request_in_its_segment_leave_its_answer_alone(
    server: Running, producer: EventProducer
) -> None:
    """A request followed in the same segment by more bytes (a pipelined request, a stray
    CRLF) gets its answer, once, on both ports: the rest is not read as WebSocket frames."""
    await producer.publish()
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for port in (server.settings.ws_port, server.settings.broadcaster_http_port):
        for after in (request, b"\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
            answer = await exchange_all(port, request + after)
            assert answer.startswith(b"HTTP/1.1 200"), (port, after, answer[:200])
            assert answer.count(b"HTTP/1.1 ") == 1
            assert b'"redis":"up"' in answer


async def test_frames_in_the_segment_of_the_upgrade_request_follow_the_101(
    server: Running,
) -> None:
    """Frames a client sends right behind its upgrade request, in the same segment, are
    handled after the handshake is answered: the 101 comes first, then the greeting, then
    the pong to a ping and the echo of a close."""
    ping = client_frame(0x9, b"PP")
    close = client_frame(0x8, struct.pack("!H", 1000))
    answer = await exchange_all(
        server.settings.ws_port, handshake_request("127.0.0.1") + ping + close
    )
    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), answer[:200]
    opcodes = []
    while frames:
        length = frames[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", frames[2:4])[0], 4
        opcodes.append((frames[0] & 0x0F, frames[offset : offset + length]))
        frames = frames[offset + length :]
    assert [opcode for opcode, _ in opcodes] == [0x1, 0xA, 0x8]
    assert orjson.loads(opcodes[0][1])["type"] == "connected"
    assert opcodes[1][1] == b"PP"
    assert opcodes[2][1][:2] == struct.pack("!H", 1000)


async def test_a_request_with_oversized_headers_gets_one_answer(server: Running) -> None:
    """A request line or header field too long for websockets gets its answer (414, 431),
    alone: not a 400 of ours ahead of it."""
    long_target = b"GET /ws?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    long_field = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"
    for request, status in ((long_target, b"414"), (long_field, b"431")):
        answer = await exchange_all(server.settings.ws_port, request)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 1


async def test_health_and_metrics_answer_get_and_head_only(server: Running) -> None:
    """HEAD gets GET's status and headers without a body (HTTP forbids one); other methods
    get 405 with the methods allowed."""
    port = server.settings.ws_port
    for path in ("/healthz", "/metrics"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            async with asyncio.timeout(WITHIN):
                answer = await reader.read()  # the server closes after its answer
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:200]
        assert int(dict(_fields(head))["Content-Length"]) > 0
        assert body == b"", path
        status, fields = await http_exchange(
            port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert (status, fields["Allow"]) == (405, "GET, HEAD")


def _fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(name, value) for name, _, value in (line.partition(": ") for line in lines)]


async def test_origin_allowlist(start: Start) -> None:
    """With WS_ALLOWED_ORIGINS set, other browser origins get 403; listed ones connect."""
    async with start(ws_allowed_origins="https://kektech.xyz") as server:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_client(server.url, origin="https://evil.example"):
                pass
        assert caught.value.response.status_code == 403
        async with ws_client(server.url, origin="https://kektech.xyz") as client:
            assert client.hello["type"] == "connected"
        async with ws_client(server.url) as client:  # no Origin: not a browser
            assert client.hello["type"] == "connected"


async def test_an_allowed_origin_written_with_its_default_port_matches(start: Start) -> None:
    """Browsers send an Origin without its scheme's default port: https://kektech.xyz:443 in
    WS_ALLOWED_ORIGINS admits them."""
    async with (
        start(ws_allowed_origins="https://KekTech.xyz:443") as server,
        ws_client(server.url, origin="https://kektech.xyz") as client,
    ):
        assert client.hello["type"] == "connected"


async def test_connections_per_ip(start: Start) -> None:
    """Per real client IP (X-Forwarded-For from the trusted local proxy) the limit holds."""
    async with start(ws_max_connections_per_ip=2) as server:
        async with (
            ws_client(server.url, **via("203.0.113.7")),
            ws_client(server.url, **via("203.0.113.7")),
        ):
            with pytest.raises(InvalidStatus) as caught:
                async with ws_client(server.url, **via("203.0.113.7")):
                    pass
            assert caught.value.response.status_code == 429
            async with ws_client(server.url, **via("198.51.100.1")) as other:
                assert other.hello["type"] == "connected"
        # The slots are free again once those connections are gone.
        async with ws_client(server.url, **via("203.0.113.7")) as again:
            assert again.hello["type"] == "connected"


async def test_connections_past_the_server_limit_get_503(start: Start) -> None:
    """Past WS_MAX_CONNECTIONS (whoever holds them) a connection is answered 503 at once; a
    slot is free again when a connection ends, and the metrics port still answers."""
    async with start(ws_max_connections=2) as server:
        async with ws_client(server.url, **via("203.0.113.7")), ws_client(server.url):
            with pytest.raises(InvalidStatus) as caught:
                async with ws_client(server.url, **via("198.51.100.1")):
                    pass
            assert caught.value.response.status_code == 503
            assert caught.value.response.body == b"server full\n"
            assert await server.metric("kektech_broadcaster_rejected_total") == 1
        async with ws_client(server.url, **via("198.51.100.1")) as again:
            assert again.hello["type"] == "connected"


async def test_a_full_server_answers_503_to_the_request_not_before_it(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full server answers once the request's head has come, unparsed. Answered at the
    accept, nginx could read the 503 before it had sent its request (under load, about one
    handshake in 600); it then tried the next instance without clearing what it had read,
    parsed the 503's body as that instance's answer, and gave the client 502."""
    monkeypatch.setattr(server_module, "REFUSAL_WAIT", 60.0)  # no answer for want of a head
    async with start(ws_max_connections=1) as server, ws_client(server.url):
        request = handshake_request("127.0.0.1")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.settings.ws_port)
        try:
            with pytest.raises(TimeoutError):  # nothing comes before the request
                async with asyncio.timeout(0.3):
                    await reader.read(1)
            writer.write(request[:20])  # half a head: still nothing
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await reader.read(1)
            writer.write(request[20:])
            async with asyncio.timeout(WITHIN):
                answer = await reader.read()  # and then the end of the connection
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert answer.endswith(b"\r\n\r\nserver full\n")
        assert await server.metric("kektech_broadcaster_rejected_total") == 1


async def test_a_full_server_answers_a_silent_connection_and_ends_it(start: Start) -> None:
    """A connection that sends nothing is not kept: answered and ended after REFUSAL_WAIT,
    or WS_HANDSHAKE_TIMEOUT when that is shorter (here 0.5 s)."""
    async with start(ws_max_connections=1, ws_handshake_timeout=0.5) as server:
        async with ws_client(server.url):
            silent = await exchange_all(server.settings.ws_port, b"")
        assert silent.startswith(b"HTTP/1.1 503"), silent[:200]


async def test_connections_waiting_to_be_refused_are_bounded(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused connections that wait for their request hold descriptors the server keeps
    free for Redis and the ops port: past REFUSALS_WAITING of them, a connection is closed at
    the accept, unanswered (an answer then could come before nginx sent its request); those
    waiting are answered when their request comes."""
    monkeypatch.setattr(server_module, "REFUSAL_WAIT", 60.0)
    bound = server_module.REFUSALS_WAITING
    async with start(ws_max_connections=1) as server, ws_client(server.url):
        port = server.settings.ws_port
        waiting = [await asyncio.open_connection("127.0.0.1", port) for _ in range(bound)]
        try:

            async def all_refused() -> bool:
                return await server.metric("kektech_broadcaster_rejected_total") == bound

            await eventually(all_refused, within=WITHIN, what="the silent connections accepted")
            # One more, its request sent at once: closed, unanswered, and counted.
            try:
                answer = await exchange_all(port, handshake_request("127.0.0.1"))
            except ConnectionResetError:  # the request came after the end: reset
                answer = b""
            assert answer == b""
            assert await server.metric("kektech_broadcaster_rejected_total") == bound + 1
            assert (await server.health())["status"] == "ok"
            for reader, writer in waiting:
                writer.write(handshake_request("127.0.0.1"))
                async with asyncio.timeout(WITHIN):
                    assert (await reader.read()).startswith(b"HTTP/1.1 503")
        finally:
            for _, writer in waiting:
                writer.close()


async def test_forwarded_for_is_ignored_from_untrusted_peers(start: Start) -> None:
    """With no trusted proxy, X-Forwarded-For cannot dodge the per-IP limit."""
    async with (
        start(ws_max_connections_per_ip=1, ws_trusted_proxies="") as server,
        ws_client(server.url),
    ):
        with pytest.raises(InvalidStatus) as caught:
            async with ws_client(server.url, **via("203.0.113.8")):
                pass
    assert caught.value.response.status_code == 429


async def test_health_and_metrics_on_both_ports(server: Running, producer: EventProducer) -> None:
    """/healthz (JSON) and /metrics (Prometheus) answer on the ops port and the WebSocket port."""
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        await producer.publish()
        await client.events(1)
        for base in (server.http, server.public_http):
            status, body = await server.get("/healthz", base)
            assert status == 200
            health = orjson.loads(body)
            assert health["redis"] == "up"
            assert health["seq"] == 1
            assert health["streamSeq"] == 1
            assert health["behind"] == 0
            assert health["connections"] == 1
            assert health["subscriptions"] == 1
            assert health["lastEventAgeSeconds"] is not None
            status, body = await server.get("/metrics", base)
            assert status == 200
            text = body.decode()
            for name in (
                "kektech_broadcaster_connections 1.0",
                "kektech_broadcaster_subscriptions 1.0",
                "kektech_broadcaster_last_seq 1.0",
                "kektech_broadcaster_deliveries_total 1.0",
                "kektech_broadcaster_event_lag_seconds_bucket",
                "kektech_broadcaster_replay_events_bucket",
                "kektech_broadcaster_slow_consumer_closes_total",
            ):
                assert name in text
        status, _ = await server.get("/nothing")
        assert status == 404


async def test_the_lag_histogram_counts_each_event_of_a_read(
    server: Running, producer: EventProducer
) -> None:
    """Events read from the stream together (a block, a backlog drained) are each observed in
    event_lag_seconds, as its help says: one observation per read under-weighted exactly the
    drains where lag is high."""

    def lag_count(text: str) -> float:
        name = "kektech_broadcaster_event_lag_seconds_count "
        return next(
            float(line.removeprefix(name)) for line in text.splitlines() if line.startswith(name)
        )

    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        _, body = await server.get("/metrics")
        before = lag_count(body.decode())
        await producer.publish(count=5)  # one MULTI/EXEC: one read
        await client.events(5)
        _, body = await server.get("/metrics")
    assert lag_count(body.decode()) == before + 5


async def test_redis_up_is_said_once_the_stream_is_found(server: Running) -> None:
    """Once /healthz says the stream is followed, /metrics says Redis is up too, with nothing
    published: not only when the first blocking read returns (half BROADCASTER_REDIS_TIMEOUT
    later), which left the two disagreeing at every start and after every outage."""
    status, body = await server.get("/metrics")
    assert status == 200
    assert "kektech_broadcaster_redis_up 1.0" in body.decode().splitlines()


async def test_a_flood_of_health_checks_reads_redis_once_a_second(
    server: Running, producer: EventProducer, redis_client: aioredis.Redis
) -> None:
    """/healthz is public (the WebSocket port): 200 at once cost a handful of Redis reads,
    not 200, so they cannot crowd resumes out of the connection pool; all get an answer."""
    await producer.publish()

    async def xinfo_calls() -> int:
        stats = await redis_client.info("commandstats")
        return int(
            stats.get("cmdstat_xinfo|stream", stats.get("cmdstat_xinfo", {})).get("calls", 0)
        )

    before = await xinfo_calls()
    answers = await asyncio.gather(
        *(server.get("/healthz", server.public_http) for _ in range(200))
    )
    calls = await xinfo_calls() - before
    assert all(status == 200 and b'"redis":"up"' in body for status, body in answers)
    assert calls <= 3, calls
