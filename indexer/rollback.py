"""Rolling the stored chain back to an ancestor: after a reorg, or before a reindex."""

from __future__ import annotations

from indexer.batch import StoredEvent
from indexer.cursor import save_headers
from indexer.database import Database
from indexer.lease import Lease, fence
from indexer.market_rebuild import rebuild_markets
from indexer.queries import keyset_pages
from indexer.rpc_results import BlockHeader
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
    stored headers and the cursor all go back together. Returns the events removed.
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
        async for records in pages:
            notices = []
            for event in map(StoredEvent.from_record, records):
                if event.decoded is not None:
                    last_seq += 1
                    notices.append(
                        outbox_values(event, chain_id=state["chain_id"], seq=last_seq, removed=True)
                    )
                    if event.market:
                        markets.add(event.market)
            if notices:
                await db.copy(conn, "outbox", notices, OUTBOX_COLUMNS)
            retracted += len(records)
        await conn.execute("DELETE FROM events WHERE block_number > $1", ancestor.number)
        await rebuild_markets(conn, markets, created_above=ancestor.number)
        await conn.execute("DELETE FROM blocks WHERE number > $1", ancestor.number)
        await save_headers(conn, [ancestor])
        await conn.execute(
            "UPDATE indexer_state SET block_number = $1, block_hash = $2, last_seq = $3,"
            " updated_at = now() WHERE id = 1",
            ancestor.number,
            ancestor.hash,
            last_seq,
        )
        await fence(conn, lease, ttl)
    return retracted
