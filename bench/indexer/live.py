"""Live latency: from a mined block to the first Redis Pub/Sub message of its events.

Blocks are mined one at a time at random intervals (uniform 0.1-0.6 s), so the samples fall
at every phase of the indexer's poll loop rather than locking onto it. The clock is this
process's `perf_counter`, read right after `evm_mine` returns and right after a message
arrives on a pattern subscription to `events:*` (every event is published on one of those).

Before the samples, `settle_writes` flushes what the catch-up left to write (a Postgres
CHECKPOINT, then sync(2)). Without it, the kernel's write-back of the catch-up's data (every
5 s, `vm.dirty_writeback_centisecs`) stalled the live batches' commit fsyncs by 150-360 ms
in the first ~20 s (traced: the stalls were the commits, 5 s apart), which measured the disk
right after a bulk load rather than the indexer following the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from devnet.chain import DevChain
from devnet.driver import ActivityDriver

PATTERN = "events:*"
MIN_GAP = 0.1
MAX_GAP = 0.6
# How long to wait for the last blocks' events after the last block was mined.
SETTLE_TIMEOUT = 10.0


class TimedChain(DevChain):
    """A DevChain that notes when `evm_mine` returned and which block was mined last."""

    def __init__(self, rpc_url: str) -> None:
        super().__init__(rpc_url)
        self.mined_at = 0.0
        self.mined_block = -1

    async def request(self, method: str, params: Sequence[Any]) -> Any:
        result = await super().request(method, params)
        if method == "evm_mine":
            self.mined_at = time.perf_counter()
        return result

    async def mine(self) -> dict[str, Any]:
        block = await super().mine()
        self.mined_block = int(block["number"])
        return block


@dataclass(frozen=True, slots=True)
class Live:
    """Per-block latencies in milliseconds, and how many blocks never showed up."""

    latencies_ms: list[float]
    missing: int
    txs_per_block: int
    messages: int  # Pub/Sub messages received on events:*
    settle_seconds: float | None  # what settle_writes took before the samples; None: skipped
    # The indexer's CONFIRMATIONS: a block's latency runs from the mining of the block that
    # many above it, the one that lets the indexer take it.
    confirmations: int = 0

    def missing_text(self) -> str:
        samples = len(self.latencies_ms) + self.missing
        return f"{self.missing} of {samples} blocks never published"

    def summary(self) -> dict[str, float]:
        values = sorted(self.latencies_ms)
        if len(values) < 2:
            return {}
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return {
            "min": values[0],
            "p50": cuts[49],
            "p95": cuts[94],
            "p99": cuts[98],
            "max": values[-1],
            "mean": statistics.fmean(values),
        }


class _Arrivals:
    """When the first Pub/Sub message of each block arrived."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.messages = 0
        self.complete = asyncio.Event()
        self._wanted: set[int] | None = None

    def note(self, block: int, at: float) -> None:
        self.messages += 1
        self.first.setdefault(block, at)
        self._check()

    def expect(self, blocks: set[int]) -> None:
        """Set `complete` once every block in `blocks` has arrived."""
        self._wanted = blocks
        self._check()

    def _check(self) -> None:
        if self._wanted is not None and self._wanted <= self.first.keys():
            self.complete.set()


async def _listen(pubsub: PubSub, arrivals: _Arrivals) -> None:
    """Record the arrival of every event message. Safe to cancel."""
    async for message in pubsub.listen():
        now = time.perf_counter()
        if message["type"] == "pmessage":
            arrivals.note(int(orjson.loads(message["data"])["blockNumber"]), now)


async def settle_writes(database_url: str) -> float:
    """Write out what Postgres and the kernel still hold dirty; returns the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    await asyncio.to_thread(os.sync)
    return time.perf_counter() - started


async def measure_live(
    driver: ActivityDriver,
    chain: TimedChain,
    redis_url: str,
    *,
    samples: int,
    txs_per_block: int,
    seed: int,
    settle_seconds: float | None,
    confirmations: int = 0,
) -> Live:
    """Mine `samples` blocks of `txs_per_block` transactions and time their publication.

    An indexer with `confirmations` N publishes a block once N more follow it: N more blocks
    are mined after the samples, and each sample is timed from the mining of the block N
    above it, as the poll that can take it comes after that.
    """
    rng = random.Random(seed)
    arrivals = _Arrivals()
    mined: dict[int, float] = {}
    driver.txs_per_block = txs_per_block
    client = aioredis.Redis.from_url(redis_url)
    try:
        pubsub = client.pubsub()
        await pubsub.psubscribe(PATTERN)
        async with asyncio.TaskGroup() as tasks:
            listener = tasks.create_task(_listen(pubsub, arrivals), name="listen-pubsub")
            for _ in range(samples + confirmations):
                await driver.run(blocks=1)
                mined[chain.mined_block] = chain.mined_at
                await asyncio.sleep(rng.uniform(MIN_GAP, MAX_GAP))
            sampled = sorted(mined)[:samples]
            arrivals.expect(set(sampled))
            # Blocks still missing then are counted (`missing`), and fail the live goals.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_TIMEOUT):
                    await arrivals.complete.wait()
            listener.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
    finally:
        await client.aclose()
    first = arrivals.first
    latencies = [(first[b] - mined[b + confirmations]) * 1000 for b in sampled if b in first]
    return Live(
        latencies_ms=latencies,
        missing=len(sampled) - len(latencies),
        txs_per_block=txs_per_block,
        messages=arrivals.messages,
        settle_seconds=settle_seconds,
        confirmations=confirmations,
    )
