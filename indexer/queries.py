"""Reads of the stored tables, a keyset page at a time where they may be large.

The markets known to the follower, and what `verify` and `status` compare and count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from indexer.cursor import header
from indexer.database import Database, Record
from indexer.projection import MarketRow
from indexer.rpc_results import BlockHeader
from indexer.statements import market_row

# Rows read per query by a rollback or a markets rebuild: their memory stays bounded however
# many events a reorg or a reindex retracts.
READ_PAGE = 2000
# Keyset pages (see keyset_pages), in the order of the primary key.
RANGE_PAGE = (
    "SELECT * FROM events WHERE block_number <= $1 AND (block_number, log_index) > ($2, $3)"
    " ORDER BY block_number, log_index LIMIT $4"
)
HEADERS_PAGE = (
    "SELECT number, hash, parent_hash, timestamp FROM blocks WHERE number <= $1 AND number > $2"
    " ORDER BY number LIMIT $3"
)


async def keyset_pages(
    fetch: Callable[..., Awaitable[list[Record]]],
    query: str,
    *,
    fixed: Sequence[Any],
    start: tuple[Any, ...],
    keys: tuple[str, ...],
) -> AsyncIterator[list[Record]]:
    """Keyset pages of READ_PAGE rows: `query` takes the `fixed` arguments, then the position
    (`start`, then the `keys` of each page's last row), then the limit."""
    position = start
    while True:
        records = await fetch(query, *fixed, *position, READ_PAGE)
        if records:
            yield records
        if len(records) < READ_PAGE:
            return
        position = tuple(records[-1][key] for key in keys)


async def children(db: Database) -> dict[str, str]:
    """Every known market clone and the factory that created it."""
    rows = await db.fetch("SELECT address, factory FROM markets")
    return {r["address"]: r["factory"] for r in rows}


async def stored_positions(db: Database, first: int, last: int) -> set[tuple[int, int]]:
    """The (block number, log index) of the events stored in blocks first..last."""
    rows = await db.fetch(
        "SELECT block_number, log_index FROM events WHERE block_number BETWEEN $1 AND $2",
        first,
        last,
    )
    return {(r["block_number"], r["log_index"]) for r in rows}


async def markets_created_between(db: Database, first: int, last: int) -> list[str]:
    """The market clones announced in blocks first..last, oldest first."""
    rows = await db.fetch(
        "SELECT address FROM markets WHERE created_block BETWEEN $1 AND $2"
        " ORDER BY created_block, address",
        first,
        last,
    )
    return [r["address"] for r in rows]


@dataclass(frozen=True, slots=True)
class AboveCursor:
    """The cursor and the rows stored above it, read together (one statement: one snapshot).
    The indexer commits rows with the cursor that covers them, so any row above it was
    written by something else; rows a running indexer commits later come with a later
    cursor."""

    block_number: int
    block_hash: str
    events: int
    headers: int
    markets: int

    @property
    def rows(self) -> int:
        return self.events + self.headers + self.markets


async def above_cursor(db: Database) -> AboveCursor | None:
    """The cursor and the counts of rows above it; None before the cursor exists."""
    row = await db.fetchrow(
        "SELECT s.block_number, s.block_hash,"
        " (SELECT count(*) FROM events WHERE block_number > s.block_number) AS events,"
        " (SELECT count(*) FROM blocks WHERE number > s.block_number) AS headers,"
        " (SELECT count(*) FROM markets WHERE created_block > s.block_number) AS markets"
        " FROM indexer_state AS s WHERE s.id = 1"
    )
    if row is None:
        return None
    return AboveCursor(
        block_number=row["block_number"],
        block_hash=row["block_hash"],
        events=row["events"],
        headers=row["headers"],
        markets=row["markets"],
    )


async def market_registry(db: Database) -> dict[str, tuple[str, int]]:
    """Every known market clone, with its factory and creation block (for `verify`)."""
    rows = await db.fetch("SELECT address, factory, created_block FROM markets")
    return {r["address"]: (r["factory"], int(r["created_block"])) for r in rows}


async def event_rows(db: Database, first: int, last: int) -> AsyncIterator[list[Mapping[str, Any]]]:
    """The `events` rows of an inclusive block range, in chain order, a page at a time.

    Rows as stored, not StoredEvents: `verify` compares them column by column, and a
    damaged row (a contract kind that does not exist, a name on a log the catalogue does
    not know) must be a difference it reports, not an error that stops it.
    """
    async for rows in keyset_pages(
        db.fetch,
        RANGE_PAGE,
        fixed=[last],
        start=(first, -1),
        keys=("block_number", "log_index"),
    ):
        yield rows


async def header_rows(db: Database, first: int, last: int) -> AsyncIterator[list[BlockHeader]]:
    """The stored block headers of an inclusive block range, in order, a page at a time."""
    async for rows in keyset_pages(
        db.fetch, HEADERS_PAGE, fixed=[last], start=(first - 1,), keys=("number",)
    ):
        yield [header(r) for r in rows]


async def counts(db: Database) -> dict[str, int]:
    """Row counts for `status`."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM events) AS events,"
        " (SELECT count(*) FROM markets) AS markets,"
        " (SELECT count(*) FROM outbox) AS outbox"
    )
    assert row is not None
    return {k: int(row[k]) for k in ("events", "markets", "outbox")}


async def market(db: Database, address: str) -> MarketRow | None:
    record = await db.fetchrow("SELECT * FROM markets WHERE address = $1", address)
    return None if record is None else market_row(record)


async def markets(db: Database, addresses: Sequence[str]) -> dict[str, MarketRow]:
    """The rows of these markets (those stored), by address."""
    records = await db.fetch("SELECT * FROM markets WHERE address = ANY($1::text[])", addresses)
    return {r["address"]: market_row(r) for r in records}
