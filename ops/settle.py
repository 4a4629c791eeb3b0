"""`kektech settle`: whether every PM2 process stays online, unrestarted, for a while.

What `deploy/update.sh` waits for after a reload before it saves the process list. PM2's reload
does not tell: a process that dies before it is ready counts as reloaded, and `pm2
startOrReload` exits 0 while the new release crash-loops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ops.probes.pm2 import Pm2Process

__all__ = ["Problem", "Settled", "watch"]

POLL_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Problem:
    """What went wrong, and with which app (None: with PM2 itself)."""

    app: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Settled:
    """The outcome: `problems` empty when every process stayed online without a restart."""

    processes: int
    problems: tuple[Problem, ...]


async def watch(
    list_processes: Callable[[], Awaitable[Sequence[Pm2Process]]],
    *,
    seconds: float,
    poll: float = POLL_INTERVAL,
) -> Settled:
    """Sample the process list every `poll` s for `seconds`; stop at the first problem.

    A problem: no process at all, a process that is not online, one restarted (its restart
    count moved) or one gone since the first sample.
    """
    first = {p.key: p for p in await list_processes()}
    if not first:
        return Settled(0, (Problem(None, "PM2 runs no process"),))
    deadline = time.monotonic() + seconds
    latest = first
    while True:
        problems = _problems(first, latest)
        if problems or time.monotonic() >= deadline:
            return Settled(len(first), problems)
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        latest = {p.key: p for p in await list_processes()}


def _problems(first: dict[str, Pm2Process], latest: dict[str, Pm2Process]) -> tuple[Problem, ...]:
    found = []
    for key, before in first.items():
        now = latest.get(key)
        if now is None:
            found.append(Problem(before.name, f"{key} is gone from the process list"))
        elif now.status != "online":
            found.append(Problem(before.name, f"{key} is {now.status} ({now.restarts} restarts)"))
        elif now.restarts != before.restarts:
            found.append(
                Problem(
                    before.name, f"{key} restarted ({before.restarts} -> {now.restarts} restarts)"
                )
            )
    return tuple(found)
