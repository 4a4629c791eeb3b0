"""Helpers for end-to-end tests of the indexer against anvil, Postgres and Redis."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from eth_utils.crypto import keccak

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.redis_server import Redis
from indexer.cursor import load_state
from indexer.database import Database
from indexer.errors import ReorgDuringFetch
from indexer.rpc import LogRangeSizer, RpcClient
from indexer.sources import Sources
from indexer.verification import verify_range
from tests.broadcaster.support import read_stream
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess, indexer_env
from tests.support.waiting import eventually

_streams = itertools.count()
MARKET_CREATED_TOPIC = (
    "0x"
    + keccak(text="MarketCreated(address,address,string,uint256,uint256,bytes32,uint256)").hex()
)


@pytest.fixture
def stream_key() -> str:
    """A Redis stream key of this test's own."""
    return f"test:{os.getpid()}:{next(_streams)}:events"


@pytest.fixture
def make_indexer(
    database_url: str,
    redis_server: Redis,
    anvil: Anvil,
    deployment: Deployment,
    stream_key: str,
    tmp_path: Path,
) -> Iterator[Callable[..., IndexerProcess]]:
    """Build (not start) indexer processes sharing this test's database, chain and stream;
    any still running when the test ends (a failed wait) is killed."""
    made: list[IndexerProcess] = []

    def make(*args: str, **overrides: str) -> IndexerProcess:
        env = indexer_env(
            database_url=database_url,
            redis_url=overrides.pop("REDIS_URL", redis_server.url),
            rpc_url=overrides.pop("RPC_PROVIDER_URL", anvil.rpc_url),
            deployment=deployment,
            stream_key=stream_key,
            **overrides,
        )
        made.append(IndexerProcess(env, *args, log_dir=tmp_path))
        return made[-1]

    yield make
    for process in made:
        process.kill()


async def tracked_chain_logs(chain: DevChain, deployment: Deployment) -> list[dict[str, Any]]:
    """Every log on the chain from a contract the indexer tracks, straight from eth_getLogs."""
    head = await chain.block_number()
    logs = await chain.request("eth_getLogs", [{"fromBlock": "0x0", "toBlock": hex(head)}])
    tracked = {*deployment.factories, deployment.resolution_manager, deployment.reward_distributor}
    tracked |= {
        "0x" + lg["topics"][1][-40:]
        for lg in logs
        if lg["address"].lower() in deployment.factories and lg["topics"][0] == MARKET_CREATED_TOPIC
    }
    return [lg for lg in logs if lg["address"].lower() in tracked]


def chain_key(log: dict[str, Any]) -> tuple[Any, ...]:
    """A log's identity and content, as eth_getLogs reports it."""
    return (
        int(log["blockNumber"], 16),
        int(log["logIndex"], 16),
        log["blockHash"],
        log["transactionHash"],
        log["address"].lower(),
        tuple(log["topics"]),
        log["data"],
    )


async def stored_keys(database_url: str) -> list[tuple[Any, ...]]:
    """The same identity and content for every stored event, in chain order."""
    async with connected(database_url) as conn:
        rows = await conn.fetch(
            "SELECT block_number, log_index, block_hash, transaction_hash, contract,"
            " topic0, topic1, topic2, topic3, data FROM events ORDER BY block_number, log_index"
        )
    return [
        (r["block_number"], r["log_index"], r["block_hash"], r["transaction_hash"], r["contract"],
         tuple(t for t in (r["topic0"], r["topic1"], r["topic2"], r["topic3"]) if t is not None),
         r["data"])
        for r in rows
    ]  # fmt: skip


