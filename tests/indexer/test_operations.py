"""Operating the indexer: standby instances, the CLI commands, unknown logs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import redis.asyncio as aioredis

from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from tests.indexer.conftest import (
    assert_database_equals_chain,
    assert_gap_free,
    stream_entries,
    wait_for_stream,
)
from tests.support.indexer_process import IndexerProcess


async def run_command(make_indexer: Callable[..., IndexerProcess], *args: str) -> tuple[int, str]:
    """Run one CLI command to completion; return its exit code and output."""
    command = make_indexer(*args)
    command.start()
    code = await command.wait_exit(within=60)
    return code, command.log_text()


async def test_second_instance_waits_as_standby_then_takes_over(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A second indexer does not write while the first runs, and continues when it dies."""
    driver = ActivityDriver(dev_chain, deployment, seed=60, txs_per_block=5)
    await driver.cover_all_events()
    with make_indexer() as first, make_indexer() as second:
        await first.wait_ready()
        await asyncio.sleep(1.0)
        status, body = await second.get("/ready")
        assert (status, body["role"]) == (503, "standby")
        _, health = await second.get("/healthz")
        assert health["status"] == "ok"
        first.kill()
        await driver.run(blocks=10)
        await second.wait_cursor(await dev_chain.block_number())
        assert "standby: another indexer holds the write lease" in second.log_text()
        count = await assert_database_equals_chain(database_url, dev_chain, deployment)
        await wait_for_stream(redis_client, stream_key, count)
    assert_gap_free(await stream_entries(redis_client, stream_key))


async def test_status_verify_backfill_and_reindex(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """verify finds a tampered database, backfill repairs it, reindex rebuilds a range."""
    driver = ActivityDriver(dev_chain, deployment, seed=61, txs_per_block=5)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
        code, output = await run_command(make_indexer, "backfill", "--from", "1", "--to", "2")
        assert code == 1
        assert "an indexer is running" in output
    count = await assert_database_equals_chain(database_url, dev_chain, deployment)

    code, output = await run_command(make_indexer, "status")
    assert code == 0
    assert f"cursor: block {head}" in output
    assert f"stored: {count} events" in output

    code, output = await run_command(make_indexer, "verify", "--from", "0")
    assert (code, output.strip().splitlines()[-1].endswith(": OK")) == (0, True)

    conn = await asyncpg.connect(database_url)
    try:
        victim = await conn.fetchrow(
            "DELETE FROM events WHERE event_name = 'BetPlaced'"
            " AND (block_number, log_index) = (SELECT block_number, log_index FROM events"
            " WHERE event_name = 'BetPlaced' ORDER BY block_number LIMIT 1)"
            " RETURNING block_number, log_index"
        )
        await conn.execute(
            "UPDATE events SET data = '0x00' WHERE block_number = $1 AND log_index = 0", head
        )
    finally:
        await conn.close()
    code, output = await run_command(make_indexer, "verify", "--from", "0")
    assert code == 1
    assert f"block {victim['block_number']} log {victim['log_index']}: missing" in output
    assert f"block {head} log 0: data differs" in output

    block = str(victim["block_number"])
    code, output = await run_command(make_indexer, "backfill", "--from", block, "--to", block)
    assert (code, "1 missing events stored" in output) == (0, True)

    code, output = await run_command(make_indexer, "reindex", "--from", str(head - 5))
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    code, output = await run_command(make_indexer, "verify", "--from", "0")
    assert code == 0, output

    conn = await asyncpg.connect(database_url)
    try:
        queued = await conn.fetchval("SELECT last_seq FROM indexer_state")
    finally:
        await conn.close()
    with make_indexer() as indexer:  # publishes what the commands queued
        await wait_for_stream(redis_client, stream_key, queued)
    entries = await stream_entries(redis_client, stream_key)
    assert_gap_free(entries)
    assert any(envelope["removed"] for _, envelope in entries)


async def test_unknown_logs_from_tracked_contracts_are_kept_raw(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A log the catalogue does not know is stored raw and logged once; indexing goes on."""
    driver = ActivityDriver(dev_chain, deployment, seed=62)
    await driver.cover_all_events()
    # The template's constructor logs OpenZeppelin's Initialized(max): unknown for this kind.
    overrides = {"REWARD_DISTRIBUTOR_ADDRESS": deployment.template, "START_BLOCK": "0"}
    with make_indexer(**overrides) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        assert indexer.log_text().count("unknown log stored raw") == 1
    conn = await asyncpg.connect(database_url)
    try:
        raw = await conn.fetch("SELECT * FROM events WHERE event_name IS NULL")
        known = await conn.fetchval("SELECT count(*) FROM events WHERE event_name IS NOT NULL")
    finally:
        await conn.close()
    assert [(r["contract"], r["args"], r["seq"]) for r in raw] == [
        (deployment.template, None, None)
    ]
    assert known > 0
