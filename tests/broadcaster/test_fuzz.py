"""Property-based fuzzing of what clients send: the server never crashes or misbehaves."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from tests.broadcaster.support import MARKET, EventProducer, Running, ws_client

# Close codes a client may legitimately earn by what it sends (docs/broadcaster.md).
EARNED = {1003, 1007, 1008, 1009}

channels = st.one_of(
    st.sampled_from(["events:*", "*", "market:" + MARKET, "market:0x3*", "events:bet_?laced"]),
    st.text(max_size=140),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
)
since = st.one_of(st.none(), st.integers(min_value=-5, max_value=2**70), st.text(max_size=5))
json_messages = st.fixed_dictionaries(
    {
        "type": st.one_of(
            st.sampled_from(["subscribe", "unsubscribe", "ping"]), st.text(max_size=12)
        )
    },
    optional={"channel": channels, "since": since, "extra": st.text(max_size=20)},
).map(json.dumps)  # json: integers past 64 bits too
# A str is sent as a text frame, bytes as a binary frame.
frames: st.SearchStrategy[str | bytes] = st.one_of(
    json_messages,
    st.text(max_size=300),
    st.binary(max_size=64),
    st.integers(min_value=16_000, max_value=20_000).map(lambda size: "x" * size),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(frames, min_size=1, max_size=6))
async def test_fuzzed_client_input_never_breaks_the_server(
    server: Running, producer: EventProducer, batch: list[str | bytes]
) -> None:
    """Whatever a client sends, it gets answers or a close frame with a documented code (not
    a dropped connection); the same server then serves a normal client."""
    closing: tuple[int, ...] = ()
    async with ws_client(server.url) as client:
        try:
            for frame in batch:
                await client.ws.send(frame)
            await client.send({"type": "ping"})
            while (await client.recv())["type"] != "pong":
                pass
        except ConnectionClosed as closed:
            closing = (closed.rcvd.code,) if closed.rcvd is not None else (-1,)  # no frame
    assert set(closing) <= EARNED
    async with ws_client(server.url) as client:
        await client.subscribe("events:*")
        published = await producer.publish()
        assert [e["seq"] for e in await client.events(1)] == [published[0].seq]