async def assert_database_equals_chain(
    database_url: str,
    chain: DevChain,
    deployment: Deployment,
    *,
    first: int = 0,
    last: int | None = None,
) -> int:
    """The events table is exactly the tracked logs of the canonical chain from block `first`
    on (an indexer's START_BLOCK), up to block `last` if given (an indexer's target with
    CONFIRMATIONS), and the markets table is what the indexer makes of them (verify_markets);
    returns the count."""
    logs = await tracked_chain_logs(chain, deployment)
    top = await chain.block_number() if last is None else last
    expected = [chain_key(lg) for lg in logs if first <= int(lg["blockNumber"], 16) <= top]
    stored = await stored_keys(database_url)
    missing = sorted(set(expected) - set(stored))[:5]
    extra = sorted(set(stored) - set(expected))[:5]
    assert (missing, extra) == ([], []), f"missing {missing}, extra {extra}"
    assert stored == expected
    await verify_markets(database_url, chain, deployment, first=first, last=top)
    return len(stored)


async def database_equals_chain(
    database_url: str,
    chain: DevChain,
    deployment: Deployment,
    *,
    first: int = 0,
    last: int | None = None,
) -> bool:
    """assert_database_equals_chain as a condition to wait for (`eventually`)."""
    try:
        await assert_database_equals_chain(database_url, chain, deployment, first=first, last=last)
    except AssertionError:
        return False
    return True


async def verify_markets(
    database_url: str, chain: DevChain, deployment: Deployment, *, first: int, last: int
) -> None:
    """What `verify --from first` checks, in process: the markets table holds exactly the
    clones the deployment's factories announced on the canonical chain (with that factory and
    block), each row equal to the projection of its events on chain, and every event row as
    the catalogue decodes it; `first` is the indexer's START_BLOCK."""
    static = Sources(
        factories=frozenset(deployment.factories),
        resolution_manager=deployment.resolution_manager,
        reward_distributor=deployment.reward_distributor,
    ).static_kinds()
    async with (
        Database.open(database_url, max_size=1, command_timeout=10) as db,
        RpcClient([chain.rpc_url], timeout=5, max_retries=2) as rpc,
    ):
        state = await load_state(db)
        assert state is not None, "no cursor yet"
        try:
            report = await verify_range(
                db,
                rpc,
                LogRangeSizer(2000, 1, 10_000),
                first=first,
                last=min(last, state.block_number),
                cursor=state.block_number,
                cursor_hash=state.block_hash,
                static=static,
                began=first,
                max_addresses=1000,
                window_events=2000,
                keep=5,
            )
        except ReorgDuringFetch as exc:
            raise AssertionError(f"the chain changed during the check: {exc}") from exc
    assert report.projections_not_compared == 0, report.projections_why
    assert report.differences == 0, [f"{d.where}: {d.what}" for d in report.first]


async def stream_entries(client: aioredis.Redis, key: str) -> list[tuple[int, dict[str, Any]]]:
    """(seq, envelope) of every stream entry, in stream order."""
    result = []
    for entry_id, fields in await read_stream(client, key):
        seq = int(entry_id.decode().split("-")[0])
        assert int(fields[b"seq"]) == seq
        result.append((seq, orjson.loads(fields[b"event"])))
    return result


def assert_gap_free(entries: list[tuple[int, dict[str, Any]]]) -> None:
    """Stream seqs are 1..N with no gap, and each envelope carries its own seq."""
    seqs = [seq for seq, _ in entries]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(envelope["seq"] == seq for seq, envelope in entries)


def assert_retracted(entries: list[tuple[int, dict[str, Any]]], retracted: list[str]) -> None:
    """The stream announces exactly the retracted events (chain order) as removed, newest
    first, gap-free. (A MarketCreated goes first in its transaction there too: it is the last
    log of the transaction that creates a market, on the devnet as on the deployed chain.)"""
    removals = [envelope["id"] for _, envelope in entries if envelope["removed"]]
    assert removals == list(reversed(retracted))
    assert_gap_free(entries)


def assert_no_duplicates(entries: list[tuple[int, dict[str, Any]]]) -> None:
    """Without a reorg, no event is in the stream twice (at-least-once stops at the stream)."""
    ids = [envelope["id"] for _, envelope in entries]
    assert len(ids) == len(set(ids)), [i for i in set(ids) if ids.count(i) > 1]


