"""Operating the indexer: standby instances, the CLI commands, unknown logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain, deploy
from devnet.driver import ActivityDriver
from devnet.postgres_server import PgBouncer
from devnet.process import free_port
from tests.indexer.conftest import (
    assert_database_equals_chain,
    assert_gap_free,
    caught_up,
    stream_entries,
    tracked_chain_logs,
    wait_for_stream,
)
from tests.indexer.test_indexing import collect_pubsub
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess
from tests.support.rpc_proxy import RpcFaultProxy
from tests.support.tasks import background
from tests.support.waiting import eventually

API_KEY = "k3yABCDEFGHIJKLMNOP1234"
# How the indexer's messages spell its commands: pasted as they are on the VPS.
INDEXER = "cd /opt/kektech && .venv/bin/python -m indexer"
KEYED = f"/v2/{API_KEY}"  # an RPC URL's path as providers put their key in it
MARKER = "events:test-marker"


@contextlib.asynccontextmanager
async def erring_node(code: int, message: str) -> AsyncIterator[str]:
    """A JSON-RPC node on loopback answering every call with error `code` and `message`, in
    which "{path}" becomes the request's path (providers quote it); yields its base URL."""

    async def answer(request: web.Request) -> web.Response:
        call = await request.json()
        error = {"code": code, "message": message.format(path=request.path)}
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "error": error})

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def run_command(
    make_indexer: Callable[..., IndexerProcess], *args: str, **overrides: str
) -> tuple[int, str]:
    """Run one CLI command to completion; return its exit code and output."""
    command = make_indexer(*args, **overrides)
    command.start()
    code = await command.wait_exit(within=60)
    return code, command.log_text()


async def run_the_backfill_said(
    make_indexer: Callable[..., IndexerProcess], log: str, *, began: int, to: int
) -> str:
    """Check that a start's `log` says a contract was added after indexing began, naming the
    backfill from `began` to `to`; run that backfill as pasted, and return its output."""
    assert "added to the configuration after indexing began" in log
    backfill = f"{INDEXER} backfill --from {began} --to {to}"
    assert backfill in log
    code, output = await run_command(make_indexer, *backfill.removeprefix(INDEXER).split())
    assert code == 0, output
    return output


@contextlib.asynccontextmanager
async def another_chain(blocks: int) -> AsyncIterator[str]:
    """An anvil with another block 0 (genesis time) and the same chain id, the test contracts
    deployed at the same addresses and `blocks` empty blocks on top: a node set up again from
    scratch. Yields its RPC URL."""
    with Anvil(timestamp=1_800_000_000) as node:
        async with DevChain(node.rpc_url) as chain:
            await deploy(chain)
            await chain.mine_empty(blocks)
            yield node.rpc_url


async def events_and_cursor(database_url: str) -> tuple[int, int]:
    """How many events are stored, and the cursor's block."""
    async with connected(database_url) as conn:
        return (
            await conn.fetchval("SELECT count(*) FROM events"),
            await conn.fetchval("SELECT block_number FROM indexer_state"),
        )


async def standby(indexer: IndexerProcess) -> bool:
    """True once the indexer answers as a standby."""
    try:
        _, body = await indexer.get("/healthz")
    except aiohttp.ClientError:
        return False
    return body.get("role") == "standby"


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
    first, second = make_indexer(), make_indexer()
    with first, contextlib.ExitStack() as cleanup:
        cleanup.callback(second.kill)
        await first.wait_ready()
        second.start()
        await eventually(lambda: standby(second), within=20, what="the second one is standby")
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


async def test_a_leader_paused_past_its_lease_stops_without_publishing_again(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    stream_key: str,
) -> None:
    """A leader stopped for longer than LEASE_TTL (SIGSTOP, a frozen VM) is replaced by the
    standby, which indexes and publishes on. Resumed, the old leader publishes nothing again
    (Pub/Sub subscribers would see seqs go backwards) and stops on the lease it lost."""
    driver = ActivityDriver(dev_chain, deployment, seed=61, txs_per_block=5)
    await driver.cover_all_events()
    first, second = make_indexer(), make_indexer()
    channels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    subscribed = asyncio.Event()
    with first, contextlib.ExitStack() as cleanup:
        cleanup.callback(second.kill)
        await first.wait_cursor(await dev_chain.block_number())
        second.start()
        await eventually(lambda: standby(second), within=20, what="the second one is standby")
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            await driver.run(blocks=5)
            await second.wait_cursor(await dev_chain.block_number())
            count = await assert_database_equals_chain(database_url, dev_chain, deployment)
            await wait_for_stream(redis_client, stream_key, count)
            async with background(collect_pubsub(redis_client, channels, subscribed)):
                async with asyncio.timeout(10):
                    await subscribed.wait()
                os.kill(first.proc.pid, signal.SIGCONT)
                code = await first.wait_exit(within=30)
                # Delivered after anything the old leader published, on the same connection.
                await redis_client.publish(MARKER, b"{}")

                async def marker_seen() -> bool:
                    return MARKER in channels

                await eventually(marker_seen, within=10, what="the marker message")
        finally:
            if first.running:
                os.kill(first.proc.pid, signal.SIGCONT)
    assert code == 1
    assert "write lease lost" in first.log_text()
    assert [channel for channel in channels if channel != MARKER] == []
    assert_gap_free(await stream_entries(redis_client, stream_key))


