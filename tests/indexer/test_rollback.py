"""Rolling back more events than one read page holds, against a real Postgres."""

from __future__ import annotations

import json

from indexer.batch import Batch
from indexer.batch_commit import save_batch
from indexer.database import Database
from indexer.outbox import last_seq, outbox_after
from indexer.queries import READ_PAGE
from indexer.rollback import rollback
from tests.indexer.test_store import TTL, header, lease_at_block_zero, market_created

# Per block: a page boundary falls inside block 2 and inside block 3, between two events of
# one block, where a keyset position that compared the block alone would skip or repeat.
PER_BLOCK = {1: 5, 2: READ_PAGE + 7, 3: READ_PAGE - 3}


async def test_a_rollback_over_several_read_pages_retracts_each_event_once(
    database_url: str,
) -> None:
    """Every event above the ancestor gets exactly one removal notice, newest first, with
    consecutive seqs after the last publication; the events, markets and cursor at or below
    the ancestor stay as they were."""
    events, first = [], 0
    for block, count in PER_BLOCK.items():
        events += [market_created(i, block=block) for i in range(first, first + count)]
        first += count
    above = [event for event in events if event.log.block_number > 1]
    async with Database.open(database_url, command_timeout=30.0) as db:
        lease = await lease_at_block_zero(db)
        batch = Batch(
            events=events,
            headers=[header(block) for block in PER_BLOCK],
            cursor=header(max(PER_BLOCK)),
            prune_headers_below=0,
            extends=header(0).hash,
        )
        await save_batch(db, lease, TTL, batch)
        published = await last_seq(db)

        retracted = await rollback(db, lease, TTL, header(1))

        notices = await outbox_after(db, published, len(events) + 1)
        kept = await db.fetch("SELECT block_number, log_index FROM events ORDER BY log_index")
        markets = await db.fetchval("SELECT count(*) FROM markets")
        cursor = await db.fetchrow("SELECT block_number, block_hash FROM indexer_state")
        assert cursor is not None
        assert await last_seq(db) == published + len(above)

    assert retracted == len(above)
    assert [row.seq for row in notices] == list(range(published + 1, published + len(above) + 1))
    envelopes = [json.loads(row.payload) for row in notices]
    assert all(envelope["removed"] is True for envelope in envelopes)
    newest_first = sorted(above, key=lambda e: (e.log.block_number, e.log.log_index), reverse=True)
    assert [(e["blockNumber"], e["logIndex"]) for e in envelopes] == [
        (event.log.block_number, event.log.log_index) for event in newest_first
    ]
    assert [(row["block_number"], row["log_index"]) for row in kept] == [
        (1, index) for index in range(PER_BLOCK[1])
    ]
    assert markets == PER_BLOCK[1]
    assert (cursor["block_number"], cursor["block_hash"]) == (1, header(1).hash)