def live_ids(entries: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Ids of the events still on the chain once removal notices are applied, in order."""
    alive: dict[str, None] = {}
    for _, envelope in entries:
        if envelope["removed"]:
            alive.pop(envelope["id"], None)
        else:
            alive[envelope["id"]] = None
    return list(alive)


def expected_ids(logs: list[dict[str, Any]], chain_id: int = 32323) -> list[str]:
    return [f"{chain_id}:{lg['transactionHash']}:{int(lg['logIndex'], 16)}" for lg in logs]


def published_order(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tracked logs (chain order) in the order the stream publishes them (docs/protocol.md):
    chain order, but a factory's MarketCreated first among its transaction's logs."""
    ordered: list[dict[str, Any]] = []
    for _, run in itertools.groupby(
        logs, key=lambda lg: (lg["blockNumber"], lg["transactionHash"])
    ):
        ordered += sorted(run, key=lambda lg: lg["topics"][:1] != [MARKET_CREATED_TOPIC])
    return ordered


def is_announcement(envelope: dict[str, Any]) -> bool:
    """A factory's MarketCreated (a market's first event for the frontend)."""
    return (envelope["contractKind"], envelope["type"]) == ("factory", "MarketCreated")


def assert_announcements_first(entries: list[tuple[int, dict[str, Any]]]) -> int:
    """In the stream, a transaction's first entry is its MarketCreated when it has one: the
    frontend keeps only the first event of a transaction. Checked for its additions and its
    removal notices apart (a reorg publishes both), and within each run of consecutive
    entries of one transaction (each time it is published: a reindex publishes it again).
    Returns how many transactions announce a market."""
    first: dict[tuple[str, bool], dict[str, Any]] = {}
    announcing: set[tuple[str, bool]] = set()
    for _, envelope in entries:
        key = (envelope["transactionHash"], envelope["removed"])
        first.setdefault(key, envelope)
        if is_announcement(envelope):
            announcing.add(key)
    late = [key for key in announcing if not is_announcement(first[key])]
    assert not late, f"transactions whose first entry is not their MarketCreated: {late[:3]}"
    runs = itertools.groupby(
        (envelope for _, envelope in entries),
        key=lambda e: (e["transactionHash"], e["blockHash"], e["removed"]),
    )
    for publication, run in runs:
        announces = [is_announcement(envelope) for envelope in run]
        assert announces == sorted(announces, reverse=True), f"{publication}: {announces}"
    return len({tx for tx, removed in announcing if not removed})


async def wait_for_stream(client: aioredis.Redis, key: str, count: int, within: float = 30) -> None:
    """Wait until the stream holds at least `count` entries."""

    async def long_enough() -> bool:
        return int(await client.xlen(key)) >= count

    await eventually(long_enough, within=within, what=f"{count} entries in {key}")


async def caught_up(
    indexer: IndexerProcess,
    chain: DevChain,
    client: aioredis.Redis,
    key: str,
    database_url: str,
    deployment: Deployment,
) -> list[tuple[int, dict[str, Any]]]:
    """Wait until the indexer stored and published the whole chain; return the stream."""
    await indexer.wait_cursor(await chain.block_number())
    return await stored_and_published(chain, client, key, database_url, deployment, within=30)


async def stored_and_published(
    chain: DevChain,
    client: aioredis.Redis,
    key: str,
    database_url: str,
    deployment: Deployment,
    *,
    within: float,
) -> list[tuple[int, dict[str, Any]]]:
    """Wait (`within` s) until the database equals the chain, then (30 s) until the stream
    holds every event still on the chain; return the stream."""

    try:
        await eventually(
            lambda: database_equals_chain(database_url, chain, deployment),
            within=within,
            what="the database equals the chain",
        )
    except TimeoutError:
        await assert_database_equals_chain(database_url, chain, deployment)  # says how
        raise
    expected = expected_ids(published_order(await tracked_chain_logs(chain, deployment)))

    async def published() -> bool:
        return live_ids(await stream_entries(client, key)) == expected

    await eventually(published, within=30, what="the stream holds the chain's events")
    return await stream_entries(client, key)
