"""Postgres: migrations, the write lease, batches, rollbacks and the outbox.

With indexer/database.py (the pool, every wait bounded), the only module that speaks asyncpg;
the statements of a batch are in indexer/statements.py. Every write the follower makes goes
through one transaction per batch that also checks the lease (fencing), so a second indexer,
or one that lost its lease while paused, can never commit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg
import structlog

from indexer.batch import Batch, StoredEvent
from indexer.database import Database
from indexer.errors import IndexerError, LeaseLost, StoreError
from indexer.projection import MarketRow, ProjectedEvent, apply_events
from indexer.rpc_results import BlockHeader
from indexer.statements import (
    EVENT_COLUMNS,
    HEADER_TYPES,
    MARKET_COLUMNS,
    OUTBOX_COLUMNS,
    READ_BATCH,
    SAVE_HEADERS,
    UPSERT_MARKETS,
    WRITE_BATCH,
    columns,
    event_values,
    header_values,
    market_row,
    market_values,
    outbox_values,
)

log = structlog.get_logger()

MIGRATIONS_PACKAGE = "indexer.migrations"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Arbitrary constant: serializes concurrent migrators (transaction-scoped, pooler-safe).
MIGRATION_LOCK_KEY = 0x6B656B74
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
# Rows read per query by a rollback or a markets rebuild, and markets rebuilt per group: their
# memory stays bounded however many events a reorg or a reindex retracts.
READ_PAGE = 2000
REBUILD_GROUP = 500
MAX_BIGINT = 2**63 - 1
# Keyset pages (see _pages), in the order of the primary key and of events_market_idx.
RETRACTED_PAGE = (
    "SELECT * FROM events WHERE block_number > $1 AND (block_number, log_index) < ($2, $3)"
    " ORDER BY block_number DESC, log_index DESC LIMIT $4"
)
RANGE_PAGE = (
    "SELECT * FROM events WHERE block_number <= $1 AND (block_number, log_index) > ($2, $3)"
    " ORDER BY block_number, log_index LIMIT $4"
)
HEADERS_PAGE = (
    "SELECT number, hash, parent_hash, timestamp FROM blocks WHERE number <= $1 AND number > $2"
    " ORDER BY number LIMIT $3"
)
MARKET_EVENTS_PAGE = (
    "SELECT * FROM events WHERE market_address = ANY($1::text[])"
    " AND (market_address, block_number, log_index) > ($2, $3, $4)"
    " ORDER BY market_address, block_number, log_index LIMIT $5"
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
class SavedBatch:
    """What a committed batch stored."""

    fresh: list[StoredEvent]  # its events that were not stored before
    # Its outbox rows in seq order, for the publisher to take without reading them back; None
    # when they were streamed instead: a backfill's (no cursor), or more than HANDOFF_MAX.
    outbox: list[OutboxRow] | None


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


def _assign_seqs(events: Sequence[StoredEvent], last_seq: int) -> tuple[list[int | None], int]:
    """Consecutive publication seqs for the decoded events (None for raw ones), and the last."""
    seqs: list[int | None] = []
    for event in events:
        if event.decoded is None:
            seqs.append(None)
        else:
            last_seq += 1
            seqs.append(last_seq)
    return seqs, last_seq


async def _pages(
    fetch: Callable[..., Awaitable[list[asyncpg.Record]]],
    query: str,
    *,
    fixed: Sequence[Any],
    start: tuple[Any, ...],
    keys: tuple[str, ...],
) -> AsyncIterator[list[asyncpg.Record]]:
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


def _header(row: Mapping[str, Any]) -> BlockHeader:
    """A stored header (a `blocks` row)."""
    return BlockHeader(
        number=row["number"],
        hash=row["hash"],
        parent_hash=row["parent_hash"],
        timestamp=row["timestamp"],
    )


def _projected(events: Iterable[StoredEvent]) -> Iterator[ProjectedEvent]:
    """The events that concern a market, as the projection sees them."""
    return (p for e in events if (p := e.projected()) is not None)


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
        command_timeout: float,
    ) -> AsyncIterator[Store]:
        """Connect a small pool. statement_cache_size=0 for PgBouncer/Supavisor transaction mode;
        command_timeout: seconds a statement may take (DB_COMMAND_TIMEOUT for the services)."""
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
                    # Bounded on the server like every transaction (Database.transaction), as
                    # the lock held here would stop every later start. No server-side
                    # statement_timeout: DB_COMMAND_TIMEOUT already bounds each statement on
                    # this side, and the server ends it when the connection goes.
                    await conn.execute(
                        f"{self._db.idle_bound}; SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
                    )
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

    async def sources(self) -> dict[str, int]:
        """The contracts recorded as followed, and the block each is followed from."""
        rows = await self._db.fetch(
            "SELECT address, since_block FROM sources WHERE dropped_after IS NULL"
        )
        return {r["address"]: int(r["since_block"]) for r in rows}

    async def dropped_sources(self) -> dict[str, int]:
        """The contracts recorded as dropped from the configuration, and the cursor then."""
        rows = await self._db.fetch(
            "SELECT address, dropped_after FROM sources WHERE dropped_after IS NOT NULL"
        )
        return {r["address"]: int(r["dropped_after"]) for r in rows}

    async def add_sources(self, rows: Sequence[tuple[str, str, int]]) -> None:
        """Record contracts as (address, kind, since_block): one followed already stays, one
        dropped before is followed again from `since_block`."""
        await self._db.execute(
            "INSERT INTO sources (address, kind, since_block)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
            " ON CONFLICT (address) DO UPDATE SET kind = EXCLUDED.kind,"
            " since_block = EXCLUDED.since_block, dropped_after = NULL"
            " WHERE sources.dropped_after IS NOT NULL",
            *columns(rows, 3),
        )

    async def drop_sources(self, addresses: Sequence[str], *, cursor: int) -> None:
        """Mark contracts no longer configured as dropped after block `cursor`."""
        await self._db.execute(
            "UPDATE sources SET dropped_after = $2"
            " WHERE address = ANY($1::text[]) AND dropped_after IS NULL",
            addresses,
            cursor,
        )

    async def children(self) -> dict[str, str]:
        """Every known market clone and the factory that created it."""
        rows = await self._db.fetch("SELECT address, factory FROM markets")
        return {r["address"]: r["factory"] for r in rows}

    async def market_registry(self) -> dict[str, tuple[str, int]]:
        """Every known market clone, with its factory and creation block (for `verify`)."""
        rows = await self._db.fetch("SELECT address, factory, created_block FROM markets")
        return {r["address"]: (r["factory"], int(r["created_block"])) for r in rows}

    async def recent_headers(self, limit: int) -> list[BlockHeader]:
        """The newest stored headers, newest first."""
        rows = await self._db.fetch(
            "SELECT number, hash, parent_hash, timestamp FROM blocks ORDER BY number DESC LIMIT $1",
            limit,
        )
        return [_header(r) for r in rows]

    # -- batches -----------------------------------------------------------------------------

    async def save_batch(self, lease: Lease, ttl: float, batch: Batch) -> SavedBatch:
        """Commit a batch atomically; returns what it stored.

        Four round trips for a live block (indexer/statements.py); a large batch sends its
        events and outbox rows by COPY, a backfill (no cursor) also replays its markets.
        The outbox rows of a batch that moves the cursor come back for the publisher too,
        unless there are more than HANDOFF_MAX of them.
        """
        events = batch.events
        span = (events[0].log.block_number, events[-1].log.block_number) if events else (1, 0)
        touched = sorted({e.market for e in events if e.market is not None})
        async with self._db.transaction() as conn:
            snapshot = await conn.fetchrow(READ_BATCH, *span, touched, lease.owner, lease.token)
            if snapshot is None:
                raise IndexerError("indexer_state is missing; the cursor was never initialized")
            if not snapshot["leased"]:
                raise LeaseLost(lease.owner)
            stored = set(zip(snapshot["numbers"] or (), snapshot["indexes"] or (), strict=True))
            fresh = [e for e in events if (e.log.block_number, e.log.log_index) not in stored]
            seqs, last_seq = _assign_seqs(fresh, snapshot["last_seq"])
            queued = last_seq - snapshot["last_seq"]
            chain_id = snapshot["chain_id"]
            new_events = map(event_values, fresh, seqs)
            new_outbox = (
                outbox_values(e, chain_id=chain_id, seq=seq)
                for e, seq in zip(fresh, seqs, strict=True)
                if seq is not None
            )
            handed: list[OutboxRow] | None = None
            event_rows: list[tuple[Any, ...]] = []
            outbox_rows: list[tuple[Any, ...]] = []
            if batch.cursor is None or queued > HANDOFF_MAX:
                # A backfill (often another process than the publisher's), or a batch too
                # large to hand over: streamed, so its rows and envelopes are never all in
                # memory; the publisher reads the outbox.
                await self._copy(conn, "events", new_events, EVENT_COLUMNS)
                await self._copy(conn, "outbox", new_outbox, OUTBOX_COLUMNS)
            else:
                # Kept for the publisher, large batches too: reading a catch-up batch back
                # cost more than the envelopes it keeps (about 1 kB each, BATCH_EVENTS of them).
                kept = list(new_outbox)
                handed = [OutboxRow(seq, channels, payload) for seq, _, channels, payload in kept]
                if len(fresh) > COPY_ABOVE:
                    await self._copy(conn, "events", new_events, EVENT_COLUMNS)
                    await self._copy(conn, "outbox", kept, OUTBOX_COLUMNS)
                else:  # in the write statement
                    event_rows, outbox_rows = list(new_events), kept
            markets: list[MarketRow] = []
            if batch.cursor is None:
                # A backfill inserts events into the past: replay those markets in order.
                await self._rebuild_markets(conn, {e.market for e in fresh if e.market})
            else:
                current = {r["address"]: market_row(r) for r in snapshot["markets"] or ()}
                rows: dict[str, MarketRow | None] = {a: current.get(a) for a in touched}
                markets = apply_events(rows, _projected(fresh))
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

    async def _copy(
        self,
        conn: asyncpg.Connection,
        table: str,
        rows: Iterable[tuple[Any, ...]],
        columns: Sequence[str],
    ) -> None:
        """COPY rows into a table, bounded like a statement.

        asyncpg's command timeout covers a COPY's answer but not its writing: on a path that
        stops taking data, the write would wait on the socket for ever (asyncpg 0.32).
        """
        async with asyncio.timeout(self._db.command_timeout):
            await conn.copy_records_to_table(table, records=rows, columns=columns)

    async def _rebuild_markets(
        self, conn: asyncpg.Connection, addresses: set[str], *, created_above: int | None = None
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
            pages = _pages(
                conn.fetch,
                MARKET_EVENTS_PAGE,
                fixed=[group],
                start=("", -1, -1),
                keys=("market_address", "block_number", "log_index"),
            )
            async for records in pages:
                apply_events(rows, _projected(map(StoredEvent.from_record, records)))
            # The upsert replaces every column of a row the fold produced.
            markets = [row for row in rows.values() if row is not None]
            if markets:
                rows_by_column = columns(map(market_values, markets), len(MARKET_COLUMNS))
                await conn.execute(UPSERT_MARKETS, *rows_by_column)

    @staticmethod
    async def _save_headers(conn: asyncpg.Connection, headers: Sequence[BlockHeader]) -> None:
        await conn.execute(SAVE_HEADERS, *columns(map(header_values, headers), len(HEADER_TYPES)))

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
            last_seq = state["last_seq"]
            retracted = 0
            markets: set[str] = set()
            # Newest first, a page at a time (a reindex may retract most of the chain).
            pages = _pages(
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
                            outbox_values(
                                event, chain_id=state["chain_id"], seq=last_seq, removed=True
                            )
                        )
                        if event.market:
                            markets.add(event.market)
                if notices:
                    await self._copy(conn, "outbox", notices, OUTBOX_COLUMNS)
                retracted += len(records)
            await conn.execute("DELETE FROM events WHERE block_number > $1", ancestor.number)
            await self._rebuild_markets(conn, markets, created_above=ancestor.number)
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
        return retracted

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

    async def oldest_outbox_seq(self) -> int | None:
        """The seq of the oldest publication still in the outbox (None: it is empty)."""
        value = await self._db.fetchval("SELECT min(seq) FROM outbox")
        return None if value is None else int(value)

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

    async def event_rows(self, first: int, last: int) -> AsyncIterator[list[Mapping[str, Any]]]:
        """The `events` rows of an inclusive block range, in chain order, a page at a time.

        Rows as stored, not StoredEvents: `verify` compares them column by column, and a
        damaged row (a contract kind that does not exist, a name on a log the catalogue does
        not know) must be a difference it reports, not an error that stops it.
        """
        async for rows in _pages(
            self._db.fetch,
            RANGE_PAGE,
            fixed=[last],
            start=(first, -1),
            keys=("block_number", "log_index"),
        ):
            yield rows

    async def header_rows(self, first: int, last: int) -> AsyncIterator[list[BlockHeader]]:
        """The stored block headers of an inclusive block range, in order, a page at a time."""
        async for rows in _pages(
            self._db.fetch, HEADERS_PAGE, fixed=[last], start=(first - 1,), keys=("number",)
        ):
            yield [_header(r) for r in rows]

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
        return None if record is None else market_row(record)

    async def markets(self, addresses: Sequence[str]) -> dict[str, MarketRow]:
        """The rows of these markets (those stored), by address."""
        records = await self._db.fetch(
            "SELECT * FROM markets WHERE address = ANY($1::text[])", addresses
        )
        return {r["address"]: market_row(r) for r in records}
