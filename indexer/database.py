"""The Postgres connection pool, with every wait on the database bounded.

A dead network path to the database (a half-open socket, a frozen pooler, a partition) answers
nothing and closes nothing. asyncpg would then wait without limit in three places: a statement
(bounded by `command_timeout`), the return to the pool of a connection whose statement was
cancelled or timed out (it waits for the server to acknowledge the cancel), and closing the
pool (it waits for each connection's goodbye). Here a connection whose work failed or was
cancelled is dropped instead of returned, and closing is bounded. So a stop (PM2's SIGINT)
ends in seconds, and a stalled statement surfaces as a StoreError that takes the service down
for PM2 to restart, instead of a hang.

The indexer's only module that speaks asyncpg: those that read and write its tables
(schema.py, lease.py, cursor.py, sources.py, batch_commit.py, rollback.py, market_rebuild.py,
outbox.py, queries.py) take a Database, or a connection typed by the Connection protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeAlias

import asyncpg
import orjson
import structlog

from indexer.errors import DatabaseUnavailable, StoreError

log = structlog.get_logger()

# Returning a healthy connection to the pool (no I/O expected: see _keep_session).
RELEASE_TIMEOUT = 2.0
# Closing the pool at shutdown, after which the connections left are dropped.
CLOSE_TIMEOUT = 2.0
# Seconds to establish a connection (TCP, TLS, authentication), DB_COMMAND_TIMEOUT if lower:
# a server that accepts and never answers is then said within seconds (start-up's wait and
# /healthz), not after DB_COMMAND_TIMEOUT, 60 s by default, as long as PM2's listen_timeout.
CONNECT_TIMEOUT = 10.0
# Postgres's timeouts are ints of milliseconds: a larger DB_COMMAND_TIMEOUT bounds at this.
POSTGRES_MAX_TIMEOUT_MS = 2**31 - 1
# Errors of the connection rather than of a statement: the database is unreachable or the
# link died. A statement's own error (a PostgresError) is a bug here, so it passes unchanged.
LINK_ERRORS = (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
# The server ended or cancelled the work (57014: statement_timeout, as DB_COMMAND_TIMEOUT
# sets it, or pg_cancel_backend; 57P01-57P05: shutdown, termination, idle_session_timeout),
# or asyncpg met the goodbye of a server that ended an idle pooled connection in the middle of
# the next call ("cannot switch to state ..."): the database is unavailable, not a statement
# of ours wrong.
ENDED_ERRORS = (asyncpg.OperatorInterventionError, asyncpg.InternalClientError)
# Refusals of a connection that pass by themselves: the server is starting up or shutting
# down (57P01, 57P03), or has no connection slot free (53300).
BUSY_ERRORS = (asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError)
# Connection settings that cannot work, whatever the server does: a bad DATABASE_URL
# parameter, a certificate file that is not there or not readable, TLS that does not verify.
SETTINGS_ERRORS = (
    asyncpg.ClientConfigurationError,
    FileNotFoundError,
    PermissionError,
    ssl.SSLCertVerificationError,
)
# A statement's own error, for the modules that must not import asyncpg to catch it.
StatementError: TypeAlias = asyncpg.PostgresError
# A row as asyncpg returns it: by column name or by position.
Record: TypeAlias = asyncpg.Record


class Connection(Protocol):
    """What the other modules use of a connection (asyncpg's), so they need not import it."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def fetch(self, query: str, *args: Any) -> list[Record]: ...

    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Reset on release: nothing beyond asyncpg's own rollback of an open transaction.

    The indexer sets no session state (no SET, LISTEN, cursors or session locks), so the
    default reset (RESET ALL and friends) would only cost a round trip per release, which
    lies on the live path: the publisher is woken once the batch's connection is back.
    """


class Database:
    """A small asyncpg pool for one process; see the module docstring for its bounds."""

    def __init__(self, pool: asyncpg.Pool, *, command_timeout: float) -> None:
        self._pool = pool
        self.command_timeout = command_timeout
        # A dead path may leave the server's side open, inside a transaction that holds the
        # cursor's and the lease's row locks; the server keeps such a session until TCP
        # keepalive gives up (about 2 h by default), and every restart would wait on those
        # locks. Bounded here, per transaction (SET LOCAL: also through a transaction pooler,
        # which refuses such settings at connection start-up), in the same round trip as BEGIN.
        bound_ms = max(1, int(min(command_timeout * 1000, POSTGRES_MAX_TIMEOUT_MS)))
        self.idle_bound = f"SET LOCAL idle_in_transaction_session_timeout = {bound_ms}"
        self._begin = f"BEGIN; {self.idle_bound}; SET LOCAL statement_timeout = {bound_ms}"

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        statement_cache_size: int = 100,
        max_size: int = 4,
        command_timeout: float,
    ) -> AsyncIterator[Database]:
        """Connect a small pool. statement_cache_size=0 for PgBouncer/Supavisor transaction mode;
        command_timeout: seconds a statement may take (DB_COMMAND_TIMEOUT for the services)."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                statement_cache_size=statement_cache_size,
                init=_init_connection,
                reset=_keep_session,
                command_timeout=command_timeout,
                timeout=min(command_timeout, CONNECT_TIMEOUT),
            )
        except SETTINGS_ERRORS as exc:
            raise StoreError(f"database connection settings do not work: {exc}") from exc
        except LINK_ERRORS as exc:
            raise DatabaseUnavailable(
                f"database unreachable: {str(exc) or type(exc).__name__}"
            ) from exc
        except BUSY_ERRORS as exc:
            raise DatabaseUnavailable(f"database refused the connection for now: {exc}") from exc
        except asyncpg.PostgresError as exc:  # no such database or role, authentication
            raise StoreError(f"database refused the connection: {exc}") from exc
        try:
            yield cls(pool, command_timeout=command_timeout)
        finally:
            try:
                # On any error, cancellation included, close() terminates the pool itself.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await pool.close()
            except TimeoutError:
                log.warning("database connections did not close in time: dropped them")

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a lost link or a stalled statement becomes a StoreError.

        When the block fails, cancellation included, the connection is dropped rather than
        returned: the server then rolls back whatever transaction was open, and nothing waits
        on a link that may be dead (asyncpg would first wait for the cancel of the statement
        in flight, then roll back). A reconnect is the price, paid only after a failure.
        """
        try:
            conn = await self._pool.acquire()
            try:
                yield conn
            except BaseException:
                # A connection the server ended is already out of the pool (asyncpg detached
                # it): touching it raises an InterfaceError that would hide the real reason.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                raise
            finally:
                with contextlib.suppress(asyncpg.InterfaceError):
                    await self._pool.release(conn, timeout=RELEASE_TIMEOUT)
        except (*LINK_ERRORS, *ENDED_ERRORS) as exc:
            raise DatabaseUnavailable(
                f"database call failed: {str(exc) or type(exc).__name__}"
            ) from exc
        # The server takes no such work for now: it is read-only (25006: a hot standby after
        # a failover, Supabase's read-only mode once its disk is nearly full) or out of a
        # resource (class 53: disk full, out of memory, no connection slot left for the
        # pool's next connection). No statement of ours is wrong: unavailable, as unreachable.
        except asyncpg.ReadOnlySQLTransactionError as exc:
            raise DatabaseUnavailable(f"database is read-only for now: {exc}") from exc
        except asyncpg.InsufficientResourcesError as exc:
            raise DatabaseUnavailable(f"database is out of resources: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction, committed if the block ends without an error.

        On an error the connection is dropped (see connection()), which rolls back; the server
        itself ends the transaction if the link is dead and its side stays open (__init__).
        """
        async with self.connection() as conn:
            await conn.execute(self._begin)
            yield conn
            await conn.execute("COMMIT")

    async def copy(
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
        async with asyncio.timeout(self.command_timeout):
            await conn.copy_records_to_table(table, records=rows, columns=columns)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            status: str = await conn.execute(query, *args)
            return status