async def test_an_http_port_already_taken_stops_it_with_a_clear_error(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """A second indexer on this host with the first one's INDEXER_HTTP_PORT cannot serve its
    endpoints: it says which port and which settings, without a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = await run_command(make_indexer, "run", INDEXER_HTTP_PORT=str(port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port} (INDEXER_HTTP_HOST, INDEXER_HTTP_PORT)" in log
    assert "Traceback" not in log


async def test_a_pruned_market_keeps_its_row_through_a_rollback(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A market's events pruned as docs/operations.md says (its `markets` row kept), then a
    later event naming it rolled back by a reindex: the rollback cannot recompute the row
    without the market's MarketCreated, so it keeps it, and the market stays followed."""
    driver = ActivityDriver(dev_chain, deployment, seed=64, txs_per_block=5)
    await driver.cover_all_events()
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    async with connected(database_url) as conn:
        market = await conn.fetchval("SELECT address FROM markets ORDER BY created_block LIMIT 1")
        before = await conn.fetchrow("SELECT * FROM markets WHERE address = $1", market)
        await conn.execute("DELETE FROM events WHERE market_address = ANY($1)", [market])
    rewards = dev_chain.contract("RewardDistributor")
    await dev_chain.send(
        sender=dev_chain.accounts[3],
        to=deployment.reward_distributor,
        data=rewards.encode_abi("claimReward", [market, 1, 5]),
    )
    claimed = (await dev_chain.mine())["number"]
    with make_indexer() as indexer:
        await indexer.wait_cursor(claimed)
    code, log = await run_command(make_indexer, "reindex", "--from", str(claimed))
    assert code == 0, log
    async with connected(database_url) as conn:
        after = await conn.fetchrow("SELECT * FROM markets WHERE address = $1", market)
        claims = await conn.fetchval(
            "SELECT count(*) FROM events WHERE market_address = $1 AND block_number = $2",
            market,
            claimed,
        )
    assert claims == 1  # the claim was rolled back and indexed again
    assert after is not None, "the rollback deleted the pruned market's row"
    was, now = dict(before), dict(after)
    assert was.pop("updated_block") <= now.pop("updated_block")
    assert now == was


async def test_status_never_prints_a_secret_a_node_echoes(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """A provider whose error message quotes the request path, API key included: `status`
    prints the error with the key redacted, as the logs would."""
    async with erring_node(-32600, "invalid request to {path}: unknown key") as node:
        code, output = await run_command(make_indexer, "status", RPC_PROVIDER_URL=node + KEYED)
    assert code == 0, output
    assert "chain head: unreachable (" in output
    assert "/v2/***" in output
    assert API_KEY not in output


async def test_status_asks_each_node_once_instead_of_retrying_a_hung_one(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """Two endpoints that take connections and never answer: `status` says the head is
    unreachable after one attempt at each (an operator's question; with the service's retries
    and backoff it hung for over a minute), then reports the rest."""
    with socket.socket() as first, socket.socket() as second:
        for hung in (first, second):
            hung.bind(("127.0.0.1", 0))
            hung.listen(8)  # the kernel completes connections; nothing ever reads them
        urls = ",".join(f"http://127.0.0.1:{s.getsockname()[1]}" for s in (first, second))
        code, output = await run_command(
            make_indexer, "status", RPC_PROVIDER_URL=urls, RPC_TIMEOUT="1", RPC_MAX_RETRIES="5"
        )
    assert code == 0, output
    assert "chain head: unreachable (" in output
    assert "after 2 attempts" in output
    assert "cursor: " in output


async def test_database_settings_that_cannot_work_stop_it_instead_of_a_wait(
    make_indexer: Callable[..., IndexerProcess], database_url: str
) -> None:
    """A DATABASE_URL whose parameters cannot work (here a bad sslmode) is not an outage to
    wait out: the indexer stops with exit 1, saying so."""
    bad = database_url + ("&" if "?" in database_url else "?") + "sslmode=bogus"
    code, log = await run_command(make_indexer, "run", DATABASE_URL=bad)
    assert code == 1, log
    assert "database connection settings do not work" in log
    assert "start-up waits" not in log


async def test_what_start_up_waits_for_is_shown_without_secrets(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """/healthz says why start-up waits; a provider error that quotes the URL's API key is
    shown with the key redacted there too, as in the logs."""
    async with erring_node(-32005, "rate limit for {path}") as node:
        url = node + KEYED
        with make_indexer(RPC_PROVIDER_URL=url, RPC_MAX_RETRIES="0") as indexer:
            await indexer.wait_waiting_for("rate limit")
            _, body = await indexer.get("/healthz")
    assert "/v2/***" in str(body["waiting_for"])
    assert API_KEY not in str(body)
    assert API_KEY not in indexer.log_text()


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
    top = await redis_client.xinfo_stream(stream_key)
    assert top["last-generated-id"].decode() == f"{count}-0"  # every event published
    assert f"redis: the stream {stream_key} ends at seq {count}" in output
    # Redis out of reach: said so, not taken for published (the database records the past).
    code, output = await run_command(
        make_indexer, "status", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    assert code == 0
    assert "redis: unreachable" in output
    assert f"stored: {count} events" in output

    code, output = await run_command(make_indexer, "verify", "--from", "0")
    assert (code, output.strip().splitlines()[-1].endswith(": OK")) == (0, True)
    # Up to the deployment's block, where the database began: no market is announced yet, and
    # the rows of those announced later are no difference.
    deployed = str(deployment.block)
    code, output = await run_command(make_indexer, "verify", "--from", "0", "--to", deployed)
    assert (code, output.strip().splitlines()[-1].endswith(": OK")) == (0, True), output

    async with connected(database_url) as conn:
        victim = await conn.fetchrow(
            "DELETE FROM events WHERE event_name = 'BetPlaced'"
            " AND (block_number, log_index) = (SELECT block_number, log_index FROM events"
            " WHERE event_name = 'BetPlaced' ORDER BY block_number LIMIT 1)"
            " RETURNING block_number, log_index"
        )
        await conn.execute(
            "UPDATE events SET data = '0x00' WHERE block_number = $1 AND log_index = 0", head
        )
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

    async with connected(database_url) as conn:
        queued = await conn.fetchval("SELECT last_seq FROM indexer_state")
    with make_indexer() as indexer:  # publishes what the commands queued
        await wait_for_stream(redis_client, stream_key, queued)
    entries = await stream_entries(redis_client, stream_key)
    assert_gap_free(entries)
    assert any(envelope["removed"] for _, envelope in entries)


# Copies of every stored event, multiplied enough that holding the retracted ones (or the
# remaining events of the markets they touched) in memory at once would take hundreds of MiB.
EVENT_COPIES = 400
PEAK_RSS_LIMIT_KIB = 128 * 1024


async def copy_events(conn: asyncpg.Connection, copies: int) -> int:
    """Store `copies` copies of every decoded event, at log indexes no block uses."""
    result = await conn.execute(
        "INSERT INTO events SELECT block_number, log_index + 1000 * g, block_hash,"
        " block_time, transaction_hash, transaction_index, contract, contract_kind,"
        " event_name, market_address, topic0, topic1, topic2, topic3, data, args, NULL"
        " FROM events, generate_series(1, $1) AS g WHERE event_name IS NOT NULL",
        copies,
    )
    return int(result.split()[-1])


async def test_a_reindex_over_many_events_keeps_memory_bounded(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """reindex reads the events it retracts, and those of the markets it rebuilds, in pages:
    its memory does not grow with the size of the range."""
    driver = ActivityDriver(dev_chain, deployment, seed=69, txs_per_block=5)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    first = head - 10
    async with connected(database_url) as conn:
        # Copies on both sides of `first`: the ones above are retracted, the ones below stay
        # and are folded again into the markets' rows.
        await copy_events(conn, EVENT_COPIES)
        retracted = await conn.fetchval(
            "SELECT count(*) FROM events WHERE block_number >= $1 AND event_name IS NOT NULL",
            first,
        )
        removed = await conn.fetchval("SELECT count(*) FROM events WHERE block_number >= $1", first)
        kept = await conn.fetchval(
            "SELECT count(*) FROM events WHERE block_number < $1 AND market_address IS NOT NULL",
            first,
        )
        last_seq = await conn.fetchval("SELECT last_seq FROM indexer_state")
    assert (retracted > 50_000, kept > 50_000) == (True, True)

    command = make_indexer("reindex", "--from", str(first))
    command.start()
    code = await command.wait_exit(within=100)
    assert code == 0, command.log_text()[-3000:]
    assert f"{removed} events removed" in command.log_text()
    assert 0 < command.peak_rss_kib < PEAK_RSS_LIMIT_KIB, command.peak_rss_kib

    async with connected(database_url) as conn:
        notices = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE seq > $1"
            " AND position('\"removed\":true' IN convert_from(payload, 'UTF8')) > 0",
            last_seq,
        )
        restored = await conn.fetch(
            "SELECT block_number, log_index, block_hash FROM events WHERE block_number >= $1"
            " ORDER BY block_number, log_index",
            first,
        )
    assert notices == retracted
    chain = [
        (int(lg["blockNumber"], 16), int(lg["logIndex"], 16), lg["blockHash"])
        for lg in await tracked_chain_logs(dev_chain, deployment)
        if int(lg["blockNumber"], 16) >= first
    ]
    assert [tuple(r) for r in restored] == chain


async def test_a_verify_over_many_events_keeps_memory_bounded(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """verify compares a window of blocks at a time and reads the stored events in pages: its
    memory does not grow with the number of events, and every difference is counted."""
    driver = ActivityDriver(dev_chain, deployment, seed=70, txs_per_block=5)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with connected(database_url) as conn:
        extra = await copy_events(conn, EVENT_COPIES)
        first_extra = await conn.fetchrow(
            "SELECT block_number, log_index FROM events WHERE log_index >= 1000"
            " ORDER BY block_number, log_index LIMIT 1"
        )
    assert extra > 100_000

    command = make_indexer("verify", "--from", "0")
    command.start()
    code = await command.wait_exit(within=100)
    output = command.log_text()
    assert code == 1, output[-3000:]
    assert output.strip().splitlines()[-1].endswith(f": {extra} differences"), output[-3000:]
    block, index = first_extra
    assert f"block {block} log {index}: in the database but not on the chain" in output
    assert 0 < command.peak_rss_kib < PEAK_RSS_LIMIT_KIB, command.peak_rss_kib


async def test_confirmations_keep_the_indexer_that_far_behind_the_head(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """With CONFIRMATIONS=3 a block is indexed once 3 more follow it: the cursor stays 3 below
    the head and nothing above it is stored, yet the indexer is caught up (/ready) and
    `status` says lag 0; the blocks come in as the chain grows."""
    driver = ActivityDriver(dev_chain, deployment, seed=72, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    with make_indexer(CONFIRMATIONS="3") as indexer:
        await indexer.wait_cursor(head - 3)
        await indexer.wait_ready()
        _, health = await indexer.get("/healthz")
        assert health["cursor"] == head - 3
        async with connected(database_url) as conn:
            newest = await conn.fetchval("SELECT max(block_number) FROM events")
        assert newest <= head - 3
        code, output = await run_command(make_indexer, "status", CONFIRMATIONS="3")
        assert code == 0, output
        assert f"chain head: block {head}, lag 0 blocks" in output
        await dev_chain.mine_empty(3)
        await indexer.wait_cursor(head)
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_verify_on_a_database_never_migrated_says_so(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """verify against a database no indexer ever used says there is nothing to verify (exit 1),
    with no traceback."""
    code, output = await run_command(make_indexer, "verify", "--from", "0")
    assert (code, output.strip()) == (1, "nothing indexed yet")


@pytest.mark.parametrize(
    "command", [["backfill", "--from", "1", "--to", "5"], ["reindex", "--from", "1"]]
)
async def test_backfill_and_reindex_on_a_database_with_no_cursor_say_so(
    make_indexer: Callable[..., IndexerProcess], database_url: str, command: list[str]
) -> None:
    """Nothing indexed: a backfill or a reindex says so (exit 1) and changes nothing, not
    even the schema (a DATABASE_URL naming the wrong database is left as it was), rather
    than create the cursor itself, or wait for ever for a START_BLOCK beyond the head."""
    code, output = await run_command(make_indexer, *command, START_BLOCK="1000000")
    assert code == 1, output
    assert output.strip().endswith("nothing indexed yet: `run` indexes from START_BLOCK")
    async with connected(database_url) as conn:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    assert tables == []


async def test_a_factory_added_after_indexing_began_is_said_with_its_backfill(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A factory added to MARKET_FACTORY_ADDRESS after indexing began is followed from the
    cursor on, and its earlier markets are not indexed by following the chain: at start the
    indexer says so, naming the backfill that fetches them, and that backfill completes the
    database."""
    driver = ActivityDriver(dev_chain, deployment, seed=73, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=8)
    head = await dev_chain.block_number()
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1) as indexer:
        await indexer.wait_cursor(head)
    with make_indexer() as indexer:  # both factories now
        await indexer.wait_cursor(head)
        log = indexer.log_text()
    assert deployment.factory_v2 in log
    with pytest.raises(AssertionError):  # the v2 markets created before are missing
        await assert_database_equals_chain(database_url, dev_chain, deployment)
    await run_the_backfill_said(make_indexer, log, began=deployment.block, to=head)
    await assert_database_equals_chain(database_url, dev_chain, deployment)


NO_CONTRACTS = {
    "MARKET_FACTORY_ADDRESS": "",
    "RESOLUTION_MANAGER_ADDRESS": "",
    "REWARD_DISTRIBUTOR_ADDRESS": "",
}


@pytest.mark.parametrize("history", ["none-at-first", "all-dropped-for-a-while"])
async def test_contracts_configured_when_none_is_followed_are_said_with_their_backfill(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
    history: str,
) -> None:
    """Contracts configured while the database follows none (a first start with the
    addresses still empty, as .env.example ships them, or every one lost from the .env for a
    while) were not followed before: the start says they need a backfill, naming it, and
    that backfill completes the database. (Taken for a database indexed before contracts
    were recorded, they were followed from START_BLOCK with no word, the events before
    missing.)"""
    driver = ActivityDriver(dev_chain, deployment, seed=79, txs_per_block=3)
    await driver.cover_all_events()
    if history == "all-dropped-for-a-while":
        with make_indexer() as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
    await driver.run(blocks=6)  # while none is followed
    head = await dev_chain.block_number()
    with make_indexer(**NO_CONTRACTS) as indexer:
        await indexer.wait_cursor(head)
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
        log = indexer.log_text()
    await run_the_backfill_said(make_indexer, log, began=deployment.block, to=head)
    await assert_database_equals_chain(database_url, dev_chain, deployment)


@pytest.mark.parametrize("done_by", ["backfill", "reindex"])
async def test_a_backfill_needed_is_said_at_every_start_and_by_status_until_done(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    done_by: str,
) -> None:
    """The backfill a contract added after indexing began needs is said again at each start
    (a `pm2 restart` before it is run must not make it forgotten) and by `status`, with what
    it cannot find for a factory; once the named backfill, or a reindex from where the
    database began, has run, neither says it any more."""
    driver = ActivityDriver(dev_chain, deployment, seed=80, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=4)
    head = await dev_chain.block_number()
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1) as indexer:
        await indexer.wait_cursor(head)
    backfill = f"{INDEXER} backfill --from {deployment.block} --to {head}"
    for _ in range(2):  # both factories now, started twice
        with make_indexer() as indexer:
            await indexer.wait_cursor(head)
            log = indexer.log_text()
        assert "added to the configuration after indexing began" in log
        assert backfill in log
    code, output = await run_command(make_indexer, "status")
    assert code == 0, output
    said = [line for line in output.splitlines() if line.startswith("backfill needed:")]
    assert len(said) == 1, output
    assert deployment.factory_v2 in said[0]
    assert f"`{backfill}`" in said[0]
    assert f"announced before block {deployment.block}" in said[0]
    if done_by == "backfill":
        command = backfill.removeprefix(INDEXER).split()
    else:
        command = ["reindex", "--from", str(deployment.block)]
    code, output = await run_command(make_indexer, *command)
    assert code == 0, output
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
        log = indexer.log_text()
    assert "after indexing began" not in log
    code, output = await run_command(make_indexer, "status")
    assert code == 0, output
    assert "backfill needed" not in output


async def test_a_database_of_another_chain_id_is_said_the_right_way_round(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A database indexed on another chain than the node's and CHAIN_ID's stops the indexer
    with the database's chain id said as the database's."""
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with connected(database_url) as conn:
        await conn.execute("UPDATE indexer_state SET chain_id = 1")
    code, output = await run_command(make_indexer, "run")
    assert code != 0
    assert f"chain id 1 at the database, expected {deployment.chain_id}" in output, output


async def factory_added_after_its_markets(
    dev_chain: DevChain, deployment: Deployment, make_indexer: Callable[..., IndexerProcess]
) -> tuple[int, int, str]:
    """Index with factory v1 only up to `head`, then with both factories while a market of
    v2, created before, takes bets the service does not know of, up to `cursor`; returns
    (head, cursor, the second run's log, which names the backfill to run)."""
    driver = ActivityDriver(dev_chain, deployment, seed=77, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=4)
    market = await driver.active_market(deployment.factory_v2)
    head = await dev_chain.block_number()
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1) as indexer:
        await indexer.wait_cursor(head)
    with make_indexer() as indexer:  # both factories now
        await indexer.wait_cursor(head)
        for _ in range(3):  # bets in a market of v2 that the service does not know
            await driver.bet(market)
        cursor = await dev_chain.block_number()
        await indexer.wait_cursor(cursor)
        return head, cursor, indexer.log_text()


async def test_markets_a_backfill_finds_get_their_events_up_to_the_cursor(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """The backfill named at start (`--to` the cursor of then) finds the markets the added
    factory created before; their events after `--to`, which the service went on without,
    are fetched by the same backfill up to the cursor of now, and its output says so: the
    database equals the chain after the one command."""
    head, cursor, log = await factory_added_after_its_markets(dev_chain, deployment, make_indexer)
    output = await run_the_backfill_said(make_indexer, log, began=deployment.block, to=head)
    assert f"their events from block {head + 1} to the cursor {cursor} were fetched too" in output
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_backfill_of_a_complete_range_fetches_no_header_of_what_is_stored(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A backfill reads the range's logs again to find what is missing; the headers (block
    times) of blocks whose logs are all stored are not needed: a repair of a long range, and
    its second pass over the later activity of the markets announced there, cost the node
    about the logs alone. With one event removed, its block's header is fetched, and the
    event stored again."""
    driver = ActivityDriver(dev_chain, deployment, seed=78, txs_per_block=4)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with connected(database_url) as conn:
        victim = await conn.fetchval(
            "DELETE FROM events WHERE (block_number, log_index) = (SELECT block_number,"
            " log_index FROM events ORDER BY block_number DESC LIMIT 1) RETURNING block_number"
        )
        with_logs = await conn.fetchval(
            "SELECT count(DISTINCT block_number) FROM events WHERE block_number >= $1",
            deployment.block,
        )
    async with RpcFaultProxy(anvil.rpc_url, seed=1) as proxy:
        asked: list[int] = []

        async def count_headers(method: str, params: list[Any]) -> None:
            # Block 0: the start's check that the node serves the database's chain.
            if method == "eth_getBlockByNumber" and params and params[0] not in ("latest", "0x0"):
                asked.append(int(params[0], 16))

        proxy.on_call = count_headers
        code, output = await run_command(
            make_indexer,
            "backfill",
            "--from",
            str(deployment.block),
            "--to",
            str(victim),
            RPC_PROVIDER_URL=proxy.url,
        )
    assert code == 0, output
    assert "1 missing events stored" in output, output
    # One range here: its two ends and the victim's block, not every block with logs.
    assert victim in asked
    assert len(set(asked)) <= 3 < with_logs, (sorted(set(asked)), with_logs)
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_backfill_killed_before_the_found_markets_later_events_completes_when_run_again(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """The same backfill, killed (a crash, the OOM killer, a reboot) as it starts fetching
    the found markets' events after `--to`: their markets and events up to `--to` are
    committed, so run again it no longer finds them "not followed". It must still fetch their
    events up to the cursor, or they are lost: the service is past them."""
    head, cursor, _ = await factory_added_after_its_markets(dev_chain, deployment, make_indexer)
    args = ["backfill", "--from", str(deployment.block), "--to", str(head)]
    async with RpcFaultProxy(anvil.rpc_url, seed=1) as proxy:
        command = make_indexer(*args, RPC_PROVIDER_URL=proxy.url)
        killed: list[int] = []

        async def kill_in_the_second_pass(method: str, params: list[Any]) -> None:
            if method == "eth_getLogs" and params and params[0].get("fromBlock") == hex(head + 1):
                command.kill()
                killed.append(head + 1)

        proxy.on_call = kill_in_the_second_pass
        command.start()
        await command.wait_exit(within=60)
    assert killed, "the backfill was not killed as it fetched after --to"
    code, output = await run_command(make_indexer, *args)
    assert code == 0, output
    assert f"their events from block {head + 1} to the cursor {cursor} were fetched too" in output
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_contract_configured_in_another_role_than_indexed_in_is_said_with_its_reindex(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """Factory v2's address pasted as the resolution manager's, then corrected: its stored
    events were decoded as a resolution manager's (its MarketCreated raw, its markets not
    followed), which a backfill cannot change as it skips what is stored. The corrected start
    says so and names the reindex from the first of them; after that reindex the database
    equals the chain and the record holds the configured role, so it is not said again."""
    driver = ActivityDriver(dev_chain, deployment, seed=73, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=4)
    head = await dev_chain.block_number()
    mistake = {
        "MARKET_FACTORY_ADDRESS": deployment.factory_v1,
        "RESOLUTION_MANAGER_ADDRESS": deployment.factory_v2,
    }
    with make_indexer(**mistake) as indexer:
        await indexer.wait_cursor(head)
    with make_indexer() as indexer:  # every contract in its role
        await indexer.wait_cursor(head)
        said = [
            orjson.loads(line)
            for line in indexer.log_text().splitlines()
            if "configured in another role" in line
        ]
    assert [(w["contract"], w["configured"], w["recorded"]) for w in said] == [
        (deployment.factory_v2, "factory", "resolution_manager")
    ]
    reindex = said[0]["reindex"].split(" -m indexer ", 1)[1].split()
    assert reindex[:2] == ["reindex", "--from"]
    assert deployment.block <= int(reindex[2]) <= head
    code, output = await run_command(make_indexer, *reindex)
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
        assert "configured in another role" not in indexer.log_text()
    async with connected(database_url) as conn:
        kind = await conn.fetchval(
            "SELECT kind FROM sources WHERE address = $1", deployment.factory_v2
        )
    assert kind == "factory"


async def test_a_contract_dropped_then_configured_in_another_role_is_said_too(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """The same mistake, with the contract dropped from the configuration in between: its
    record comes back in the role it was indexed in, so the corrected start says it too."""
    driver = ActivityDriver(dev_chain, deployment, seed=73, txs_per_block=3)
    await driver.cover_all_events()
    head = await dev_chain.block_number()
    mistake = {
        "MARKET_FACTORY_ADDRESS": deployment.factory_v1,
        "RESOLUTION_MANAGER_ADDRESS": deployment.factory_v2,
    }
    with make_indexer(**mistake) as indexer:
        await indexer.wait_cursor(head)
    with make_indexer(MARKET_FACTORY_ADDRESS=deployment.factory_v1) as indexer:  # v2 dropped
        await indexer.wait_cursor(head)
    for _ in range(2):  # corrected: said at each start while the events stay
        with make_indexer() as indexer:
            await indexer.wait_cursor(head)
            said = [
                orjson.loads(line)
                for line in indexer.log_text().splitlines()
                if "configured in another role" in line
            ]
        assert [(w["contract"], w["recorded"]) for w in said] == [
            (deployment.factory_v2, "resolution_manager")
        ]


async def test_a_factory_dropped_from_the_configuration_is_no_longer_followed(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A factory dropped from MARKET_FACTORY_ADDRESS (a bad .env, say) is no longer followed,
    nor are its markets, as the start-up warning says; verify then compares what the
    configuration follows and names the other stored events as not compared, rather than as
    differences (the factory is recorded in `sources` as dropped). Configured again, the
    factory is said to need a backfill for the blocks it missed, as any contract added after
    indexing began, and that backfill completes the database."""
    driver = ActivityDriver(dev_chain, deployment, seed=76, txs_per_block=4)
    await driver.cover_all_events()
    market = await driver.active_market(deployment.factory_v2)
    first_head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(first_head)
    v1_only = {"MARKET_FACTORY_ADDRESS": deployment.factory_v1}
    await driver.bet(market)  # a market of the factory to be dropped
    await driver.run(blocks=8)
    head = await dev_chain.block_number()
    with make_indexer(**v1_only) as indexer:
        await indexer.wait_cursor(head)
        assert "no longer in the configuration" in indexer.log_text()
    async with connected(database_url) as conn:
        v2 = {deployment.factory_v2} | {
            r["address"]
            for r in await conn.fetch(
                "SELECT address FROM markets WHERE factory = $1", deployment.factory_v2
            )
        }
        stored_late = await conn.fetchval(
            "SELECT count(*) FROM events WHERE contract = ANY($1) AND block_number > $2",
            list(v2),
            first_head,
        )
        dropped_after = await conn.fetchval(
            "SELECT dropped_after FROM sources WHERE address = $1", deployment.factory_v2
        )
    assert dropped_after == first_head  # recorded, so that verify knows it was followed
    chain_late = [
        lg
        for lg in await tracked_chain_logs(dev_chain, deployment)
        if lg["address"].lower() in v2 and int(lg["blockNumber"], 16) > first_head
    ]
    assert {lg["address"].lower() for lg in chain_late} - {deployment.factory_v2}  # a market's
    assert stored_late == 0
    code, output = await run_command(make_indexer, "verify", "--from", "0", **v1_only)
    assert code == 0, output
    assert "not compared" in output
    assert "not on the chain" not in output
    with make_indexer() as indexer:  # both factories again
        await indexer.wait_cursor(head)
        log = indexer.log_text()
    await run_the_backfill_said(make_indexer, log, began=deployment.block, to=head)
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_start_block_above_the_head_is_waited_for(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """START_BLOCK beyond the chain's head on an empty database (a node still syncing, or
    the block of a deployment to come): the indexer waits for the chain to reach it, instead
    of exiting (PM2 would restart it in a loop), then indexes from there."""
    head = await dev_chain.block_number()
    start = head + 4
    with make_indexer(START_BLOCK=str(start)) as indexer:

        async def waiting() -> bool:
            return "waiting for the chain to reach START_BLOCK" in indexer.log_text()

        await eventually(waiting, within=30, what="the indexer says it waits")
        assert indexer.running
        await dev_chain.mine_empty(3)
        await ActivityDriver(dev_chain, deployment, seed=74, txs_per_block=3).run(blocks=3)
        await indexer.wait_cursor(await dev_chain.block_number())
    async with connected(database_url) as conn:
        first = await conn.fetchval("SELECT min(block_number) FROM events")
        count = await conn.fetchval("SELECT count(*) FROM events")
    assert count > 0
    assert first >= start


async def test_unknown_logs_from_tracked_contracts_are_kept_raw(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A log the catalogue does not know is stored raw, counted each time and logged once per
    (contract, topic0); indexing goes on."""
    driver = ActivityDriver(dev_chain, deployment, seed=62)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    # The two configured the wrong way round: each one's events are unknown for the other's
    # kind, and the chain holds most of them several times.
    overrides = {
        "RESOLUTION_MANAGER_ADDRESS": deployment.reward_distributor,
        "REWARD_DISTRIBUTOR_ADDRESS": deployment.resolution_manager,
    }
    with make_indexer(**overrides) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        counted = await indexer.metric("kektech_indexer_unknown_logs_total")
        lines = [
            orjson.loads(line)
            for line in indexer.log_text().splitlines()
            if "unknown log stored raw" in line
        ]
    async with connected(database_url) as conn:
        raw = await conn.fetch(
            "SELECT contract, topic0, args, seq FROM events WHERE event_name IS NULL"
        )
        known = await conn.fetchval("SELECT count(*) FROM events WHERE event_name IS NOT NULL")
    swapped = {deployment.reward_distributor, deployment.resolution_manager}
    assert {r["contract"] for r in raw} == swapped
    assert all(r["args"] is None and r["seq"] is None for r in raw)
    repeated = Counter((r["contract"], r["topic0"]) for r in raw)
    assert max(repeated.values()) > 1, "the chain holds an unknown log several times"
    logged = [(line["contract"], line["topic0"]) for line in lines]
    assert sorted(logged) == sorted(repeated)  # one line per (contract, topic0)
    assert counted == len(raw)
    assert known > 0


async def test_works_through_a_transaction_pooler(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    redis_client: aioredis.Redis,
    database_url: str,
    pgbouncer: PgBouncer,
    stream_key: str,
) -> None:
    """Through PgBouncer in transaction mode with DB_STATEMENT_CACHE_SIZE=0, as on Supabase."""
    driver = ActivityDriver(dev_chain, deployment, seed=63, txs_per_block=4)
    await driver.cover_all_events()
    pooled = pgbouncer.dsn(database_url.rsplit("/", 1)[1])
    overrides = {"DATABASE_URL": pooled, "DB_STATEMENT_CACHE_SIZE": "0", "REORG_WINDOW": "8"}
    with make_indexer(**overrides) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        indexer.kill()
        await driver.run(blocks=10)
        indexer.start()
        await indexer.wait_cursor(await dev_chain.block_number())
        data = dev_chain.contract("FlexibleMarketFactoryUnified").encode_abi("setPaused", [False])
        tx = {"from": dev_chain.accounts[0], "to": deployment.factory_v1, "data": data}
        await dev_chain.request("anvil_reorg", [2, [[tx, 0]]])
        await dev_chain.mine_empty(1)
        entries = await caught_up(
            indexer, dev_chain, redis_client, stream_key, database_url, deployment
        )
    assert_gap_free(entries)
    assert any(envelope["removed"] for _, envelope in entries)


async def test_a_backfill_longer_than_the_lease_ttl_completes(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """backfill commits range by range, renewing the write lease, however long the range."""
    driver = ActivityDriver(dev_chain, deployment, seed=67, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=20)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with connected(database_url) as conn:
        deleted = await conn.fetchval(
            "WITH gone AS (DELETE FROM events WHERE event_name = 'BetPlaced' RETURNING 1)"
            " SELECT count(*) FROM gone"
        )
    assert deleted > 0
    # Every RPC answer takes 0.3 s and getLogs spans 2 blocks: the whole range takes several
    # times the 2 s lease to fetch.
    async with RpcFaultProxy(
        dev_chain.rpc_url, seed=5, rates={"timeout": 1.0}, timeout_delay=0.3
    ) as proxy:
        command = make_indexer(
            "backfill",
            "--from",
            "0",
            "--to",
            str(head),
            RPC_PROVIDER_URL=proxy.url,
            LEASE_TTL="2",
            LOGS_RANGE_MAX="2",
            LOGS_RANGE_INITIAL="2",
        )
        command.start()
        code = await command.wait_exit(within=90)
    assert code == 0, command.log_text()[-3000:]
    assert f"{deleted} missing events stored" in command.log_text()
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_a_reindex_slower_than_the_lease_ttl_completes(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """reindex keeps its write lease while it works, however long a step between two commits
    takes (here every RPC answer takes 0.6 s against a 2 s lease)."""
    driver = ActivityDriver(dev_chain, deployment, seed=68, txs_per_block=3)
    await driver.cover_all_events()
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with RpcFaultProxy(dev_chain.rpc_url, seed=5) as proxy:
        proxy.delay = 0.6
        command = make_indexer("reindex", "--from", "1", RPC_PROVIDER_URL=proxy.url, LEASE_TTL="2")
        command.start()
        code = await command.wait_exit(within=90)
    assert code == 0, command.log_text()[-3000:]
    assert f"indexed again up to block {head}" in command.log_text()
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_an_interrupted_command_does_not_exit_as_if_it_succeeded(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """verify stopped by SIGTERM while it waits on the node exits 143 (128 + SIGTERM), not 0,
    which would read as "no difference"; `run` still stops with 0 (PM2's clean stop)."""
    await ActivityDriver(dev_chain, deployment, seed=69, txs_per_block=3).run(blocks=2)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    async with RpcFaultProxy(dev_chain.rpc_url, seed=5) as proxy:
        proxy.delay = 30.0  # the node never answers in time
        command = make_indexer("verify", "--from", "0", RPC_PROVIDER_URL=proxy.url)
        command.start()

        async def waiting_on_the_node() -> bool:
            return proxy.requests > 0

        await eventually(waiting_on_the_node, within=30, what="verify asks the node")
        assert command.running
        assert await asyncio.to_thread(command.stop, signal.SIGTERM) == 128 + signal.SIGTERM


async def test_start_block_changed_on_an_existing_database_is_said_and_verify_still_works(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """START_BLOCK raised after indexing began from the deployment: `verify` still knows the
    markets announced below it (it looks from where the database began, as recorded in
    `sources`) and finds no difference; `status` and `run` say the setting no longer matches
    where the database began."""
    driver = ActivityDriver(dev_chain, deployment, seed=75, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    later = str(head - 3)  # above every market's creation
    code, output = await run_command(make_indexer, "verify", "--from", later, START_BLOCK=later)
    assert (code, output.strip().splitlines()[-1].endswith(": OK")) == (0, True), output
    code, output = await run_command(make_indexer, "status", START_BLOCK=later)
    assert code == 0, output
    assert f"START_BLOCK {later}, but the database began at block {deployment.block}" in output
    with make_indexer(START_BLOCK=later) as indexer:
        await indexer.wait_ready()
        log = indexer.log_text()
    assert "START_BLOCK differs from where the database began" in log


async def test_a_reindex_from_below_where_the_database_began_begins_it_there(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A database created with START_BLOCK above the deployment: a backfill from below where
    it began stores nothing below it, saying so; a reindex from the deployment indexes from
    there, and the database then began there (what `status`, `verify` and the reorg
    handling go by)."""
    driver = ActivityDriver(dev_chain, deployment, seed=77, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    later = str(head - 3)
    with make_indexer(START_BLOCK=later) as indexer:
        await indexer.wait_cursor(head)
    first = str(deployment.block)
    code, output = await run_command(
        make_indexer, "backfill", "--from", first, "--to", str(head), START_BLOCK=later
    )
    assert code == 0, output
    assert f"--from {first} is below block {later}, where the database began" in output
    assert f"backfill {later}..{head}:" in output
    code, output = await run_command(
        make_indexer, "backfill", "--from", first, "--to", str(int(later) - 1), START_BLOCK=later
    )
    assert code == 1, output
    assert f"nothing backfilled: the database began at block {later}" in output

    code, output = await run_command(make_indexer, "reindex", "--from", first, START_BLOCK=later)
    assert code == 0, output
    await assert_database_equals_chain(database_url, dev_chain, deployment)
    code, output = await run_command(make_indexer, "status")
    assert code == 0, output
    assert f"began: block {first}" in output
    assert "but the database began" not in output
    code, output = await run_command(make_indexer, "verify", "--from", first)
    assert (code, output.strip().splitlines()[-1].endswith(": OK")) == (0, True), output


async def test_a_leader_waiting_for_start_block_reports_the_chain_head(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """A leader waiting for the chain to reach START_BLOCK exports the head it reads
    (kektech_indexer_head_block, /ready's `head`) and follows it as the chain grows: a head
    that moves is no stalled provider (KektechIndexerHeadStalled)."""
    head = await dev_chain.block_number()
    with make_indexer(START_BLOCK=str(head + 10)) as indexer:

        async def waiting() -> bool:
            return "waiting for the chain to reach START_BLOCK" in indexer.log_text()

        await eventually(waiting, within=30, what="the indexer says it waits")
        assert await indexer.metric("kektech_indexer_leader") == 1

        async def head_exported(number: int) -> bool:
            return await indexer.metric("kektech_indexer_head_block") == number

        await eventually(lambda: head_exported(head), within=10, what=f"head {head} exported")
        status, body = await indexer.get("/ready")
        assert (status, body["head"], body["ready"]) == (503, head, False)
        await dev_chain.mine_empty(2)
        await eventually(lambda: head_exported(head + 2), within=10, what="the new head exported")
        assert indexer.running


async def test_a_reindex_from_above_the_cursor_is_refused(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """reindex --from above the block after the cursor has nothing to roll back: it is
    refused (exit 1) naming the cursor, instead of saying it rolled back. From the block
    after the cursor, it says there was nothing to roll back and indexes up to the head."""
    await ActivityDriver(dev_chain, deployment, seed=76, txs_per_block=3).run(blocks=3)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    code, output = await run_command(make_indexer, "reindex", "--from", str(head + 5))
    assert code == 1, output
    assert f"--from {head + 5} is above the block after the cursor {head}" in output
    assert "rolled back" not in output
    await dev_chain.mine_empty(2)
    code, output = await run_command(make_indexer, "reindex", "--from", str(head + 1))
    assert code == 0, output
    assert f"nothing to roll back: the cursor is at block {head}" in output
    assert f"indexed up to block {head + 2}" in output
    await assert_database_equals_chain(database_url, dev_chain, deployment)


async def test_verify_says_what_of_the_range_it_did_not_check(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """verify of a range wholly above the cursor checked nothing: exit 1, naming the cursor,
    not a success. A --to above the cursor is capped there, and the output says so."""
    await ActivityDriver(dev_chain, deployment, seed=77, txs_per_block=3).run(blocks=3)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    code, output = await run_command(make_indexer, "verify", "--from", str(head + 5))
    assert code == 1, output
    assert f"nothing verified: --from {head + 5} is above the cursor {head}" in output
    far = str(head + 1000)
    code, output = await run_command(make_indexer, "verify", "--from", "0", "--to", far)
    assert code == 0, output
    assert f"--to {far} is above the cursor {head}: verified up to {head}" in output
    began = deployment.block  # the harness's START_BLOCK
    assert output.strip().splitlines()[-1].startswith(f"verify {began}..{head}: ")


async def test_verify_beside_the_running_service_finds_no_difference_that_is_not_there(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """verify while the service indexes a busy chain (the rebuild procedure runs it so): the
    markets the service creates or changes after verify read the cursor are no differences
    (they were reported as announced by nobody, or as rows that did not match their events)."""
    driver = ActivityDriver(dev_chain, deployment, seed=78, txs_per_block=5)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    with make_indexer() as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
        async with RpcFaultProxy(dev_chain.rpc_url, seed=14) as proxy:
            proxy.delay = 0.3  # verify's node is a remote one: the service moves on meanwhile
            command = make_indexer(
                "verify", "--from", str(deployment.block), RPC_PROVIDER_URL=proxy.url
            )
            command.start()
            while command.running:
                await driver.run(blocks=1)
                await asyncio.sleep(0.1)
            code = await command.wait_exit(within=60)
        assert indexer.running
    output = command.log_text()
    assert code == 0, output
    assert output.strip().splitlines()[-1].endswith(": OK"), output


async def test_verify_finds_rows_stored_above_the_cursor(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """Rows above the cursor (events, block headers, markets) are never committed by the
    indexer, which moves the cursor with them: verify reports them, whatever range it was
    asked (it said OK)."""
    await ActivityDriver(dev_chain, deployment, seed=79, txs_per_block=3).run(blocks=3)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    async with connected(database_url) as conn:
        await conn.execute(
            "INSERT INTO events SELECT block_number + 1, log_index, block_hash, block_time,"
            " transaction_hash, transaction_index, contract, contract_kind, event_name,"
            " market_address, topic0, topic1, topic2, topic3, data, args, seq"
            " FROM events WHERE block_number = $1 ORDER BY log_index LIMIT 1",
            head,
        )
        await conn.execute(
            "INSERT INTO blocks SELECT number + 100, hash, parent_hash, timestamp FROM blocks"
            " WHERE number = $1",
            head,
        )
    code, output = await run_command(make_indexer, "verify", "--from", str(deployment.block))
    assert code == 1, output
    assert f"above the cursor (block {head}): 1 events, 1 block headers, 0 markets" in output
    assert output.strip().splitlines()[-1].endswith(": 1 differences"), output


async def test_verify_from_below_where_the_database_began_verifies_from_there(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """A database created with START_BLOCK above the deployment holds nothing below where it
    began: a verify from below starts there and says so, as backfill does (it reported every
    log below as missing), and one wholly below checks nothing (exit 1)."""
    driver = ActivityDriver(dev_chain, deployment, seed=80, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=6)
    head = await dev_chain.block_number()
    later = str(head - 3)
    with make_indexer(START_BLOCK=later) as indexer:
        await indexer.wait_cursor(head)
    first = str(deployment.block)
    code, output = await run_command(make_indexer, "verify", "--from", first, START_BLOCK=later)
    assert code == 0, output
    assert f"--from {first} is below block {later}, where the database began" in output
    assert output.strip().splitlines()[-1].startswith(f"verify {later}..{head}: ")
    code, output = await run_command(
        make_indexer, "verify", "--from", first, "--to", str(int(later) - 1), START_BLOCK=later
    )
    assert code == 1, output
    assert f"nothing verified: the database began at block {later}" in output


@pytest.mark.parametrize(
    "table",
    [
        "version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL",  # golang-migrate
        "version character varying NOT NULL PRIMARY KEY",  # Rails
    ],
    ids=["golang-migrate", "rails"],
)
async def test_a_database_of_another_application_is_refused_in_one_line(
    make_indexer: Callable[..., IndexerProcess], database_url: str, table: str
) -> None:
    """DATABASE_URL names another application's database, which has a `schema_migrations`
    table of its own: every command refuses it in one line naming the table, and leaves it
    as it was (they ended with asyncpg's traceback)."""
    async with connected(database_url) as conn:
        await conn.execute(f"CREATE TABLE schema_migrations ({table})")
    for command in (("status",), ("migrate",), ("verify", "--from", "0"), ("run",)):
        code, output = await run_command(make_indexer, *command)
        assert code == 1, output
        assert "schema_migrations table of another application" in output, output
        assert "Traceback" not in output
    async with connected(database_url) as conn:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    assert [t["table_name"] for t in tables] == ["schema_migrations"]


async def test_status_tells_an_expired_lease_and_a_dead_holder_from_a_held_one(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """`status` after an indexer was killed: a lease still in its term, held by a process of
    this host that is gone, is said to be so; once expired (by the database's clock), it is
    said to be free to take, not held until a time in the past."""
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
        assert indexer.proc is not None
        pid = indexer.proc.pid
    # kill -9 left the lease held; its term is set here rather than waited out.
    async with connected(database_url) as conn:
        await conn.execute("UPDATE indexer_lease SET expires_at = now() + interval '1 hour'")
        code, output = await run_command(make_indexer, "status")
        assert code == 0, output
        assert f"its process (pid {pid} on this host) is gone" in output
        await conn.execute("UPDATE indexer_lease SET expires_at = now() - interval '1 minute'")
        code, output = await run_command(make_indexer, "status")
    assert code == 0, output
    assert "write lease: expired at " in output
    assert ", free to take" in output
    assert " until " not in output


async def test_a_one_shot_command_reports_an_unreachable_database_as_its_failure(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """`status` and `verify` with the database down exit 1 saying the command failed and
    why, not "indexer stopped" (which reads as if the service had died)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        url = f"postgresql://kektech:secret@127.0.0.1:{port}/kektech"
        for command in (("status",), ("verify", "--from", "0")):
            code, output = await run_command(make_indexer, *command, DATABASE_URL=url)
            assert code == 1, output
            assert f"kektech: {command[0]} failed: " in output
            assert "indexer stopped" not in output
            assert "secret" not in output


async def test_status_with_a_wrong_chain_id_says_wrong_chain(
    make_indexer: Callable[..., IndexerProcess],
) -> None:
    """`status` against a node of another chain than CHAIN_ID says "wrong chain", not that
    the node is unreachable."""
    code, output = await run_command(make_indexer, "status", CHAIN_ID="999")
    assert code == 0, output
    assert "chain head: wrong chain (chain id 32323" in output
    assert "unreachable" not in output


async def test_a_head_no_longer_read_is_not_ready_and_its_age_shows(
    dev_chain: DevChain, anvil: Anvil, make_indexer: Callable[..., IndexerProcess]
) -> None:
    """Caught up, then every RPC call fails: the indexer no longer says it is ready once the
    head was last read longer ago than three polls and two RPC timeouts, and
    kektech_indexer_head_age_seconds grows, rather than /ready 200 with a lag of 0 for the
    minute its retries take to give up; the errors are counted meanwhile."""
    async with RpcFaultProxy(anvil.rpc_url, seed=1) as proxy:
        with make_indexer(
            RPC_PROVIDER_URL=proxy.url, RPC_TIMEOUT="1", RPC_MAX_RETRIES="100"
        ) as indexer:
            await indexer.wait_cursor(await dev_chain.block_number())
            await indexer.wait_ready()
            assert (await indexer.metric("kektech_indexer_head_age_seconds") or 99) < 2
            proxy.rates = {"http_503": 1.0}

            async def not_ready() -> bool:
                status, _ = await indexer.get("/ready")
                return status == 503

            await eventually(not_ready, within=15, what="/ready 503")
            age = await indexer.metric("kektech_indexer_head_age_seconds")
            assert age is not None
            assert age > 2
            errors = await indexer.metric('kektech_indexer_rpc_errors{kind="http_5xx"}')
            assert errors is not None
            assert errors > 0
            proxy.rates = {}
            await indexer.wait_ready()


async def test_rpc_errors_at_start_up_are_counted(
    anvil: Anvil, make_indexer: Callable[..., IndexerProcess]
) -> None:
    """An RPC endpoint failing from the start: the indexer waits for it, and /metrics counts
    the requests and errors of its attempts meanwhile (the RPC error alert has nothing
    to go by otherwise), over the RPC clients start-up makes for them."""
    async with RpcFaultProxy(anvil.rpc_url, seed=1, rates={"http_503": 1.0}) as proxy:
        with make_indexer(RPC_PROVIDER_URL=proxy.url, RPC_MAX_RETRIES="1") as indexer:
            await indexer.wait_waiting_for("eth_chainId")

            async def counted_twice() -> bool:
                errors = await indexer.metric('kektech_indexer_rpc_errors{kind="http_5xx"}')
                requests = await indexer.metric("kektech_indexer_rpc_requests")
                # Two attempts per client (RPC_MAX_RETRIES=1): more is a second client's.
                return errors is not None and errors > 2 and requests == errors

            await eventually(counted_twice, within=20, what="the attempts of two clients")


@pytest.mark.parametrize("blocks", [2, 12], ids=["shorter", "longer"])
async def test_a_database_of_another_chain_with_the_same_chain_id_is_refused(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
    blocks: int,
) -> None:
    """The node answers for another chain than the database was indexed from, with the same
    chain id (a testnet or a fork, a node set up again from scratch): the indexer stops with
    an error saying so, and changes nothing. It waited for ever, said ready, for a shorter
    chain, and rolled the whole database back onto a longer one (younger than REORG_WINDOW)."""
    driver = ActivityDriver(dev_chain, deployment, seed=81, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=4)
    head = await dev_chain.block_number()
    with make_indexer() as indexer:
        await indexer.wait_cursor(head)
    stored, _ = await events_and_cursor(database_url)
    async with another_chain(blocks) as url:
        code, output = await run_command(make_indexer, "run", RPC_PROVIDER_URL=url)
    assert code == 1, output
    assert "another chain than the database was indexed from" in output
    assert await events_and_cursor(database_url) == (stored, head)


async def test_an_endpoint_of_another_chain_with_the_same_chain_id_is_left_out(
    dev_chain: DevChain,
    deployment: Deployment,
    anvil: Anvil,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A second endpoint in RPC_PROVIDER_URL that serves another chain with the same chain id
    (a node set up again from scratch) is left out when the indexer fails over to it, as one of
    another chain id is: the database stays as it is. It was taken as a reorg, and the whole
    database rolled back onto it."""
    driver = ActivityDriver(dev_chain, deployment, seed=82, txs_per_block=3)
    await driver.cover_all_events()
    await driver.run(blocks=4)
    head = await dev_chain.block_number()
    async with (
        another_chain(head + 5) as other,
        RpcFaultProxy(anvil.rpc_url, seed=1) as proxy,
    ):
        urls = f"{proxy.url},{other}"
        with make_indexer(RPC_PROVIDER_URL=urls, RPC_MAX_RETRIES="1", RPC_TIMEOUT="1") as indexer:
            await indexer.wait_cursor(head)
            stored, _ = await events_and_cursor(database_url)
            proxy.rates = {"http_503": 1.0}  # the first fails: over to the second

            def left_out() -> bool:
                return "rpc endpoint serves another chain" in indexer.log_text()

            async def said() -> bool:
                return left_out() or not indexer.running

            await eventually(said, within=20, what="the second endpoint looked at")
            log = indexer.log_text()
    assert left_out(), log
    assert "reorg rolled back" not in log
    assert await events_and_cursor(database_url) == (stored, head)
