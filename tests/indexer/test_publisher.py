"""The outbox publisher on its own: stopping it is reliable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from devnet.services import Redis
from indexer.metrics import Metrics
from indexer.publisher import Publisher
from indexer.service import redis_client
from indexer.store import Store

IDLE_SETTLE = 0.2  # the publisher reaches its idle wait within a few ms on an empty outbox


@pytest.fixture
async def publisher_parts(
    database_url: str, redis_server: Redis
) -> AsyncIterator[tuple[Store, aioredis.Redis]]:
    async with Store.open(database_url) as store, redis_client(redis_server.url) as redis:
        await store.migrate()
        yield store, redis


async def test_a_stop_that_coincides_with_a_wake_up_still_stops_the_publisher(
    publisher_parts: tuple[Store, aioredis.Redis],
) -> None:
    """Cancelling the publisher in the same loop turn as a commit wakes it ends its task."""
    store, redis = publisher_parts
    publisher = Publisher(
        redis=redis,
        store=store,
        stream_key="kektech:test-publisher",
        stream_maxlen=1000,
        outbox_keep=100,
        metrics=Metrics(),
    )
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
