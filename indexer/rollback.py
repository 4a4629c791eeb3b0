"""Rolling the stored chain back to an ancestor: after a reorg, or before a reindex."""

from __future__ import annotations

from collections.abc import Sequence

from indexer.batch import StoredEvent
from indexer.cursor import save_headers
from indexer.database import Connection, Database
from indexer.lease import Lease, fence
from indexer.market_rebuild import rebuild_markets
from indexer.publish_order import complete_transactions, in_publish_order
from indexer.queries import keyset_pages
from indexer.rpc_results import BlockHeader
from indexer.sources import MARK_BACKFILLED
from indexer.statements import OUTBOX_COLUMNS, outbox_values

MAX_BIGINT = 2**63 - 1
# A keyset page (see queries.keyset_pages), in the order of the primary key.
RETRACTED_PAGE = (
    "SELECT * FROM events WHERE block_number > $1 AND (block_number, log_index) < ($2, $3)"
    " ORDER BY block_number DESC, log_index DESC LIMIT $4"
)


async def rollback(db: Database, lease: Lease, ttl: float, ancestor: BlockHeader) -> int:
    """Undo everything above `ancestor` in one transaction, queueing removal notices.

    Events, markets created above the ancestor, projections of markets they touched,
    stored headers and the cursor all go back together. Returns the events removed. An
    ancestor below where the database began (a reindex from below it) moves that down to
    the block after it, from which the database is indexed again; a reorg's ancestor is
    never below the block before it (indexer/reorg.py).
    Notices go newest first, but a MarketCreated first among its transaction's (as
    publications do, indexer/publish_order.py).
    """
    async with db.transaction() as conn:
        state = await conn.fetchrow(
            "SELECT chain_id, last_seq FROM indexer_state WHERE id = 1 FOR UPDATE"
        )
        assert state is not None, "rollback before the cursor exists"
        last_seq = state["last_seq"]
        retracted = 0
        markets: set[str] = set()
        # Newest first, a page at a time (a reindex may retract most of the chain).
        pages = keyset_pages(
            conn.fetch,
            RETRACTED_PAGE,
            fixed=[ancestor.number],
            start=(MAX_BIGINT, 0),
            keys=("block_number", "log_index"),
        )
        # The last transaction of a page waits for the next page, which may hold the rest of
        # it: its MarketCreated goes first among its notices (indexer/publish_order.py).
        held: list[StoredEvent] = []
        async for records in pages:
            events = [e for e in map(StoredEvent.from_record, records) if e.decoded is not None]
            markets.update(e.market for e in events if e.market)
            whole, held = complete_transactions([*held, *events])
            last_seq = await _queue_removals(db, conn, whole, state["chain_id"], last_seq)
            retracted += len(records)
        last_seq = await _queue_removals(db, conn, held, state["chain_id"], last_seq)
        await conn.execute("DELETE FROM events WHERE block_number > $1", ancestor.number)
        await rebuild_markets(conn, markets, created_above=ancestor.number)
        await conn.execute("DELETE FROM blocks WHERE number > $1", ancestor.number)
        await save_headers(conn, [ancestor])
        # CASE, not least(): a record still missing (sources.indexed_from) stays missing.
        await conn.execute(
            "UPDATE indexer_state SET block_number = $1, block_hash = $2, last_seq = $3,"
            " began_at = CASE WHEN began_at > $4 THEN $4 ELSE began_at END,"
            " updated_at = now() WHERE id = 1",
            ancestor.number,
            ancestor.hash,
            last_seq,
            ancestor.number + 1,
        )
        # Everything above the ancestor is indexed again, every configured contract's
        # events included: one followed from a later block is then from the block after it.
        await conn.execute(MARK_BACKFILLED, ancestor.number + 1, MAX_BIGINT - 1)
        await fence(conn, lease, ttl)
    return retracted


async def _queue_removals(
    db: Database,
    conn: Connection,
    events: Sequence[StoredEvent],
    chain_id: int,
    last_seq: int,
) -> int:
    """Queue removal notices of `events` (whole transactions, newest first); returns the last
    seq assigned."""
    notices = [
        outbox_values(event, chain_id=chain_id, seq=seq, removed=True)
        for seq, event in enumerate(in_publish_order(events), last_seq + 1)
    ]
    if notices:
        await db.copy(conn, "outbox", notices, OUTBOX_COLUMNS)
    return last_seq + len(notices)
