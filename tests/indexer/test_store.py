"""The database layer against a real Postgres, where what matters is below the indexer's
own behaviour: how the link to the server fails."""

from __future__ import annotations

import asyncio
import socket

import pytest

from devnet.services import Postgres
from indexer.batch import Batch, StoredEvent, block_time
from indexer.catalog import ContractKind
from indexer.errors import StoreError
from indexer.rpc_results import BlockHeader, RawLog
from indexer.service import acquire_lease, lease_owner
from indexer.store import Store
from tests.support.tasks import background
from tests.support.tcp_proxy import TcpProxy

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


async def test_rows_sent_by_copy_into_a_path_that_stops_taking_data_end_in_a_store_error(
    postgres: Postgres, database_url: str
) -> None:
    """A batch big enough to go by COPY, written into a network path that stops taking data
    (the socket buffers fill, the write blocks), fails with a StoreError within the command
    timeout like any statement, instead of waiting forever."""
    async with TcpProxy(postgres.port, receive_buffer=4096) as proxy:
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        async with Store.open(url, command_timeout=2.0) as store:
            await store.migrate()
            lease = await store.try_acquire_lease("test", TTL)
            assert lease is not None
            await store.init_state(lease, TTL, chain_id=1, cursor=header(0))
            batch = Batch(
                events=[raw_event(i) for i in range(20_000)],
                headers=[header(1)],
                cursor=header(1),
                prune_headers_below=0,
            )
            proxy.stall_before = b"PGCOPY"  # the first rows of a binary COPY
            async with background(store.save_batch(lease, TTL, batch)) as saving:
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
    async with Store.open(database_url, command_timeout=5.0) as store:
        await store.migrate()
        assert await store.try_acquire_lease(elsewhere, TTL) is not None
        assert await acquire_lease(store, owner=lease_owner(), ttl=TTL, wait=False) is None
        assert await store.try_acquire_lease(gone_from_here, TTL, steal_from=elsewhere)
        assert await acquire_lease(store, owner=lease_owner(), ttl=TTL, wait=False) is not None
        assert socket.gethostname() == host


async def test_a_migration_cut_off_by_a_dead_network_path_does_not_block_the_next(
    postgres: Postgres, database_url: str
) -> None:
    """Migrations hold a lock while they run: one whose path dies before its end, with the
    server's side left open, is ended by the server, so the next start migrates."""
    async with TcpProxy(postgres.port) as proxy:
        proxy.freeze_before = b"INSERT INTO schema_migrations"
        url = database_url.replace(f":{postgres.port}/", f":{proxy.port}/")
        async with Store.open(url, command_timeout=2.0) as cut_off:
            with pytest.raises(StoreError):
                await cut_off.migrate()
        # The dead path's connection stays open on the server's side meanwhile.
        async with Store.open(database_url, command_timeout=2.0) as store:
            assert await store.migrate()
            assert await store.schema_version() == Store.latest_schema_version()


async def test_a_command_timeout_past_what_postgres_takes_still_writes(database_url: str) -> None:
    """A DB_COMMAND_TIMEOUT beyond Postgres's largest timeout (about 24.8 days), e.g. to mean
    "no limit", bounds the transactions at that largest value instead of failing them."""
    async with Store.open(database_url, command_timeout=1e9) as store:
        await store.migrate()
        lease = await store.try_acquire_lease("test", TTL)
        assert lease is not None
        state = await store.init_state(lease, TTL, chain_id=1, cursor=header(0))
        assert state.block_number == 0
