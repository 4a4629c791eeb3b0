"""The schema: the migrations in indexer/migrations/, applied in order, and the version applied."""

from __future__ import annotations

import re
from importlib import resources

import structlog

from indexer.database import Connection, Database
from indexer.errors import StoreError

log = structlog.get_logger()

MIGRATIONS_PACKAGE = "indexer.migrations"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Arbitrary constant: serializes concurrent migrators (transaction-scoped, pooler-safe).
MIGRATION_LOCK_KEY = 0x6B656B74


# The columns of our schema_migrations table, as information_schema names their types.
OUR_COLUMNS = {"version": "integer", "name": "text", "applied_at": "timestamp with time zone"}


async def _check_ours(conn: Connection | Database) -> bool:
    """Whether the schema_migrations table exists; StoreError if it is another application's
    (golang-migrate, Rails, Flyway... name theirs so too): DATABASE_URL names the wrong
    database, which is left as it is."""
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
    )
    found = {r["column_name"]: r["data_type"] for r in rows}
    if found and found != OUR_COLUMNS:
        columns = ", ".join(f"{name} {kind}" for name, kind in sorted(found.items()))
        raise StoreError(
            f"the database has a schema_migrations table of another application ({columns}):"
            " DATABASE_URL must name KEKTECH's own database"
        )
    return bool(found)


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(db: Database) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns their names."""
    applied: list[str] = []
    async with db.connection() as conn:
        for version, name, sql in _migrations():
            async with conn.transaction():
                # Bounded on the server like every transaction (Database.transaction), as
                # the lock held here would stop every later start. No server-side
                # statement_timeout: DB_COMMAND_TIMEOUT already bounds each statement on
                # this side, and the server ends it when the connection goes.
                await conn.execute(
                    f"{db.idle_bound}; SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
                )
                await _check_ours(conn)
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


async def schema_version(db: Database) -> int:
    """The highest applied migration (0 when none)."""
    if not await _check_ours(db):
        return 0
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


def latest_schema_version() -> int:
    return _migrations()[-1][0]
