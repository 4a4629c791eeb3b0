"""`run(settings)`: the broadcaster service, owning every resource and task.

Start-up: connect to Redis (lazily: a Redis that is down at boot only delays the first
event), listen for WebSocket clients, and follow the event stream from its newest entry.
Shutdown is cancellation (SIGINT from PM2, or SIGTERM): the stream stops being read, the
listener closes, clients are closed with 1012 so they reconnect and resume, and any client
that does not finish the closing handshake within a second is cut off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from broadcaster.errors import StreamUnavailable
from broadcaster.hub import Hub
from broadcaster.metrics import Metrics
from broadcaster.server import serve_clients
from broadcaster.stream import EventStream, open_stream
from shared.broadcaster_settings import BroadcasterSettings
from shared.readiness import notify_ready

__all__ = ["run"]

log = structlog.get_logger()

HEALTH_TIMEOUT = 1.0
# /healthz reads the stream's top at most this often, however many ask: it is served on the
# public port, and a flood of it must not crowd resumes out of the Redis connection pool.
HEALTH_FRESH_FOR = 1.0


def build_hub(settings: BroadcasterSettings, metrics: Metrics) -> Hub:
    return Hub(
        metrics=metrics,
        send_buffer_bytes=settings.ws_send_buffer_bytes,
        history_size=settings.ws_history_size,
        replay_limit=settings.ws_replay_limit,
        replay_stream_budget=settings.ws_replay_stream_budget,
        max_subscriptions=settings.ws_max_subscriptions,
        max_glob_patterns=settings.ws_max_glob_patterns,
        max_glob_patterns_per_ip=settings.ws_max_glob_patterns_per_ip,
    )


class StreamTop:
    """The stream's newest seq for /healthz (None: Redis did not answer), read once for all
    the requests that come while it is read, and reused for HEALTH_FRESH_FOR seconds."""

    def __init__(self, stream: EventStream, fresh_for: float = HEALTH_FRESH_FOR) -> None:
        self._stream = stream
        self._fresh_for = fresh_for
        self._value: int | None = None
        self._read_at: float | None = None
        self._reading: asyncio.Future[int | None] | None = None

    @property
    def reading(self) -> bool:
        """Whether the stream is being read (EventStream.reading)."""
        return self._stream.reading

    async def get(self) -> int | None:
        read_at = self._read_at
        if read_at is not None and time.monotonic() - read_at < self._fresh_for:
            return self._value
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        # Shielded: a request that goes away does not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    async def _read(self) -> int | None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                value: int | None = await self._stream.monitored_top()
        except (StreamUnavailable, TimeoutError):
            value = None
        finally:
            self._reading = None
        self._value, self._read_at = value, time.monotonic()
        return value


async def health(hub: Hub, stream_top: StreamTop) -> dict[str, Any]:
    """What /healthz reports: Redis reachable, the stream being read, how far behind it,
    event age, and whether relaying waits for the stream to be written again
    (`refillAwaited`)."""
    top = await stream_top.get()
    reading = stream_top.reading
    now = time.time()
    position = hub.position
    refill_awaited = hub.refill_awaited
    if top is not None and position is not None and not refill_awaited:
        top = max(top, position)  # what was relayed since the read is in the stream too
    return {
        "status": "ok" if top is not None and reading and not refill_awaited else "degraded",
        "redis": "up" if top is not None else "down",
        "reading": reading,
        "refillAwaited": refill_awaited,
        "seq": position,
        "streamSeq": top,
        "behind": max(0, top - position) if top is not None and position is not None else None,
        "lastEventAgeSeconds": _age(now, hub.last_block_time),
        "lastRelayAgeSeconds": _age(now, hub.last_relay_time),
        "connections": len(hub.clients),
        "subscriptions": hub.subscription_count,
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 3)


async def run(settings: BroadcasterSettings) -> None:
    """The broadcaster service: runs until cancelled or until a task fails."""
    metrics = Metrics()
    hub = build_hub(settings, metrics)
    async with open_stream(
        settings.redis_url.get_secret_value(),
        key=settings.redis_stream_key,
        redis_timeout=settings.broadcaster_redis_timeout,
    ) as stream:
        hub.source = stream

        stream_top = StreamTop(stream)
        await stream.boot(hub, history=settings.ws_history_size)

        async def status() -> dict[str, Any]:
            return await health(hub, stream_top)

        async with serve_clients(settings, hub=hub, metrics=metrics, status=status):
            log.info(
                "broadcaster started",
                host=settings.ws_host,
                port=settings.ws_port,
                path=settings.ws_path,
                stream=settings.redis_stream_key,
            )
            notify_ready("broadcaster", port=settings.ws_port)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(
                    stream.follow(hub, metrics, history=settings.ws_history_size),
                    name="follow-stream",
                )
