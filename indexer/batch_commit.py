"""Committing a batch: its events, outbox rows, markets, headers and cursor in one transaction.

Every write the follower makes goes through one transaction per batch that also checks the
lease (fencing), so a second indexer, or one that lost its lease while paused, can never
commit. The statements of a batch are in indexer/statements.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from indexer.batch import Batch, StoredEvent
from indexer.database import Database
from indexer.errors import CursorMoved, IndexerError, LeaseLost
from indexer.lease import Lease
from indexer.market_rebuild import projected, rebuild_markets
from indexer.outbox import OutboxRow
from indexer.projection import MarketRow, apply_events
from indexer.publish_order import in_publish_order
from indexer.statements import (
    EVENT_COLUMNS,
    HEADER_TYPES,
    MARKET_COLUMNS,
    OUTBOX_COLUMNS,
    READ_BATCH,
    WRITE_BATCH,
    columns,
    event_values,
    header_values,
    market_row,
    market_values,
    outbox_values,
)

# Above this many new events a batch sends its events and outbox rows by COPY (cheaper per
# row) rather than as arrays in the batch's one write statement (cheaper in round trips).
COPY_ABOVE = 256
# The most outbox rows a commit hands to the publisher in memory (SavedBatch.outbox, then
# Publisher.wake), which also keeps at most this many while Redis is slow or down; past it they
# are read back from the outbox, which holds them anyway. Catch-up batches are handed over too
# (about BATCH_EVENTS rows, 2,000 by default): room for the one being published, the next and
# a range that overshoots its estimate, at about 1 kB per row some 5 MB at most. A batch of
# more rows (BATCH_EVENTS set above it) is streamed to the outbox and not handed over.
HANDOFF_MAX = 5000


@dataclass(frozen=True, slots=True)
class SavedBatch:
    """What a committed batch stored."""

    fresh: list[StoredEvent]  # its events that were not stored before
    # Its outbox rows in seq order, for the publisher to take without reading them back; None
    # when they were streamed instead: a backfill's (no cursor), or more than HANDOFF_MAX.
    outbox: list[OutboxRow] | None


def _assign_seqs(
    events: Sequence[StoredEvent], last_seq: int
) -> tuple[list[int | None], list[StoredEvent], int]:
    """Publication seqs for the events in their order (None for raw ones, never published),
    the published events in seq order (indexer/publish_order.py), and the last seq."""
    published = list(in_publish_order([e for e in events if e.decoded is not None]))
    # By chain position, unique within a batch (the events table's key).
    seq_of = {e.position: seq for seq, e in enumerate(published, last_seq + 1)}
    return [seq_of.get(e.position) for e in events], published, last_seq + len(published)


async def save_batch(db: Database, lease: Lease, ttl: float, batch: Batch) -> SavedBatch:
    """Commit a batch atomically; returns what it stored.

    Four round trips for a live block (indexer/statements.py); a large batch sends its
    events and outbox rows by COPY, a backfill (no cursor) also replays its markets.
    The outbox rows of a batch that moves the cursor come back for the publisher too,
    unless there are more than HANDOFF_MAX of them.
    """
    events = batch.events
    span = (events[0].log.block_number, events[-1].log.block_number) if events else (1, 0)
    touched = sorted({e.market for e in events if e.market is not None})
    async with db.transaction() as conn:
        snapshot = await conn.fetchrow(READ_BATCH, *span, touched, lease.owner, lease.token)
        if snapshot is None:
            raise IndexerError("indexer_state is missing; the cursor was never initialized")
        if not snapshot["leased"]:
            raise LeaseLost(lease.owner)
        if batch.cursor is not None and snapshot["block_hash"] != batch.extends:
            raise CursorMoved(snapshot["block_number"], snapshot["block_hash"], str(batch.extends))
        stored = set(zip(snapshot["numbers"] or (), snapshot["indexes"] or (), strict=True))
        fresh = [e for e in events if e.position not in stored]
        first_seq = snapshot["last_seq"] + 1
        seqs, published, last_seq = _assign_seqs(fresh, snapshot["last_seq"])
        queued = len(published)
        chain_id = snapshot["chain_id"]
        new_events = map(event_values, fresh, seqs)
        new_outbox = (
            outbox_values(e, chain_id=chain_id, seq=seq)
            for seq, e in enumerate(published, first_seq)
        )
        handed: list[OutboxRow] | None = None
        event_rows: list[tuple[Any, ...]] = []
        outbox_rows: list[tuple[Any, ...]] = []
        if batch.cursor is None or queued > HANDOFF_MAX:
            # A backfill (often another process than the publisher's), or a batch too
            # large to hand over: streamed, so its rows and envelopes are never all in
            # memory; the publisher reads the outbox.
            await db.copy(conn, "events", new_events, EVENT_COLUMNS)
            await db.copy(conn, "outbox", new_outbox, OUTBOX_COLUMNS)
        else:
            # Kept for the publisher, large batches too: reading a catch-up batch back
            # cost more than the envelopes it keeps (about 1 kB each, BATCH_EVENTS of them).
            kept = list(new_outbox)
            handed = [OutboxRow(seq, channels, payload) for seq, _, channels, payload in kept]
            if len(fresh) > COPY_ABOVE:
                await db.copy(conn, "events", new_events, EVENT_COLUMNS)
                await db.copy(conn, "outbox", kept, OUTBOX_COLUMNS)
            else:  # in the write statement
                event_rows, outbox_rows = list(new_events), kept
        markets: list[MarketRow] = []
        if batch.cursor is None:
            # A backfill inserts events into the past: replay those markets in order.
            await rebuild_markets(conn, {e.market for e in fresh if e.market})
        else:
            current = {r["address"]: market_row(r) for r in snapshot["markets"] or ()}
            rows: dict[str, MarketRow | None] = {a: current.get(a) for a in touched}
            markets = apply_events(rows, projected(fresh))
        cursor = batch.cursor
        # As if stored, then pruned: a header below the bound is not kept.
        headers = [h for h in batch.headers if h.number >= batch.prune_headers_below]
        fenced = await conn.fetchval(
            WRITE_BATCH,
            *columns(event_rows, len(EVENT_COLUMNS)),
            *columns(outbox_rows, len(OUTBOX_COLUMNS)),
            *columns(map(market_values, markets), len(MARKET_COLUMNS)),
            *columns(map(header_values, headers), len(HEADER_TYPES)),
            None if cursor is None else batch.prune_headers_below,
            None if cursor is None else cursor.number,
            None if cursor is None else cursor.hash,
            last_seq,
            lease.owner,
            lease.token,
            ttl,
        )
        if fenced is None:
            raise LeaseLost(lease.owner)
    return SavedBatch(fresh=fresh, outbox=handed)
