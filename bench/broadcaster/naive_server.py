"""`python -m bench.broadcaster.naive_server`: the baseline the broadcaster is measured against.

What one writes first with websockets: the same stream-following loop, but each event is
encoded once per event with the stdlib json module, routed by testing every connection's
subscriptions against its channels, and sent with websockets.broadcast() — the library's
recommended fan-out, with no backpressure, no de-duplication and no resume. For the
benchmark only; settings come from the same environment variables as the real service.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import cast

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve

from shared.broadcaster_settings import BroadcasterSettings
from shared.channels import pattern_matches, validate_channel
from shared.envelope import EventEnvelope
from shared.errors import ChannelError, EnvelopeError
from shared.settings_loading import settings_or_exit


def now_ms() -> int:
    return int(time.time() * 1000)


def dumps(body: object) -> str:
    return json.dumps(body, separators=(",", ":"))


async def run(settings: BroadcasterSettings) -> None:
    subscriptions: dict[ServerConnection, set[str]] = {}

    async def handler(ws: ServerConnection) -> None:
        subscriptions[ws] = set()
        await ws.send(dumps({"type": "connected", "clientId": str(ws.id), "timestamp": now_ms()}))
        try:
            async for raw in ws:
                try:
                    message = json.loads(raw)
                    if message.get("type") == "ping":
                        await ws.send(dumps({"type": "pong", "timestamp": now_ms()}))
                    elif message.get("type") == "subscribe":
                        channel = validate_channel(message.get("channel"))
                        subscriptions[ws].add(channel)
                        await ws.send(
                            dumps({"type": "subscribed", "channel": channel, "timestamp": now_ms()})
                        )
                except (ValueError, ChannelError, AttributeError) as exc:
                    await ws.send(dumps({"type": "error", "message": str(exc)}))
        finally:
            del subscriptions[ws]

    # No socket timeout: XREAD BLOCK would otherwise time out while the loop is busy.
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=None)
    key = settings.redis_stream_key
    last = b"$"
    async with serve(
        handler,
        settings.ws_host,
        settings.ws_port,
        max_size=settings.ws_max_message_bytes,
        ping_interval=settings.ws_heartbeat_interval,
        backlog=16384,
    ):
        while True:
            # redis-py's annotation covers every reply shape; without decoding it is this one.
            reply = cast(
                list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                await redis.xread({key: last}, block=5000, count=1000),
            )
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        envelope = EventEnvelope.from_json_bytes(fields[b"event"])
                    except EnvelopeError:
                        continue
                    channels = fields[b"channels"].decode().split()
                    targets = [
                        ws
                        for ws, subs in subscriptions.items()
                        if any(pattern_matches(sub, ch) for sub in subs for ch in channels)
                    ]
                    message = dumps(
                        {
                            "type": "event",
                            "channel": channels[0],
                            "data": envelope.model_dump(),
                            "timestamp": now_ms(),
                        }
                    )
                    broadcast(targets, message)


def main() -> int:
    settings = settings_or_exit(BroadcasterSettings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
