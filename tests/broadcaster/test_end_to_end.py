"""End to end: transactions on anvil reach subscribed WebSocket clients through the indexer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.redis_server import Redis
from tests.broadcaster.support import Running, read_stream, ws_client
from tests.indexer.conftest import (
    expected_ids,
    published_order,
    stored_and_published,
    tracked_chain_logs,
)
from tests.support.indexer_process import IndexerProcess, indexer_env

Start = Callable[..., AbstractAsyncContextManager[Running]]


async def test_chain_activity_reaches_websocket_clients(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    database_url: str,
    redis_server: Redis,
    redis_client: aioredis.Redis,
    stream_key: str,
    start: Start,
    tmp_path: Path,
) -> None:
    """Every event the indexer publishes reaches an events:* client, in seq order, intact,
    and a market subscription resumed from 0 gets exactly that market's events."""
    env = indexer_env(
        database_url=database_url,
        redis_url=redis_server.url,
        rpc_url=anvil.rpc_url,
        deployment=deployment,
        stream_key=stream_key,
    )
    async with start() as server:
        async with ws_client(server.url) as client:
            await client.subscribe("events:*")
            with IndexerProcess(env, log_dir=tmp_path) as indexer:
                await indexer.wait_ready()
                driver = ActivityDriver(dev_chain, deployment, seed=11, txs_per_block=6)
                await driver.run(blocks=4)
                await indexer.wait_cursor(await dev_chain.block_number())
                await stored_and_published(
                    dev_chain, redis_client, stream_key, database_url, deployment, within=30
                )
                entries = await read_stream(redis_client, stream_key)
                events = await client.events(len(entries), within=30)
        published = [orjson.loads(fields[b"event"]) for _, fields in entries]
        assert [e["seq"] for e in events] == list(range(1, len(entries) + 1))
        assert [e["data"] for e in events] == published
        # ... and they are the chain's events, every one, in chain order but for each
        # MarketCreated, first in its transaction (docs/protocol.md).
        chain = expected_ids(published_order(await tracked_chain_logs(dev_chain, deployment)))
        assert [e["data"]["id"] for e in events] == chain
        market = next(
            e["data"]["marketAddress"] for e in events if e["data"]["type"] == "MarketCreated"
        )
        async with ws_client(server.url) as resumed:
            ack = await asyncio.wait_for(resumed.subscribe("market:" + market, since=0), 10)
    assert ack["recovered"] is True
    assert [e["data"] for e in ack["replayedEvents"]] == [
        p for p in published if p["marketAddress"] == market
    ]
