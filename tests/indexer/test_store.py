"""The database layer against a real Postgres, where what matters is below the indexer's
own behaviour: how the link to the server fails."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from eth_abi.abi import encode

from devnet.postgres_server import Postgres
from indexer.batch import Batch, StoredEvent, block_time
from indexer.batch_commit import COPY_ABOVE, HANDOFF_MAX, save_batch
from indexer.catalog import MARKET_CREATED, ContractKind, catalog
from indexer.cursor import init_state
from indexer.database import Database
from indexer.decoding import decode_log
from indexer.errors import DatabaseUnavailable, LeaseLost, StoreError
from indexer.lease import Lease, try_acquire_lease
from indexer.metrics import Metrics
from indexer.outbox import outbox_after
from indexer.publisher import Publisher
from indexer.queries import READ_PAGE
from indexer.rollback import rollback
from indexer.rpc_results import BlockHeader, RawLog
from indexer.schema import latest_schema_version, migrate, schema_version
from indexer.service import acquire_lease, lease_owner
from tests.broadcaster.support import read_stream
from tests.indexer.test_publisher import held_lease
from tests.support.database import connected
from tests.support.tasks import background
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

TTL = 60.0
NO_SUCH_PID = 2**22 + 7  # above Linux's largest pid_max: no process has it


def header(number: int) -> BlockHeader:
    return BlockHeader(
        number=number, hash=f"0x{number + 1:064x}", parent_hash=f"0x{number:064x}", timestamp=0
    )


def raw_event(index: int) -> StoredEvent:
    """A log the catalogue does not know (stored raw), at block 1."""
    log = RawLog(
        address="0x" + "11" * 20,
        topics=("0x" + "ab" * 32,),
        data="0x" + "cd" * 96,
        block_number=1,
        block_hash=header(1).hash,
        transaction_hash=f"0x{index:064x}",
        transaction_index=0,
        log_index=index,
        removed=False,
    )
    return StoredEvent(log=log, kind=ContractKind.FACTORY, decoded=None, block_time=block_time(0))


async def lease_at_block_zero(db: Database) -> Lease:
    """Migrate, take the write lease and put the cursor at block 0; return the lease."""
    await migrate(db)
    lease = await try_acquire_lease(db, "test", TTL)
    assert lease is not None
    await init_state(db, lease, TTL, chain_id=1, cursor=header(0))
    return lease


def at_block(number: int, events: list[StoredEvent]) -> Batch:
    """A batch of events at this block that moves the cursor there from the block before."""
    return Batch(
        events=events,
        headers=[header(number)],
        cursor=header(number),
        prune_headers_below=0,
        extends=header(number).parent_hash,
    )


def block_one(events: list[StoredEvent]) -> Batch:
    """A batch of events at block 1 that moves the cursor there."""
    return at_block(1, events)


def market_created(index: int, *, block: int = 1) -> StoredEvent:
    """The factory's MarketCreated of the index-th market, at block 1 unless told."""
    factory, market = "0x" + "11" * 20, f"0x{index + 1:040x}"
    topics = [
        MARKET_CREATED.topic0,
        "0x" + market[2:].rjust(64, "0"),
        "0x" + ("22" * 20).rjust(64, "0"),
        "0x" + "33" * 32,
    ]
    data = "0x" + encode(["string", "uint256", "uint256", "uint256"], [f"Q{index}?", 1, 2, 3]).hex()
    log = RawLog(
        factory, tuple(topics), data, block, header(block).hash, f"0x{index:064x}", 0, index, False
    )
    decoded = decode_log(ContractKind.FACTORY, factory, topics, data)
    assert decoded is not None
    return StoredEvent(
        log=log, kind=ContractKind.FACTORY, decoded=decoded, block_time=block_time(0)
    )


def factory_paused(log_index: int, transaction: str) -> StoredEvent:
    """The factory's FactoryPaused(true) at this log of block 1, in this transaction."""
    factory = "0x" + "11" * 20
    spec = next(s for s in catalog().values() if s.name == "FactoryPaused")
    topics, data = [spec.topic0], "0x" + encode(["bool"], [True]).hex()
    log = RawLog(factory, tuple(topics), data, 1, header(1).hash, transaction, 0, log_index, False)
    decoded = decode_log(ContractKind.FACTORY, factory, topics, data)
    time = block_time(0)
    return StoredEvent(log=log, kind=ContractKind.FACTORY, decoded=decoded, block_time=time)


