"""Waiting on conditions in other processes (Redis, Postgres, a subprocess) with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL_INTERVAL = 0.05


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll `check` until it returns True; TimeoutError naming `what` after `within` seconds.

    Polling, not an event: the condition lives in another process that cannot notify us.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError(f"not true after {within}s: {what}")
        await asyncio.sleep(POLL_INTERVAL)
