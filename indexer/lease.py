"""The write lease: its row in the database, and how long this process knows it holds it.

The database says who holds the lease, and fences every commit with it (`fence`, in the
transactions of batch_commit.py, rollback.py and cursor.py). No fence reaches Redis, though:
the publisher writes there only while the lease's last renewal is younger than LEASE_TTL. A
process paused past that (SIGSTOP, a frozen VM) may have been replaced by a standby that has
published since; when it resumes, its publisher waits for the next renewal, which fails with
LeaseLost, and the service stops, if the lease was taken.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from datetime import datetime

from indexer.database import Connection, Database, StatementError
from indexer.errors import LeaseLost, StoreError


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to write, as granted by the database: owner plus fencing token."""

    owner: str
    token: int


async def try_acquire_lease(
    db: Database, owner: str, ttl: float, *, steal_from: str | None = None
) -> Lease | None:
    """Take the write lease if it is free, expired, ours, or held by `steal_from`."""
    token = await db.fetchval(
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


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """The lease row as `status` and a starting indexer read it: who last took the lease,
    until when, and whether that term has ended by the database's clock (the one that
    judges it, not this host's)."""

    owner: str | None
    expires_at: datetime | None
    expired: bool


async def lease_holder(db: Database) -> LeaseHolder:
    """Who holds the lease, until when, and whether the term has ended, in one read."""
    row = await db.fetchrow(
        "SELECT owner, expires_at, expires_at < clock_timestamp() AS expired"
        " FROM indexer_lease WHERE id = 1"
    )
    if row is None:
        return LeaseHolder(owner=None, expires_at=None, expired=True)
    return LeaseHolder(row["owner"], row["expires_at"], bool(row["expired"]))


async def renew_lease(db: Database, lease: Lease, ttl: float) -> None:
    """Extend the lease; LeaseLost if another instance took it."""
    async with db.connection() as conn:
        await fence(conn, lease, ttl)


async def release_lease(db: Database, lease: Lease) -> None:
    """Give the lease up at a clean stop so a standby can start at once."""
    try:
        await db.execute(
            "UPDATE indexer_lease SET owner = NULL, expires_at = '-infinity'"
            " WHERE id = 1 AND owner = $1 AND token = $2",
            lease.owner,
            lease.token,
        )
    except (StatementError, StoreError) as exc:
        raise StoreError(f"releasing the lease failed: {exc}") from exc


async def fence(conn: Connection, lease: Lease, ttl: float) -> None:
    """Renew the lease in conn's transaction, locking its row to the commit; LeaseLost if it
    is not ours.

    Ours means our owner and token, whatever `expires_at` says: every takeover takes a new
    token, and while this transaction holds the row none can happen, so a transaction kept
    waiting past LEASE_TTL (on a lock, a slow disk) still commits what it wrote under the
    lease. Expiry only tells a standby when it may take the lease over.
    """
    ok = await conn.fetchval(
        "UPDATE indexer_lease SET expires_at = clock_timestamp() + make_interval(secs => $3)"
        " WHERE id = 1 AND owner = $1 AND token = $2 RETURNING 1",
        lease.owner,
        lease.token,
        ttl,
    )
    if ok is None:
        raise LeaseLost(lease.owner)


class LeaseTerm:
    """Until when the lease is known held: LEASE_TTL after its last renewal was sent."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._until = -math.inf
        self._renewed = asyncio.Event()

    @staticmethod
    def now() -> float:
        """The clock of `renewed` (monotonic: it keeps running while the process is stopped)."""
        return time.monotonic()

    def renewed(self, sent: float) -> None:
        """The lease was taken or renewed by a statement sent at `sent` (now()).

        From when it was sent, not answered: the database counts LEASE_TTL from when it ran
        the statement, a moment later, so the term ends before the lease at the latest.
        """
        self._until = max(self._until, sent + self.ttl)
        self._renewed.set()

    def held(self) -> bool:
        return time.monotonic() < self._until

    def lapsed_for(self) -> float | None:
        """Seconds since the last renewal was sent, once the term has ended (None while it
        holds, or before the first renewal): a standby may have taken the lease since."""
        if self._until == -math.inf or self.held():
            return None
        return time.monotonic() - (self._until - self.ttl)

    async def wait_held(self) -> None:
        """Return once a renewal makes the lease known held again. Safe to cancel."""
        while not self.held():
            self._renewed.clear()
            await self._renewed.wait()
