"""`verify`: what it compares besides the raw logs (test_operations.py has the rest)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from tests.indexer.test_operations import run_command
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess

PHANTOM = "0x000000000000000000000000000000000000dead"  # a contract nothing announced


async def index_chain(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    *,
    seed: int,
    **overrides: str,
) -> ActivityDriver:
    """Drive every event (and an active market of factory v1 with a bet), index it all."""
    driver = ActivityDriver(dev_chain, deployment, seed=seed, txs_per_block=5)
    await driver.cover_all_events()
    await driver.bet(await driver.active_market(deployment.factory_v1))
    with make_indexer(**overrides) as indexer:
        await indexer.wait_cursor(await dev_chain.block_number())
    return driver


async def verify(
    make_indexer: Callable[..., IndexerProcess], *args: str, **overrides: str
) -> tuple[int, list[str]]:
    """Run `verify` with these arguments: its exit code and output lines."""
    code, output = await run_command(make_indexer, "verify", *args, **overrides)
    return code, output.strip().splitlines()


async def test_the_markets_followed_are_compared_with_the_announcements(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """`markets` is also the list of clones the indexer follows: an announced market without a
    row, a row naming another factory or creation block, and a row no configured factory
    announced are differences, one line each naming the market."""
    await index_chain(dev_chain, deployment, make_indexer, seed=90)
    async with connected(database_url) as conn:
        gone, moved = await conn.fetch(
            "SELECT address, factory, created_block FROM markets"
            " ORDER BY created_block, address LIMIT 2"
        )
        await conn.execute("DELETE FROM markets WHERE address = $1", gone["address"])
        other = next(f for f in deployment.factories if f != moved["factory"])
        await conn.execute(
            "UPDATE markets SET factory = $2, created_block = created_block + 1 WHERE address = $1",
            moved["address"],
            other,
        )
        await conn.execute(
            "CREATE TEMP TABLE phantom AS SELECT * FROM markets WHERE address = $1",
            moved["address"],
        )
        await conn.execute("UPDATE phantom SET address = $1", PHANTOM)
        await conn.execute("INSERT INTO markets SELECT * FROM phantom")
    code, lines = await verify(make_indexer, "--from", "0")
    assert code == 1, lines
    block = gone["created_block"]
    missing = f"market {gone['address']} announced here has no row in markets"
    assert next(line for line in lines if missing in line).startswith(f"block {block} log ")
    moved_at = f"market {moved['address']}:"
    assert f"{moved_at} factory is {other}, but {moved['factory']} announced it" in lines
    shifted = f"created_block is {moved['created_block'] + 1}, but it was announced in block"
    assert f"{moved_at} {shifted} {moved['created_block']}" in lines
    assert any(
        line.startswith(f"market {PHANTOM}: in markets (factory {other}")
        and line.endswith("but no configured factory announced it")
        for line in lines
    ), lines
    assert lines[-1].endswith(": 4 differences"), lines


async def test_each_market_row_is_compared_with_the_projection_of_its_events(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A market row other than what the indexer's projection makes of the market's events on
    chain is a difference; a verify that does not see all of a market's events (from above
    its creation, or to below the cursor) does not compare its row, and says so."""
    driver = await index_chain(dev_chain, deployment, make_indexer, seed=91)
    market = (await driver.active_market(deployment.factory_v1)).address
    head = await dev_chain.block_number()
    async with connected(database_url) as conn:
        created = await conn.fetchval(
            "UPDATE markets SET bets_outcome1 = 999, state = 'FINALIZED' WHERE address = $1"
            " RETURNING created_block",
            market,
        )
    code, lines = await verify(make_indexer, "--from", "0")
    assert code == 1, lines
    (line,) = [line for line in lines if line.startswith(f"market {market}: ")]
    assert "state is FINALIZED, expected ACTIVE" in line
    assert "bets_outcome1 is 999, expected " in line
    assert lines[-1].endswith(": 1 differences"), lines

    code, lines = await verify(make_indexer, "--from", str(created + 1))
    assert code == 0, lines
    assert any(
        "market rows were not compared with their events" in line
        and f"created before block {created + 1}" in line
        for line in lines
    ), lines
    code, lines = await verify(make_indexer, "--from", "0", "--to", str(head - 1))
    assert code == 0, lines
    assert any(
        "market rows were not compared with their events" in line
        and f"below the cursor {head}" in line
        for line in lines
    ), lines