async def test_removal_notices_put_market_created_first_in_a_transaction_across_pages(
    database_url: str,
) -> None:
    """A rollback announces removals newest first but a transaction's MarketCreated first
    among its own, also when the rollback reads that transaction in two pages."""
    transaction = "0x" + "77" * 32
    first = market_created(0)
    created = dataclasses.replace(
        first, log=dataclasses.replace(first.log, transaction_hash=transaction)
    )
    paused = [factory_paused(index, transaction) for index in (1, 2)]
    # Raw logs after it, one fewer than a page: the newest page ends inside the transaction.
    later = [raw_event(index) for index in range(3, 3 + READ_PAGE - 1)]
    async with Database.open(database_url, command_timeout=10.0) as db:
        lease = await lease_at_block_zero(db)
        await save_batch(db, lease, TTL, block_one([created, *paused, *later]))
        await rollback(db, lease, TTL, header(0))
        notices = [orjson.loads(row.payload) for row in await outbox_after(db, 3, 10)]
    assert [(n["type"], n["logIndex"], n["removed"]) for n in notices] == [
        ("MarketCreated", 0, True),
        ("FactoryPaused", 2, True),
        ("FactoryPaused", 1, True),
    ]


@pytest.mark.parametrize("events", [3, COPY_ABOVE + 44])
async def test_a_committed_batch_hands_over_exactly_its_outbox_rows(
    database_url: str, events: int
) -> None:
    """What a batch that moves the cursor hands to the publisher in memory, a live block's
    few rows or a catch-up batch's sent by COPY, equals what the outbox holds."""
    async with Database.open(database_url, command_timeout=5.0) as db:
        lease = await lease_at_block_zero(db)
        batch = block_one([market_created(i) for i in range(events)])
        saved = await save_batch(db, lease, TTL, batch)
        assert saved.outbox is not None
        assert len(saved.outbox) == events
        assert saved.outbox == await outbox_after(db, 0, 2 * events)


async def test_a_batch_too_large_to_hand_over_reaches_redis_from_the_outbox_in_order(
    database_url: str, redis_client: aioredis.Redis
) -> None:
    """A batch that queues more than HANDOFF_MAX publications (BATCH_EVENTS set above it)
    hands none over, between batches that do: the publisher reads it from the outbox, and
    every event reaches the stream once, in seq order, exactly as the outbox holds it."""
    sizes = {1: 3, 2: HANDOFF_MAX + 1, 3: 3}
    total = sum(sizes.values())
    key = f"kektech:test-large-batch:{os.getpid()}:{database_url.rsplit('/', 1)[-1]}"
    try:
        async with Database.open(database_url, command_timeout=10.0) as db:
            lease = await lease_at_block_zero(db)
            publisher = Publisher(
                redis=redis_client,
                db=db,
                term=held_lease(),
                stream_key=key,
                stream_maxlen=2 * total,
                outbox_keep=total,
                metrics=Metrics(),
            )
            handed: list[int | None] = []
            async with background(publisher.publish_forever(), name="publish-outbox") as task:
                first = 0
                for number, size in sizes.items():
                    events = [market_created(i, block=number) for i in range(first, first + size)]
                    first += size
                    saved = await save_batch(db, lease, TTL, at_block(number, events))
                    handed.append(None if saved.outbox is None else len(saved.outbox))
                    publisher.wake(saved.outbox or ())  # as the follower does after a commit

                async def all_published() -> bool:
                    return publisher.published == total or task.done()

                await eventually(all_published, within=60, what=f"seq {total} published")
                assert not task.done(), task
            outbox = await outbox_after(db, 0, total + 1)
        assert handed == [3, None, 3]
        assert [row.seq for row in outbox] == list(range(1, total + 1))
        assert await read_stream(redis_client, key) == [
            (
                b"%d-0" % row.seq,
                {
                    b"seq": b"%d" % row.seq,
                    b"channels": row.channels.encode(),
                    b"event": row.payload,
                },
            )
            for row in outbox
        ]
    finally:
        await redis_client.delete(key)


async def test_rows_sent_by_copy_into_a_path_that_stops_taking_data_end_in_a_store_error(
    postgres: Postgres, database_url: str
) -> None:
    """A batch big enough to go by COPY, written into a network path that stops taking data
    (the socket buffers fill, the write blocks), fails with a StoreError within the command
    timeout like any statement, instead of waiting forever."""
    async with TcpProxy(postgres.port, receive_buffer=4096) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        async with Database.open(url, command_timeout=2.0) as db:
            lease = await lease_at_block_zero(db)
            batch = block_one([raw_event(i) for i in range(20_000)])
            proxy.stall_before = b"PGCOPY"  # the first rows of a binary COPY
            async with background(save_batch(db, lease, TTL, batch)) as saving:
                await asyncio.wait([saving], timeout=30)  # far past the command timeout
                assert saving.done(), "the COPY still waits"
                with pytest.raises(StoreError):
                    saving.result()


