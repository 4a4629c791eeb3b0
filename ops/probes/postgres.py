"""Postgres: reachable, writable, which migrations are applied, where the indexer's cursor
stands."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from indexer.cursor import load_state
from indexer.database import Database
from indexer.errors import StoreError
from indexer.schema import latest_schema_version, schema_version
from indexer.sources import backfills_needed, indexed_from
from ops.errors import ProbeError

__all__ = ["DatabaseInfo", "probe_postgres"]


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """Schema version applied, the version this code ships, the cursor (None if unset),
    whether the database takes writes, where it began and the contracts added after that
    which still need a backfill ((address, kind, followed from block), once migrated)."""

    schema_version: int
    latest_version: int
    cursor: int | None
    read_only: bool
    began: int | None = None
    backfills: tuple[tuple[str, str, int], ...] = ()


async def probe_postgres(dsn: str, *, statement_cache_size: int, within: float) -> DatabaseInfo:
    """Connect and read schema_migrations (the indexer's record of applied migrations)."""
    try:
        async with (
            asyncio.timeout(within),
            Database.open(
                dsn,
                statement_cache_size=statement_cache_size,
                max_size=1,
                command_timeout=within,
            ) as db,
        ):
            version = await schema_version(db)
            state = await load_state(db) if version > 0 else None
            # A session's own transactions: read-only on a standby (in recovery) and where
            # default_transaction_read_only is on (Supabase's read-only mode sets it).
            read_only = await db.fetchval("SELECT current_setting('transaction_read_only')")
            migrated = state is not None and version == latest_schema_version()
            began = await indexed_from(db) if migrated else None
            backfills = await backfills_needed(db, began) if began is not None else []
    except TimeoutError:
        raise ProbeError(f"no answer within {within:g} s") from None
    except (StoreError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if isinstance(exc, StoreError) and exc.__cause__ is None:
            raise ProbeError(str(exc)) from None  # connected, and found what it says
        if isinstance(exc, StoreError):
            exc = exc.__cause__  # the driver's own error names the cause
        message = getattr(exc, "strerror", None) or str(exc)
        raise ProbeError(f"cannot connect: {type(exc).__name__}: {message}") from None
    return DatabaseInfo(
        schema_version=version,
        latest_version=latest_schema_version(),
        cursor=state.block_number if state is not None else None,
        read_only=read_only == "on",
        began=began,
        backfills=tuple(backfills),
    )
