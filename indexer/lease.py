"""How long this process knows it holds the write lease, by its own clock.

The database says who holds the lease, and fences every commit with it (indexer/store.py).
No fence reaches Redis, though: the publisher writes there only while the lease's last renewal
is younger than LEASE_TTL. A process paused past that (SIGSTOP, a frozen VM) may have been
replaced by a standby that has published since; when it resumes, its publisher waits for the
next renewal, which fails with LeaseLost, and the service stops, if the lease was taken.
"""

from __future__ import annotations

import asyncio
import math
import time


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

    async def wait_held(self) -> None:
        """Return once a renewal makes the lease known held again. Safe to cancel."""
        while not self.held():
            self._renewed.clear()
            await self._renewed.wait()