async def test_only_a_dead_holder_of_this_machine_loses_the_lease_before_it_expires(
    database_url: str,
) -> None:
    """A lease whose holder was a process of this machine that is gone (kill -9) is taken
    over at once; one held on another machine (or container) that has the same host name,
    where that pid means nothing here, is left alone until it expires."""
    host, _, tag, node = lease_owner().split(":")
    elsewhere = f"{host}:{NO_SUCH_PID}:{tag}:{'0' * len(node)}"
    gone_from_here = f"{host}:{NO_SUCH_PID}:{tag}:{node}"
    async with Database.open(database_url, command_timeout=5.0) as db:
        await migrate(db)
        assert await try_acquire_lease(db, elsewhere, TTL) is not None
        assert await acquire_lease(db, owner=lease_owner(), ttl=TTL, wait=False) is None
        assert await try_acquire_lease(db, gone_from_here, TTL, steal_from=elsewhere)
        assert await acquire_lease(db, owner=lease_owner(), ttl=TTL, wait=False) is not None
        assert socket.gethostname() == host


async def test_a_migration_cut_off_by_a_dead_network_path_does_not_block_the_next(
    postgres: Postgres, database_url: str
) -> None:
    """Migrations hold a lock while they run: one whose path dies before its end, with the
    server's side left open, is ended by the server, so the next start migrates."""
    async with TcpProxy(postgres.port) as proxy:
        proxy.freeze_before = b"INSERT INTO schema_migrations"
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        async with Database.open(url, command_timeout=2.0) as cut_off:
            with pytest.raises(StoreError):
                await migrate(cut_off)
        # The dead path's connection stays open on the server's side meanwhile.
        async with Database.open(database_url, command_timeout=2.0) as db:
            assert await migrate(db)
            assert await schema_version(db) == latest_schema_version()


async def test_a_command_timeout_past_what_postgres_takes_still_writes(database_url: str) -> None:
    """A DB_COMMAND_TIMEOUT beyond Postgres's largest timeout (about 24.8 days), e.g. to mean
    "no limit", bounds the transactions at that largest value instead of failing them."""
    async with Database.open(database_url, command_timeout=1e9) as db:
        await migrate(db)
        lease = await try_acquire_lease(db, "test", TTL)
        assert lease is not None
        state = await init_state(db, lease, TTL, chain_id=1, cursor=header(0))
        assert state.block_number == 0


async def test_a_connection_the_server_ends_mid_statement_is_reported_with_its_reason(
    database_url: str,
) -> None:
    """Postgres ending a connection in the middle of a batch (a restart, a failover, an
    operator) is a lost link, reported with the server's reason: not with what dropping the
    dead connection raised, which reads like a bug of ours."""
    async with (
        connected(database_url) as admin,
        Database.open(database_url, statement_cache_size=0, max_size=2, command_timeout=30) as db,
    ):
        backend: list[int] = []

        async def batch() -> None:
            async with db.transaction() as conn:
                backend.append(await conn.fetchval("SELECT pg_backend_pid()"))
                await conn.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(batch())

        async def sleeping() -> bool:
            query = "SELECT query FROM pg_stat_activity WHERE pid = $1"
            return bool(backend) and "pg_sleep" in str(await admin.fetchval(query, backend[0]))

        await eventually(sleeping, within=10, what="the statement in flight")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", backend[0])
        with pytest.raises(DatabaseUnavailable) as failure:
            await task
    assert "administrator command" in str(failure.value)


async def test_an_idle_connection_the_server_ended_fails_its_next_call_as_unavailable(
    database_url: str,
) -> None:
    """A pooled connection ended by the server while idle (a restart, a pooler's recycling,
    `idle_session_timeout`): its next call either works on a fresh connection or fails as a
    lost link. asyncpg may meet the server's goodbye in the middle of that call and raise its
    own InternalClientError ("cannot switch to state ..."), which read as a bug of ours."""
    raw: list[str] = []
    async with (
        connected(database_url) as admin,
        Database.open(database_url, max_size=1, command_timeout=10) as db,
    ):
        for attempt in range(40):
            pid = await db.fetchval("SELECT pg_backend_pid()")
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.0005 * (attempt % 10))  # every moment of the goodbye
            try:
                await db.fetchval("SELECT 1")
            except DatabaseUnavailable:
                pass
            except Exception as exc:
                raw.append(f"{type(exc).__name__}: {exc}")
    assert raw == []


async def test_a_statement_the_server_cancels_is_a_database_unavailable(database_url: str) -> None:
    """A statement past the transaction's statement_timeout (a lock held elsewhere) is
    cancelled by the server: the database did not answer in time, as when the client's own
    timeout fires, not a bug of the statement. The server's bound is set below the client's
    here so that the server, not asyncpg's own timeout, is the one that ends the wait."""

    async def insert(db: Database) -> None:
        async with db.transaction() as conn:
            await conn.execute("SET LOCAL statement_timeout = 200")
            await conn.execute("INSERT INTO locked VALUES (1)")

    async with (
        connected(database_url) as admin,
        Database.open(database_url, command_timeout=5) as db,
    ):
        await admin.execute("CREATE TABLE locked (id int)")
        async with admin.transaction():
            await admin.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(DatabaseUnavailable) as failure:
                await insert(db)
    assert "statement timeout" in str(failure.value)


