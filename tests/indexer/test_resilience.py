"""The indexer loses and duplicates nothing across crashes, Redis outages, reorgs and bad RPC."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from eth_utils.crypto import keccak

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.postgres_server import Postgres
from devnet.process import free_port
from devnet.redis_server import Redis
from indexer.database import Database
from indexer.market_rebuild import rebuild_markets
from indexer.tip_blooms import BLOOM_GRACE
from tests.broadcaster.support import read_stream_after
from tests.indexer.conftest import (
    assert_announcements_first,
    assert_database_equals_chain,
    assert_gap_free,
    assert_no_duplicates,
    assert_retracted,
    caught_up,
    chain_key,
    database_equals_chain,
    expected_ids,
    live_ids,
    published_order,
    stored_keys,
    stream_entries,
    tracked_chain_logs,
    wait_for_stream,
)
from tests.indexer.test_indexing import STOP_BOUND
from tests.indexer.test_operations import INDEXER, run_command
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess
from tests.support.rpc_proxy import RpcFaultProxy
from tests.support.tasks import background
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually


async def follow_stream(client: aioredis.Redis, key: str, seen: list[int]) -> None:
    """A consumer reading the stream live, as a broadcaster would, recording each seq it sees."""
    last = "0-0"
    while True:
        try:
            entries = await read_stream_after(client, key, last, block=200, count=500)
        except (ConnectionError, OSError, aioredis.ConnectionError, aioredis.TimeoutError):
            # Also a read past redis-py's 5 s socket timeout: a loaded machine can stall this
            # loop that long. Like the broadcaster, read again after the last seq seen.
            await asyncio.sleep(0.1)
            continue
        for entry_id, _fields in entries:
            last = entry_id.decode()
            seen.append(int(last.split("-")[0]))


async def drive_until(driver: ActivityDriver, stop: asyncio.Event) -> None:
    """Mine a block of activity every 0.1 s until `stop` is set."""
    while not stop.is_set():
        await driver.run(blocks=1, block_interval=0.1)


# Eleven indexer starts, a block every 0.1 s while they last (150-200 blocks here).
@pytest.mark.timeout(240)
async def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Ten SIGKILLs during a busy run: the database equals the chain and the stream is gap-free."""
    driver = ActivityDriver(dev_chain, deployment, seed=21, txs_per_block=12)
    await driver.cover_all_events()
    seen: list[int] = []
    rng = random.Random(2026)
    indexer = make_indexer()
    stop = asyncio.Event()
    async with (
        background(drive_until(driver, stop), name="chain-load") as busy,
        background(follow_stream(redis_client, stream_key, seen), name="stream-consumer"),
    ):
        for _ in range(10):
            indexer.start()
            await indexer.wait_cursor(0)  # started: following the chain, not still importing
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            assert indexer.running
            # Every kill lands while blocks are being mined and indexed, not on an idle chain.
            assert not busy.done(), "the chain load stopped before the kills ended"
            indexer.kill()
        stop.set()
        await busy
        indexer.start()
        try:
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
        finally:
            indexer.kill()

        async def consumed() -> bool:
            return len(seen) >= len(entries)

        await eventually(consumed, within=10, what="the live consumer read the whole stream")
    assert_gap_free(entries)
    assert_no_duplicates(entries)
    assert seen == [seq for seq, _ in entries]  # the live consumer saw all of them, in order
    assert not any(envelope["removed"] for _, envelope in entries)


async def test_redis_outage_loses_nothing_and_the_backlog_drains(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
    stream_key: str,
) -> None:
    """Redis stopped during indexing and started again: every event reaches the stream in order."""
    driver = ActivityDriver(dev_chain, deployment, seed=22, txs_per_block=6)
    await driver.cover_all_events()
    with Redis() as own_redis:
        async with aioredis.Redis.from_url(own_redis.url) as client:
            with make_indexer(REDIS_URL=own_redis.url) as indexer:
                await indexer.wait_ready()
                own_redis.stop()
                await driver.run(blocks=30, block_interval=0.05)
                await indexer.wait_cursor(await dev_chain.block_number())
                assert await indexer.metric("kektech_indexer_redis_up") == 0
                backlog = await indexer.metric("kektech_indexer_publish_backlog")
                assert (backlog or 0) > 0
                own_redis.start()
                entries = await caught_up(
                    indexer, dev_chain, client, stream_key, database_url, deployment
                )
    assert_gap_free(entries)


def reorg_transactions(chain: DevChain, deployment: Deployment) -> list[list[object]]:
    """Transactions for the replacement branch: a factory event nobody else emits there."""
    data = chain.contract("FlexibleMarketFactoryUnified").encode_abi("setPaused", [False])
    tx = {"from": chain.accounts[0], "to": deployment.factory_v2, "data": data, "gas": hex(300_000)}
    return [[tx, 0]]


async def blocks_events(chain: DevChain, deployment: Deployment, first: int) -> list[str]:
    logs = await tracked_chain_logs(chain, deployment)
    return expected_ids([lg for lg in logs if int(lg["blockNumber"], 16) >= first])