async def test_events_are_compared_with_what_the_catalogue_makes_of_the_logs(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A stored event other than the indexer's decoding of the chain's log is a difference: a
    decodable log stored raw (never published), a lost market address, another contract kind,
    and a log the catalogue does not decode stored as an event."""
    # The template's constructor logs Initialized(max), unknown for a reward distributor.
    overrides = {"REWARD_DISTRIBUTOR_ADDRESS": deployment.template, "START_BLOCK": "0"}
    await index_chain(dev_chain, deployment, make_indexer, seed=92, **overrides)
    async with connected(database_url) as conn:
        created = await conn.fetchrow(
            "UPDATE events SET event_name = NULL, args = NULL, market_address = NULL,"
            " seq = NULL WHERE (block_number, log_index) = (SELECT block_number, log_index"
            " FROM events WHERE event_name = 'MarketCreated' ORDER BY block_number DESC LIMIT 1)"
            " RETURNING block_number, log_index"
        )
        bet = await conn.fetchrow(
            "SELECT block_number, log_index, market_address FROM events"
            " WHERE event_name = 'BetPlaced' ORDER BY block_number LIMIT 1"
        )
        await conn.execute(
            "UPDATE events SET market_address = NULL WHERE (block_number, log_index) = ($1, $2)",
            bet["block_number"],
            bet["log_index"],
        )
        managed = await conn.fetchrow(
            "UPDATE events SET contract_kind = 'factory' WHERE (block_number, log_index) ="
            " (SELECT block_number, log_index FROM events"
            " WHERE contract_kind = 'resolution_manager' ORDER BY block_number LIMIT 1)"
            " RETURNING block_number, log_index"
        )
        raw = await conn.fetchrow(
            "UPDATE events SET event_name = 'Initialized', args = '{\"version\": \"1\"}',"
            " seq = 999999 WHERE event_name IS NULL AND contract = $1"
            " RETURNING block_number, log_index",
            deployment.template,
        )
    code, lines = await verify(make_indexer, "--from", "0", **overrides)
    assert code == 1, lines

    def at_log(row: asyncpg.Record) -> str:
        return f"block {row['block_number']} log {row['log_index']}:"

    assert f"{at_log(created)} stored raw, but the catalogue decodes it as MarketCreated" in lines
    assert f"{at_log(bet)} market_address is NULL, expected {bet['market_address']}" in lines
    assert f"{at_log(managed)} contract_kind is factory, expected resolution_manager" in lines
    assert f"{at_log(raw)} stored as Initialized, but the catalogue does not decode it" in lines
    assert lines[-1].endswith(": 4 differences"), lines


async def test_an_event_of_a_contract_nothing_follows_is_a_difference(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A stored event of a contract neither configured, nor announced by a configured factory,
    nor recorded as dropped from the configuration (table `sources`) is a difference, not one
    of the events of dropped contracts left uncompared."""
    await index_chain(dev_chain, deployment, make_indexer, seed=93)
    async with connected(database_url) as conn:
        block = await conn.fetchval(
            "INSERT INTO events SELECT block_number, 900, block_hash, block_time,"
            " transaction_hash, transaction_index, $1, contract_kind, event_name, $1,"
            " topic0, topic1, topic2, topic3, data, args, NULL FROM events"
            " WHERE event_name = 'BetPlaced' ORDER BY block_number LIMIT 1"
            " RETURNING block_number",
            PHANTOM,
        )
    code, lines = await verify(make_indexer, "--from", "0")
    assert code == 1, lines
    assert (
        f"block {block} log 900: in the database but not on the chain, from {PHANTOM}:"
        " neither a configured contract nor a market a configured factory announced"
    ) in lines
    assert not [line for line in lines if "not compared" in line], lines
    assert lines[-1].endswith(": 1 differences"), lines


async def test_the_stored_block_headers_and_the_cursor_are_compared_with_the_chain(
    dev_chain: DevChain,
    deployment: Deployment,
    make_indexer: Callable[..., IndexerProcess],
    database_url: str,
) -> None:
    """A stored block header (kept for reorg detection) or a cursor hash other than the node's
    block at that height is a difference naming the block, even where no event is stored;
    headers as indexed are no difference."""
    await index_chain(dev_chain, deployment, make_indexer, seed=94)
    code, lines = await verify(make_indexer, "--from", "0")
    assert (code, lines[-1].endswith(": OK")) == (0, True), lines
    wrong = "0x" + "ab" * 32
    async with connected(database_url) as conn:
        header = await conn.fetchrow(
            "UPDATE blocks SET hash = $1 WHERE number = (SELECT min(number) FROM blocks"
            " WHERE number >= 0) RETURNING number",
            wrong,
        )
        cursor = await conn.fetchval(
            "UPDATE indexer_state SET block_hash = $1 RETURNING block_number", wrong
        )
    assert header["number"] < cursor
    code, lines = await verify(make_indexer, "--from", "0")
    assert code == 1, lines
    assert next(
        line for line in lines if line.startswith(f"block {header['number']}: ")
    ).startswith(f"block {header['number']}: stored header hash is {wrong}, expected 0x"), lines
    assert next(line for line in lines if line.startswith(f"block {cursor}: ")).startswith(
        f"block {cursor}: the cursor's hash is {wrong}, expected 0x"
    ), lines
    assert lines[-1].endswith(": 2 differences"), lines
