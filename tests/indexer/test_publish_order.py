"""End to end: a market's MarketCreated is the first stream entry of its transaction."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from indexer import outbox
from indexer.database import Database
from tests.indexer.conftest import (
    assert_announcements_first,
    assert_database_equals_chain,
    assert_gap_free,
    expected_ids,
    is_announcement,
    live_ids,
    stream_entries,
    tracked_chain_logs,
    wait_for_stream,
)
from tests.indexer.test_operations import run_command
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess

# Small enough that the first catch-up fetches deep ranges, not only tip ones.
WINDOW = {"REORG_WINDOW": "2"}


async def last_seq(database_url: str) -> int:
    async with Database.open(database_url, command_timeout=10.0) as db:
        return await outbox.last_seq(db)


async def test_market_created_is_published_first_in_its_transaction(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """However an event is published (a catch-up, the tip, a backfill, a reindex's removal
    notices and what it indexes again), the MarketCreated of a market-creating transaction
    comes before the market's own creation logs, which the chain puts first: the frontend
    keeps only the first event of a transaction. The stream stays gap-free and holds every
    event of the chain."""
    driver = ActivityDriver(dev_chain, deployment, seed=18, txs_per_block=4)
    await driver.cover_all_events()
    await driver.run(blocks=12)
    # Factory v1 only at first: the markets of v2 are then stored by a backfill.
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1, **WINDOW) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())  # a catch-up
        await driver.run(blocks=6)  # block by block at the tip
        cursor = await dev_chain.block_number()
        await indexer.wait_cursor(cursor)
    code, output = await run_command(
        make_indexer, "backfill", "--from", str(deployment.block), "--to", str(cursor), **WINDOW
    )
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    # From the block of cover_all_events' first markets: every market's creation is
    # retracted and indexed again.
    code, output = await run_command(
        make_indexer, "reindex", "--from", str(deployment.block + 2), **WINDOW
    )
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    with make_indexer(**WINDOW) as indexer:  # publishes what the commands queued
        await wait_for_stream(redis_client, stream_key, await last_seq(database_url))
    entries = await stream_entries(redis_client, stream_key)

    assert_gap_free(entries)
    logs = await tracked_chain_logs(dev_chain, deployment)
    assert sorted(live_ids(entries)) == sorted(expected_ids(logs))
    assert assert_announcements_first(entries) == len(driver.markets)
    removed = [envelope for _, envelope in entries if envelope["removed"]]
    assert sum(map(is_announcement, removed)) == len(driver.markets)


async def test_a_backfill_publishes_the_markets_it_finds_in_chain_order(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """The markets a backfill finds are fetched on to the cursor in chunks of
    LOGS_MAX_ADDRESSES addresses; their events still get seqs in chain order, not chunk by
    chunk (docs/protocol.md, "Order")."""
    driver = ActivityDriver(dev_chain, deployment, seed=18, txs_per_block=6)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1, **WINDOW) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    before = await last_seq(database_url)
    last = deployment.block + 4
    code, output = await run_command(
        make_indexer,
        "backfill",
        *("--from", str(deployment.block), "--to", str(last)),
        LOGS_MAX_ADDRESSES="1",
        **WINDOW,
    )
    assert code == 0, output
    async with connected(database_url) as conn:
        rows = await conn.fetch(
            "SELECT block_number FROM events WHERE seq > $1 ORDER BY seq", before
        )
    blocks = [row["block_number"] for row in rows]
    assert any(block > last for block in blocks), "the found markets' later events"
    assert blocks == sorted(blocks)
