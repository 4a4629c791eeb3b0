"""Postgres: migrations, the write lease, batches, rollbacks and the outbox.

With indexer/database.py (the pool, every wait bounded), the only module that speaks asyncpg.
Every write the follower makes goes through one
transaction per batch that first checks the lease (fencing), so a second indexer, or one
that lost its lease while paused, can never commit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any

import asyncpg
import structlog

from indexer.batch import Batch, StoredEvent
from indexer.database import Database
from indexer.errors import IndexerError, LeaseLost, StoreError
from indexer.projection import MarketRow, apply_event
from indexer.rpc_results import BlockHeader

log = structlog.get_logger()

# Seconds one statement may take before its connection is given up (indexer/database.py).
COMMAND_TIMEOUT = 60.0
MIGRATIONS_PACKAGE = "indexer.migrations"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Arbitrary constant: serializes concurrent migrators (transaction-scoped, pooler-safe).
MIGRATION_LOCK_KEY = 0x6B656B74
MARKET_COLUMNS = tuple(MarketRow.__dataclass_fields__)
EVENT_COLUMNS = (
    "block_number",
    "log_index",
    "block_hash",
    "block_time",
    "transaction_hash",
    "transaction_index",
    "contract",
    "contract_kind",
    "event_name",
    "market_address",
    "topic0",
    "topic1",
    "topic2",
    "topic3",
    "data",
    "args",
    "seq",
)
NUMERIC_COLUMNS = frozenset(
    {"resolution_time", "creator_bond", "volume_outcome1", "volume_outcome2"}
)
# Postgres array type of each markets column, for the one-statement upsert (0001_initial.sql).
MARKET_ARRAY_TYPES = {
    **{c: "text[]" for c in MARKET_COLUMNS},
    **{c: "numeric[]" for c in NUMERIC_COLUMNS},
    "rejected": "boolean[]",
    "deactivated": "boolean[]",
    "bets_outcome1": "bigint[]",
    "bets_outcome2": "bigint[]",
    "created_block": "bigint[]",
    "updated_block": "bigint[]",
    "created_at": "timestamptz[]",
}
# One statement for any number of rows: a row per array position.
UPSERT_MARKETS = (
    f"INSERT INTO markets ({', '.join(MARKET_COLUMNS)})"  # noqa: S608 - constant column names
    " SELECT * FROM unnest("
    + ", ".join(f"${i}::{MARKET_ARRAY_TYPES[c]}" for i, c in enumerate(MARKET_COLUMNS, 1))
    + ") ON CONFLICT (address) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in MARKET_COLUMNS if c != "address")
)


@dataclass(frozen=True, slots=True)
class IndexerState:
    """The cursor: the last block whose logs are all stored, and the last seq assigned."""

    chain_id: int
    block_number: int
    block_hash: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One publication waiting for (or already given to) Redis."""

    seq: int
    channels: str  # space-separated, as stored and as the publish script takes them
    payload: bytes


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write, as granted by the database: owner plus fencing token."""

    owner: str
    token: int


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def _outbox_values(
    event: StoredEvent, *, chain_id: int, seq: int, removed: bool = False
) -> tuple[Any, ...]:
    ident, payload = event.wire(chain_id=chain_id, seq=seq, removed=removed)
    return (seq, ident, " ".join(event.channels), payload)


def _event_values(event: StoredEvent, seq: int | None) -> tuple[Any, ...]:
    raw = event.log
    decoded = event.decoded
    topics = (*raw.topics, None, None, None, None)[:4]
    return (
        raw.block_number,
        raw.log_index,
        raw.block_hash,
        event.block_time,
        raw.transaction_hash,
        raw.transaction_index,
        raw.address,
        event.kind.value,
        decoded.spec.name if decoded else None,
        decoded.market if decoded else None,
        *topics,
        raw.data,
        decoded.args if decoded else None,
        seq,
    )


def _row_values(row: MarketRow) -> list[Any]:
    return [
        Decimal(getattr(row, c)) if c in NUMERIC_COLUMNS else getattr(row, c)
        for c in MARKET_COLUMNS
    ]


def _row_from_record(record: asyncpg.Record) -> MarketRow:
    values = {c: record[c] for c in MARKET_COLUMNS}
    for column in NUMERIC_COLUMNS:
        values[column] = int(values[column])
    return MarketRow(**values)


class Store:
    """The indexer's database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        statement_cache_size: int = 100,
        max_size: int = 4,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> AsyncIterator[Store]:
        """Connect a small pool. statement_cache_size=0 for PgBouncer/Supavisor transaction mode."""
        async with Database.open(
            dsn,
            statement_cache_size=statement_cache_size,
            max_size=max_size,
            command_timeout=command_timeout,
        ) as db:
            yield cls(db)

    # -- schema ------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations in order, each in its own transaction; returns their names."""
        applied: list[str] = []
        async with self._db.connection() as conn:
            for version, name, sql in _migrations():
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                    done = await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE version = $1", version
                    )
                    if done:
                        continue
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                    applied.append(name)
                    log.info("migration applied", migration=name)
        return applied

    async def schema_version(self) -> int:
        """The highest applied migration (0 when none)."""
        exists = await self._db.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not exists:
            return 0
        return int(
            await self._db.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        )

    @staticmethod
    def latest_schema_version() -> int:
        return _migrations()[-1][0]

    # -- lease -------------------------------------------------------------------------------

    async def try_acquire_lease(
        self, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> Lease | None:
        """Take the write lease if it is free, expired, ours, or held by `steal_from`."""
        token = await self._db.fetchval(
            "UPDATE indexer_lease SET owner = $1, token = token + 1,"
            " expires_at = clock_timestamp() + make_interval(secs => $2)"
            " WHERE id = 1 AND (owner IS NULL OR owner = $1 OR owner = $3"
            " OR expires_at < clock_timestamp())"
            " RETURNING token",
            owner,
            ttl,
            steal_from,
        )
        return None if token is None else Lease(owner=owner, token=int(token))

    async def lease_holder(self) -> tuple[str | None, datetime | None]:
        """Who holds the lease and until when."""
        row = await self._db.fetchrow("SELECT owner, expires_at FROM indexer_lease WHERE id = 1")
        if row is None:
            return None, None
        return row["owner"], row["expires_at"]

    async def renew_lease(self, lease: Lease, ttl: float) -> None:
        """Extend the lease; LeaseLost if another instance took it."""
        async with self._db.connection() as conn:
            await self._fence(conn, lease, ttl)

    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up at a clean stop so a standby can start at once."""
        try:
            await self._db.execute(
                "UPDATE indexer_lease SET owner = NULL, expires_at = '-infinity'"
                " WHERE id = 1 AND owner = $1 AND token = $2",
                lease.owner,
                lease.token,
            )
        except (asyncpg.PostgresError, StoreError) as exc:
            raise StoreError(f"releasing the lease failed: {exc}") from exc

    @staticmethod
    async def _fence(conn: asyncpg.Connection, lease: Lease, ttl: float) -> None:
        ok = await conn.fetchval(
            "UPDATE indexer_lease SET expires_at = clock_timestamp() + make_interval(secs => $3)"
            " WHERE id = 1 AND owner = $1 AND token = $2 AND expires_at > clock_timestamp()"
            " RETURNING 1",
            lease.owner,
            lease.token,
            ttl,
        )
        if ok is None:
            raise LeaseLost(lease.owner)

    # -- state -------------------------------------------------------------------------------

    async def load_state(self) -> IndexerState | None:
        row = await self._db.fetchrow(
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
        self, lease: Lease, ttl: float, *, chain_id: int, cursor: BlockHeader
    ) -> IndexerState:
        """Create the cursor just before the first block to index (no-op if it exists)."""
        async with self._db.transaction() as conn:
            await self._fence(conn, lease, ttl)
            await conn.execute(
                "INSERT INTO indexer_state (id, chain_id, block_number, block_hash)"
                " VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
                chain_id,
                cursor.number,
                cursor.hash,
            )
            await self._save_headers(conn, [cursor])
        state = await self.load_state()
        assert state is not None
        return state

    async def children(self) -> dict[str, str]:
        """Every known market clone and the factory that created it."""
        rows = await self._db.fetch("SELECT address, factory FROM markets")
        return {r["address"]: r["factory"] for r in rows}

    async def recent_headers(self, limit: int) -> list[BlockHeader]:
        """The newest stored headers, newest first."""
        rows = await self._db.fetch(
            "SELECT number, hash, parent_hash, timestamp FROM blocks ORDER BY number DESC LIMIT $1",
            limit,
        )
        return [
            BlockHeader(
                number=r["number"],
                hash=r["hash"],
                parent_hash=r["parent_hash"],
                timestamp=r["timestamp"],
            )
            for r in rows
        ]

    # -- batches -----------------------------------------------------------------------------

    async def save_batch(self, lease: Lease, ttl: float, batch: Batch) -> list[StoredEvent]:
        """Commit a batch atomically; returns the events that were not stored before."""
        async with self._db.transaction() as conn:
            state = await conn.fetchrow(
                "SELECT chain_id, last_seq, block_number FROM indexer_state WHERE id = 1 FOR UPDATE"
            )
            if state is None:
                raise IndexerError("indexer_state is missing; the cursor was never initialized")
            fresh = await self._new_events(conn, batch.events)
            last_seq = await self._insert_events(
                conn, fresh, chain_id=state["chain_id"], last_seq=state["last_seq"]
            )
            if batch.cursor is None:
                # A backfill inserts events into the past: replay those markets in order.
                await self._rebuild_markets(conn, {e.market for e in fresh if e.market})
            else:
                await self._project(conn, [e for e in fresh if e.decoded is not None])
            await self._save_headers(conn, batch.headers)
            if batch.cursor is None:
                await conn.execute(
                    "UPDATE indexer_state SET last_seq = $1, updated_at = now() WHERE id = 1",
                    last_seq,
                )
            else:
                await conn.execute(
                    "UPDATE indexer_state SET block_number = $1, block_hash = $2, last_seq = $3,"
                    " updated_at = now() WHERE id = 1",
                    batch.cursor.number,
                    batch.cursor.hash,
                    last_seq,
                )
                await conn.execute(
                    "DELETE FROM blocks WHERE number < $1", batch.prune_headers_below
                )
            # Fenced last, with the clock at commit time: the lease row stays locked only for an
            # instant, and a batch commits only if the lease is still ours right now.
            await self._fence(conn, lease, ttl)
        return fresh

    async def _new_events(
        self, conn: asyncpg.Connection, events: Sequence[StoredEvent]
    ) -> list[StoredEvent]:
        """Drop events already stored (re-running a range changes nothing)."""
        if not events:
            return []
        rows = await conn.fetch(
            "SELECT block_number, log_index FROM events WHERE block_number BETWEEN $1 AND $2",
            events[0].log.block_number,
            events[-1].log.block_number,
        )
        if not rows:
            return list(events)
        stored = {(r["block_number"], r["log_index"]) for r in rows}
        return [e for e in events if (e.log.block_number, e.log.log_index) not in stored]

    async def _insert_events(
        self,
        conn: asyncpg.Connection,
        events: Sequence[StoredEvent],
        *,
        chain_id: int,
        last_seq: int,
    ) -> int:
        """Insert events and their outbox rows, assigning consecutive seqs; returns the last.

        Rows are generated while COPY sends them (asyncpg encodes them in chunks), so the rows
        and the envelopes of a whole batch are never all in memory at once.
        """
        if not events:
            return last_seq
        seqs: list[int | None] = []
        for event in events:
            if event.decoded is None:
                seqs.append(None)
            else:
                last_seq += 1
                seqs.append(last_seq)
        await conn.copy_records_to_table(
            "events", records=map(_event_values, events, seqs), columns=EVENT_COLUMNS
        )
        published = ((e, s) for e, s in zip(events, seqs, strict=True) if s is not None)
        await self._insert_outbox(
            conn, (_outbox_values(e, chain_id=chain_id, seq=s) for e, s in published)
        )
        return last_seq

    @staticmethod
    async def _insert_outbox(conn: asyncpg.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
        await conn.copy_records_to_table(
            "outbox", records=rows, columns=("seq", "event_id", "channels", "payload")
        )

    async def _project(self, conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> None:
        touched = sorted({e.market for e in events if e.market is not None})
        if not touched:
            return
        records = await conn.fetch("SELECT * FROM markets WHERE address = ANY($1::text[])", touched)
        rows: dict[str, MarketRow | None] = {r["address"]: _row_from_record(r) for r in records}
        changed: set[str] = set()
        for event in events:
            projected = event.projected()
            if projected is None:
                continue
            after = apply_event(rows.get(projected.market), projected)
            if after is not None:
                rows[projected.market] = after
                changed.add(projected.market)
        await self._upsert_markets(conn, [r for a in sorted(changed) if (r := rows[a]) is not None])

    async def _rebuild_markets(self, conn: asyncpg.Connection, addresses: set[str]) -> None:
        """Recompute the rows of these markets from every event stored for them."""
        if not addresses:
            return
        affected = sorted(addresses)
        await conn.execute("DELETE FROM markets WHERE address = ANY($1::text[])", affected)
        remaining = await conn.fetch(
            "SELECT * FROM events WHERE market_address = ANY($1::text[])"
            " ORDER BY block_number, log_index",
            affected,
        )
        await self._project(conn, [StoredEvent.from_record(r) for r in remaining])

    async def _upsert_markets(self, conn: asyncpg.Connection, rows: Sequence[MarketRow]) -> None:
        if not rows:
            return
        columns = zip(*(_row_values(r) for r in rows), strict=True)
        await conn.execute(UPSERT_MARKETS, *(list(values) for values in columns))

    @staticmethod
    async def _save_headers(conn: asyncpg.Connection, headers: Sequence[BlockHeader]) -> None:
        if not headers:
            return
        await conn.execute(
            "INSERT INTO blocks (number, hash, parent_hash, timestamp)"
            " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])"
            " ON CONFLICT (number) DO UPDATE SET hash = EXCLUDED.hash,"
            " parent_hash = EXCLUDED.parent_hash, timestamp = EXCLUDED.timestamp",
            [h.number for h in headers],
            [h.hash for h in headers],
            [h.parent_hash for h in headers],
            [h.timestamp for h in headers],
        )

    # -- reorgs ------------------------------------------------------------------------------

    async def rollback(self, lease: Lease, ttl: float, ancestor: BlockHeader) -> int:
        """Undo everything above `ancestor` in one transaction, queueing removal notices.

        Events, markets created above the ancestor, projections of markets they touched,
        stored headers and the cursor all go back together. Returns the events removed.
        """
        async with self._db.transaction() as conn:
            state = await conn.fetchrow(
                "SELECT chain_id, last_seq FROM indexer_state WHERE id = 1 FOR UPDATE"
            )
            assert state is not None, "rollback before the cursor exists"
            records = await conn.fetch(
                "SELECT * FROM events WHERE block_number > $1"
                " ORDER BY block_number DESC, log_index DESC",
                ancestor.number,
            )
            retracted = [StoredEvent.from_record(r) for r in records]
            last_seq = state["last_seq"]
            notices = []
            for event in retracted:
                if event.decoded is not None:
                    last_seq += 1
                    notices.append(
                        _outbox_values(
                            event, chain_id=state["chain_id"], seq=last_seq, removed=True
                        )
                    )
            await self._insert_outbox(conn, notices)
            await conn.execute("DELETE FROM events WHERE block_number > $1", ancestor.number)
            await self._rebuild_markets(conn, {e.market for e in retracted if e.market})
            await conn.execute("DELETE FROM blocks WHERE number > $1", ancestor.number)
            await self._save_headers(conn, [ancestor])
            await conn.execute(
                "UPDATE indexer_state SET block_number = $1, block_hash = $2, last_seq = $3,"
                " updated_at = now() WHERE id = 1",
                ancestor.number,
                ancestor.hash,
                last_seq,
            )
            await self._fence(conn, lease, ttl)
        return len(retracted)

    # -- outbox ------------------------------------------------------------------------------

    async def outbox_after(self, seq: int, limit: int) -> list[OutboxRow]:
        """Publications with a seq above `seq`, in order."""
        rows = await self._db.fetch(
            "SELECT seq, channels, payload FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
            seq,
            limit,
        )
        # By position: this runs for every event published, and a Record's keys cost more.
        return [OutboxRow(r[0], r[1], r[2]) for r in rows]

    async def published_seq(self) -> int:
        return int(
            await self._db.fetchval("SELECT published_seq FROM publisher_state WHERE id = 1")
        )

    async def last_seq(self) -> int:
        value = await self._db.fetchval("SELECT last_seq FROM indexer_state WHERE id = 1")
        return int(value or 0)

    async def mark_published(self, seq: int) -> None:
        """Record that every publication up to `seq` reached Redis (never moves backwards)."""
        await self._db.execute(
            "UPDATE publisher_state SET published_seq = greatest(published_seq, $1),"
            " updated_at = now() WHERE id = 1",
            seq,
        )

    async def prune_outbox(self, keep: int, limit: int) -> int:
        """Delete up to `limit` of the oldest published outbox rows, keeping the newest `keep`."""
        result = await self._db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox"
            " WHERE seq <= (SELECT published_seq FROM publisher_state) - $1"
            " ORDER BY seq LIMIT $2)",
            keep,
            limit,
        )
        return int(result.split()[-1])

    # -- reads for verify / status -----------------------------------------------------------

    async def events_between(self, first: int, last: int) -> list[StoredEvent]:
        """Stored events of an inclusive block range, in chain order."""
        rows = await self._db.fetch(
            "SELECT * FROM events WHERE block_number BETWEEN $1 AND $2"
            " ORDER BY block_number, log_index",
            first,
            last,
        )
        return [StoredEvent.from_record(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        """Row counts for `status`."""
        row = await self._db.fetchrow(
            "SELECT (SELECT count(*) FROM events) AS events,"
            " (SELECT count(*) FROM markets) AS markets,"
            " (SELECT count(*) FROM outbox) AS outbox"
        )
        assert row is not None
        return {k: int(row[k]) for k in ("events", "markets", "outbox")}

    async def market(self, address: str) -> MarketRow | None:
        record = await self._db.fetchrow("SELECT * FROM markets WHERE address = $1", address)
        return None if record is None else _row_from_record(record)
