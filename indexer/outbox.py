"""The outbox: publications in seq order, waiting for (or already given to) Redis."""

from __future__ import annotations

from dataclasses import dataclass

from indexer.database import Database


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One publication waiting for (or already given to) Redis."""

    seq: int
    channels: str  # space-separated, as stored and as the publish script takes them
    payload: bytes


async def outbox_after(db: Database, seq: int, limit: int) -> list[OutboxRow]:
    """Publications with a seq above `seq`, in order."""
    rows = await db.fetch(
        "SELECT seq, channels, payload FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
        seq,
        limit,
    )
    # By position: this runs for every event published, and a Record's keys cost more.
    return [OutboxRow(r[0], r[1], r[2]) for r in rows]


async def oldest_outbox_seq(db: Database) -> int | None:
    """The seq of the oldest publication still in the outbox (None: it is empty)."""
    value = await db.fetchval("SELECT min(seq) FROM outbox")
    return None if value is None else int(value)


async def published_seq(db: Database) -> int:
    return int(await db.fetchval("SELECT published_seq FROM publisher_state WHERE id = 1"))


async def last_seq(db: Database) -> int:
    value = await db.fetchval("SELECT last_seq FROM indexer_state WHERE id = 1")
    return int(value or 0)


async def mark_published(db: Database, seq: int) -> None:
    """Record that every publication up to `seq` reached Redis (never moves backwards)."""
    await db.execute(
        "UPDATE publisher_state SET published_seq = greatest(published_seq, $1),"
        " updated_at = now() WHERE id = 1",
        seq,
    )


async def prune_outbox(db: Database, keep: int, limit: int) -> int:
    """Delete up to `limit` of the oldest published outbox rows, keeping the newest `keep`."""
    result = await db.execute(
        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox"
        " WHERE seq <= (SELECT published_seq FROM publisher_state) - $1"
        " ORDER BY seq LIMIT $2)",
        keep,
        limit,
    )
    return int(result.split()[-1])
