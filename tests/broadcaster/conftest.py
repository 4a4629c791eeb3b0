"""Fixtures for broadcaster tests: a stream of the test's own, a producer, a running server."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from devnet.redis_server import Redis
from tests.broadcaster.support import EventProducer, Running, running, settings_for

_streams = itertools.count()


@pytest.fixture
def stream_key() -> str:
    """A Redis stream key of this test's own."""
    return f"test:{os.getpid()}:{next(_streams)}:broadcast"


@pytest.fixture
async def producer(redis_client: aioredis.Redis, stream_key: str) -> EventProducer:
    """Writes events to this test's stream exactly as the indexer does."""
    return EventProducer(redis_client, stream_key)


@pytest.fixture
def start(
    redis_server: Redis, stream_key: str
) -> Callable[..., AbstractAsyncContextManager[Running]]:
    """Start a broadcaster on free ports for this test's stream: `async with start(**env)`."""

    def make(**overrides: Any) -> AbstractAsyncContextManager[Running]:
        overrides.setdefault("redis_url", redis_server.url)
        return running(settings_for(overrides.pop("redis_url"), stream_key, **overrides))

    return make


@pytest.fixture
async def server(
    start: Callable[..., AbstractAsyncContextManager[Running]],
) -> AsyncIterator[Running]:
    """A broadcaster with default settings."""
    async with start() as instance:
        yield instance


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Redis]:
    """A Redis server of this test's own, for a test that stops it: were the session's server
    not to come back, every test after it would fail."""
    with Redis(workdir=tmp_path) as server:
        yield server


@pytest.fixture
async def own_producer(own_redis: Redis, stream_key: str) -> AsyncIterator[EventProducer]:
    """Writes events to this test's stream on `own_redis`, as the indexer does."""
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        yield EventProducer(client, stream_key)
    finally:
        await client.aclose()
