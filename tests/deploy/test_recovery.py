"""Recovery runbook (docs/operations.md): rebuild the database from the chain alone, then verify."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from devnet.anvil_node import Anvil
from devnet.chain import Deployment, DevChain
from devnet.driver import ActivityDriver
from devnet.postgres_server import Postgres
from devnet.redis_server import Redis
from tests.support.database import connected
from tests.support.indexer_process import IndexerProcess, indexer_env


async def rows(database_url: str, query: str) -> list[dict[str, Any]]:
    async with connected(database_url) as conn:
        return [dict(record) for record in await conn.fetch(query)]


async def index_to_head(env: dict[str, str], head: int, log_dir: Path) -> None:
    """Run the indexer until its cursor reaches head (then kill it, as a lost server would)."""
    with IndexerProcess(env, log_dir=log_dir) as indexer:
        await indexer.wait_cursor(head)


async def verify(env: dict[str, str], first: int, log_dir: Path) -> tuple[int, str]:
    """`python -m indexer verify --from first`: exit code and output."""
    with IndexerProcess(env, "verify", "--from", str(first), log_dir=log_dir) as command:
        code = await command.wait_exit(within=60)
        return code, command.log_text()


@pytest.mark.timeout(180)
async def test_database_rebuilt_from_the_chain_equals_the_original(
    anvil: Anvil,
    dev_chain: DevChain,
    deployment: Deployment,
    postgres: Postgres,
    database_url: str,
    redis_server: Redis,
    tmp_path: Path,
) -> None:
    """A fresh database indexed from START_BLOCK holds the same events and markets as the lost
    one, `verify` finds no difference, and it does find a row deleted afterwards."""
    driver = ActivityDriver(dev_chain, deployment, seed=73, txs_per_block=5)
    await driver.cover_all_events()
    await driver.run(blocks=10)
    head = await dev_chain.block_number()

    def env(url: str, name: str, **extra: str) -> dict[str, str]:
        return indexer_env(
            database_url=url,
            redis_url=redis_server.url,
            rpc_url=anvil.rpc_url,
            deployment=deployment,
            stream_key=f"test:{os.getpid()}:recovery:{name}",
            **extra,
        )

    # The original database, indexed from genesis like a long-running deployment.
    await index_to_head(env(database_url, "a", START_BLOCK="0"), head, tmp_path)

    rebuilt_name = f"recovery_{os.getpid()}"
    rebuilt_url = postgres.create_database(rebuilt_name)
    try:
        rebuilt = env(rebuilt_url, "b", START_BLOCK=str(deployment.block))
        await index_to_head(rebuilt, head, tmp_path)

        code, output = await verify(rebuilt, deployment.block, tmp_path)
        assert code == 0, output
        assert output.strip().splitlines()[-1].endswith(": OK"), output
        for query in (
            "SELECT * FROM events ORDER BY block_number, log_index",
            "SELECT * FROM markets ORDER BY address",
        ):
            original = await rows(database_url, query)
            assert original, query
            assert await rows(rebuilt_url, query) == original, query

        deleted = await rows(
            rebuilt_url,
            "DELETE FROM events WHERE (block_number, log_index) = "
            "(SELECT block_number, log_index FROM events ORDER BY block_number DESC LIMIT 1) "
            "RETURNING block_number, log_index",
        )
        code, output = await verify(rebuilt, deployment.block, tmp_path)
        assert code == 1, output
        block, log_index = deleted[0]["block_number"], deleted[0]["log_index"]
        assert f"block {block} log {log_index}: missing from the database" in output
    finally:
        postgres.drop_database(rebuilt_name)
