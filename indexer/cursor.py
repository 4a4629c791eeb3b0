"""The cursor (indexer_state) and the stored block headers it is checked against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from indexer.database import Connection, Database
from indexer.lease import Lease, fence
from indexer.rpc_results import BlockHeader
from indexer.statements import HEADER_TYPES, SAVE_HEADERS, columns, header_values


@dataclass(frozen=True, slots=True)
class IndexerState:
    """The cursor: the last block whose logs are all stored, and the last seq assigned."""

    chain_id: int
    block_number: int
    block_hash: str
    last_seq: int


def header(row: Mapping[str, Any]) -> BlockHeader:
    """A stored header (a `blocks` row)."""
    return BlockHeader(
        number=row["number"],
        hash=row["hash"],
        parent_hash=row["parent_hash"],
        timestamp=row["timestamp"],
    )


async def load_state(db: Database) -> IndexerState | None:
    row = await db.fetchrow(
        "SELECT chain_id, block_number, block_hash, last_seq FROM indexer_state WHERE id = 1"
    )
    if row is None:
        return None
    return IndexerState(
        chain_id=row["chain_id"],
        block_number=row["block_number"],
        block_hash=row["block_hash"],
        last_seq=row["last_seq"],
    )


async def init_state(
    db: Database, lease: Lease, ttl: float, *, chain_id: int, cursor: BlockHeader
) -> IndexerState:
    """Create the cursor just before the first block to index (no-op if it exists), and
    record that the database began at the block after it (sources.indexed_from)."""
    async with db.transaction() as conn:
        await fence(conn, lease, ttl)
        await conn.execute(
            "INSERT INTO indexer_state (id, chain_id, block_number, block_hash, began_at)"
            " VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
            chain_id,
            cursor.number,
            cursor.hash,
            cursor.number + 1,
        )
        await save_headers(conn, [cursor])
    state = await load_state(db)
    assert state is not None
    return state


async def genesis_of(db: Database, found: str) -> str:
    """The hash of block 0 of the chain the database is indexed from: `found` (the node's)
    when none is recorded yet, which is then recorded."""
    recorded = await db.fetchval(
        "UPDATE indexer_state SET genesis_hash = coalesce(genesis_hash, $1) WHERE id = 1"
        " RETURNING genesis_hash",
        found,
    )
    assert recorded is not None, "genesis_of before the cursor exists"
    return str(recorded)


async def save_headers(conn: Connection, headers: Sequence[BlockHeader]) -> None:
    await conn.execute(SAVE_HEADERS, *columns(map(header_values, headers), len(HEADER_TYPES)))


async def recent_headers(db: Database, limit: int) -> list[BlockHeader]:
    """The newest stored headers, newest first."""
    rows = await db.fetch(
        "SELECT number, hash, parent_hash, timestamp FROM blocks ORDER BY number DESC LIMIT $1",
        limit,
    )
    return [header(r) for r in rows]
