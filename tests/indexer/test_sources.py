"""Where the database began, as recorded, against a real Postgres: what the reorg handling
and `verify` go by, whatever the configured contracts did since."""

from __future__ import annotations

from importlib import resources

import pytest

from indexer.catalog import ContractKind
from indexer.cursor import init_state
from indexer.database import Database
from indexer.lease import Lease, try_acquire_lease
from indexer.rollback import rollback
from indexer.schema import MIGRATION_NAME, MIGRATIONS_PACKAGE, migrate
from indexer.sources import began_at, indexed_from, record_sources
from tests.indexer.test_store import TTL, header

F1 = "0x" + "f1" * 20
F2 = "0x" + "f2" * 20
START = 100


async def migrate_to(db: Database, version: int) -> None:
    """Bring an empty database to schema `version` as a release that stopped there did."""
    await db.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    entries = sorted(resources.files(MIGRATIONS_PACKAGE).iterdir(), key=lambda e: e.name)
    for entry in entries:
        match = MIGRATION_NAME.match(entry.name)
        if match and int(match.group(1)) <= version:
            await db.execute(entry.read_text(encoding="utf-8"))
            await db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                int(match.group(1)),
                entry.name,
            )


async def swap_factory_and_back(db: Database) -> None:
    """The operator's mistake: the factory's address swapped for another, then put back."""
    await record_sources(
        db, {F2: ContractKind.FACTORY}, cursor=150, start_block=START, created=False
    )
    await record_sources(
        db, {F1: ContractKind.FACTORY}, cursor=160, start_block=START, created=False
    )


async def new_database(db: Database) -> Lease:
    """A database created at START, as the follower creates one: the cursor at the block
    before, then the configured factory recorded; returns the write lease."""
    await migrate(db)
    lease = await try_acquire_lease(db, "test", TTL)
    assert lease is not None
    await init_state(db, lease, TTL, chain_id=1, cursor=header(START - 1))
    await record_sources(
        db, {F1: ContractKind.FACTORY}, cursor=START - 1, start_block=START, created=True
    )
    return lease


async def test_swapping_the_only_factory_and_back_leaves_where_the_database_began(
    database_url: str,
) -> None:
    """The only configured factory swapped for another and back re-adds it from the block
    after the cursor then: the database still began at START_BLOCK, not there."""
    async with Database.open(database_url, command_timeout=10.0) as db:
        await new_database(db)
        assert await began_at(db, start_block=START) == START
        await swap_factory_and_back(db)
        assert await indexed_from(db) == START
        assert await began_at(db, start_block=START + 500) == START


async def test_a_rollback_below_where_the_database_began_moves_it_down(
    database_url: str,
) -> None:
    """Rolled back onto a block below where the database began (a reindex from below it),
    the database holds what is indexed from the block after that one on: it began there.
    A rollback onto the block before where it began leaves it."""
    async with Database.open(database_url, command_timeout=10.0) as db:
        lease = await new_database(db)
        await rollback(db, lease, TTL, header(START - 1))
        assert await indexed_from(db) == START
        await rollback(db, lease, TTL, header(49))
        assert await indexed_from(db) == 50
        await swap_factory_and_back(db)
        assert await indexed_from(db) == 50


@pytest.mark.parametrize(
    ("swapped", "event_block", "began"),
    [(False, None, START), (True, 120, 120)],
    ids=["earliest-since-block", "earliest-event-below-it"],
)
async def test_a_database_of_schema_version_3_began_at_its_best_record(
    database_url: str, swapped: bool, event_block: int | None, began: int
) -> None:
    """Migrated from version 3, a database began at the earliest block a contract it
    recorded is followed from, or at its earliest stored event if lower (the factory swapped
    and back before the upgrade); swapping a factory and back no longer moves that."""
    f1_since, f2 = (161, (F2, 151, 160)) if swapped else (START, (F2, 110, 115))
    async with Database.open(database_url, command_timeout=10.0) as db:
        await migrate_to(db, 3)
        await db.execute(
            "INSERT INTO indexer_state (id, chain_id, block_number, block_hash)"
            " VALUES (1, 1, 170, $1)",
            header(170).hash,
        )
        await db.execute(
            "INSERT INTO sources (address, kind, since_block, dropped_after)"
            " VALUES ($1, 'factory', $2, NULL), ($3, 'factory', $4, $5)",
            F1,
            f1_since,
            *f2,
        )
        if event_block is not None:
            await db.execute(
                "INSERT INTO events (block_number, log_index, block_hash, block_time,"
                " transaction_hash, transaction_index, contract, contract_kind, data)"
                " VALUES ($1, 0, $2, now(), $3, 0, $4, 'factory', '0x')",
                event_block,
                header(event_block).hash,
                "0x" + "aa" * 32,
                F1,
            )
        assert await migrate(db) == ["0004_began_at.sql", "0005_genesis.sql"]
        assert await db.fetchval("SELECT began_at FROM indexer_state") == began
        await swap_factory_and_back(db)
        assert await began_at(db, start_block=START + 500) == began


async def test_a_database_indexed_before_sources_were_recorded_began_at_start_block(
    database_url: str,
) -> None:
    """A database whose cursor predates the record of contracts (schema version 1, never
    started since) began at START_BLOCK, as its first start records: swapping a factory and
    back does not move that."""
    async with Database.open(database_url, command_timeout=10.0) as db:
        await migrate_to(db, 1)
        await db.execute(
            "INSERT INTO indexer_state (id, chain_id, block_number, block_hash)"
            " VALUES (1, 1, 120, $1)",
            header(120).hash,
        )
        await migrate(db)
        assert await began_at(db, start_block=START) == START
        await record_sources(
            db, {F1: ContractKind.FACTORY}, cursor=120, start_block=START, created=False
        )
        await swap_factory_and_back(db)
        assert await began_at(db, start_block=START + 500) == START
