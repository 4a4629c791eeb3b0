"""The SQL of a batch commit and the values it binds: plain text and plain functions, no I/O.

A batch commits in four round trips to the database: BEGIN, one read (`READ_BATCH`: the cursor
and lease rows, locked, and whether the lease is still ours; which of the batch's events are
stored already; the rows of the markets they touch), one write (`WRITE_BATCH`: events, outbox,
markets, headers, cursor and the lease check, as data-modifying CTEs of one statement) and
COMMIT. Following the chain behind a remote database (Supabase), round trips rather than rows
are what a block costs. Rows go as one array per column (`unnest`). A large batch sends its
events and outbox rows by COPY first (batch_commit.py), two round trips each but less work per
row, and leaves those arrays empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from indexer.batch import StoredEvent
from indexer.projection import MarketRow
from indexer.rpc_results import BlockHeader

# Column name -> Postgres array type, in table order (0001_initial.sql).
EVENT_TYPES = {
    "block_number": "bigint[]",
    "log_index": "integer[]",
    "block_hash": "text[]",
    "block_time": "timestamptz[]",
    "transaction_hash": "text[]",
    "transaction_index": "integer[]",
    "contract": "text[]",
    "contract_kind": "text[]",
    "event_name": "text[]",
    "market_address": "text[]",
    "topic0": "text[]",
    "topic1": "text[]",
    "topic2": "text[]",
    "topic3": "text[]",
    "data": "text[]",
    "args": "jsonb[]",
    "seq": "bigint[]",
}
EVENT_COLUMNS = tuple(EVENT_TYPES)
OUTBOX_TYPES = {"seq": "bigint[]", "event_id": "text[]", "channels": "text[]", "payload": "bytea[]"}
OUTBOX_COLUMNS = tuple(OUTBOX_TYPES)
MARKET_COLUMNS = tuple(MarketRow.__dataclass_fields__)
NUMERIC_COLUMNS = frozenset(
    {"resolution_time", "creator_bond", "volume_outcome1", "volume_outcome2"}
)
MARKET_TYPES = {
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
HEADER_TYPES = {
    "number": "bigint[]",
    "hash": "text[]",
    "parent_hash": "text[]",
    "timestamp": "bigint[]",
}


def _unnest(types: Mapping[str, str], first: int) -> str:
    """`unnest($first::t1, $first+1::t2, ...)`: one row per array position."""
    return "unnest(" + ", ".join(f"${i}::{t}" for i, t in enumerate(types.values(), first)) + ")"


def _insert(table: str, types: Mapping[str, str], first: int) -> str:
    return f"INSERT INTO {table} ({', '.join(types)}) SELECT * FROM {_unnest(types, first)}"  # noqa: S608 - constant names


def _upsert_markets(first: int) -> str:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in MARKET_COLUMNS if c != "address")
    return (
        f"{_insert('markets', MARKET_TYPES, first)} ON CONFLICT (address) DO UPDATE SET {updates}"
    )


def _save_headers(first: int) -> str:
    return (
        f"{_insert('blocks', HEADER_TYPES, first)} ON CONFLICT (number) DO UPDATE SET"
        " hash = EXCLUDED.hash, parent_hash = EXCLUDED.parent_hash, timestamp = EXCLUDED.timestamp"
    )


UPSERT_MARKETS = _upsert_markets(1)
SAVE_HEADERS = _save_headers(1)

# $1, $2: the batch's block span; $3: the markets its events concern; $4, $5: the lease's
# owner and token. The lease row is locked and checked with the cursor row, not only by
# WRITE_BATCH: a writer that lost the lease to a leader committing meanwhile waits for the
# cursor row, then Postgres reads again only the rows it locks (EvalPlanQual, READ COMMITTED),
# while `stored` and `touched` stay as they were before the wait. Its WRITE_BATCH would then
# clash with the events the new leader just stored before the fence said LeaseLost; `leased`,
# computed from the lease row as it is after the wait, says it first.
READ_BATCH = """
SELECT s.chain_id, s.last_seq, s.block_number, s.block_hash, stored.numbers, stored.indexes,
    touched.markets,
    (l.owner = $4 AND l.token = $5) IS TRUE AS leased
FROM indexer_state AS s
CROSS JOIN indexer_lease AS l
CROSS JOIN LATERAL (
    SELECT array_agg(block_number) AS numbers, array_agg(log_index) AS indexes
    FROM events WHERE block_number BETWEEN $1 AND $2
) AS stored
CROSS JOIN LATERAL (
    SELECT array_agg(m) AS markets FROM markets AS m WHERE m.address = ANY($3::text[])
) AS touched
WHERE s.id = 1 AND l.id = 1
FOR UPDATE OF s, l
"""

_OUTBOX_AT = 1 + len(EVENT_TYPES)
_MARKETS_AT = _OUTBOX_AT + len(OUTBOX_TYPES)
_HEADERS_AT = _MARKETS_AT + len(MARKET_TYPES)
_REST_AT = _HEADERS_AT + len(HEADER_TYPES)
# The modifying CTEs all run, to completion, on one snapshot; none depends on another's rows.
# The lease check (fencing) is the statement's result: no row means the lease is not ours.
# Owner and token, not expiry (lease.fence): READ_BATCH locked the row, so no takeover can
# have happened since, however long the batch waited.
WRITE_BATCH = f"""
WITH new_events AS ({_insert("events", EVENT_TYPES, 1)}),
new_outbox AS ({_insert("outbox", OUTBOX_TYPES, _OUTBOX_AT)}),
markets_upserted AS ({_upsert_markets(_MARKETS_AT)}),
headers_saved AS ({_save_headers(_HEADERS_AT)}),
headers_pruned AS (DELETE FROM blocks WHERE number < ${_REST_AT}),
cursor_moved AS (
    UPDATE indexer_state SET block_number = coalesce(${_REST_AT + 1}, block_number),
        block_hash = coalesce(${_REST_AT + 2}, block_hash), last_seq = ${_REST_AT + 3},
        updated_at = now()
    WHERE id = 1
)
UPDATE indexer_lease SET expires_at = clock_timestamp() + make_interval(secs => ${_REST_AT + 6})
WHERE id = 1 AND owner = ${_REST_AT + 4} AND token = ${_REST_AT + 5}
RETURNING 1
"""  # noqa: S608 - constant names and placeholders only


def outbox_values(
    event: StoredEvent, *, chain_id: int, seq: int, removed: bool = False
) -> tuple[Any, ...]:
    ident, payload = event.wire(chain_id=chain_id, seq=seq, removed=removed)
    return (seq, ident, event.channel_list, payload)


def event_values(event: StoredEvent, seq: int | None) -> tuple[Any, ...]:
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


def market_values(row: MarketRow) -> tuple[Any, ...]:
    return tuple(
        Decimal(getattr(row, c)) if c in NUMERIC_COLUMNS else getattr(row, c)
        for c in MARKET_COLUMNS
    )


def market_row(record: Mapping[str, Any]) -> MarketRow:
    values = {c: record[c] for c in MARKET_COLUMNS}
    for column in NUMERIC_COLUMNS:
        values[column] = int(values[column])
    return MarketRow(**values)


def header_values(header: BlockHeader) -> tuple[Any, ...]:
    return (header.number, header.hash, header.parent_hash, header.timestamp)


def columns(rows: Iterable[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to one list per column (what `unnest` takes); `width` lists when there are none."""
    transposed = [list(column) for column in zip(*rows, strict=True)]
    return transposed or [[] for _ in range(width)]
