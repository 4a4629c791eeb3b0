"""Background work for the length of a block, which cannot outlive it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

T = TypeVar("T")


@asynccontextmanager
async def background(
    coro: Coroutine[Any, Any, T], *, name: str | None = None
) -> AsyncIterator[asyncio.Task[T]]:
    """Run `coro` as a task for the block; when the block ends, failed or not, the task is
    cancelled and awaited, so it cannot go on into later tests (a loop reading Redis, a
    driver mining blocks). Its outcome is the block's to check: await the task in it, or
    read its result."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])
