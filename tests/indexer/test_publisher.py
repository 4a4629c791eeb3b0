"""The outbox publisher on its own: stopping it is reliable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from devnet.services import Redis
from indexer.metrics import Metrics
from indexer.publisher import Publisher
from indexer.service import redis_client
from indexer.store import Store
from tests.support.waiting import eventually

IDLE_SETTLE = 0.2  # the publisher reaches its idle wait within a few ms on an empty outbox


@pytest.fixture
async def publisher_parts(
    database_url: str, redis_server: Redis
) -> AsyncIterator[tuple[Store, aioredis.Redis]]:
    async with Store.open(database_url) as store, redis_client(redis_server.url) as redis:
        await store.migrate()
        yield store, redis


def make_publisher(
    parts: tuple[Store, aioredis.Redis], stream_key: str, **overrides: Any
) -> Publisher:
    """A publisher on this test's store and Redis; keyword arguments override the defaults."""
    store, redis = parts
    options: dict[str, Any] = {"stream_maxlen": 1000, "outbox_keep": 100, "metrics": Metrics()}
    return Publisher(redis=redis, store=store, stream_key=stream_key, **(options | overrides))


async def test_a_stop_that_coincides_with_a_wake_up_still_stops_the_publisher(
    publisher_parts: tuple[Store, aioredis.Redis],
) -> None:
    """Cancelling the publisher in the same loop turn as a commit wakes it ends its task."""
    publisher = make_publisher(publisher_parts, "kektech:test-publisher")
    task = asyncio.create_task(publisher.publish_forever(), name="publish-outbox")
    await asyncio.sleep(IDLE_SETTLE)
    assert not task.done()
    publisher.wake()  # a commit...
    task.cancel()  # ...and SIGINT, in the same loop turn
    done, _ = await asyncio.wait([task], timeout=5)
    if not done:
        task.cancel()  # the second stop signal an operator would have to send
        await asyncio.wait([task], timeout=5)
    assert done, "the publisher kept running after being cancelled"
    assert task.cancelled()


async def test_published_rows_are_pruned_in_chunks_down_to_outbox_keep(
    publisher_parts: tuple[Store, aioredis.Redis], database_url: str
) -> None:
    """Once published, the outbox shrinks to OUTBOX_KEEP rows, a bounded chunk per statement."""
    store, redis = publisher_parts
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO outbox (seq, event_id, channels, payload) VALUES ($1, $2, $3, $4)",
            [
                (seq, f"32323:0xtx:{seq}", "events:test", b'{"type":"Test","seq":%d}' % seq)
                for seq in range(1, 26)
            ],
        )
    finally:
        await conn.close()
    deletes: list[int] = []
    original = store.prune_outbox

    async def counting_prune(keep: int, limit: int) -> int:
        deleted = await original(keep, limit)
        deletes.append(deleted)
        return deleted

    store.prune_outbox = counting_prune  # type: ignore[method-assign]
    publisher = make_publisher(
        publisher_parts, "kektech:test-prune", outbox_keep=5, prune_every=0.0, prune_chunk=8
    )
    task = asyncio.create_task(publisher.publish_forever(), name="publish-outbox")
    try:
        await eventually(lambda: remaining(database_url, 5), within=10, what="pruning to 5")
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert await redis.xlen("kektech:test-prune") == 25, "every row reached Redis first"
    assert max(deletes) <= 8
    assert sum(deletes) == 20


async def remaining(database_url: str, rows: int) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM outbox ORDER BY seq")]
    finally:
        await conn.close()
    return seqs == list(range(26 - rows, 26))


async def test_redis_up_reports_redis_while_idle(
    publisher_parts: tuple[Store, aioredis.Redis], redis_server: Redis
) -> None:
    """With nothing to publish, kektech_indexer_redis_up still follows whether Redis answers."""
    metrics = Metrics()
    publisher = make_publisher(
        publisher_parts, "kektech:test-redis-up", metrics=metrics, ping_every=0.2
    )

    def redis_up() -> float | None:
        return metrics.registry.get_sample_value("kektech_indexer_redis_up")

    async def is_up(expected: float) -> bool:
        return redis_up() == expected

    task = asyncio.create_task(publisher.publish_forever(), name="publish-outbox")
    try:
        await eventually(lambda: is_up(1), within=5, what="redis_up 1 before any publication")
        redis_server.stop()
        try:
            await eventually(lambda: is_up(0), within=10, what="redis_up 0 with Redis stopped")
        finally:
            redis_server.start()
        await eventually(lambda: is_up(1), within=10, what="redis_up 1 again")
    finally:
        task.cancel()
        await asyncio.wait([task])
