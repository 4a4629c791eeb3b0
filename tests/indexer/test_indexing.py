"""End to end: the indexer stores and publishes every KEKTECH event exactly as on the chain."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from indexer.catalog import OUTCOME_NAMES, STATE_NAMES
from shared.channels import snake_case
from shared.envelope import EventEnvelope
from tests.indexer.conftest import (
    MARKET_CREATED_TOPIC,
    assert_announcements_first,
    assert_database_equals_chain,
    assert_gap_free,
    expected_ids,
    live_ids,
    published_order,
    stream_entries,
    tracked_chain_logs,
    wait_for_stream,
)
from tests.reference_events import REFERENCE_EVENTS
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess
from tests.support.rpc_proxy import RpcFaultProxy
from tests.support.tasks import background
from tests.support.waiting import eventually

ENVELOPE_FIELDS = {
    "type", "eventType", "id", "seq", "chainId", "contract", "contractKind", "marketAddress",
    "blockNumber", "blockHash", "transactionHash", "logIndex", "timestamp", "args", "data",
    "removed",
}  # fmt: skip


async def collect_pubsub(
    client: aioredis.Redis, sink: dict[str, list[dict[str, Any]]], subscribed: asyncio.Event
) -> None:
    """Gather every message on events:* and market:* by channel until cancelled; `subscribed`
    is set once Redis confirmed both pattern subscriptions."""
    confirmed = 0
    async with client.pubsub() as pubsub:
        await pubsub.psubscribe("events:*", "market:*")
        async for message in pubsub.listen():
            if message["type"] == "psubscribe":
                confirmed += 1
                if confirmed == 2:
                    subscribed.set()
            elif message["type"] == "pmessage":
                sink[message["channel"].decode()].append(orjson.loads(message["data"]))


async def test_every_event_is_indexed_decoded_and_published(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """Each reference event reaches Postgres and Redis on both channel shapes, as an envelope."""
    driver = ActivityDriver(dev_chain, deployment, seed=11)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    channels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    subscribed = asyncio.Event()
    async with background(collect_pubsub(redis_client, channels, subscribed), name="pubsub"):
        async with asyncio.timeout(10):
            await subscribed.wait()  # before anything is published
        with make_indexer() as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            logs = await tracked_chain_logs(dev_chain, deployment)
            total = await assert_database_equals_chain(database_url, dev_chain, deployment)
            await wait_for_stream(redis_client, stream_key, total)
            entries = await stream_entries(redis_client, stream_key)

            async def on_pubsub_too() -> bool:  # Pub/Sub trails the stream by a round trip
                return all(e in channels[f"events:{snake_case(e['type'])}"] for _, e in entries)

            await eventually(on_pubsub_too, within=10, what="every event on Pub/Sub")

    assert_gap_free(entries)
    assert live_ids(entries) == expected_ids(published_order(logs))
    assert assert_announcements_first(entries) == driver.stats.markets
    envelopes = [envelope for _, envelope in entries]
    assert all(set(e) == ENVELOPE_FIELDS for e in envelopes)
    for envelope in envelopes:  # what the indexer writes is what the shared model accepts
        model = EventEnvelope.from_json_bytes(orjson.dumps(envelope))
        assert model.model_dump() == envelope
    names = {(e["contractKind"], e["type"]) for e in envelopes}
    reference = {
        (kind, declaration.split("(")[0])
        for kind, declarations in REFERENCE_EVENTS.items()
        for declaration in declarations
    }
    assert names == reference
    for envelope in envelopes:
        assert envelope["eventType"] == envelope["type"]
        assert envelope["data"] == envelope["args"]
        assert envelope["removed"] is False
        assert envelope["timestamp"].endswith("Z")
        assert envelope in channels[f"events:{snake_case(envelope['type'])}"]
        if envelope["marketAddress"] is not None:
            assert envelope in channels[f"market:{envelope['marketAddress']}"]
        for value in envelope["args"].values():
            assert isinstance(value, str | bool)
    created = [e for e in envelopes if e["type"] == "MarketCreated"]
    assert all(e["data"]["question"].startswith("Will ") for e in created)
    assert all(e["marketAddress"] in driver.markets for e in created)
    approvals = [e for e in envelopes if e["type"] == "MarketApproved"]
    factory_approvals = [e for e in approvals if e["contractKind"] == "factory"]
    assert factory_approvals
    assert channels["events:proposal_approved"] == factory_approvals
    bets = [e for e in envelopes if e["type"] == "BetPlaced"]
    assert {e["args"]["outcomeName"] for e in bets} == {"OUTCOME1", "OUTCOME2"}


async def test_markets_projection_follows_the_chain(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """The markets table has every market with its creator, question, bets, and the state and
    outcome the market itself holds on the chain (its views), cancelled markets included, and
    markets the resolution manager resolved by admin or upheld a dispute of: its announcements
    are not the market's outcome, its adminResolve finalizes the market. A rollback's rebuild
    of a row folds the same way."""
    driver = ActivityDriver(dev_chain, deployment, seed=12, txs_per_block=10)
    await driver.cover_all_events()
    await driver.run(blocks=40)
    disputed = await driver.active_market(deployment.factory_v2)
    await driver.uphold_a_dispute(disputed, resolved=1, upheld=2)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    async with connected(database_url) as conn:
        rows = {r["address"]: r for r in await conn.fetch("SELECT * FROM markets")}
        admin_resolved = {
            r["market_address"]: int(r["outcome"])
            for r in await conn.fetch(
                "SELECT market_address, args->>'outcome' AS outcome FROM events"
                " WHERE event_name = 'AdminResolution' ORDER BY block_number, log_index"
            )
        }
    assert set(rows) == set(driver.markets)
    assert admin_resolved, "cover_all_events resolves a market by admin"
    # The resolution manager named OUTCOME2, the market holds OUTCOME1.
    assert (rows[disputed.address]["state"], rows[disputed.address]["outcome"]) == (
        "DISPUTED",
        "OUTCOME1",
    )
    views = dev_chain.contract("PredictionMarket")
    cancelled_in = {market.state.name for market in driver.markets.values() if market.cancelled}
    assert {"ACTIVE", "REJECTED"} <= cancelled_in
    for address, market in driver.markets.items():
        row = rows[address]
        assert row["factory"] == market.factory
        assert row["creator"] == market.creator
        assert row["question"].startswith("Will ")
        volumes = {1: 0, 2: 0}
        for (_, outcome), amount in market.stakes.items():
            volumes[outcome] += amount
        assert (int(row["volume_outcome1"]), int(row["volume_outcome2"])) == (
            volumes[1],
            volumes[2],
        )
        assert (row["bets_outcome1"], row["bets_outcome2"]) == (market.bets[1], market.bets[2])
        state = int(await dev_chain.call(to=address, data=views.encode_abi("state")), 16)
        outcome = int(await dev_chain.call(to=address, data=views.encode_abi("outcome")), 16)
        assert (row["state"], row["outcome"]) == (STATE_NAMES[state], OUTCOME_NAMES[outcome])
        if address in admin_resolved:
            assert (row["state"], row["outcome"]) == (
                "FINALIZED",
                OUTCOME_NAMES[admin_resolved[address]],
            )
        if market.state.name == "REJECTED":
            assert row["rejected"] is True
        else:
            assert row["state"] == market.state.name
    # A reindex from the dispute's block rebuilds the market's row from its stored events
    # (indexer/market_rebuild.py), then applies the block again: the same fold, the same rows.
    reindex = make_indexer("reindex", "--from", str(await dev_chain.block_number()))
    reindex.start()
    assert await reindex.wait_exit(within=60) == 0, reindex.log_text()
    async with connected(database_url) as conn:
        again = {r["address"]: r for r in await conn.fetch("SELECT * FROM markets")}
    assert again == rows


async def test_strings_text_cannot_carry_are_replaced_not_fatal(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """Anyone can send a string argument that is not UTF-8 or holds U+0000 (which Postgres
    text refuses): it is decoded with U+FFFD in their place, the indexer keeps going, and a
    market announced with such a question is followed like any other, after a restart too."""
    factory = dev_chain.contract("FlexibleMarketFactoryUnified")
    admin = dev_chain.accounts[0]
    question = b"Will it \xff? \x00"
    creation = factory.encode_abi_raw_strings(
        "createMarket", [question, 10**9, b"\x01" * 32, 0, 10**9 - 1]
    )
    await dev_chain.send(sender=admin, to=deployment.factory_v2, data=creation, value=10**15)
    block = await dev_chain.mine()
    announcement = next(
        lg for lg in block["receipts"][0]["logs"] if lg["address"].lower() == deployment.factory_v2
    )
    market = "0x" + announcement["topics"][1][-40:]
    manager = dev_chain.contract("ResolutionManager")
    findings = manager.encode_abi("investigateDispute", [market, "two\x00sources"])
    await dev_chain.send(sender=admin, to=deployment.resolution_manager, data=findings)
    await dev_chain.mine()
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    approval = factory.encode_abi("approveMarket", [market, False])
    await dev_chain.send(sender=admin, to=deployment.factory_v2, data=approval)
    await dev_chain.mine()
    with make_indexer() as indexer:  # the market is known again from the database
        await indexer.wait_cursor(await dev_chain.block_number())
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    async with connected(database_url) as conn:
        row = await conn.fetchrow("SELECT question, state FROM markets WHERE address = $1", market)
        stored = await conn.fetchval(
            "SELECT args->>'findings' FROM events WHERE event_name = 'DisputeInvestigated'"
        )
        market_events = await conn.fetchval(
            "SELECT count(*) FROM events WHERE contract = $1 AND block_number = $2",
            market,
            await dev_chain.block_number(),
        )
    assert row is not None
    assert (row["question"], row["state"]) == ("Will it \ufffd? \ufffd", "APPROVED")
    assert stored == "two\ufffdsources"
    assert market_events > 0  # the market's own events after the restart


# Runtime code that emits LOG3 with the call data's first three words as topics and the rest
# as data: CALLDATACOPY it all to memory, MLOAD the topics, LOG3.
LOG3_EMITTER = "0x366000600037604051602051600051606036036060a300"


def word(value: int | str) -> bytes:
    return (int(value, 16) if isinstance(value, str) else value).to_bytes(32, "big")


async def test_a_market_announcement_that_does_not_decode_creates_no_market(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A factory log with MarketCreated's topic0 in another layout (here `category` not
    indexed) is stored raw, and announces no market, in every run: its "child" is not followed
    before a restart and dropped after it (its events were indexed, then silently no more)."""
    admin = dev_chain.accounts[0]
    child = "0x" + "c0ffee" * 6 + "c0ff"
    for address in (deployment.factory_v1, child):
        await dev_chain.request("anvil_setCode", [address, LOG3_EMITTER])
    created = MARKET_CREATED_TOPIC
    bet = "0x" + keccak(text="BetPlaced(address,uint8,uint256,uint256,uint256)").hex()
    layout = ["string", "uint256", "uint256", "bytes32", "uint256"]
    announcement = word(created) + word(child) + word(admin)
    announcement += encode(layout, ["Q?", 10**9, 0, b"\x01" * 32, 1])
    await dev_chain.send(sender=admin, to=deployment.factory_v1, data="0x" + announcement.hex())

    def bet_of(amount: int) -> str:
        return "0x" + (word(bet) + word(admin) + word(1) + word(amount) * 2 + word(1)).hex()

    await dev_chain.send(sender=admin, to=child, data=bet_of(111))
    await dev_chain.mine()
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    await dev_chain.send(sender=admin, to=child, data=bet_of(222))
    await dev_chain.mine()
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    async with connected(database_url) as conn:
        raw = await conn.fetch(
            "SELECT event_name FROM events WHERE contract = $1 AND topic0 = $2",
            deployment.factory_v1,
            created,
        )
        child_events = await conn.fetchval("SELECT count(*) FROM events WHERE contract = $1", child)
        row = await conn.fetchval("SELECT count(*) FROM markets WHERE address = $1", child)
    assert [r["event_name"] for r in raw] == [None]  # stored raw
    assert (child_events, row) == (0, 0)
    verify = make_indexer("verify", "--from", "0")
    verify.start()
    assert await verify.wait_exit(within=60) == 0, verify.log_text()


