"""Drain the Postgres outbox to Redis, in seq order, at least once (docs/protocol.md).

Each outbox row becomes one Stream entry with the explicit ID `<seq>-0`, then one PUBLISH per
channel, all in one MULTI/EXEC. Stream IDs must grow, so re-adding a seq that is already in
the stream is skipped, which makes a retry after a crash or an outage exact for the stream
and at-least-once for Pub/Sub. Progress (`published_seq`) lives in Postgres and only moves
after Redis acknowledged, so nothing is lost while Redis is down: rows wait in the outbox and
drain in order when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from indexer.metrics import Metrics
from indexer.store import OutboxRow, Store

log = structlog.get_logger()

BATCH_SIZE = 500
IDLE_POLL = 1.0  # outbox rows may also come from another process (backfill, reindex)
BACKOFF_BASE = 0.2
BACKOFF_MAX = 5.0
PRUNE_EVERY = 60.0


class Publisher:
    """Moves outbox rows to the Redis Stream and channels; one per indexer leader."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        store: Store,
        stream_key: str,
        stream_maxlen: int,
        outbox_keep: int,
        metrics: Metrics,
    ) -> None:
        self._redis = redis
        self._store = store
        self._stream_key = stream_key
        self._maxlen = stream_maxlen
        self._outbox_keep = outbox_keep
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._published = 0
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def wake(self) -> None:
        """Tell the publisher new rows were committed (called by the follower)."""
        self._wake.set()

    @property
    def published(self) -> int:
        return self._published

    async def publish_forever(self) -> None:
        """Drain the outbox, then wait for more. Safe to cancel: progress is only recorded
        after Redis acknowledged a whole batch."""
        self._published = await self._store.published_seq()
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_EVERY
        failures = 0
        while True:
            rows = await self._store.outbox_after(self._published, BATCH_SIZE)
            last_seq = await self._store.last_seq()
            self._metrics.publish_backlog.set(max(0, last_seq - self._published))
            if not rows:
                if loop.time() >= next_prune:
                    await self._store.prune_outbox(self._outbox_keep)
                    next_prune = loop.time() + PRUNE_EVERY
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL)
                continue
            try:
                await self._publish(rows)
            except RedisError as exc:
                failures += 1
                self._metrics.redis_up.set(0)
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 16))
                delay *= 0.5 + self._rng.random() / 2
                log.warning(
                    "redis publish failed, will retry",
                    error=str(exc),
                    backlog=last_seq - self._published,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("redis publishing resumed", after_failures=failures)
                failures = 0
            self._metrics.redis_up.set(1)
            self._published = rows[-1].seq
            await self._store.mark_published(self._published)
            self._metrics.published_seq.set(self._published)

    async def _publish(self, rows: list[OutboxRow]) -> None:
        top = await self._stream_top()
        async with self._redis.pipeline(transaction=True) as pipe:
            for row in rows:
                if row.seq > top:
                    fields = {
                        "seq": row.seq,
                        "channels": " ".join(row.channels),
                        "event": row.payload,
                    }
                    pipe.xadd(
                        self._stream_key,
                        fields,  # type: ignore[arg-type]
                        id=f"{row.seq}-0",
                        maxlen=self._maxlen,
                        approximate=True,
                    )
                for channel in row.channels:
                    pipe.publish(channel, row.payload)
            await pipe.execute()

    async def _stream_top(self) -> int:
        """The seq of the newest entry ever added to the stream (0 if there is none)."""
        try:
            info = await self._redis.xinfo_stream(self._stream_key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return 0
            raise
        last = info["last-generated-id"]
        if isinstance(last, bytes):
            last = last.decode()
        return int(str(last).split("-", 1)[0])
