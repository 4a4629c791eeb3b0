"""Recomputing `markets` rows from the events stored for them (a backfill, a rollback)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from indexer.batch import StoredEvent
from indexer.database import Connection
from indexer.projection import MarketRow, ProjectedEvent, apply_events
from indexer.queries import keyset_pages
from indexer.statements import MARKET_COLUMNS, UPSERT_MARKETS, columns, market_values

# Markets rebuilt per group (their events are read READ_PAGE rows at a time): memory stays
# bounded however many events a reorg or a reindex retracts.
REBUILD_GROUP = 500
# A keyset page (see queries.keyset_pages), in the order of events_market_idx.
MARKET_EVENTS_PAGE = (
    "SELECT * FROM events WHERE market_address = ANY($1::text[])"
    " AND (market_address, block_number, log_index) > ($2, $3, $4)"
    " ORDER BY market_address, block_number, log_index LIMIT $5"
)


def projected(events: Iterable[StoredEvent]) -> Iterator[ProjectedEvent]:
    """The events that concern a market, as the projection sees them."""
    return (p for e in events if (p := e.projected()) is not None)


async def rebuild_markets(
    conn: Connection, addresses: set[str], *, created_above: int | None = None
) -> None:
    """Recompute the rows of these markets from every event stored for them.

    A row is recomputed from its market's MarketCreated on, so a market whose events were
    pruned (docs/operations.md) keeps its row as it is: nothing is left to recompute it
    from, and the indexer follows the markets listed there. With `created_above` (a
    rollback's ancestor), the rows of markets created above it, on the retracted branch,
    are deleted.

    A group of markets at a time, their events read a page at a time: a popular market
    or a reindex over many markets must not need all their events in memory at once.
    """
    if not addresses:
        return
    affected = sorted(addresses)
    if created_above is not None:
        await conn.execute(
            "DELETE FROM markets WHERE address = ANY($1::text[]) AND created_block > $2",
            affected,
            created_above,
        )
    for start in range(0, len(affected), REBUILD_GROUP):
        group = affected[start : start + REBUILD_GROUP]
        rows: dict[str, MarketRow | None] = dict.fromkeys(group)
        pages = keyset_pages(
            conn.fetch,
            MARKET_EVENTS_PAGE,
            fixed=[group],
            start=("", -1, -1),
            keys=("market_address", "block_number", "log_index"),
        )
        async for records in pages:
            apply_events(rows, projected(map(StoredEvent.from_record, records)))
        # The upsert replaces every column of a row the fold produced.
        markets = [row for row in rows.values() if row is not None]
        if markets:
            rows_by_column = columns(map(market_values, markets), len(MARKET_COLUMNS))
            await conn.execute(UPSERT_MARKETS, *rows_by_column)