# A generous bound (a busy CI machine), well inside PM2's kill_timeout (ecosystem.config.js).
STOP_BOUND = 10.0


async def test_graceful_stop_on_sigint_and_sigterm(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """SIGINT (PM2's stop signal) and SIGTERM both stop the indexer cleanly with exit code 0."""
    driver = ActivityDriver(dev_chain, deployment, seed=13)
    await driver.run(blocks=5)
    for sig in (signal.SIGINT, signal.SIGTERM):
        indexer = make_indexer()
        indexer.start()
        await indexer.wait_ready()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.to_thread(indexer.stop, sig) == 0
        assert loop.time() - started < STOP_BOUND
        assert "stopped by signal" in indexer.log_text()


async def test_batches_stay_near_batch_events_inside_the_reorg_window(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A dense chain inside the reorg window is committed in bounded batches, not all at once.

    Memory follows the size of a batch, so BATCH_EVENTS must bound the tip ranges too (each
    block there is fetched by hash) and not only the deep ranges of a catch-up.
    """
    driver = ActivityDriver(dev_chain, deployment, seed=12)
    driver.txs_per_block = 5
    await driver.run(blocks=30)
    head = await dev_chain.block_number()
    with make_indexer(BATCH_EVENTS="40", REORG_WINDOW="64") as indexer:
        await indexer.wait_cursor(head)
        total = await assert_database_equals_chain(database_url, dev_chain, deployment)
        await wait_for_stream(redis_client, stream_key, total)
        batches = [
            line["events"]
            for line in map(orjson.loads, indexer.log_text().splitlines())
            if line.get("event") == "batch indexed"
        ]
    per_block = max(len(logs) for logs in await _logs_per_block(dev_chain, deployment))
    assert head < 64 + 30  # the whole chain is inside the window: tip ranges only
    assert sum(batches) == total > 4 * 40
    assert max(batches) <= 40 + 2 * per_block, batches


async def test_a_new_head_is_indexed_without_asking_for_its_header_again(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """Following the tip, a block found by the head poll is indexed with the header that poll
    returned: no second request for it (on a remote RPC each round trip is latency)."""
    driver = ActivityDriver(dev_chain, deployment, seed=14, txs_per_block=2)
    await driver.cover_all_events()
    async with RpcFaultProxy(anvil.rpc_url, seed=1) as proxy:
        with make_indexer(RPC_PROVIDER_URL=proxy.url) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            first_live = len(proxy.calls)
            for _ in range(4):  # one block at a time: each is the head when the poll finds it
                await driver.run(blocks=1)
                await indexer.wait_cursor(await dev_chain.block_number())
            live_calls = proxy.calls[first_live:]
        await assert_database_equals_chain(database_url, dev_chain, deployment)
    by_number = [
        params
        for method, params in live_calls
        if method == "eth_getBlockByNumber" and params[:1] != ["latest"]
    ]
    assert ("eth_getBlockByNumber", ["latest", False]) in live_calls
    assert by_number == []


async def _logs_per_block(chain: DevChain, deployment: Deployment) -> list[list[dict[str, Any]]]:
    by_block: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for log in await tracked_chain_logs(chain, deployment):
        by_block[log["blockNumber"]].append(log)
    return list(by_block.values())