@pytest.mark.parametrize("depth", [1, 4, 8])
async def test_reorgs_within_the_window_follow_the_canonical_chain(
    depth: int,
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A reorg of depth 1..REORG_WINDOW is rolled back, announced as removals, and re-indexed."""
    driver = ActivityDriver(dev_chain, deployment, seed=30 + depth, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    with make_indexer(REORG_WINDOW="8") as indexer:
        head = await dev_chain.block_number()
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        retracted = await blocks_events(dev_chain, deployment, head - depth + 1)
        assert retracted, "the reorged blocks hold events"
        await dev_chain.request("anvil_reorg", [depth, reorg_transactions(dev_chain, deployment)])
        await dev_chain.mine_empty(1)
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
        assert indexer.running
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        assert await indexer.metric("kektech_indexer_reorg_depth_blocks_sum") == depth
    assert_retracted(entries, retracted)
    assert_announcements_first(entries)
    new_branch = await blocks_events(dev_chain, deployment, head - depth + 1)
    assert new_branch
    assert not set(new_branch) & set(retracted)


async def stored_markets(database_url: str) -> set[str]:
    async with connected(database_url) as conn:
        return {row["address"] for row in await conn.fetch("SELECT address FROM markets")}


async def test_a_reorg_retracting_a_market_creation_forgets_the_market(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A reorg retracting a MarketCreated deletes the market's row: it is no longer followed."""
    driver = ActivityDriver(dev_chain, deployment, seed=39, txs_per_block=3)
    await driver.cover_all_events()
    resolution_time = deployment.block + 100_000
    create = dev_chain.contract("FlexibleMarketFactoryUnified").encode_abi(
        "createMarket", ["Retracted?", resolution_time, keccak(text="x"), 0, resolution_time - 1]
    )
    with make_indexer(REORG_WINDOW="8") as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        before = await stored_markets(database_url)
        await dev_chain.send(
            sender=dev_chain.accounts[1], to=deployment.factory_v2, data=create, value=10**15
        )
        await dev_chain.mine()
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        (created,) = await stored_markets(database_url) - before
        await dev_chain.request("anvil_reorg", [1, reorg_transactions(dev_chain, deployment)])
        await dev_chain.mine_empty(1)
        # Also compares the markets table with the chain's announcements and projections.
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        assert indexer.running
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
    assert await stored_markets(database_url) == before, f"{created} is still followed"


# 70: a window longer than a tip range (TIP_MAX_BLOCKS), its headers stored by several;
# 2 against 4: a window smaller than CONFIRMATIONS.
@pytest.mark.parametrize(("window", "confirmations"), [(8, 2), (70, 2), (2, 4)])
async def test_with_confirmations_a_reorg_of_the_whole_window_after_a_catch_up_is_followed(
    window: int,
    confirmations: int,
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """With CONFIRMATIONS, the window counts from the cursor, not the head: right after a
    catch-up, a reorg retracting REORG_WINDOW indexed blocks (REORG_WINDOW + CONFIRMATIONS
    deep) is rolled back and announced as removals, not a halt as too deep."""
    settings = {"REORG_WINDOW": str(window), "CONFIRMATIONS": str(confirmations)}
    driver = ActivityDriver(dev_chain, deployment, seed=46, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=window + 12)
    with make_indexer(**settings) as indexer:
        head = await dev_chain.block_number()
        await indexer.wait_cursor(head - confirmations)  # one catch-up from an empty database
        fork = head - window - confirmations  # the newest block both branches hold
        retracted = expected_ids(
            [
                lg
                for lg in await tracked_chain_logs(dev_chain, deployment)
                if fork < int(lg["blockNumber"], 16) <= head - confirmations
            ]
        )
        assert retracted, "the retracted blocks hold events"
        await dev_chain.request(
            "anvil_reorg", [head - fork, reorg_transactions(dev_chain, deployment)]
        )
        await dev_chain.mine_empty(1)
        target = await dev_chain.block_number() - confirmations
        await indexer.wait_cursor(target)

        await eventually(
            lambda: database_equals_chain(database_url, dev_chain, deployment, last=target),
            within=30,
            what="the database equals the chain to the target",
        )
        logs = await tracked_chain_logs(dev_chain, deployment)
        assert any(int(lg["blockNumber"], 16) == fork + 1 for lg in logs), "the replacement"
        expected = expected_ids(
            published_order([lg for lg in logs if int(lg["blockNumber"], 16) <= target])
        )

        async def published() -> bool:
            return live_ids(await stream_entries(redis_client, stream_key)) == expected

        await eventually(published, within=30, what="the stream holds the new branch's events")
        assert indexer.running
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        assert await indexer.metric("kektech_indexer_reorg_depth_blocks_sum") == window
    assert_retracted(await stream_entries(redis_client, stream_key), retracted)


async def test_with_confirmations_a_reorg_at_the_same_height_is_followed_without_a_new_block(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """With CONFIRMATIONS the cursor is below the head: a reorg replacing blocks down past the
    cursor by a branch of the same height is followed at once, not when the chain next grows
    (on a chain that stops, never: the replaced events stayed stored and published)."""
    confirmations = 2
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=12)
    settings = {"REORG_WINDOW": "8", "CONFIRMATIONS": str(confirmations), "POLL_INTERVAL": "0.2"}
    with make_indexer(**settings) as indexer:
        head = await dev_chain.block_number()
        await indexer.wait_cursor(head - confirmations)
        await dev_chain.request("anvil_reorg", [5, reorg_transactions(dev_chain, deployment)])
        assert await dev_chain.block_number() == head

        await eventually(
            lambda: database_equals_chain(
                database_url, dev_chain, deployment, last=head - confirmations
            ),
            within=30,
            what="the database equals the new branch",
        )
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        assert await indexer.metric("kektech_indexer_reorg_depth_blocks_sum") == 5 - confirmations
        assert indexer.running


async def test_with_confirmations_a_reorg_onto_a_shorter_branch_is_followed_without_a_new_block(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """With CONFIRMATIONS the cursor is below the head: a branch shorter than the old one,
    still reaching past the cursor, replaces the cursor's block. It is followed at once: it
    was left until the head passed the old one's (on a chain that stops, never)."""
    confirmations = 2
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=8)
    fork_point = await dev_chain.request("evm_snapshot", [])
    await driver.run(blocks=4)
    head = await dev_chain.block_number()
    settings = {"REORG_WINDOW": "8", "CONFIRMATIONS": str(confirmations), "POLL_INTERVAL": "0.2"}
    with make_indexer(**settings) as indexer:
        await indexer.wait_cursor(head - confirmations)
        await dev_chain.request("evm_revert", [fork_point])
        # The replacement branch's first block holds the factory event of reorg_transactions.
        factory = dev_chain.contract("FlexibleMarketFactoryUnified")
        await dev_chain.send(
            sender=dev_chain.accounts[0],
            to=deployment.factory_v2,
            data=factory.encode_abi("setPaused", [False]),
        )
        await dev_chain.mine_empty(3)  # one block less than the old branch, past the cursor
        new_head = await dev_chain.block_number()
        assert head - confirmations <= new_head < head

        await eventually(
            lambda: database_equals_chain(
                database_url, dev_chain, deployment, last=new_head - confirmations
            ),
            within=30,
            what="the database equals the shorter branch",
        )
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        assert indexer.running


async def test_with_confirmations_a_reorg_hidden_once_by_a_stale_backend_is_still_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A reorg of the same height past the cursor, the first look at the cursor's block
    answered by a backend still on the old branch: the cursor is looked at again until the
    answers agree with the head. One stale answer hid the reorg for good."""
    confirmations = 2
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=12)
    async with RpcFaultProxy(anvil.rpc_url, seed=15) as proxy:
        settings = {
            "RPC_PROVIDER_URL": proxy.url,
            "REORG_WINDOW": "8",
            "CONFIRMATIONS": str(confirmations),
            "POLL_INTERVAL": "0.2",
        }
        with make_indexer(**settings) as indexer:
            head = await dev_chain.block_number()
            cursor = head - confirmations
            await indexer.wait_cursor(cursor)
            old = await dev_chain.request("eth_getBlockByNumber", [hex(cursor), False])
            proxy.stale_header(cursor, old, times=1)
            await dev_chain.request("anvil_reorg", [5, reorg_transactions(dev_chain, deployment)])
            assert await dev_chain.block_number() == head

            await eventually(
                lambda: database_equals_chain(database_url, dev_chain, deployment, last=cursor),
                within=30,
                what="the database equals the new branch",
            )
            assert await indexer.metric("kektech_indexer_reorgs_total") == 1
            assert indexer.running


async def test_with_confirmations_heads_from_backends_a_block_apart_are_looked_at_once_each(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """Behind a load balancer, "latest" may come from backends a block apart, in turn. Each
    of those heads has its branch down to the cursor read once, not at every poll (with one
    head remembered, every poll read CONFIRMATIONS headers again on a chain that stops)."""
    confirmations = 4
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=2)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    behind = await dev_chain.request("eth_getBlockByNumber", [hex(head - 1), False])
    async with RpcFaultProxy(anvil.rpc_url, seed=3) as proxy:
        settings = {
            "RPC_PROVIDER_URL": proxy.url,
            "CONFIRMATIONS": str(confirmations),
            "POLL_INTERVAL": "0.2",
        }
        with make_indexer(**settings) as indexer:
            await indexer.wait_cursor(head - confirmations)
            turn = 0

            async def alternate(method: str, params: list[Any]) -> None:
                nonlocal turn
                if method == "eth_getBlockByNumber" and params and params[0] == "latest":
                    turn += 1
                    if turn % 2:
                        proxy.stale_header("latest", behind, times=1)

            start = len(proxy.calls)
            proxy.on_call = alternate

            async def many_polls() -> bool:
                return turn >= 20

            await eventually(many_polls, within=30, what="20 looks at the head")
            proxy.on_call = None
            calls = proxy.calls[start:]
            by_number = [p[0] for m, p in calls if m == "eth_getBlockByNumber" and p[0] != "latest"]
            assert len(by_number) <= 2 * confirmations, by_number
            assert await indexer.metric("kektech_indexer_reorgs_total") == 0
            assert indexer.running


async def test_a_reorg_while_a_catch_up_range_is_fetched_is_not_half_taken(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A catch-up range whose logs are read partly before and partly after a reorg (deeper
    than the window, above the cursor) is fetched again: its blocks with no log on the old
    branch, one on the new, were stored as empty, and the range's end (on the new branch)
    linked the next range to it, so the loss went unnoticed."""
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    await dev_chain.mine_empty(5)  # the old branch's last 5 blocks hold no tracked log
    head = await dev_chain.block_number()
    replacement = reorg_transactions(dev_chain, deployment)  # a factory event at head - 4
    reorged = asyncio.Event()
    logs_asked = 0

    async def reorg_between_the_ranges_calls(method: str, params: list[Any]) -> None:
        # The range's first eth_getLogs (the static contracts) is answered on the old
        # branch; before its second (the markets), the chain reorgs.
        nonlocal logs_asked
        if method == "eth_getLogs" and not reorged.is_set():
            logs_asked += 1
            if logs_asked == 2:
                reorged.set()
                await dev_chain.request("anvil_reorg", [5, replacement])

    async with RpcFaultProxy(anvil.rpc_url, seed=15) as proxy:
        proxy.on_call = reorg_between_the_ranges_calls
        settings = {"RPC_PROVIDER_URL": proxy.url, "REORG_WINDOW": "2", "POLL_INTERVAL": "0.2"}
        with make_indexer(**settings) as indexer:
            await indexer.wait_cursor(head)
            assert reorged.is_set()
            await assert_database_equals_chain(database_url, dev_chain, deployment)
            assert await indexer.metric("kektech_indexer_reorgs_total") == 0  # none stored
            assert indexer.running


async def test_a_reorg_seen_through_a_lagging_node_retracts_only_the_replaced_blocks(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Looking for the common ancestor, a stored block the answering node does not have yet
    (a backend behind, not a shorter chain: the head is above it) is asked again later, not
    taken as replaced: no canonical event is retracted, and no reorg looks too deep."""
    driver = ActivityDriver(dev_chain, deployment, seed=58, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    async with RpcFaultProxy(
        anvil.rpc_url,
        seed=13,
        rates={"lagging": 0.5},
        fault_methods={"eth_getBlockByNumber"},
        lag_blocks=4,
    ) as proxy:
        overrides = {"RPC_PROVIDER_URL": proxy.url, "RPC_MAX_RETRIES": "30", "REORG_WINDOW": "4"}
        with make_indexer(**overrides) as indexer:
            for _ in range(6):  # each time the head block, by one holding another event
                head = await dev_chain.block_number()
                await caught_up(
                    indexer, dev_chain, redis_client, stream_key, database_url, deployment
                )
                retracted = await blocks_events(dev_chain, deployment, head)
                assert retracted, "the replaced block holds events"
                seen = len(await stream_entries(redis_client, stream_key))
                replacement = reorg_transactions(dev_chain, deployment)
                await dev_chain.request("anvil_reorg", [1, replacement])
                entries = await caught_up(
                    indexer, dev_chain, redis_client, stream_key, database_url, deployment
                )
                removals = [envelope["id"] for _, envelope in entries[seen:] if envelope["removed"]]
                assert removals == list(reversed(retracted))
            assert indexer.running
        lagged = proxy.injected["lagging"]
    assert lagged > 0
    assert_gap_free(entries)


async def test_reorg_while_stopped_is_found_at_start_up(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The cursor's block replaced while the indexer was down is detected when it starts again."""
    driver = ActivityDriver(dev_chain, deployment, seed=40, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    indexer = make_indexer(REORG_WINDOW="8")
    with indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
    await dev_chain.request("anvil_reorg", [3, reorg_transactions(dev_chain, deployment)])
    with indexer:
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert any(envelope["removed"] for _, envelope in entries)
    assert_gap_free(entries)


async def factory_event_block(chain: DevChain, deployment: Deployment) -> None:
    """Mine a block holding one factory event (tracked from any START_BLOCK)."""
    [[tx, _]] = reorg_transactions(chain, deployment)
    assert isinstance(tx, dict)
    await chain.send(sender=tx["from"], to=tx["to"], data=tx["data"])
    await chain.mine()


async def cursor_exists(database_url: str) -> bool:
    async with connected(database_url) as conn:
        return bool(await conn.fetchval("SELECT count(*) FROM indexer_state"))


async def test_a_reorg_replacing_the_block_before_start_block_is_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The first cursor is the block before START_BLOCK, and nothing below it is stored: a
    reorg replacing that block (here with the blocks indexed above it) is rolled back onto
    the node's block there, the retracted events announced as removals, instead of a halt
    saying the reorg is deeper than REORG_WINDOW."""
    await dev_chain.mine_empty(3)  # the reorg stays above the deployment
    start = await dev_chain.block_number() + 1
    settings = {"START_BLOCK": str(start), "REORG_WINDOW": "8"}
    with make_indexer(**settings) as indexer:
        await indexer.wait_cursor(start - 1)
        for _ in range(3):
            await factory_event_block(dev_chain, deployment)
        await indexer.wait_cursor(await dev_chain.block_number())
        retracted = await blocks_events(dev_chain, deployment, start)
        assert len(retracted) == 3
        replacement = [[tx, 1] for [tx, _] in reorg_transactions(dev_chain, deployment)]
        await dev_chain.request("anvil_reorg", [4, replacement])  # from start - 1 on
        await dev_chain.mine_empty(1)
        await indexer.wait_cursor(await dev_chain.block_number())

        await eventually(
            lambda: database_equals_chain(database_url, dev_chain, deployment, first=start),
            within=30,
            what="the database equals the chain",
        )
        assert indexer.running
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        new_branch = await blocks_events(dev_chain, deployment, start)
        assert len(new_branch) == 1
        await wait_for_stream(redis_client, stream_key, 2 * len(retracted) + len(new_branch))
    entries = await stream_entries(redis_client, stream_key)
    assert_retracted(entries, retracted)


async def index_block_by_block(
    indexer: IndexerProcess, chain: DevChain, deployment: Deployment, blocks: int
) -> None:
    """Mine `blocks` blocks of one factory event each, the indexer storing each (and its
    header) before the next."""
    for _ in range(blocks):
        await factory_event_block(chain, deployment)
        await indexer.wait_cursor(await chain.block_number())


@pytest.mark.parametrize("while_running", [False, True], ids=["while-stopped", "while-running"])
async def test_a_reorg_below_a_raised_start_block_follows_the_canonical_chain(
    while_running: bool,
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """START_BLOCK raised after the database began lower: a reorg within REORG_WINDOW that
    also replaces blocks below the new START_BLOCK (found at start-up or while running) is
    rolled back to where the branches meet, as the database's own history says, not stopped
    at the block before START_BLOCK: the replaced blocks' events are gone from the database
    and announced as removals."""
    window = {"REORG_WINDOW": "8"}
    driver = ActivityDriver(dev_chain, deployment, seed=48, txs_per_block=3)
    await driver.cover_all_events()
    with make_indexer(START_BLOCK="0", **window) as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        await index_block_by_block(indexer, dev_chain, deployment, 6)
    head = await dev_chain.block_number()
    raised = str(head - 2)
    retracted = await blocks_events(dev_chain, deployment, head - 4)
    assert len(retracted) == 5, "one event in each replaced block, two of them below START_BLOCK"
    replacement = reorg_transactions(dev_chain, deployment)
    if not while_running:
        await dev_chain.request("anvil_reorg", [5, replacement])
    with make_indexer(START_BLOCK=raised, **window) as indexer:
        if while_running:
            await indexer.wait_ready()
            await dev_chain.request("anvil_reorg", [5, replacement])
        await dev_chain.mine_empty(1)
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
        assert indexer.running
        assert await indexer.metric("kektech_indexer_reorgs_total") == 1
        assert await indexer.metric("kektech_indexer_reorg_depth_blocks_sum") == 5
    assert_retracted(entries, retracted)


async def test_the_first_cursor_waits_for_confirmations(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """With CONFIRMATIONS=2 the first cursor (the block before START_BLOCK) is taken only once
    two blocks follow it, as any indexed block: a reorg of the blocks that are not confirmed
    yet does not concern the indexer."""
    await dev_chain.mine_empty(3)  # the reorg stays above the deployment
    start = await dev_chain.block_number() + 1
    async with RpcFaultProxy(anvil.rpc_url, seed=17) as proxy:
        settings = {
            "START_BLOCK": str(start),
            "CONFIRMATIONS": "2",
            "RPC_PROVIDER_URL": proxy.url,
        }
        with make_indexer(**settings) as indexer:

            async def waiting() -> bool:
                return "waiting for the chain to reach START_BLOCK" in indexer.log_text()

            await eventually(waiting, within=10, what="the indexer says it waits")
            await dev_chain.mine_empty(1)  # start - 1 is followed by one block only
            polls = proxy.methods["eth_blockNumber"]

            async def looked_again() -> bool:
                # Two polls after the block: the indexer has acted on the first one's answer.
                return proxy.methods["eth_blockNumber"] >= polls + 2

            await eventually(looked_again, within=30, what="two polls of the head")
            assert not await cursor_exists(database_url)
            replacement = [[tx, 1] for [tx, _] in reorg_transactions(dev_chain, deployment)]
            await dev_chain.request("anvil_reorg", [2, replacement])  # start - 1 and start
            await dev_chain.mine_empty(2)
            await indexer.wait_cursor(start)
            assert indexer.running
            assert await indexer.metric("kektech_indexer_reorgs_total") == 0
            stored = await assert_database_equals_chain(
                database_url, dev_chain, deployment, first=start
            )
            assert stored
            await wait_for_stream(redis_client, stream_key, 1)
    entries = await stream_entries(redis_client, stream_key)
    assert not any(envelope["removed"] for _, envelope in entries)


async def test_a_reorg_outgrown_by_more_than_the_window_before_the_next_poll_is_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The cursor's block is replaced and the new branch grows past REORG_WINDOW before the
    indexer looks again: the range is then deep (no block-by-block check), yet the replaced
    blocks are rolled back and announced as removals, not kept beside the new branch."""
    driver = ActivityDriver(dev_chain, deployment, seed=42, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    armed, held, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold_head_polls(method: str, params: list[Any]) -> None:
        """Hold the indexer's next look at the head (and any after it) until released."""
        if armed.is_set() and method == "eth_getBlockByNumber" and params[:1] == ["latest"]:
            held.set()
            await release.wait()

    async with RpcFaultProxy(anvil.rpc_url, seed=16) as proxy:
        proxy.on_call = hold_head_polls
        with make_indexer(REORG_WINDOW="8", RPC_PROVIDER_URL=proxy.url) as indexer:
            head = await dev_chain.block_number()
            await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
            retracted = await blocks_events(dev_chain, deployment, head - 2)
            assert retracted, "the reorged blocks hold events"
            armed.set()
            async with asyncio.timeout(30):
                await held.wait()  # the indexer's next poll, which sees nothing until...
            await dev_chain.request("anvil_reorg", [3, reorg_transactions(dev_chain, deployment)])
            await dev_chain.mine_empty(20)
            release.set()  # ...the new branch is 20 blocks past the cursor
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            assert await indexer.metric("kektech_indexer_reorgs_total") == 1
    assert_retracted(entries, retracted)


async def test_a_reorg_hidden_from_the_cursor_check_by_a_stale_backend_is_still_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The cursor's block replaced while the indexer was down, the new branch grown past
    REORG_WINDOW, and the first checks of the cursor answered by a backend still on the old
    branch (behind a load balancer): the deep range must still link to the stored cursor, so
    the indexer rolls the replaced blocks back instead of adding the new branch on top."""
    driver = ActivityDriver(dev_chain, deployment, seed=44, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    indexer = make_indexer(REORG_WINDOW="8")
    with indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
    cursor = await dev_chain.block_number()
    old_header = await dev_chain.request("eth_getBlockByNumber", [hex(cursor), False])
    retracted = await blocks_events(dev_chain, deployment, cursor - 2)
    assert retracted, "the reorged blocks hold events"
    await dev_chain.request("anvil_reorg", [3, reorg_transactions(dev_chain, deployment)])
    await dev_chain.mine_empty(20)
    async with RpcFaultProxy(anvil.rpc_url, seed=14) as proxy:
        proxy.stale_header(cursor, old_header, times=3)
        with make_indexer(REORG_WINDOW="8", RPC_PROVIDER_URL=proxy.url) as indexer:
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
        assert proxy.injected["stale_header"] == 3
    assert_retracted(entries, retracted)


async def test_a_backfill_does_not_write_while_the_cursor_is_unsettled(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The cursor's block replaced while the indexer was down, and the node answering "no
    such block" for the cursor at start-up: a backfill, having no loop to look again, refuses
    instead of storing the new branch's events beside the old branch's."""
    driver = ActivityDriver(dev_chain, deployment, seed=47, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    await dev_chain.mine_empty(3)  # the replaced blocks: the new branch's event has no twin
    with make_indexer(REORG_WINDOW="8") as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
    cursor = await dev_chain.block_number()
    stored = await stored_keys(database_url)
    await dev_chain.request("anvil_reorg", [3, reorg_transactions(dev_chain, deployment)])
    async with RpcFaultProxy(anvil.rpc_url, seed=19) as proxy:
        proxy.stale_header(cursor, None, times=10_000)
        code, output = await run_command(
            make_indexer,
            "backfill",
            "--from",
            str(cursor - 5),
            "--to",
            str(cursor),
            REORG_WINDOW="8",
            POLL_INTERVAL="0.2",
            RPC_PROVIDER_URL=proxy.url,
        )
        looked = proxy.injected["stale_header"]
    assert await stored_keys(database_url) == stored
    assert code == 1, output[-3000:]
    assert "the block at the cursor is replaced or not on the node yet" in output
    assert looked >= 2  # looked again before refusing


async def test_a_head_from_another_branch_at_the_cursor_is_no_reorg(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """Behind a load balancer the head may come from a backend on another branch (a sibling
    of the cursor's block, at its height) while the cursor's block asked by number comes from
    one that has it: nothing is replaced, so nothing is rolled back nor counted as a reorg,
    and the indexer asks again at its pace instead of spinning."""
    head = await dev_chain.block_number()
    snapshot = await dev_chain.request("evm_snapshot", [])
    await factory_event_block(dev_chain, deployment)
    sibling = await dev_chain.request("eth_getBlockByNumber", [hex(head + 1), False])
    await dev_chain.request("evm_revert", [snapshot])
    await dev_chain.mine_empty(1)  # the block at head + 1 the node has
    async with RpcFaultProxy(anvil.rpc_url, seed=15) as proxy:
        settings = {"RPC_PROVIDER_URL": proxy.url, "POLL_INTERVAL": "0.5"}
        with make_indexer(**settings) as indexer:
            await indexer.wait_cursor(head + 1)
            proxy.stale_header("latest", sibling, times=10_000)
            before = proxy.requests
            await asyncio.sleep(2)
            requests = proxy.requests - before
            stale = proxy.injected["stale_header"]
            assert indexer.running
            assert await indexer.metric("kektech_indexer_reorgs_total") == 0
            assert (await indexer.metric("kektech_indexer_fetch_retries_total") or 0) > 0
            proxy.clear_stale()
            await factory_event_block(dev_chain, deployment)
            await indexer.wait_cursor(head + 2)
    assert 0 < stale <= 8, stale  # about one head poll per half second
    assert requests <= 20, requests
    assert "reorg rolled back" not in indexer.log_text()
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_chain_shorter_than_the_cursor_at_start_up_is_waited_for(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Started on a chain that no longer reaches its cursor (a shorter branch, or a node
    behind), the indexer waits instead of exiting, then follows the branch once it is longer."""
    driver = ActivityDriver(dev_chain, deployment, seed=43, txs_per_block=3)
    await driver.cover_all_events()
    snapshot = await dev_chain.request("evm_snapshot", [])
    await driver.run(blocks=5)
    indexer = make_indexer(REORG_WINDOW="8")
    with indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
    await dev_chain.request("evm_revert", [snapshot])
    with indexer:
        await indexer.wait_ready()
        shorter = await dev_chain.block_number()

        async def polled_the_shorter_chain() -> bool:
            said = "waiting for the chain to reach it" in indexer.log_text()
            return said and await indexer.metric("kektech_indexer_head_block") == shorter

        await eventually(polled_the_shorter_chain, within=30, what="a poll of the shorter chain")
        assert indexer.running
        unpause = dev_chain.contract("FlexibleMarketFactoryUnified").encode_abi(
            "setPaused", [False]
        )
        await dev_chain.send(sender=dev_chain.accounts[0], to=deployment.factory_v2, data=unpause)
        await dev_chain.mine()
        await dev_chain.mine_empty(6)
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert any(envelope["removed"] for _, envelope in entries)
    assert_gap_free(entries)


async def test_reorg_deeper_than_the_window_halts_without_deleting(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A reorg deeper than REORG_WINDOW stops the indexer with a clear error; data is kept."""
    driver = ActivityDriver(dev_chain, deployment, seed=41, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    with make_indexer(REORG_WINDOW="4") as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        before = await stream_entries(redis_client, stream_key)
        stored = await stored_keys(database_url)
        await dev_chain.request("anvil_reorg", [6, reorg_transactions(dev_chain, deployment)])
        await dev_chain.mine_empty(1)
        assert await indexer.wait_exit(within=20) == 1
    assert "REORG_WINDOW=4" in indexer.log_text()
    assert await stream_entries(redis_client, stream_key) == before
    assert await stored_keys(database_url) == stored
    with pytest.raises(AssertionError):
        await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_after_a_reorg_deeper_than_the_window_the_named_reindex_recovers(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The halt on a reorg deeper than REORG_WINDOW names the block to reindex from (the one
    after the newest stored block still on the chain); that reindex, run as said, rolls back
    the replaced blocks and indexes the new branch: the database equals the chain again and
    the retracted events are announced as removals. A backfill, or a reindex from a replaced
    block, is refused meanwhile, naming the same command, and deletes nothing."""
    window = {"REORG_WINDOW": "4"}
    driver = ActivityDriver(dev_chain, deployment, seed=45, txs_per_block=3)
    await driver.cover_all_events()
    with make_indexer(**window) as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        for _ in range(10):  # followed block by block: every header of the tip is stored
            await driver.run(blocks=1)
            await indexer.wait_cursor(await dev_chain.block_number())
        head = await dev_chain.block_number()
        retracted = await blocks_events(dev_chain, deployment, head - 5)
        assert retracted, "the reorged blocks hold events"
        await dev_chain.request("anvil_reorg", [6, reorg_transactions(dev_chain, deployment)])
        await dev_chain.mine_empty(1)
        assert await indexer.wait_exit(within=20) == 1
    reindex = f"{INDEXER} reindex --from {head - 5}"
    assert reindex in indexer.log_text()
    stored = await stored_keys(database_url)

    code, output = await run_command(make_indexer, "backfill", "--from", "1", "--to", "2", **window)
    assert (code, reindex in output) == (1, True), output
    code, output = await run_command(make_indexer, "reindex", "--from", str(head), **window)
    assert (code, reindex in output) == (1, True), output
    assert await stored_keys(database_url) == stored

    code, output = await run_command(make_indexer, *reindex.removeprefix(INDEXER).split(), **window)
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    with make_indexer(**window) as indexer:
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_retracted(entries, retracted)


async def test_a_reorg_deeper_than_the_window_below_a_raised_start_block_halts(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """START_BLOCK raised after the database began lower, to a block inside the window: a
    reorg deeper than REORG_WINDOW (counted from the cursor, down to where the database
    began) still stops the indexer, naming the reindex, and deletes nothing; the block
    before START_BLOCK is no ancestor taken on trust."""
    window = {"REORG_WINDOW": "4"}
    driver = ActivityDriver(dev_chain, deployment, seed=49, txs_per_block=3)
    await driver.cover_all_events()
    with make_indexer(START_BLOCK="0", **window) as indexer:
        await caught_up(indexer, dev_chain, redis_client, stream_key, database_url, deployment)
        await index_block_by_block(indexer, dev_chain, deployment, 8)
    head = await dev_chain.block_number()
    with make_indexer(START_BLOCK=str(head - 2), **window) as indexer:
        before = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
        stored = await stored_keys(database_url)
        await dev_chain.request("anvil_reorg", [6, reorg_transactions(dev_chain, deployment)])
        await dev_chain.mine_empty(1)
        assert await indexer.wait_exit(within=20) == 1
    assert "REORG_WINDOW=4" in indexer.log_text()
    assert f"{INDEXER} reindex --from {head - 5}" in indexer.log_text()
    assert await stream_entries(redis_client, stream_key) == before
    assert await stored_keys(database_url) == stored


async def test_a_long_catch_up_keeps_reporting_the_head_as_the_chain_grows(
    dev_chain: DevChain,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """The head reported while catching up follows the chain: frozen where the catch-up began,
    it made a catch-up longer than 15 minutes look like a provider stuck on an old head (the
    KektechIndexerHeadStalled alert), and understated the lag."""
    window = 8
    await dev_chain.mine_empty(300)
    chain_head = await dev_chain.block_number()

    async def slow_logs(method: str, params: list[Any]) -> None:
        if method == "eth_getLogs":
            await asyncio.sleep(0.1)  # with ranges of 5 blocks: a catch-up of 6 s or more

    async def metric(indexer: IndexerProcess, name: str) -> float | None:
        try:
            return await indexer.metric(name)
        except OSError:  # not listening yet
            return None

    async with RpcFaultProxy(anvil.rpc_url, seed=18, rates={}) as proxy:
        proxy.on_call = slow_logs
        with make_indexer(
            RPC_PROVIDER_URL=proxy.url,
            REORG_WINDOW=str(window),
            LOGS_RANGE_MIN="1",
            LOGS_RANGE_INITIAL="5",
            LOGS_RANGE_MAX="5",
        ) as indexer:
            first_head: float | None = None

            async def first_head_seen() -> bool:
                nonlocal first_head
                first_head = await metric(indexer, "kektech_indexer_head_block")
                return first_head is not None and first_head >= chain_head

            await eventually(first_head_seen, within=30, what="the indexer reports a head")
            assert first_head is not None
            while True:
                await dev_chain.mine_empty()
                head = await metric(indexer, "kektech_indexer_head_block")
                cursor = await metric(indexer, "kektech_indexer_cursor_block")
                assert head is not None
                assert cursor is not None
                if head > first_head:
                    break
                assert cursor < first_head - window, (
                    f"the catch-up to block {first_head:.0f} ended (cursor {cursor:.0f}) "
                    "with the head reported still where it began"
                )
                await asyncio.sleep(0.2)
            assert cursor < first_head - window, "the head was read again during the catch-up"


async def test_rpc_faults_cause_no_loss_and_no_duplicates(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Through a proxy injecting 429s, 5xx, timeouts, drops and range errors, nothing is lost."""
    driver = ActivityDriver(dev_chain, deployment, seed=50, txs_per_block=8)
    await driver.cover_all_events()
    await driver.run(blocks=40)
    rates = {"http_429": 0.06, "http_502": 0.04, "http_503": 0.04, "rpc_rate_limit": 0.05,
             "timeout": 0.03, "drop": 0.05, "invalid_json": 0.05}  # fmt: skip
    async with RpcFaultProxy(anvil.rpc_url, seed=7, rates=rates, max_range=7, max_results=60,
                             retry_after=0.05, timeout_delay=3.0) as proxy:  # fmt: skip
        overrides = {"RPC_PROVIDER_URL": proxy.url, "RPC_TIMEOUT": "1", "RPC_MAX_RETRIES": "30",
                     "LOGS_RANGE_INITIAL": "50", "LOGS_RANGE_MAX": "200",
                     "REORG_WINDOW": "8"}  # fmt: skip
        # A short window: catch-up asks by ranges (range errors), the tip by block hashes.
        # Each kind of fault once for sure (between faithful answers), then at random.
        proxy.schedule(*[fault for kind in rates for fault in (kind, None)])
        with make_indexer(**overrides) as indexer:
            busy = asyncio.create_task(driver.run(blocks=20, block_interval=0.1))
            await busy
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
        injected = dict(proxy.injected)
    assert_gap_free(entries)
    assert_no_duplicates(entries)
    assert not any(envelope["removed"] for _, envelope in entries)
    assert all(injected.get(kind, 0) > 0 for kind in rates), injected
    assert injected["range"] > 0, injected
    assert injected["results"] > 0, injected


@pytest.mark.parametrize(
    ("empty_unknown_hash", "seed", "proxy_seed"),
    [(False, 52, 9), (True, 59, 14)],
    ids=["unknown block", "[]"],
)
async def test_a_node_lagging_behind_the_head_loses_no_event_at_the_tip(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
    empty_unknown_hash: bool,
    seed: int,
    proxy_seed: int,
) -> None:
    """Live blocks whose logs one backend has not seen yet are fetched again, not skipped:
    whether it answers their blockHash query with "unknown block" or, as older Besu, reth
    and anvil do, with [] (taken as none, the database would not equal the chain)."""
    driver = ActivityDriver(dev_chain, deployment, seed=seed, txs_per_block=4)
    await driver.cover_all_events()
    async with RpcFaultProxy(
        anvil.rpc_url,
        seed=proxy_seed,
        rates={"lagging": 0.5},
        fault_methods={"eth_getLogs"},
        empty_unknown_hash=empty_unknown_hash,
    ) as proxy:
        overrides = {"RPC_PROVIDER_URL": proxy.url, "RPC_MAX_RETRIES": "30"}
        with make_indexer(**overrides) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            await driver.run(blocks=25, block_interval=0.15)
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            assert indexer.running
        lagged = proxy.injected["lagging"]
    assert lagged > 0
    assert_gap_free(entries)


async def test_a_node_lagging_more_than_the_window_loses_no_event_in_catch_up(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Catch-up asks for logs by block range, which a backend behind the head answers with
    no logs for the blocks it lacks, and no error: a range is taken only from a backend that
    shows it has the range's last block, so nothing is skipped."""
    driver = ActivityDriver(dev_chain, deployment, seed=57, txs_per_block=4)
    await driver.cover_all_events()
    await driver.run(blocks=30)
    async with RpcFaultProxy(
        anvil.rpc_url, seed=12, rates={"lagging": 0.5}, fault_methods={"eth_getLogs"}, lag_blocks=25
    ) as proxy:
        overrides = {
            "RPC_PROVIDER_URL": proxy.url,
            "RPC_MAX_RETRIES": "30",
            "REORG_WINDOW": "8",
            "LOGS_RANGE_INITIAL": "4",
            "LOGS_RANGE_MAX": "8",
        }
        with make_indexer(**overrides) as indexer:
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
        lagged = proxy.injected["lagging"]
    assert lagged > 0
    assert_gap_free(entries)


async def test_a_null_answer_for_the_latest_block_is_asked_again(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A node (or a backend behind a load balancer) answers null for "latest" once, having no
    head to give for a moment: the indexer asks again and goes on (it stopped with "block -1
    not found" at the first one, with its only endpoint)."""
    driver = ActivityDriver(dev_chain, deployment, seed=69, txs_per_block=3)
    await driver.run(blocks=2)
    async with RpcFaultProxy(anvil.rpc_url, seed=13) as proxy:
        with make_indexer(RPC_PROVIDER_URL=proxy.url) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            proxy.stale_header("latest", None, 2)
            await driver.run(blocks=3)
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            assert indexer.running
        assert proxy.injected["stale_header"] == 2
    assert_gap_free(entries)


async def test_a_node_lagging_behind_the_head_for_every_method_stops_nothing(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Behind a load balancer the head may come from one backend and the headers from one two
    blocks behind, which has none yet for the newest numbers: the indexer asks again later
    instead of stopping, and loses nothing."""
    driver = ActivityDriver(dev_chain, deployment, seed=54, txs_per_block=4)
    await driver.cover_all_events()
    async with RpcFaultProxy(
        anvil.rpc_url,
        seed=11,
        rates={"lagging": 0.5},
        fault_methods={"eth_blockNumber", "eth_getBlockByNumber", "eth_getLogs"},
        lag_blocks=2,
    ) as proxy:
        overrides = {"RPC_PROVIDER_URL": proxy.url, "RPC_MAX_RETRIES": "30"}
        with make_indexer(**overrides) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            for _ in range(12):  # three blocks at a time: tip ranges ask for headers by number
                await dev_chain.mine_empty(2)
                await driver.run(blocks=1)
                await asyncio.sleep(0.15)
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            assert indexer.running
        lagged = proxy.injected["lagging"]
    assert lagged > 0
    assert_gap_free(entries)


async def test_logs_a_node_indexes_after_serving_the_header_are_not_lost(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A node may serve a block's header before its log index holds the block's logs, and
    answer eth_getLogs, even by block hash, with none meanwhile (go-ethereum#26098): a tip
    block whose bloom names a tracked contract and event but came with no logs is fetched
    again, said in the log and counted, not stored empty (81 events were lost here)."""
    driver = ActivityDriver(dev_chain, deployment, seed=61, txs_per_block=3)
    await driver.cover_all_events()
    async with RpcFaultProxy(anvil.rpc_url, seed=15, log_index_lag=1.0) as proxy:
        with make_indexer(RPC_PROVIDER_URL=proxy.url) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            await driver.run(blocks=10, block_interval=0.3)
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            retries = await indexer.metric("kektech_indexer_fetch_retries_total")
            accepted = await indexer.metric("kektech_indexer_bloom_accepted_blocks_total")
            assert indexer.running
        hidden = proxy.injected["hidden_logs"]
    assert hidden > 0
    assert_gap_free(entries)
    said = [
        orjson.loads(line)
        for line in indexer.log_text().splitlines()
        if "fetching again" in line and "bloom" in line
    ]
    assert said, "no range was fetched again for its bloom"
    assert (retries or 0) >= len(said)
    assert accepted == 0


async def test_a_block_whose_bloom_names_logs_the_node_never_gives_is_stored_after_a_grace(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A bloom's false positive (here a node that never gives one block's logs, its bloom
    naming them) holds the indexer back BLOOM_GRACE seconds, not for good: the block is stored
    without logs, with a warning naming it and a count, and indexing goes on."""
    driver = ActivityDriver(dev_chain, deployment, seed=62, txs_per_block=3)
    await driver.cover_all_events()
    market = await driver.active_market(deployment.factory_v1)
    async with RpcFaultProxy(anvil.rpc_url, seed=16) as proxy:
        with make_indexer(RPC_PROVIDER_URL=proxy.url) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            hidden = await dev_chain.block_number() + 1
            proxy.hidden_blocks.add(hidden)
            await driver.bet(market)  # a block of one bet: a market's event, no new market
            await driver.run(blocks=3, block_interval=0.2)
            head = await dev_chain.block_number()
            await indexer.wait_cursor(head)
            accepted = await indexer.metric("kektech_indexer_bloom_accepted_blocks_total")
            assert indexer.running
    logs = await tracked_chain_logs(dev_chain, deployment)
    withheld = {chain_key(lg) for lg in logs if int(lg["blockNumber"], 16) == hidden}
    assert withheld, "the hidden block holds tracked events"
    expected = [chain_key(lg) for lg in logs if chain_key(lg) not in withheld]
    assert await stored_keys(database_url) == expected
    assert any(int(lg["blockNumber"], 16) > hidden for lg in logs), "events follow it"
    warnings = [
        orjson.loads(line)
        for line in indexer.log_text().splitlines()
        if "taken for a bloom false positive" in line
    ]
    assert [w["block"] for w in warnings] == [hidden]
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["waited"] >= BLOOM_GRACE
    assert accepted == 1


async def test_a_tip_block_replaced_before_its_logs_are_fetched_is_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The new block's header is fetched, then a reorg replaces the block before its logs are
    asked for by hash: the node answers "unknown block" for good. The indexer notices the
    reorg and indexes the new branch, instead of failing once its retries are spent."""
    driver = ActivityDriver(dev_chain, deployment, seed=53, txs_per_block=3)
    await driver.cover_all_events()
    armed, held, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold_logs_by_hash(method: str, params: list[Any]) -> None:
        if armed.is_set() and method == "eth_getLogs" and "blockHash" in params[0]:
            held.set()
            await release.wait()

    async with RpcFaultProxy(anvil.rpc_url, seed=3) as proxy:
        proxy.on_call = hold_logs_by_hash
        with make_indexer(RPC_PROVIDER_URL=proxy.url, RPC_MAX_RETRIES="2") as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            armed.set()
            await driver.run(blocks=1)
            async with asyncio.timeout(10):
                await held.wait()
            await dev_chain.request("anvil_reorg", [1, reorg_transactions(dev_chain, deployment)])
            armed.clear()
            release.set()
            await dev_chain.mine_empty(1)
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            assert indexer.running
    assert_gap_free(entries)


async def test_stops_promptly_when_postgres_stops_answering(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    postgres: Postgres,
    database_url: str,
) -> None:
    """The database's network path goes dead (nothing answers, nothing closes), then PM2 stops
    the indexer: it still exits within the stop bound, leaving the lease to expire."""
    driver = ActivityDriver(dev_chain, deployment, seed=59, txs_per_block=3)
    await driver.run(blocks=3)
    async with TcpProxy(postgres.port) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        with make_indexer(DATABASE_URL=url) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            # The path dies as the next batch's transaction begins: its BEGIN never arrives.
            proxy.freeze_before = b"BEGIN"
            await driver.run(blocks=1)  # a batch to commit while the database is unreachable

            async def committing() -> bool:
                return proxy.frozen

            await eventually(committing, within=30, what="the batch's commit began")
            started = asyncio.get_running_loop().time()
            assert await asyncio.to_thread(indexer.stop) == 0
            assert asyncio.get_running_loop().time() - started < STOP_BOUND
    assert "stopped by signal" in indexer.log_text()


async def test_a_database_that_stops_answering_makes_the_indexer_exit_for_a_restart(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    postgres: Postgres,
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A statement that gets no answer within DB_COMMAND_TIMEOUT ends the indexer with a
    clear error (PM2 then restarts it) instead of stalling it for good; the restarted indexer
    loses nothing."""
    driver = ActivityDriver(dev_chain, deployment, seed=61, txs_per_block=3)
    await driver.run(blocks=3)
    async with TcpProxy(postgres.port) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        with make_indexer(DATABASE_URL=url, DB_COMMAND_TIMEOUT="2") as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            proxy.freeze()
            await driver.run(blocks=2)
            assert await indexer.wait_exit(within=STOP_BOUND) == 1
    assert '"error_type":"DatabaseUnavailable"' in indexer.log_text()
    with make_indexer() as restarted:
        entries = await caught_up(
            restarted, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_gap_free(entries)


async def test_a_leader_whose_lease_lapsed_says_so(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    postgres: Postgres,
    database_url: str,
) -> None:
    """The path to the database freezes while DB_COMMAND_TIMEOUT (60 s) lets the calls wait:
    once the write lease went LEASE_TTL unrenewed, a standby may hold it, and the leader says
    so (/healthz `waiting_for`, not ready, `kektech_indexer_leader` 0) instead of reporting
    itself the leader, ready, with a frozen head, as two leaders would."""
    await ActivityDriver(dev_chain, deployment, seed=64, txs_per_block=3).run(blocks=2)
    async with TcpProxy(postgres.port) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        with make_indexer(DATABASE_URL=url, LEASE_TTL="3") as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            assert (await indexer.get("/ready"))[0] == 200
            assert await indexer.metric("kektech_indexer_leader") == 1
            proxy.freeze()

            async def lapsed() -> bool:
                _, body = await indexer.get("/healthz")
                return "write lease" in str(body.get("waiting_for"))

            await eventually(lapsed, within=10, what="/healthz says the lease lapsed")
            status, body = await indexer.get("/ready")
            assert (status, body["role"], body["ready"]) == (503, "leader", False)
            assert await indexer.metric("kektech_indexer_leader") == 0
            assert indexer.running


async def test_a_batch_waiting_on_a_lock_longer_than_the_lease_term_keeps_the_lease(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A batch waits on a lock (an operator's `LOCK TABLE`, a long migration elsewhere) for
    longer than LEASE_TTL. Its transaction holds the lease row from its first read, so no
    standby could take the lease meanwhile: the lone leader commits once the lock is gone and
    goes on (it stopped with "write lease lost ... another indexer took over")."""
    driver = ActivityDriver(dev_chain, deployment, seed=65, txs_per_block=3)
    await driver.run(blocks=2)
    with make_indexer(LEASE_TTL="2") as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        async with connected(database_url) as other, other.transaction():
            await other.execute("LOCK TABLE events IN SHARE MODE")  # reads pass, writes wait
            await driver.run(blocks=2)

            async def a_batch_waits() -> bool:
                return bool(
                    await other.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                )

            await eventually(a_batch_waits, within=30, what="a batch waiting on the lock")
            await asyncio.sleep(5)  # two and a half terms
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
        assert indexer.running
    assert_gap_free(entries)
    assert "LeaseLost" not in indexer.log_text()


async def test_a_statement_cancelled_by_the_server_makes_the_indexer_exit_for_a_restart(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The server cancels the batch's statement (an operator's `pg_cancel_backend` of a
    session stuck behind a lock; the `statement_timeout` DB_COMMAND_TIMEOUT sets does the
    same): the indexer ends with the same clear DatabaseUnavailable as for a silent database
    (it ended with a traceback), and the restarted one loses nothing."""
    driver = ActivityDriver(dev_chain, deployment, seed=62, txs_per_block=3)
    await driver.run(blocks=2)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        async with connected(database_url) as other, other.transaction():
            await other.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            await driver.run(blocks=2)

            async def cancelled_a_waiter() -> bool:
                return bool(
                    await other.fetch(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                )

            await eventually(cancelled_a_waiter, within=30, what="a batch waiting on the lock")
            assert await indexer.wait_exit(within=STOP_BOUND) == 1
    log = indexer.log_text()
    assert '"error_type":"DatabaseUnavailable"' in log
    assert "Traceback" not in log
    with make_indexer() as restarted:
        entries = await caught_up(
            restarted, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_gap_free(entries)


async def test_a_transaction_cut_off_by_a_dead_network_path_does_not_block_the_restart(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    postgres: Postgres,
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The path to Postgres dies after the server got a batch's statements but not its
    COMMIT, and nothing closes the server's side: the server ends that transaction, and the
    row locks it holds, within DB_COMMAND_TIMEOUT instead of hours (TCP keepalive), so the
    restarted indexer goes on."""
    driver = ActivityDriver(dev_chain, deployment, seed=62, txs_per_block=3)
    await driver.run(blocks=3)
    async with TcpProxy(postgres.port) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        with make_indexer(DATABASE_URL=url, DB_COMMAND_TIMEOUT="2") as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            proxy.freeze_before = b"COMMIT"
            await driver.run(blocks=2)
            assert await indexer.wait_exit(within=STOP_BOUND) == 1
        # The dead path's connections stay open on the server's side meanwhile.
        with make_indexer(DB_COMMAND_TIMEOUT="2") as restarted:
            entries = await caught_up(
                restarted, dev_chain, redis_client, stream_key, database_url, deployment
            )
    assert_gap_free(entries)


async def test_start_up_says_it_waits_for_a_database_that_accepts_and_never_answers(
    make_indexer: Callable[..., IndexerProcess], database_url: str, postgres: Postgres
) -> None:
    """A database whose port accepts connections and never answers (a hung server, a
    firewall that swallows packets after the handshake) is said on /healthz and in the log
    within seconds, not after DB_COMMAND_TIMEOUT (60 s, as long as PM2's listen_timeout):
    connecting is bounded on its own."""
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = database_url.replace(f":{postgres.port}/", f":{silent.getsockname()[1]}/")
        with make_indexer(DATABASE_URL=url) as indexer:
            reason = await indexer.wait_waiting_for("database", within=25)
            assert indexer.running
    assert "database" in reason


async def test_start_up_waits_for_the_database_and_the_rpc_endpoint(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    postgres: Postgres,
    anvil: Anvil,
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Postgres, then the RPC endpoint, are not there yet when the indexer starts (a boot, a
    deploy during an outage): it waits for each, saying on /healthz what it waits for, instead
    of exiting (PM2 gives up on an app that fails ten times in its first 100 s), then indexes
    everything."""
    driver = ActivityDriver(dev_chain, deployment, seed=63, txs_per_block=3)
    await driver.run(blocks=3)
    # Proxies to ports where nothing listens: every connection is cut, as to a server down.
    async with TcpProxy(free_port()) as db_path, TcpProxy(free_port()) as rpc_path:
        url = database_url.replace(f":{postgres.port}/", f":{db_path.port}/")
        rpc_url = f"http://127.0.0.1:{rpc_path.port}"
        with make_indexer(DATABASE_URL=url, RPC_PROVIDER_URL=rpc_url) as indexer:
            await indexer.wait_waiting_for("database")
            assert indexer.running
            db_path.target_port = postgres.port
            await indexer.wait_waiting_for("eth_chainId", within=60)
            assert indexer.running
            rpc_path.target_port = anvil.port
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
            _, body = await indexer.get("/healthz")
            assert "waiting_for" not in body
    assert_gap_free(entries)
    log = indexer.log_text()
    assert "start-up waits for a dependency" in log
    assert "Traceback" not in log


async def test_start_up_waits_for_a_read_only_database(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The database answers but takes no writes (a standby during a failover, Supabase's
    read-only mode once its disk is nearly full): start-up waits for it, saying so, as for a
    database that is not there (its migrations ended the indexer with a traceback, and PM2's
    restarts soon gave up), then indexes everything once it takes writes again."""
    await ActivityDriver(dev_chain, deployment, seed=66, txs_per_block=3).run(blocks=2)
    async with connected(database_url) as admin:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        with make_indexer() as indexer:
            reason = await indexer.wait_waiting_for("read-only", within=25)
            assert indexer.running
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            entries = await caught_up(
                indexer, dev_chain, redis_client, stream_key, database_url, deployment
            )
    assert_gap_free(entries)
    assert "database is read-only" in reason
    assert "Traceback" not in indexer.log_text()


async def test_a_database_out_of_room_makes_the_indexer_exit_for_a_restart(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A batch the server cannot write for lack of room (53100, raised here by a trigger as
    the server raises it when its disk is full) ends the indexer with the clear
    DatabaseUnavailable that PM2's restart then waits on, not a traceback; nothing is lost."""
    driver = ActivityDriver(dev_chain, deployment, seed=67, txs_per_block=3)
    await driver.run(blocks=2)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        async with connected(database_url) as admin:
            await admin.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " RAISE EXCEPTION 'could not extend file: No space left on device'"
                " USING ERRCODE = 'disk_full'; END $$;"
                " CREATE TRIGGER refuse BEFORE INSERT ON events"
                " FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
            await driver.run(blocks=2)
            assert await indexer.wait_exit(within=30) == 1
            await admin.execute("DROP TRIGGER refuse ON events")
    log = indexer.log_text()
    assert '"error_type":"DatabaseUnavailable"' in log
    assert "No space left on device" in log
    assert "Traceback" not in log
    with make_indexer() as restarted:
        entries = await caught_up(
            restarted, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_gap_free(entries)


async def lose_commits_above(database_url: str, block: int) -> None:
    """Leave the database as it was when its cursor stood at `block`, as a failover to a
    replica that had not received the last commits does (or a restore to a moment before
    them): their events, outbox rows, headers, market rows and cursor are gone."""
    async with (
        Database.open(database_url, max_size=1, command_timeout=10) as db,
        db.transaction() as conn,
    ):
        # Between two batches: a batch in flight holds the cursor row until its commit.
        await conn.execute("SELECT 1 FROM indexer_state WHERE id = 1 FOR UPDATE")
        last_seq = await conn.fetchval(
            "SELECT coalesce(max(seq), 0) FROM events WHERE block_number <= $1", block
        )
        block_hash = await conn.fetchval("SELECT hash FROM blocks WHERE number = $1", block)
        assert block_hash is not None
        touched = await conn.fetch(
            "SELECT DISTINCT market_address FROM events"
            " WHERE block_number > $1 AND market_address IS NOT NULL",
            block,
        )
        await conn.execute("DELETE FROM events WHERE block_number > $1", block)
        await conn.execute("DELETE FROM outbox WHERE seq > $1", last_seq)
        await conn.execute("DELETE FROM blocks WHERE number > $1", block)
        await rebuild_markets(conn, {r[0] for r in touched}, created_above=block)
        await conn.execute(
            "UPDATE indexer_state SET block_number = $1, block_hash = $2, last_seq = $3",
            block,
            block_hash,
            last_seq,
        )
        await conn.execute(
            "UPDATE publisher_state SET published_seq = least(published_seq, $1)", last_seq
        )


async def test_a_database_that_lost_its_last_commits_is_not_written_past(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """The database loses commits it had acknowledged (a failover to a replica behind):
    its cursor is no longer at the block the indexer's next batch follows. The indexer stops
    with a clear error rather than write that batch above a hole it would never fill; the
    restarted indexer resumes from the database's cursor and misses nothing."""
    driver = ActivityDriver(dev_chain, deployment, seed=68, txs_per_block=3)
    await driver.run(blocks=2)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        for _ in range(3):  # live blocks, each its own batch
            await driver.run(blocks=1)
            await indexer.wait_cursor(await dev_chain.block_number())
        await lose_commits_above(database_url, await dev_chain.block_number() - 2)
        await driver.run(blocks=2)
        assert await indexer.wait_exit(within=30) == 1
    log = indexer.log_text()
    assert '"error_type":"CursorMoved"' in log
    assert "Traceback" not in log
    with make_indexer() as restarted:
        entries = await caught_up(
            restarted, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_gap_free(entries)


async def test_start_up_tries_a_missing_database_again_at_least_every_few_seconds(
    make_indexer: Callable[..., IndexerProcess], postgres: Postgres, database_url: str
) -> None:
    """While the database is down the back-off doubles from 1 s but stays short (5 s), so the
    indexer PM2 restarted during an outage is back within seconds of the database (with a
    30 s cap it came back up to 30 s later, every time)."""
    async with TcpProxy(free_port()) as db_path:
        url = database_url.replace(f":{postgres.port}/", f":{db_path.port}/")
        with make_indexer(DATABASE_URL=url) as indexer:

            def retries() -> list[float]:
                lines = indexer.log_text().splitlines()
                waits = [orjson.loads(line) for line in lines if "start-up waits" in line]
                return [float(wait["retry_in"]) for wait in waits]

            async def waited_long() -> bool:
                return sum(retries()) >= 20

            await eventually(waited_long, within=60, what="20 s of start-up retries")
            assert indexer.running
    delays = retries()
    assert delays[:3] == [1.0, 2.0, 4.0]  # still a back-off
    assert max(delays) <= 5


async def test_an_endpoint_on_another_chain_does_not_stop_the_indexer(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A URL of another network listed after a working one: the working one's first 503
    failed over to it and stopped the indexer with ChainIdMismatch (and PM2's restarts did
    the same for as long as an outage lasted). It is left out, and indexing goes on."""
    driver = ActivityDriver(dev_chain, deployment, seed=21, txs_per_block=2)
    await driver.cover_all_events()
    async with (
        RpcFaultProxy(anvil.rpc_url, seed=21) as working,
        RpcFaultProxy(anvil.rpc_url, seed=22, chain_id=1) as other_chain,
    ):
        with make_indexer(RPC_PROVIDER_URL=f"{working.url},{other_chain.url}") as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            working.schedule("http_503")
            await driver.run(blocks=3)
            await indexer.wait_cursor(await dev_chain.block_number())
            assert indexer.running
            assert "rpc endpoint serves another chain" in indexer.log_text()
        assert other_chain.methods == {"eth_chainId": 1}
    await assert_database_equals_chain(database_url, dev_chain, deployment)