async def test_a_read_only_database_is_unavailable(database_url: str) -> None:
    """A database that takes no writes for now (a hot standby after a failover, Supabase's
    read-only mode once its disk is nearly full) is unavailable, as an unreachable one is: the
    indexer stops with one clear line, or waits at start-up (migrate), instead of ending with
    asyncpg's traceback."""
    async with connected(database_url) as admin:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    async with Database.open(database_url, command_timeout=10) as db:
        with pytest.raises(DatabaseUnavailable) as failure:
            await migrate(db)
    assert "read-only" in str(failure.value)


@pytest.mark.parametrize("condition", ["disk_full", "out_of_memory"])
async def test_a_database_out_of_resources_is_unavailable(
    database_url: str, condition: str
) -> None:
    """A write the server cannot make for lack of resources (SQLSTATE class 53: its disk is
    full, it is out of memory) fails as DatabaseUnavailable. The server's own error is raised
    by a trigger here: filling a disk is not something a test can do to its machine."""
    async with connected(database_url) as admin:
        await admin.execute(
            "CREATE TABLE full_up (id int);"
            " CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" RAISE EXCEPTION 'no room left' USING ERRCODE = '{condition}'; END $$;"
            " CREATE TRIGGER refuse BEFORE INSERT ON full_up"
            " FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    async with Database.open(database_url, command_timeout=10) as db:
        with pytest.raises(DatabaseUnavailable) as failure:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO full_up VALUES (1)")
    assert "no room left" in str(failure.value)


async def test_no_connection_slot_left_is_unavailable(
    postgres: Postgres, database_url: str
) -> None:
    """The pool needs another connection and the server has no slot left for it (53300:
    max_connections, or a role's CONNECTION LIMIT as Supabase sets them): DatabaseUnavailable,
    not asyncpg's TooManyConnectionsError with a traceback."""
    role = f"limited_{os.getpid()}"
    async with connected(database_url) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        try:
            url = database_url.replace(f"//{postgres.user}@", f"//{role}@")
            assert url != database_url
            async with (
                Database.open(url, max_size=2, command_timeout=10) as db,
                db.connection() as first,
            ):
                assert await first.fetchval("SELECT 1") == 1
                with pytest.raises(DatabaseUnavailable) as failure:
                    async with db.connection() as second:
                        await second.fetchval("SELECT 1")
        finally:
            await admin.execute(f"DROP ROLE {role}")
    assert "too many connections" in str(failure.value)


async def take_over(conn: asyncpg.Connection) -> None:
    """Take the write lease as another indexer does once it expired: a new owner and token."""
    await conn.execute(
        "UPDATE indexer_lease SET owner = 'successor', token = token + 1,"
        " expires_at = clock_timestamp() + interval '60 s' WHERE id = 1"
    )


@pytest.mark.parametrize("taken", ["before", "while-waiting"])
async def test_a_writer_that_lost_the_lease_to_a_committing_leader_gets_lease_lost(
    database_url: str, taken: str
) -> None:
    """A writer whose lease was taken ("before" it began its batch, or "while" it waited for
    the cursor row) meets the new leader committing the same block: it gets LeaseLost, not a
    clash on the events the new leader just committed (asyncpg's UniqueViolationError, which
    the indexer reports as a bug with a traceback)."""
    async with Database.open(database_url, command_timeout=10) as db:
        stale = await lease_at_block_zero(db)
        async with connected(database_url) as successor:
            if taken == "before":
                await take_over(successor)
            commit = successor.transaction()
            await commit.start()
            await successor.execute("SELECT 1 FROM indexer_state WHERE id = 1 FOR UPDATE")
            batch = block_one([market_created(0)])
            async with background(save_batch(db, stale, TTL, batch)) as saving:

                async def waiting() -> bool:
                    query = (
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                    return bool(await successor.fetchval(query))

                await eventually(waiting, within=10, what="the stale writer waiting its turn")
                if taken == "while-waiting":
                    await take_over(successor)
                # The successor's batch: the same event, at block 1 log index 0.
                await successor.execute(
                    "INSERT INTO events (block_number, log_index, block_hash, block_time,"
                    " transaction_hash, transaction_index, contract, contract_kind, data)"
                    " VALUES (1, 0, $1, now(), $2, 0, $3, 'factory', '0x')",
                    header(1).hash,
                    f"0x{0:064x}",
                    "0x" + "11" * 20,
                )
                await commit.commit()
                with pytest.raises(LeaseLost):
                    await saving
